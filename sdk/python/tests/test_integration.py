"""Tests against a real PandaStack server.

Skipped unless PANDASTACK_URL is set (PANDASTACK_API_KEY, or the server's key
file, gives the key). With PANDASTACK_REQUIRE_SERVER=1 a missing
PANDASTACK_URL fails them instead. The whole file should take well under a
minute: it creates four sandboxes.
"""

import os
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone

import pytest

from pandastack import (AuthenticationError, InvalidArgumentError, NotFoundError, Sandbox,
                        SandboxInfo)

SDK_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# PATIENCE bounds every wait for something that must happen. It is generous:
# machines differ several-fold in speed, and the tests never assume how fast
# one is, only that it gets there.
PATIENCE = 600

SEED = """\
from pandastack import Sandbox
with Sandbox.create(template="code-interpreter", ttl_seconds=300) as sb:
    result = sb.exec("python3 -c 'print(sum(range(100)))'", timeout_seconds=30)
    print(result.stdout, result.exit_code)
"""


@pytest.fixture(scope="module", autouse=True)
def server_url():
    url = os.environ.get("PANDASTACK_URL")
    if not url:
        if os.environ.get("PANDASTACK_REQUIRE_SERVER") == "1":
            pytest.fail("PANDASTACK_REQUIRE_SERVER=1 but PANDASTACK_URL is not set", pytrace=False)
        pytest.skip("PANDASTACK_URL is not set: no PandaStack server to test against")
    return url


def _kill_quietly(sb):
    try:
        sb.kill()
    except NotFoundError:
        pass


@pytest.fixture(scope="module")
def base(server_url):
    sb = Sandbox.create(template="base", ttl_seconds=1800, metadata={"suite": "python-integration"},
                        request_timeout=PATIENCE)
    yield sb
    _kill_quietly(sb)


@pytest.fixture(scope="module")
def py(server_url):
    sb = Sandbox.create(template="code-interpreter", ttl_seconds=1800, request_timeout=PATIENCE)
    yield sb
    _kill_quietly(sb)


def test_seed_program():
    env = dict(os.environ)
    env["PYTHONPATH"] = SDK_DIR + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run([sys.executable, "-c", SEED], env=env, cwd=SDK_DIR,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=PATIENCE)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    assert proc.stdout.decode() == "4950\n 0\n"


def test_exec_stdout_stderr_exit_code(base):
    res = base.exec("echo out; echo err >&2; exit 3", timeout_seconds=30)
    assert (res.stdout, res.stderr, res.exit_code) == ("out\n", "err\n", 3)
    assert res.timed_out is False and res.truncated is False
    assert res.duration_ms >= 0


def test_exec_argv_and_not_found(base):
    res = base.exec(["echo", "a  b", "$HOME"], timeout_seconds=30)
    assert (res.stdout, res.exit_code) == ("a  b $HOME\n", 0)
    assert base.exec("no-such-command-xyz", timeout_seconds=30).exit_code == 127


def test_exec_env_and_cwd(base):
    res = base.exec('echo "$FOO:$(pwd)"', env={"FOO": "bar baz"}, cwd="/tmp", timeout_seconds=30)
    assert (res.stdout, res.exit_code) == ("bar baz:/tmp\n", 0)


def test_exec_stdin(base):
    res = base.exec("cat; echo; echo done", stdin="hello\nworld", timeout_seconds=30)
    assert res.stdout == "hello\nworld\ndone\n"


def test_exec_timeout(base):
    start = time.monotonic()
    res = base.exec("sleep 1000", timeout_seconds=1)
    elapsed = time.monotonic() - start
    assert res.timed_out is True
    assert res.exit_code == 124
    # The timeout ended it, not the sleep (however slow the machine).
    assert elapsed < 120, "exec with a 1 s timeout took %.1f s" % elapsed


def test_exec_streaming_is_incremental(base):
    # The command prints "two" only once the test, having received "one" in
    # its callback, creates a file (it gives up after 60 s): "one" must reach
    # the callback while the command runs, however fast the machine.
    chunks = []
    errs = []
    touches = []

    def on_stdout(s):
        chunks.append(s)
        if len(chunks) == 1:
            t = threading.Thread(target=lambda: base.exec(["touch", "/tmp/go-streaming"], timeout_seconds=PATIENCE))
            t.start()
            touches.append(t)

    cmd = ("echo one; i=0; until [ -e /tmp/go-streaming ] || [ $i -ge 1200 ]; do sleep 0.05; i=$((i+1)); done; "
           "[ -e /tmp/go-streaming ] && echo two >&2; echo three")
    res = base.exec(cmd, timeout_seconds=PATIENCE, on_stdout=on_stdout, on_stderr=errs.append)
    for t in touches:
        t.join()
    assert chunks and chunks[0].startswith("one")
    assert "".join(chunks) == "one\nthree\n"
    assert "".join(errs) == "two\n", "the command never saw the file made on the first chunk: not streamed"
    assert (res.stdout, res.stderr, res.exit_code) == ("one\nthree\n", "two\n", 0)


def test_code_interpreter_has_numpy_and_pandas(py):
    res = py.exec(["python3", "-c",
                   "import numpy, pandas; print(int(numpy.arange(4).sum()), int(pandas.DataFrame({'a': [1, 2]}).a.sum()))"],
                  timeout_seconds=PATIENCE)
    assert (res.stdout, res.exit_code) == ("6 3\n", 0), res.stderr


def test_connect_list_set_timeout(base):
    info = base.info
    assert info.template == "base" and info.state == "running"
    assert info.metadata == {"suite": "python-integration"}
    assert info.cpu > 0 and info.memory_mb > 0
    assert info.created_at <= info.expires_at

    other = Sandbox.connect(base.id)
    assert other.id == base.id and other.info.state == "running"

    listed = Sandbox.list()
    assert all(isinstance(i, SandboxInfo) for i in listed)
    assert base.id in [i.id for i in listed]

    # The new expiry is 600 s from the request, whenever it is handled.
    before = datetime.now(timezone.utc)
    new = base.set_timeout(600)
    after = datetime.now(timezone.utc)
    assert 599 <= (new.expires_at - before).total_seconds(), (before, new.expires_at)
    assert (new.expires_at - after).total_seconds() <= 601, (after, new.expires_at)
    assert base.refresh().expires_at == new.expires_at


def test_kill_then_kill_again_and_exec():
    sb = Sandbox.create(template="base", ttl_seconds=60)
    sb.kill()
    with pytest.raises(NotFoundError):
        sb.kill()
    with pytest.raises(NotFoundError):
        sb.exec("true", timeout_seconds=5)


def test_unknown_template():
    with pytest.raises(NotFoundError) as ei:
        Sandbox.create(template="no-such-template-xyz", ttl_seconds=30)
    assert ei.value.status == 404 and ei.value.code == "not_found"


@pytest.mark.parametrize("ttl", [-5, 10 ** 7])
def test_bad_ttl(ttl):
    with pytest.raises(InvalidArgumentError) as ei:
        Sandbox.create(template="base", ttl_seconds=ttl)
    assert ei.value.status == 400 and ei.value.code == "invalid_argument"


def test_wrong_api_key():
    with pytest.raises(AuthenticationError) as ei:
        Sandbox.list(api_key="definitely-not-the-key")
    assert ei.value.status == 401 and ei.value.code == "unauthenticated"
