"""Background processes against a real PandaStack server (skipped without PANDASTACK_URL, see
test_integration.py): sb.exec(background=True), stdin, signals, waits, re-attach from a second
client after the first one left, pty resize, the default user.

Every wait for a state has a generous deadline (PATIENCE); nothing assumes how fast a machine is.
"""

import os
import signal
import subprocess
import sys
import time

import pytest

from pandastack import (ConflictError, InvalidArgumentError, NotFoundError, Process, Sandbox, WaitTimeoutError)

PATIENCE = 600
SDK_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(SDK_DIR, "..", "..", "README.md")


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
    s = Sandbox.create(template="base", ttl_seconds=1800, request_timeout=PATIENCE)
    yield s
    try:
        s.kill()
    except NotFoundError:
        pass


def read_until(events, want):
    """Read output events until their text holds ``want``; returns the text."""
    text = ""
    for ev in events:
        text += ev.data
        if want in text:
            return text
        assert ev.type not in ("exit", "end"), "output ended before %r: %r" % (want, text)
    raise AssertionError("output ended before %r: %r" % (want, text))


def eventually(check, what):
    deadline = time.monotonic() + PATIENCE
    delay = 0.01
    while True:
        got = check()
        if got:
            return got
        assert time.monotonic() < deadline, "gave up waiting for " + what
        time.sleep(delay)
        delay = min(delay * 2, 0.5)


def test_readme_example():
    """The README's background-process example, verbatim."""
    with open(README, encoding="utf-8") as f:
        text = f.read()
    block = text.split("Background processes:", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    assert "background=True" in block
    env = dict(os.environ)
    env["PYTHONPATH"] = SDK_DIR + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run([sys.executable, "-c", block], env=env, cwd=SDK_DIR,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=PATIENCE)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    ticks = "tick 1\ntick 2\ntick 3\n"
    assert proc.stdout.decode() == ticks + "0\n" + ticks + "bye Ada\n\n"


def test_the_verbatim_exec_contract_still_holds(server_url):
    with Sandbox.create(template="code-interpreter", ttl_seconds=300) as s:
        result = s.exec("python3 -c 'print(sum(range(100)))'", timeout_seconds=30)
        assert (result.stdout, result.exit_code) == ("4950\n", 0)


def test_background_handle_stdin_and_exit_code(sb):
    p = sb.exec("echo start; read line; echo got:$line; exit 7", background=True, stdin=True, tag="greeter")
    assert isinstance(p, Process) and p.pid > 0 and p.tag == "greeter" and p.info.stdin
    listed = {i.pid: i for i in sb.processes.list()}
    assert listed[p.pid].tag == "greeter"
    p.send_stdin("hello\n")
    events = list(p.output())
    text = "".join(e.data for e in events if e.type == "stdout")
    assert text == "start\ngot:hello\n" and events[-1].type == "exit"
    assert p.wait() == 7 and p.exit_code == 7 and p.info.state == "exited"
    assert p.refresh().exit_code == 7
    # A finished process takes no more input.
    with pytest.raises(ConflictError):
        p.send_stdin("late\n")


def test_close_stdin_ends_input(sb):
    p = sb.exec("wc -c", background=True, stdin=True)
    p.send_stdin(b"\x00\x01abc")
    p.close_stdin()
    assert p.wait() == 0
    out = "".join(e.data for e in p.output(follow=False))
    assert out.strip() == "5"
    # stdin given as data is the whole input.
    p = sb.exec("cat", background=True, stdin="whole input")
    assert p.wait() == 0
    assert "".join(e.data for e in p.output()) == "whole input"


def test_reattach_from_a_second_client_replays_output_produced_meanwhile(sb, server_url):
    p = sb.exec("echo before; read a; echo meanwhile:$a; read b; echo last:$b; cat; exit 4",
                background=True, stdin=True, tag="reattach")
    with p.output() as events:
        assert read_until(events, "before\n") == "before\n"
    # The first client left: the process goes on, and writes while nobody is attached.
    assert p.refresh().running
    p.send_stdin("x\n")
    want = len("before\nmeanwhile:x\n")
    eventually(lambda: p.refresh().stdout_bytes >= want, "the process to write its second line")

    other = Sandbox.connect(sb.id, request_timeout=PATIENCE)  # a second client, its own connection
    assert [i.tag for i in other.processes.list() if i.pid == p.pid] == ["reattach"]
    q = other.processes.connect(p.pid)
    assert (q.pid, q.tag, q.info.running) == (p.pid, "reattach", True)
    with q.output() as events:
        text = read_until(events, "meanwhile:x\n")
        assert text == "before\nmeanwhile:x\n"
        q.send_stdin("y\n")
        q.close_stdin()
        rest = list(events)
    assert "".join(e.data for e in rest) == "last:y\n" and rest[-1].type == "exit"
    assert rest[-1].process.exit_code == 4 and q.exit_code == 4
    assert p.wait() == 4


def test_signals(sb):
    p = sb.exec("trap 'echo got TERM; exit 5' TERM; echo ready; while :; do sleep 1; done", background=True)
    with p.output() as events:
        read_until(events, "ready\n")
        p.signal("TERM")
        assert read_until(events, "got TERM\n").endswith("got TERM\n")
    assert p.wait() == 5

    p = sb.exec(["sleep", "1000"], background=True)
    p.signal(signal.SIGUSR1)
    assert p.wait() == 128 + signal.SIGUSR1
    p = sb.exec(["sleep", "1000"], background=True)
    p.signal(15)
    assert p.wait() == 128 + 15
    p = sb.exec(["sleep", "1000"], background=True)
    with pytest.raises(WaitTimeoutError):
        p.wait(timeout=0.5)
    assert p.refresh().running  # a wait that gave up leaves it running
    with pytest.raises(InvalidArgumentError):
        p.signal("NOPE")
    p.kill()
    assert p.wait() == 137


def test_timeout_and_default_user(sb):
    p = sb.exec("sleep 1000", background=True, timeout_seconds=1)
    assert p.wait() == 124 and p.info.timed_out
    p = sb.exec("id -u", background=True)
    assert p.wait() == 0 and "".join(e.data for e in p.output()) == "1000\n"
    p = sb.exec("id -u", background=True, user="root")
    assert p.wait() == 0 and "".join(e.data for e in p.output()) == "0\n"


def test_output_past_the_cap_is_reported_dropped(sb):
    total = 3 * (1 << 20) + 12345
    p = sb.exec("head -c %d /dev/zero | tr '\\0' a" % total, background=True)
    assert p.wait() == 0
    events = list(p.output(follow=False))
    dropped = sum(e.bytes for e in events if e.type == "dropped")
    kept = sum(len(e.data) for e in events if e.type == "stdout")
    assert dropped > 0 and dropped + kept == total and p.info.stdout_bytes == total
    assert events[-1].type == "exit"


def test_pty_resize(sb):
    p = sb.processes.start("stty size; read x; stty size", pty=(100, 30))
    assert p.info.pty
    with p.output() as events:
        read_until(events, "30 100")
        p.resize(120, 40)
        p.send_stdin("go\n")
        read_until(events, "40 120")
    assert p.wait() == 0


def test_unknown_processes(sb):
    with pytest.raises(NotFoundError):
        sb.processes.connect(999999)
    with pytest.raises(InvalidArgumentError):
        sb.exec("", background=True)
