"""The Sandbox class: create, use and kill PandaStack sandboxes."""

from __future__ import annotations

import json
import warnings
from typing import Any, Callable, Dict, List, Literal, Mapping, Optional, Sequence, Union, overload

from ._http import DEFAULT_REQUEST_TIMEOUT, HTTPClient, path_escape, str_map
from .errors import (NotFoundError, PandaStackConnectionError, PandaStackError, ServerError,
                     error_from_code)
from .code import CodeMixin
from .files import Files
from .models import ExecResult, SandboxInfo
from .network import NetworkMixin, NetworkSpec, network_body
from .processes import Process, Processes
from .snapshot import Snapshot

DEFAULT_TEMPLATE = "base"


class _DefaultTimeout(float):
    """The default of exec's ``timeout_seconds``, told apart by identity: a
    background process has no timeout unless one is passed."""


DEFAULT_EXEC_TIMEOUT = _DefaultTimeout(60.0)
# Extra seconds the HTTP read timeout of an exec allows beyond the command's
# own timeout: the server needs time to start, kill and report.
EXEC_TIMEOUT_MARGIN = 30.0

OutputCallback = Callable[[str], Any]


class Sandbox(CodeMixin, NetworkMixin):
    """A handle on one sandbox.

    Make one with :meth:`create` or :meth:`connect`. As a context manager it
    kills the sandbox on exit::

        with Sandbox.create(template="code-interpreter") as sb:
            print(sb.exec("echo hi").stdout)
    """

    def __init__(self, info: SandboxInfo, client: HTTPClient):
        self._info = info
        self._client = client

    # ----- constructors -----------------------------------------------------

    @classmethod
    def create(cls, template: Optional[str] = None, ttl_seconds: Optional[int] = None,
               env: Optional[Mapping[str, str]] = None,
               metadata: Optional[Mapping[str, str]] = None,
               cpu: Optional[float] = None, memory_mb: Optional[int] = None,
               snapshot_id: Optional[str] = None, on_timeout: Optional[str] = None,
               disk_mb: Optional[int] = None, pids: Optional[int] = None, *,
               network: Optional[NetworkSpec] = None, public_ports: Optional[bool] = None,
               url: Optional[str] = None, api_key: Optional[str] = None,
               request_timeout: Optional[float] = DEFAULT_REQUEST_TIMEOUT) -> "Sandbox":
        """Start a new sandbox and return it once it is running.

        It boots from ``template`` ("base" by default), or with
        ``snapshot_id`` continues from that snapshot (see :meth:`snapshot`):
        its processes go on where they were, and ``template`` may then only
        be left out or name the snapshot's template.

        ``ttl_seconds``, ``cpu``, ``memory_mb``, ``disk_mb`` (writable root
        layer) and ``pids`` (processes inside) default to the server's
        defaults (300 s, 1 CPU, 1024 MiB, 2048 MiB, 512). ``env`` is set for every command,
        ``metadata`` is stored with the sandbox. ``on_timeout`` is what the
        TTL does: "kill" (the server's default) or "pause", which keeps the
        sandbox paused until it is resumed or killed.

        ``network`` gives the sandbox a network: "none" (no egress, but its
        ports can be reached: :meth:`get_url`), "internet" (any public
        address) or ``{"allow": ["10.1.2.3/32", "*.pypi.org:443"], "deny": [...]}``
        (see :mod:`pandastack.network`); left out, it has none at all.
        ``public_ports=True`` lets anyone reach its ports without a token.
        """
        client = HTTPClient(url, api_key, request_timeout)
        body: Dict[str, Any] = {}
        if template is not None:
            body["template"] = template
        elif snapshot_id is None:
            body["template"] = DEFAULT_TEMPLATE
        if snapshot_id is not None:
            body["snapshot_id"] = snapshot_id
        if on_timeout is not None:
            body["on_timeout"] = on_timeout
        if ttl_seconds is not None:
            body["ttl_seconds"] = ttl_seconds
        if env is not None:
            body["env"] = str_map(env)
        if metadata is not None:
            body["metadata"] = str_map(metadata)
        if cpu is not None:
            body["cpu"] = cpu
        if memory_mb is not None:
            body["memory_mb"] = memory_mb
        if disk_mb is not None:
            body["disk_mb"] = disk_mb
        if pids is not None:
            body["pids"] = pids
        net = network_body(network, public_ports)
        if net is not None:
            body["network"] = net
        doc = client.call("POST", "/v1/sandboxes", body)
        return cls(_sandbox_info(doc, client), client)

    @classmethod
    def connect(cls, id: str, *, url: Optional[str] = None, api_key: Optional[str] = None,
                request_timeout: Optional[float] = DEFAULT_REQUEST_TIMEOUT) -> "Sandbox":
        """Attach to an existing sandbox by id (raises NotFoundError if there is none).

        A paused sandbox is resumed, so that the handle is ready for use.
        """
        client = HTTPClient(url, api_key, request_timeout)
        doc = client.call("GET", "/v1/sandboxes/" + path_escape(id))
        sb = cls(_sandbox_info(doc, client), client)
        if sb._info.state == "paused":
            sb.resume()
        return sb

    @classmethod
    def list(cls, *, url: Optional[str] = None, api_key: Optional[str] = None,
             request_timeout: Optional[float] = DEFAULT_REQUEST_TIMEOUT) -> List[SandboxInfo]:
        """The caller's sandboxes, running and paused."""
        client = HTTPClient(url, api_key, request_timeout)
        doc = client.call("GET", "/v1/sandboxes")
        if not isinstance(doc, dict) or not isinstance(doc.get("sandboxes", []), (list, type(None))):
            raise ServerError("GET %s/v1/sandboxes: unexpected answer %r" % (client.base_url, doc))
        return [_sandbox_info(item, client) for item in (doc.get("sandboxes") or [])]

    # ----- state ------------------------------------------------------------

    @property
    def id(self) -> str:
        return self._info.id

    @property
    def info(self) -> SandboxInfo:
        """What the server last said about this sandbox; :meth:`refresh` asks again.

        An exec that resumed a paused sandbox does not update it.
        """
        return self._info

    @property
    def url(self) -> str:
        """The server this handle talks to."""
        return self._client.base_url

    @property
    def files(self) -> Files:
        """The sandbox's files: ``sb.files.write(path, data)``, ``read``, ``list``, ... (see :class:`Files`)."""
        return Files(self._client, self._path())

    @property
    def processes(self) -> Processes:
        """The sandbox's background processes: ``list()``, ``connect(pid)``, ``start(...)`` (see :class:`Processes`)."""
        return Processes(self._client, self._path())

    def refresh(self) -> SandboxInfo:
        """Fetch the sandbox's current description, store it in :attr:`info` and return it."""
        doc = self._client.call("GET", self._path())
        self._info = _sandbox_info(doc, self._client)
        return self._info

    def set_timeout(self, seconds: int) -> SandboxInfo:
        """Make the sandbox expire ``seconds`` from now; returns the updated :attr:`info`."""
        doc = self._client.call("POST", self._path("/timeout"), {"ttl_seconds": seconds})
        self._info = _sandbox_info(doc, self._client)
        return self._info

    def pause(self) -> SandboxInfo:
        """Save the sandbox's memory and processes to disk and stop them.

        Frees their memory; the TTL stops counting. Pausing a paused sandbox
        does nothing. :meth:`resume`, an exec and :meth:`connect` resume it.
        Returns the updated :attr:`info` (state "paused", ``paused_bytes``).
        """
        doc = self._client.call("POST", self._path("/pause"))
        self._info = _sandbox_info(doc, self._client)
        return self._info

    def resume(self) -> SandboxInfo:
        """Restore a paused sandbox where it stopped; its TTL starts again from now.

        Resuming a running sandbox does nothing. Returns the updated :attr:`info`.
        """
        doc = self._client.call("POST", self._path("/resume"))
        self._info = _sandbox_info(doc, self._client)
        return self._info

    def metrics(self) -> "SandboxMetrics":
        """The sandbox's recent usage samples (CPU, memory, disk, processes).

        The server samples each running sandbox every ``interval_seconds``
        and keeps the latest samples, oldest first.
        """
        from .models import SandboxMetrics

        doc = self._client.call("GET", self._path("/metrics"))
        return SandboxMetrics.from_dict(doc)

    def snapshot(self) -> Snapshot:
        """Save the sandbox's memory and writable files as a new :class:`Snapshot`.

        The sandbox keeps running. ``Sandbox.create(snapshot_id=snap.id)``
        starts sandboxes from the snapshot; it is kept until deleted.
        """
        doc = self._client.call("POST", self._path("/snapshot"))
        return Snapshot.from_json(doc, self._client)

    def fork(self, count: int = 1, ttl_seconds: Optional[int] = None) -> List["Sandbox"]:
        """Copy the running sandbox ``count`` times (1 to 16); the parent keeps running.

        Each fork starts with the parent's processes, memory and files as
        they are now, but has its own id, TTL, writable layer and fresh
        randomness. ``ttl_seconds`` defaults to the parent's TTL setting.
        The caller owns the forks: kill them when done.
        """
        body: Dict[str, Any] = {"count": count}
        if ttl_seconds is not None:
            body["ttl_seconds"] = ttl_seconds
        doc = self._client.call("POST", self._path("/fork"), body)
        if not isinstance(doc, dict) or not isinstance(doc.get("sandboxes"), list):
            raise ServerError("fork of %s: unexpected answer %r" % (self.id, doc))
        cls = type(self)
        return [cls(_sandbox_info(item, self._client), self._client) for item in doc["sandboxes"]]

    def kill(self) -> None:
        """Stop and remove the sandbox. Killing it again raises NotFoundError."""
        self._client.call("DELETE", self._path())
        self._info.state = "stopped"

    # ----- exec -------------------------------------------------------------

    @overload
    def exec(self, cmd: Union[str, Sequence[str]], timeout_seconds: Optional[float] = ...,
             env: Optional[Mapping[str, str]] = ..., cwd: Optional[str] = ...,
             stdin: Optional[Union[str, bytes]] = ...,
             on_stdout: Optional[OutputCallback] = ...,
             on_stderr: Optional[OutputCallback] = ...,
             user: Optional[str] = ..., *, background: Literal[False] = ...,
             tag: None = ...) -> ExecResult: ...

    @overload
    def exec(self, cmd: Union[str, Sequence[str]], timeout_seconds: Optional[float] = ...,
             env: Optional[Mapping[str, str]] = ..., cwd: Optional[str] = ...,
             stdin: Optional[Union[str, bytes, bool]] = ...,
             on_stdout: None = ..., on_stderr: None = ...,
             user: Optional[str] = ..., *, background: Literal[True],
             tag: Optional[str] = ...) -> Process: ...

    def exec(self, cmd: Union[str, Sequence[str]], timeout_seconds: Optional[float] = DEFAULT_EXEC_TIMEOUT,
             env: Optional[Mapping[str, str]] = None, cwd: Optional[str] = None,
             stdin: Optional[Union[str, bytes, bool]] = None,
             on_stdout: Optional[OutputCallback] = None,
             on_stderr: Optional[OutputCallback] = None,
             user: Optional[str] = None, *, background: bool = False,
             tag: Optional[str] = None) -> Union[ExecResult, Process]:
        """Run a command in the sandbox and wait for it to exit.

        ``cmd`` is a string run by ``/bin/sh -c`` or a list of arguments run
        directly. A command past ``timeout_seconds`` is killed and the result
        has ``timed_out=True`` and ``exit_code=124``. With ``on_stdout`` or
        ``on_stderr`` the output is streamed: each callback gets every chunk
        of text as it is produced, and the returned result still holds all of
        it. Commands run as the unprivileged ``user`` (home and default
        working directory ``/home/user``) unless ``user="root"``.

        With ``background=True`` it returns at once a :class:`Process`
        handle (``pid``, ``tag``, ``wait()``, ``kill()``, ``signal()``,
        ``send_stdin()``, ``close_stdin()``, ``output()``): the command runs
        until it exits, whoever is attached (see :meth:`Processes.start`). It
        then has no timeout unless ``timeout_seconds`` is passed; ``stdin=True``
        keeps its input open for ``send_stdin``.
        """
        if background:
            if on_stdout is not None or on_stderr is not None:
                raise TypeError("on_stdout and on_stderr are for exec without background: "
                                "iterate the process's output() instead")
            return self.processes.start(
                cmd, env=env, cwd=cwd, user=user, tag=tag, stdin=stdin if stdin is not None else False,
                timeout_seconds=None if timeout_seconds is DEFAULT_EXEC_TIMEOUT else timeout_seconds)
        if tag is not None:
            raise TypeError("tag is for background processes (background=True)")
        body: Dict[str, Any] = {}
        if isinstance(cmd, str):
            body["cmd"] = cmd
        elif isinstance(cmd, (bytes, bytearray)):
            raise TypeError("cmd must be a str or a list of str, not bytes")
        else:
            argv = list(cmd)
            if not all(isinstance(a, str) for a in argv):
                raise TypeError("cmd as a list must hold only str, got %r" % (argv,))
            body["argv"] = argv
        if env is not None:
            body["env"] = str_map(env)
        if cwd is not None:
            body["cwd"] = cwd
        if stdin is not None:
            if isinstance(stdin, (bytes, bytearray)):
                stdin = bytes(stdin).decode("utf-8")
            body["stdin"] = stdin
        if timeout_seconds is not None:
            body["timeout_seconds"] = timeout_seconds
        if user is not None:
            body["user"] = user

        # The answer comes only when the command ends: wait longer than it may run.
        command_timeout = timeout_seconds if timeout_seconds is not None else DEFAULT_EXEC_TIMEOUT
        http_timeout = command_timeout + EXEC_TIMEOUT_MARGIN
        if self._client.request_timeout is not None:
            http_timeout = max(http_timeout, self._client.request_timeout)

        if on_stdout is None and on_stderr is None:
            doc = self._client.call("POST", self._path("/exec"), body, timeout=http_timeout)
            if not isinstance(doc, dict):
                raise ServerError("exec in %s: unexpected answer %r" % (self.id, doc))
            return ExecResult.from_json(doc)
        return self._exec_stream(body, http_timeout, on_stdout, on_stderr)

    def _exec_stream(self, body: Dict[str, Any], http_timeout: float,
                     on_stdout: Optional[OutputCallback],
                     on_stderr: Optional[OutputCallback]) -> ExecResult:
        client = self._client
        stdout: List[str] = []
        stderr: List[str] = []
        with client.open("POST", self._path("/exec"), body, timeout=http_timeout,
                         accept="application/x-ndjson") as resp:
            for raw in client.iter_lines("POST", resp):
                line = raw.strip()
                if not line:
                    continue
                try:
                    event = json.loads(line.decode("utf-8"))
                except (ValueError, UnicodeDecodeError):
                    raise ServerError("exec in %s: bad stream line %r" % (self.id, raw[:200])) from None
                if not isinstance(event, dict):
                    raise ServerError("exec in %s: bad stream event %r" % (self.id, event))
                kind = event.get("type")
                if kind == "stdout":
                    data = str(event.get("data") or "")
                    stdout.append(data)
                    if on_stdout is not None and data:
                        on_stdout(data)
                elif kind == "stderr":
                    data = str(event.get("data") or "")
                    stderr.append(data)
                    if on_stderr is not None and data:
                        on_stderr(data)
                elif kind == "exit":
                    result = ExecResult.from_json(event.get("result") or {})
                    # The exit event's own stdout/stderr are empty: they were streamed.
                    result.stdout = "".join(stdout) or result.stdout
                    result.stderr = "".join(stderr) or result.stderr
                    return result
                elif kind == "error":
                    err = event.get("error") or {}
                    raise error_from_code(err.get("code"), str(err.get("message") or "exec stream failed"),
                                          err.get("request_id") if isinstance(err.get("request_id"), str) else None)
                # Unknown event types are skipped: newer servers may add some.
        raise PandaStackConnectionError(
            "exec in %s: the stream from %s ended before the command's exit event"
            % (self.id, client.base_url), url=client.base_url)

    # ----- context manager --------------------------------------------------

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            self.kill()
        except NotFoundError:
            pass  # already killed or expired: the goal is reached
        except PandaStackError as e:
            if exc_type is None:
                raise
            # Do not hide the error that ended the block; the TTL reaps the sandbox.
            warnings.warn("could not kill sandbox %s: %s" % (self.id, e), RuntimeWarning, stacklevel=2)

    def __repr__(self) -> str:
        return "Sandbox(id=%r, template=%r, state=%r)" % (self._info.id, self._info.template, self._info.state)

    def _path(self, suffix: str = "") -> str:
        return "/v1/sandboxes/" + path_escape(self._info.id) + suffix


def _sandbox_info(doc: Any, client: HTTPClient) -> SandboxInfo:
    if not isinstance(doc, dict) or not doc.get("id"):
        raise ServerError("unexpected answer from %s, not a sandbox: %r" % (client.base_url, doc))
    try:
        return SandboxInfo.from_json(doc)
    except (TypeError, ValueError) as e:
        raise ServerError("unexpected sandbox from %s: %s" % (client.base_url, e)) from None
