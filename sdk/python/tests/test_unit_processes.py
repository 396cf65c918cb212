"""Unit tests of background processes (sb.exec(background=True), sb.processes) against a local
HTTP server that answers as docs/API.md ("Processes") says.

They check what the SDK sends (methods, paths, bodies), that output is read as it streams (an
event is seen before the server writes the next), and how answers and errors are read.
"""

import base64
import json
import queue
import signal
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from pandastack import (ConflictError, InvalidArgumentError, NotFoundError, PandaStackConnectionError, Process,
                        ProcessEvent, ProcessInfo, Sandbox, SandboxInfo, WaitTimeoutError)
from pandastack._http import HTTPClient
from pandastack.processes import STDIN_PIECE

API_KEY = "proc-key"
PATIENCE = 60  # seconds any wait in a test may take before the test fails


def proc_doc(pid, state="running", exit_code=None, tag="", stdin=False):
    d = {"pid": pid, "tag": tag, "argv": ["/bin/sh", "-c", "x"], "user": "user", "cwd": "/home/user",
         "pty": False, "stdin": stdin, "state": state, "started_at": "2025-01-02T03:04:05.123456789Z",
         "timed_out": False, "stdout_bytes": 3, "stderr_bytes": 0}
    if exit_code is not None:
        d["exit_code"] = exit_code
        d["exited_at"] = "2025-01-02T03:04:06Z"
    return d


def error_body(code, message):
    return json.dumps({"error": {"code": code, "message": message}}).encode()


class FakeProcesses:
    """Answers sandbox sb-1's process routes; records every request.

    The output route sends the lines it takes from ``self.lines`` (a queue) as they come,
    chunked, until it takes None; waits answer once ``self.exited`` is set.
    """

    def __init__(self):
        self.requests = []
        self.lines = queue.Queue()
        self.exited = threading.Event()
        self.stop_event = threading.Event()
        self.reject = {}  # route suffix -> (status, body) for every request to it
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                fake.handle(self)

            do_POST = do_GET

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = "http://127.0.0.1:%d" % self.server.server_address[1]

    def stop(self):
        self.stop_event.set()
        self.exited.set()
        self.lines.put(None)
        self.server.shutdown()
        self.server.server_close()

    def send(self, h, status, body=b"", ctype="application/json"):
        h.send_response(status)
        h.send_header("Content-Type", ctype)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    def handle(self, h):
        u = urllib.parse.urlsplit(h.path)
        n = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(n) if n else b""
        self.requests.append({"method": h.command, "path": u.path, "query": dict(urllib.parse.parse_qsl(u.query)),
                              "body": json.loads(body) if body else None})
        if h.headers.get("Authorization") != "Bearer " + API_KEY:
            return self.send(h, 401, error_body("unauthenticated", "no"))
        if u.path == "/v1/sandboxes/sb-1" and h.command == "GET":
            return self.send(h, 200, json.dumps({"id": "sb-1", "template": "base", "state": "running"}).encode())
        if u.path == "/v1/sandboxes/sb-1/exec":
            return self.send(h, 200, json.dumps({"stdout": "4950\n", "stderr": "", "exit_code": 0}).encode())
        prefix = "/v1/sandboxes/sb-1/processes"
        if not u.path.startswith(prefix):
            return self.send(h, 404, error_body("not_found", "no route"))
        route = u.path[len(prefix):]
        for suffix, (status, b) in self.reject.items():
            if route.endswith(suffix):
                return self.send(h, status, b)
        if route == "" and h.command == "POST":
            doc = json.loads(body)
            return self.send(h, 201, json.dumps(proc_doc(42, tag=doc.get("tag", ""), stdin=doc.get("stdin", False))).encode())
        if route == "" and h.command == "GET":
            return self.send(h, 200, json.dumps({"processes": [proc_doc(42, tag="web"),
                                                               proc_doc(43, "exited", 0)]}).encode())
        if route == "/99":
            return self.send(h, 404, error_body("not_found", "no background process 99"))
        if route == "/42" and h.command == "GET":
            return self.send(h, 200, json.dumps(proc_doc(42, tag="web")).encode())
        if route in ("/42/stdin", "/42/signal", "/42/resize"):
            h.send_response(204)
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        if route == "/42/wait":
            self.exited.wait()
            if self.stop_event.is_set():
                return
            return self.send(h, 200, json.dumps(proc_doc(42, "exited", 7)).encode())
        if route == "/42/output":
            h.send_response(200)
            h.send_header("Content-Type", "application/x-ndjson")
            h.send_header("Transfer-Encoding", "chunked")
            h.end_headers()
            while True:
                line = self.lines.get()
                if line is None:
                    break
                b = json.dumps(line).encode() + b"\n"
                h.wfile.write(b"%x\r\n%s\r\n" % (len(b), b))
                h.wfile.flush()
            h.wfile.write(b"0\r\n\r\n")
            h.wfile.flush()
            return
        return self.send(h, 404, error_body("not_found", "no route"))


@pytest.fixture
def fake():
    f = FakeProcesses()
    yield f
    f.stop()


@pytest.fixture
def sb(fake):
    client = HTTPClient(fake.url, API_KEY)
    return Sandbox(SandboxInfo(id="sb-1", template="base", state="running", created_at=None, expires_at=None), client)


def test_background_exec_starts_a_process_without_a_timeout(fake, sb):
    p = sb.exec("python3 -m http.server", background=True, tag="web", env={"A": 1}, cwd="/srv", user="root")
    assert isinstance(p, Process) and (p.pid, p.tag, p.exit_code) == (42, "web", None)
    assert p.info.running and p.info.started_at.year == 2025 and p.info.argv == ["/bin/sh", "-c", "x"]
    r = fake.requests[-1]
    assert (r["method"], r["path"]) == ("POST", "/v1/sandboxes/sb-1/processes")
    # No timeout unless one is passed: a server in the background runs until told otherwise.
    assert r["body"] == {"cmd": "python3 -m http.server", "tag": "web", "env": {"A": "1"}, "cwd": "/srv",
                         "user": "root"}
    sb.exec(["sleep", "100"], 60.0, background=True, stdin=True)
    assert fake.requests[-1]["body"] == {"argv": ["sleep", "100"], "timeout_seconds": 60.0, "stdin": True}
    sb.processes.start("top", pty=(120, 40))
    assert fake.requests[-1]["body"] == {"cmd": "top", "pty": {"cols": 120, "rows": 40}}


def test_foreground_exec_is_unchanged(fake, sb):
    res = sb.exec("python3 -c 'print(sum(range(100)))'", timeout_seconds=30)
    assert (res.stdout, res.exit_code) == ("4950\n", 0)
    assert fake.requests[-1]["path"] == "/v1/sandboxes/sb-1/exec"
    assert fake.requests[-1]["body"] == {"cmd": "python3 -c 'print(sum(range(100)))'", "timeout_seconds": 30}
    sb.exec("true")
    assert fake.requests[-1]["body"] == {"cmd": "true", "timeout_seconds": 60.0}


def test_misused_arguments(fake, sb):
    with pytest.raises(TypeError):
        sb.exec("x", background=True, on_stdout=print)
    with pytest.raises(TypeError):
        sb.exec("x", tag="t")
    with pytest.raises(TypeError):
        sb.exec(b"x", background=True)
    with pytest.raises(TypeError):
        sb.processes.connect("42")
    assert not fake.requests


def test_stdin_is_sent_in_pieces_then_closed(fake, sb):
    p = sb.exec("cat", background=True, stdin=True)
    p.send_stdin("héllo")
    assert fake.requests[-1]["path"] == "/v1/sandboxes/sb-1/processes/42/stdin"
    assert base64.b64decode(fake.requests[-1]["body"]["data_base64"]) == "héllo".encode()
    data = bytes(range(256)) * ((2 * STDIN_PIECE) // 256 + 7)
    before = len(fake.requests)
    p.send_stdin(data)
    pieces = [base64.b64decode(r["body"]["data_base64"]) for r in fake.requests[before:]]
    assert len(pieces) == 3 and all(len(x) <= STDIN_PIECE for x in pieces) and b"".join(pieces) == data
    p.close_stdin()
    assert fake.requests[-1]["body"] == {"eof": True}
    with pytest.raises(TypeError):
        p.send_stdin(42)

    # stdin given as data: the whole input, then its end.
    before = len(fake.requests)
    sb.exec("wc -c", background=True, stdin=b"abc")
    start, put, eof = fake.requests[before:]
    assert start["body"] == {"cmd": "wc -c", "stdin": True}
    assert base64.b64decode(put["body"]["data_base64"]) == b"abc" and eof["body"] == {"eof": True}


def test_signals_kill_and_resize(fake, sb):
    p = sb.processes.connect(42)
    for sig, sent in [("TERM", "TERM"), (15, 15), (signal.SIGINT, "SIGINT")]:
        p.signal(sig)
        assert fake.requests[-1]["path"].endswith("/42/signal") and fake.requests[-1]["body"] == {"signal": sent}
    p.kill()
    assert fake.requests[-1]["body"] == {"signal": "SIGKILL"}
    p.resize(100, 30)
    assert fake.requests[-1]["path"].endswith("/42/resize") and fake.requests[-1]["body"] == {"cols": 100, "rows": 30}
    with pytest.raises(TypeError):
        p.signal(1.5)
    fake.reject["/signal"] = (400, error_body("invalid_argument", "unknown signal \"NOPE\""))
    with pytest.raises(InvalidArgumentError) as e:
        p.signal("NOPE")
    assert "unknown signal" in str(e.value)


def test_list_and_connect(fake, sb):
    procs = sb.processes.list()
    assert [(p.pid, p.state, p.exit_code) for p in procs] == [(42, "running", None), (43, "exited", 0)]
    assert procs[1].exited_at.second == 6 and not procs[1].running
    s2 = Sandbox.connect("sb-1", url=fake.url, api_key=API_KEY)
    p = s2.processes.connect(procs[0])
    assert (p.pid, p.tag) == (42, "web") and fake.requests[-1]["path"] == "/v1/sandboxes/sb-1/processes/42"
    with pytest.raises(NotFoundError):
        s2.processes.connect(99)


def test_wait_returns_the_exit_code(fake, sb):
    p = sb.processes.connect(42)
    got = {}
    t = threading.Thread(target=lambda: got.setdefault("code", p.wait()))
    t.start()
    fake.exited.set()
    t.join(PATIENCE)
    assert got["code"] == 7 and p.exit_code == 7 and p.info.state == "exited"
    assert fake.requests[-1]["method"] == "POST" and fake.requests[-1]["path"].endswith("/42/wait")


def test_wait_with_a_timeout(fake, sb):
    p = sb.processes.connect(42)
    with pytest.raises(WaitTimeoutError) as e:
        p.wait(timeout=0.2)  # the fake answers only once told the process exited
    assert isinstance(e.value, TimeoutError) and "goes on" in str(e.value)


def test_output_streams_events_as_they_come(fake, sb):
    p = sb.processes.connect(42)
    fake.lines.put({"type": "stdout", "data": "one\n"})
    with p.output() as events:
        assert fake.requests[-1]["query"] == {"follow": "true"}
        # The first event is read before the server has the second to send.
        assert next(events) == ProcessEvent(type="stdout", data="one\n")
        fake.lines.put({"type": "dropped", "stream": "stderr", "bytes": 123})
        assert next(events) == ProcessEvent(type="dropped", stream="stderr", bytes=123)
        fake.lines.put({"type": "stderr", "data": "two\n"})
        fake.lines.put({"type": "exit", "process": proc_doc(42, "exited", 3)})
        rest = list(events)
    assert [e.type for e in rest] == ["stderr", "exit"] and rest[1].process.exit_code == 3
    assert p.exit_code == 3  # the exit event updated the handle
    fake.lines.put(None)


def test_iterating_a_process_follows_it(fake, sb):
    p = sb.processes.connect(42)
    for line in ({"type": "stdout", "data": "a"}, {"type": "future-type"}, {"type": "exit", "process": proc_doc(42, "exited", 0)}):
        fake.lines.put(line)
    assert [(e.type, e.data) for e in p] == [("stdout", "a"), ("future-type", ""), ("exit", "")]
    fake.lines.put(None)


def test_output_without_follow_ends_with_end(fake, sb):
    p = sb.processes.connect(42)
    fake.lines.put({"type": "end", "process": proc_doc(42)})
    events = list(p.output(follow=False))
    assert fake.requests[-1]["query"] == {"follow": "false"}
    assert [e.type for e in events] == ["end"] and events[0].process.running and p.exit_code is None
    fake.lines.put(None)


def test_output_errors(fake, sb):
    p = sb.processes.connect(42)
    fake.lines.put({"type": "stdout", "data": "x"})
    fake.lines.put({"type": "error", "error": {"code": "conflict", "message": "sandbox sb-1 was paused"}})
    events = p.output()
    assert next(events).data == "x"
    with pytest.raises(ConflictError) as e:
        next(events)
    assert "paused" in str(e.value)
    fake.lines.put(None)
    # A stream cut before its last event is not a normal end.
    fake.lines.put({"type": "stdout", "data": "y"})
    fake.lines.put(None)
    events = p.output()
    assert next(events).data == "y"
    with pytest.raises(PandaStackConnectionError):
        next(events)
    fake.reject["/output"] = (404, error_body("not_found", "no background process 42"))
    with pytest.raises(NotFoundError):
        p.output()


def test_process_info_rejects_garbage():
    with pytest.raises(Exception):
        ProcessInfo.from_json({"pid": "x"})
    with pytest.raises(Exception):
        ProcessInfo.from_json(None)
