"""run_code and code contexts against a real PandaStack server.

Skipped unless PANDASTACK_URL is set (see test_integration.py). Creates a
few code-interpreter sandboxes; cells run in their live Jupyter kernels.
"""

import base64
import os
import struct
import subprocess
import sys
import threading

import pytest

from pandastack import ConflictError, Execution, NotFoundError, Sandbox

SDK_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATIENCE = 600

README = os.path.join(SDK_DIR, "..", "..", "README.md")


def readme_example():
    """The README's code-interpreter example, verbatim."""
    with open(README, encoding="utf-8") as f:
        text = f.read()
    block = text.split("Code interpreter:", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    assert "run_code" in block
    return block


@pytest.fixture(scope="module", autouse=True)
def server_url():
    url = os.environ.get("PANDASTACK_URL")
    if not url:
        if os.environ.get("PANDASTACK_REQUIRE_SERVER") == "1":
            pytest.fail("PANDASTACK_REQUIRE_SERVER=1 but PANDASTACK_URL is not set", pytrace=False)
        pytest.skip("PANDASTACK_URL is not set: no PandaStack server to test against")
    return url


@pytest.fixture(scope="module")
def sb(server_url):
    s = Sandbox.create(template="code-interpreter", ttl_seconds=1800, request_timeout=PATIENCE)
    yield s
    try:
        s.kill()
    except NotFoundError:
        pass


def test_readme_example():
    env = dict(os.environ)
    env["PYTHONPATH"] = SDK_DIR + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run([sys.executable, "-c", readme_example()], env=env, cwd=SDK_DIR,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=PATIENCE)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    out = proc.stdout.decode()
    assert out.startswith("6\n['text', 'png']\n"), out
    assert out.replace("\n", "") == "6['text', 'png']abZeroDivisionError", out


def test_state_results_and_errors(sb):
    sb.run_code("x = 20\ndef f(y):\n    return x + y", timeout_seconds=PATIENCE)
    exe = sb.run_code("f(22)", timeout_seconds=PATIENCE)
    assert isinstance(exe, Execution) and exe.text == "42" and exe.error is None

    frame = sb.run_code("import pandas as pd\npd.DataFrame({'a': [1, 2]})", timeout_seconds=PATIENCE)
    assert "<table" in frame.results[0].html and frame.results[0].is_main_result

    fig = sb.run_code("import matplotlib.pyplot as plt\nplt.figure(figsize=(3, 2), dpi=100)\nplt.plot([1, 2])",
                      timeout_seconds=PATIENCE)
    png = [r.png for r in fig.results if r.png]
    assert len(png) == 1
    raw = base64.b64decode(png[0])
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", raw[16:24]) == (300, 200)

    err = sb.run_code("int('x')", timeout_seconds=PATIENCE)
    assert err.error.name == "ValueError" and "invalid literal" in err.error.value
    assert "int('x')" in err.error.traceback


def test_streaming_callbacks(sb):
    # The cell waits for a file that the test makes only once the first
    # line has reached it: the line must arrive while the cell runs.
    seen, touches = [], []

    def on_stdout(s):
        seen.append(s)
        if len(seen) == 1:
            t = threading.Thread(target=lambda: sb.exec(["touch", "/tmp/go-code"], timeout_seconds=PATIENCE))
            t.start()
            touches.append(t)

    results = []
    exe = sb.run_code("import os, time\nprint('one', flush=True)\n"
                      "while not os.path.exists('/tmp/go-code'):\n    time.sleep(0.05)\nprint('two')\n3",
                      on_stdout=on_stdout, on_result=results.append, timeout_seconds=PATIENCE)
    for t in touches:
        t.join()
    assert "".join(seen) == "one\ntwo\n" and exe.logs.stdout == seen
    assert [r.text for r in results] == ["3"] and exe.text == "3"


def test_timeout_keeps_variables(sb):
    code = "kept = 41\nprint('ready', flush=True)\nimport time\nwhile True:\n    time.sleep(0.05)"
    timeout = 2.0
    while True:
        exe = sb.run_code(code, timeout_seconds=timeout)
        assert exe.timed_out and exe.error.name == "KeyboardInterrupt"
        if "ready" in "".join(exe.logs.stdout):
            break
        assert timeout < PATIENCE, "the cell never got ready before its timeout"
        timeout *= 2
    assert sb.run_code("kept + 1", timeout_seconds=PATIENCE).text == "42"


def test_contexts(sb):
    c = sb.create_code_context(cwd="/tmp", env={"WHO": "c"})
    assert c.id and c.cwd == "/tmp" and c.state == "idle"
    sb.run_code("v = 'c'", context=c, timeout_seconds=PATIENCE)
    sb.run_code("v = 'default'", timeout_seconds=PATIENCE)
    assert sb.run_code("v, __import__('os').environ['WHO']", context=c.id, timeout_seconds=PATIENCE).text == "('c', 'c')"
    assert c.id in [x.id for x in sb.list_code_contexts()]
    sb.restart_code_context(c)
    assert sb.run_code("v", context=c, timeout_seconds=PATIENCE).error.name == "NameError"
    assert sb.run_code("v", timeout_seconds=PATIENCE).text == "'default'"
    sb.delete_code_context(c)
    with pytest.raises(NotFoundError):
        sb.run_code("1", context=c)


def test_dead_kernel_is_reported_and_restartable(sb):
    ctx = sb.create_code_context()
    exe = sb.run_code("import os; os.kill(os.getpid(), 9)", context=ctx, timeout_seconds=PATIENCE)
    assert exe.error.name == "DeadKernelError"
    with pytest.raises(ConflictError):
        sb.run_code("1", context=ctx, timeout_seconds=PATIENCE)
    sb.restart_code_context(ctx)
    assert sb.run_code("1 + 1", context=ctx, timeout_seconds=PATIENCE).text == "2"
    sb.delete_code_context(ctx)
