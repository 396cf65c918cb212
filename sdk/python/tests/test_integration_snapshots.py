"""Snapshots, fork, pause and resume against a real PandaStack server.

Skipped unless PANDASTACK_URL is set (PANDASTACK_API_KEY, or the server's key
file, gives the key). With PANDASTACK_REQUIRE_SERVER=1 a missing
PANDASTACK_URL fails them instead. Every sandbox and snapshot a test makes is
killed or deleted at its end, paused ones included.

The tests check live process memory, not only files, with a worker: a Python
process started in the background that holds ``x = 41`` and a counter ``n``
in memory. Every 0.1 s it writes "pid x n" to /tmp/w/state (atomically, by
rename), and when /tmp/w/req appears it removes it, adds 1 to x and writes x
to /tmp/w/resp. A worker that resumed from a snapshot keeps its pid, x and
n; one started afresh would begin at n = 1. Reading the state file is not
enough (the file is copied with the rest): the tests wait for n to move on.
"""

import os
import time
from datetime import datetime, timezone

import pytest

from pandastack import NotFoundError, Sandbox, Snapshot

TEMPLATE = "code-interpreter"

# PATIENCE bounds every wait for something that must happen (an exec, the
# worker counting, a TTL running out). It is generous: machines differ
# several-fold in speed, and the tests never assume how fast one is.
PATIENCE = 180

WORKER = r'''
import os, sys, time
os.setsid()  # out of the exec's process group: the exec returning must not end it
d = sys.argv[1]
x = 41
n = 0


def put(name, text):
    tmp = os.path.join(d, name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, os.path.join(d, name))


while True:
    n += 1
    try:
        os.remove(os.path.join(d, "req"))
    except FileNotFoundError:
        pass
    else:
        x += 1
        put("resp", "%d\n" % x)
    put("state", "%d %d %d\n" % (os.getpid(), x, n))
    time.sleep(0.1)
'''

# ASK asks the worker for its x (after adding 1) and prints it; exit 1 if no
# answer comes within 120 s.
ASK = r'''
import os, sys, time
d = sys.argv[1]
try:
    os.remove(os.path.join(d, "resp"))
except FileNotFoundError:
    pass
open(os.path.join(d, "req"), "w").close()
deadline = time.monotonic() + 120
while time.monotonic() < deadline:
    try:
        with open(os.path.join(d, "resp")) as f:
            text = f.read()
    except FileNotFoundError:
        text = ""
    if text.endswith("\n"):
        print(text.strip())
        sys.exit(0)
    time.sleep(0.05)
sys.exit(1)
'''


@pytest.fixture(scope="module", autouse=True)
def server_url():
    url = os.environ.get("PANDASTACK_URL")
    if not url:
        if os.environ.get("PANDASTACK_REQUIRE_SERVER") == "1":
            pytest.fail("PANDASTACK_REQUIRE_SERVER=1 but PANDASTACK_URL is not set", pytrace=False)
        pytest.skip("PANDASTACK_URL is not set: no PandaStack server to test against")
    return url


@pytest.fixture
def made():
    """Collects sandboxes and snapshots to clean up: made.append(sb_or_snap)."""
    things = []
    yield things
    for thing in reversed(things):
        try:
            if isinstance(thing, Snapshot):
                Snapshot.delete(thing.id)
            else:
                thing.kill()
        except NotFoundError:
            pass


def create(made, **kwargs):
    kwargs.setdefault("ttl_seconds", 900)
    # Snapshots, forks, pauses and resumes of a big sandbox take a while on
    # a slow machine: wait for their answers as long as for anything else.
    kwargs.setdefault("request_timeout", PATIENCE)
    if "snapshot_id" not in kwargs:
        kwargs.setdefault("template", TEMPLATE)
    sb = Sandbox.create(**kwargs)
    made.append(sb)
    return sb


def run(sb, cmd, **kwargs):
    """Run cmd in sb, insist on exit 0 and return its stdout."""
    kwargs.setdefault("timeout_seconds", PATIENCE)
    res = sb.exec(cmd, **kwargs)
    assert res.exit_code == 0, "%r in %s: exit %d, stderr %r" % (cmd, sb.id, res.exit_code, res.stderr)
    return res.stdout


def start_worker(sb):
    """Start the worker in sb; returns its first (pid, x, n)."""
    run(sb, ["sh", "-c", "mkdir -p /tmp/w && cat > /tmp/worker.py"], stdin=WORKER)
    run(sb, ["sh", "-c", "cat > /tmp/ask.py"], stdin=ASK)
    run(sb, "python3 /tmp/worker.py /tmp/w </dev/null >/tmp/w/log 2>&1 &")
    return wait_state(sb, 0)


def read_state(sb):
    res = sb.exec("cat /tmp/w/state", timeout_seconds=PATIENCE)
    parts = res.stdout.split()
    if res.exit_code != 0 or len(parts) != 3:
        return None
    return tuple(int(p) for p in parts)


def wait_state(sb, after_n, timeout=PATIENCE):
    """Wait until the worker's counter in sb is past after_n; returns (pid, x, n).

    Fails if it does not move: the worker is not running.
    """
    deadline = time.monotonic() + timeout
    state = None
    while time.monotonic() < deadline:
        state = read_state(sb)
        if state is not None and state[2] > after_n:
            return state
        time.sleep(0.2)
    log = sb.exec("cat /tmp/w/log", timeout_seconds=PATIENCE).stdout
    pytest.fail("worker in %s did not count past %d within %.0f s (last state %r, log %r)"
                % (sb.id, after_n, timeout, state, log))


def ask(sb):
    """Ask sb's worker to add 1 to its x; returns the new x."""
    return int(run(sb, "python3 /tmp/ask.py /tmp/w").strip())


def test_snapshot_then_create_continues_processes(made):
    sb = create(made)
    pid, x, n = start_worker(sb)
    assert x == 41
    run(sb, "echo before > /tmp/file")

    snap = sb.snapshot()
    made.append(snap)
    assert snap.id.startswith("snap-") and snap.source_sandbox == sb.id
    assert snap.template == TEMPLATE and snap.size_bytes > 0
    assert snap.created_at is not None and abs((datetime.now(timezone.utc) - snap.created_at).total_seconds()) < 120
    assert sb.refresh().state == "running", "the source must keep running"
    assert Snapshot.get(snap.id) == snap
    assert snap.id in [s.id for s in Snapshot.list()]

    clone = create(made, snapshot_id=snap.id)
    assert clone.id != sb.id
    assert (clone.info.state, clone.info.template) == ("running", TEMPLATE)
    assert run(clone, "hostname").strip() == clone.id
    # The worker goes on counting from where it was: same process, same memory.
    cpid, cx, cn = wait_state(clone, n)
    assert (cpid, cx) == (pid, 41)
    assert ask(clone) == 42
    assert ask(clone) == 43
    assert run(clone, "cat /tmp/file") == "before\n"
    # The source's memory is its own.
    assert ask(sb) == 42


def test_fork_copies_memory_and_files_but_not_randomness(made):
    parent = create(made)
    _, _, n = start_worker(parent)
    run(parent, "echo parent > /tmp/mark")

    forks = parent.fork(count=2, ttl_seconds=900)
    made.extend(forks)
    assert len(forks) == 2
    ids = [parent.id] + [f.id for f in forks]
    assert len(set(ids)) == 3, ids
    assert all(f.info.state == "running" for f in forks)
    assert parent.refresh().state == "running", "the parent must keep running"

    everyone = [parent] + forks
    urandom = [run(sb, ["python3", "-c", "import os; print(os.urandom(16).hex())"]) for sb in everyone]
    assert len(set(urandom)) == 3, urandom
    dev = [run(sb, "head -c 16 /dev/urandom | od -An -tx1") for sb in everyone]
    assert len(set(dev)) == 3, dev
    uuids = [run(sb, ["python3", "-c", "import uuid; print(uuid.uuid4())"]) for sb in everyone]
    assert len(set(uuids)) == 3, uuids

    for f in forks:
        assert run(f, "hostname").strip() == f.id
        assert run(f, "cat /tmp/mark") == "parent\n"
        # Each fork's worker is a copy of the parent's: it goes on counting.
        wait_state(f, n)
    for i, f in enumerate(forks):
        run(f, "echo %s > /tmp/own" % f.id)
        assert ask(f) == 42, "fork %d's x" % i
    for sb in everyone:
        res = sb.exec("cat /tmp/own", timeout_seconds=PATIENCE)
        want = "" if sb is parent else sb.id + "\n"
        assert res.stdout == want, "%s sees %r in /tmp/own, want %r" % (sb.id, res.stdout, want)
    assert ask(parent) == 42


def test_pause_resume_three_times(made):
    sb = create(made, ttl_seconds=300)
    pid, x, n = start_worker(sb)
    for i in range(1, 4):
        run(sb, "echo %d > /tmp/file-%d" % (i, i))
        _, _, n = wait_state(sb, n)

        info = sb.pause()
        assert info.state == "paused" and info.paused_bytes > 0, info
        assert sb.refresh().state == "paused"
        listed = {s.id: s for s in Sandbox.list()}
        assert listed[sb.id].state == "paused", "GET /v1/sandboxes must list paused sandboxes"

        before = datetime.now(timezone.utc)
        info = sb.resume()
        after = datetime.now(timezone.utc)
        assert info.state == "running" and info.paused_bytes == 0, info
        # The TTL restarts at the resume: 300 s from then.
        assert (info.expires_at - before).total_seconds() >= 299, "resume must restart the TTL: %s, resumed after %s" % (
            info.expires_at, before)
        assert (info.expires_at - after).total_seconds() <= 301, (after, info.expires_at)
        for j in range(1, i + 1):
            assert run(sb, "cat /tmp/file-%d" % j) == "%d\n" % j
        wpid, _, n = wait_state(sb, n)
        assert wpid == pid
        assert ask(sb) == 41 + i

    # Pausing twice and resuming a running sandbox are no-ops.
    assert sb.pause().state == "paused"
    assert sb.pause().state == "paused"
    assert sb.resume().state == "running"
    assert sb.resume().state == "running"


def test_exec_and_connect_resume_a_paused_sandbox(made):
    sb = create(made)
    run(sb, "echo kept > /tmp/file")
    assert sb.pause().state == "paused"
    assert run(sb, "cat /tmp/file") == "kept\n"
    assert sb.refresh().state == "running"

    assert sb.pause().state == "paused"
    other = Sandbox.connect(sb.id)
    assert other.info.state == "running"
    assert run(other, "cat /tmp/file") == "kept\n"


def test_deleted_snapshot_is_gone(made):
    sb = create(made, template="base")
    snap = sb.snapshot()
    made.append(snap)
    Snapshot.delete(snap.id)
    with pytest.raises(NotFoundError):
        Snapshot.get(snap.id)
    with pytest.raises(NotFoundError):
        Sandbox.create(snapshot_id=snap.id, ttl_seconds=60)
    with pytest.raises(NotFoundError):
        snap.delete()
    assert snap.id not in [s.id for s in Snapshot.list()]


def wait_paused(sb):
    start = time.monotonic()
    state = None
    while time.monotonic() - start < PATIENCE:
        state = sb.refresh().state
        if state == "paused":
            return
        time.sleep(0.25)
    pytest.fail("state %r %.0f s after the 2 s TTL of a sandbox with on_timeout=pause began" % (
        state, time.monotonic() - start))


def test_on_timeout_pause(made):
    sb = create(made, template="base", ttl_seconds=2, on_timeout="pause")
    assert sb.info.on_timeout == "pause"
    run(sb, "echo kept > /tmp/file")
    wait_paused(sb)
    assert sb.info.paused_bytes > 0
    # A paused sandbox is kept past its TTL (this can only pass wrongly on
    # a slow machine, never fail wrongly)...
    time.sleep(3)
    assert sb.refresh().state == "paused"
    # ...and an exec resumes it, with its 2 s TTL restarted. A slow machine
    # may take longer than that to look, and find it paused again: then it
    # tries again.
    deadline = time.monotonic() + PATIENCE
    while True:
        start = time.monotonic()
        assert run(sb, "cat /tmp/file") == "kept\n"
        state = sb.refresh().state
        if state == "running":
            break
        elapsed = time.monotonic() - start
        assert state == "paused" and elapsed >= 2, "state %r %.1f s after the exec that resumed it" % (state, elapsed)
        assert time.monotonic() < deadline, "never seen running after a resume within its 2 s TTL"
        wait_paused(sb)
