"""PandaStack Python SDK: run untrusted code in gVisor sandboxes.

    from pandastack import Sandbox
    with Sandbox.create(template="code-interpreter", ttl_seconds=300) as sb:
        result = sb.exec("python3 -c 'print(sum(range(100)))'", timeout_seconds=30)
        print(result.stdout, result.exit_code)
        snap = sb.snapshot()    # also sb.fork(), sb.pause(), sb.resume()

    t = Template.build("myapp", "./myapp", tag="v1")   # from ./myapp/Dockerfile
    sb = Sandbox.create(template=t.ref)

The server URL and API key come from the arguments, else $PANDASTACK_URL and
$PANDASTACK_API_KEY, else http://127.0.0.1:7423 and the server's key file
($PANDASTACK_DATA_DIR/api-key, by default /var/lib/pandastack/api-key).
Standard library only; Python 3.9 or later.
"""

from ._http import __version__
from .errors import (AuthenticationError, ConflictError, InsufficientStorageError,
                     InvalidArgumentError, NotFoundError, PandaStackConnectionError, PandaStackError,
                     QuotaExceededError, ServerError, ServerTimeoutError, TooLargeError, UnavailableError)
from .code import CodeContext, Execution, ExecutionError, Logs, Result
from .files import FileEvent, FileInfo, Files, UploadResult, Watch
from .models import ExecResult, MetricsSample, NetworkInfo, SandboxInfo, SandboxMetrics
from .processes import OutputStream, Process, ProcessEvent, Processes, ProcessInfo, WaitTimeoutError
from .sandbox import Sandbox
from .snapshot import Snapshot
from .template import BuildError, Template, TemplateBuildEvent

__all__ = [
    "Sandbox",
    "SandboxInfo",
    "SandboxMetrics",
    "MetricsSample",
    "NetworkInfo",
    "Snapshot",
    "Template",
    "TemplateBuildEvent",
    "BuildError",
    "ExecResult",
    "Files",
    "FileInfo",
    "FileEvent",
    "UploadResult",
    "Watch",
    "Processes",
    "Process",
    "ProcessInfo",
    "ProcessEvent",
    "OutputStream",
    "WaitTimeoutError",
    "Execution",
    "ExecutionError",
    "Result",
    "Logs",
    "CodeContext",
    "PandaStackError",
    "InvalidArgumentError",
    "AuthenticationError",
    "NotFoundError",
    "ConflictError",
    "TooLargeError",
    "QuotaExceededError",
    "UnavailableError",
    "ServerTimeoutError",
    "InsufficientStorageError",
    "ServerError",
    "PandaStackConnectionError",
    "__version__",
]
