"""Unit tests of the client against a fake server that follows docs/API.md.

They check what the SDK sends and how it reads answers; nothing here needs a
real PandaStack daemon.
"""

import contextlib
import io
import json
import os
import socket
import threading
import time
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import pandastack
from pandastack import (AuthenticationError, ConflictError, ExecResult, InvalidArgumentError,
                        NotFoundError, PandaStackConnectionError, PandaStackError,
                        QuotaExceededError, Sandbox, SandboxInfo, ServerError, Snapshot,
                        TooLargeError, UnavailableError)
from pandastack import _http
from pandastack.errors import InsufficientStorageError, ServerTimeoutError, error_from_code
from pandastack.models import parse_time

API_KEY = "test-key-123"


class Recorded:
    def __init__(self, method, path, headers, body):
        self.method = method
        self.path = path
        self.headers = headers
        self.raw = body
        self.json = json.loads(body.decode("utf-8")) if body else None


class FakeServer:
    """An in-process stand-in for the PandaStack daemon.

    Knobs for tests: ``canned`` maps (method, path) to (status, body bytes,
    content type[, extra headers]); ``exec_events`` is the list of events a streamed exec
    sends (an entry ("wait", name) waits until the test sets
    ``gates[name]``); ``exec_result`` is the blocking exec's answer;
    ``delay`` sleeps before answering.
    """

    def __init__(self, api_key=API_KEY):
        self.api_key = api_key
        self.requests = []
        self.sandboxes = {}
        self.snapshots = {}
        self.canned = {}
        self.exec_events = None
        self.exec_result = {"stdout": "ok\n", "stderr": "", "exit_code": 0, "timed_out": False,
                            "truncated": False, "duration_ms": 1.5}
        self.gates = {}
        self.gate_waits = {}
        self.delay = 0.0
        self.counter = 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _handle(self):
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else b""
                rec = Recorded(self.command, self.path, dict(self.headers.items()), body)
                with server.lock:
                    server.requests.append(rec)
                if server.delay:
                    time.sleep(server.delay)
                server.route(self, rec)

            do_GET = do_POST = do_DELETE = do_PUT = _handle

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = "http://127.0.0.1:%d" % self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True)

    def start(self):
        self.thread.start()
        return self

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()

    # ----- answers -----

    @staticmethod
    def send(h, status, body=b"", ctype="application/json", headers=None):
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
        h.send_response(status)
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        if status != 204:
            h.send_header("Content-Type", ctype)
            h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if status != 204:
            h.wfile.write(body)

    def error(self, h, status, code, message):
        self.send(h, status, {"error": {"code": code, "message": message}})

    def new_sandbox(self, template="base", ttl=300, metadata=None, cpu=1, memory_mb=1024,
                    on_timeout="kill"):
        with self.lock:
            self.counter += 1
            sid = "sb-%04d" % self.counter
        self.sandboxes[sid] = {
            "id": sid, "template": template, "state": "running",
            "created_at": "2024-05-01T12:00:00.123456789Z",
            "expires_at": _go_time(datetime.now(timezone.utc) + timedelta(seconds=ttl)),
            "metadata": metadata or {}, "cpu": cpu, "memory_mb": memory_mb,
            "on_timeout": on_timeout, "paused_bytes": 0, "ttl": ttl,
        }
        return self.sandboxes[sid]

    @staticmethod
    def public(sb):
        return {k: v for k, v in sb.items() if k != "ttl"}

    def route(self, h, rec):
        key = (rec.method, rec.path)
        if key in self.canned:
            return self.send(h, *self.canned[key])
        parts = rec.path.split("?")[0].strip("/").split("/")
        if rec.path == "/v1/health" and rec.method == "GET":
            return self.send(h, 200, {"status": "ok", "version": "test", "runtime": "gvisor"})
        if rec.headers.get("Authorization") != "Bearer " + self.api_key:
            return self.error(h, 401, "unauthenticated", "missing or wrong API key")
        if parts[:2] == ["v1", "snapshots"]:
            return self.route_snapshots(h, rec, parts[2:])
        if parts[:2] != ["v1", "sandboxes"]:
            return self.error(h, 404, "not_found", "no route %s %s" % (rec.method, rec.path))
        if len(parts) == 2:
            if rec.method == "POST":
                req = rec.json or {}
                template = req.get("template", "base")
                if "snapshot_id" in req:
                    snap = self.snapshots.get(req["snapshot_id"])
                    if snap is None:
                        return self.error(h, 404, "not_found", "snapshot %r not found" % req["snapshot_id"])
                    if req.get("template", snap["template"]) != snap["template"]:
                        return self.error(h, 400, "invalid_argument", "template is not the snapshot's")
                    template = snap["template"]
                if template not in ("base", "code-interpreter"):
                    return self.error(h, 404, "not_found", "template %r not found" % template)
                ttl = req.get("ttl_seconds", 300)
                if not 1 <= ttl <= 86400:
                    return self.error(h, 400, "invalid_argument", "bad ttl_seconds %d" % ttl)
                if req.get("on_timeout", "kill") not in ("kill", "pause"):
                    return self.error(h, 400, "invalid_argument", "bad on_timeout")
                sb = self.new_sandbox(template, ttl, req.get("metadata"),
                                      req.get("cpu", 1), req.get("memory_mb", 1024),
                                      req.get("on_timeout", "kill"))
                return self.send(h, 201, self.public(sb))
            if rec.method == "GET":
                return self.send(h, 200, {"sandboxes": [self.public(sb) for sb in self.sandboxes.values()]})
        sid = parts[2]
        sb = self.sandboxes.get(sid)
        if sb is None:
            return self.error(h, 404, "not_found", "sandbox %r not found" % sid)
        if len(parts) == 3 and rec.method == "GET":
            return self.send(h, 200, self.public(sb))
        if len(parts) == 3 and rec.method == "DELETE":
            del self.sandboxes[sid]
            return self.send(h, 204)
        if parts[3:] == ["timeout"] and rec.method == "POST":
            sb["expires_at"] = _go_time(datetime.now(timezone.utc) + timedelta(seconds=rec.json["ttl_seconds"]))
            return self.send(h, 200, self.public(sb))
        if parts[3:] == ["exec"] and rec.method == "POST":
            sb["state"], sb["paused_bytes"] = "running", 0  # exec resumes a paused sandbox
            if "ndjson" in rec.headers.get("Accept", ""):
                return self.stream(h)
            return self.send(h, 200, self.exec_result)
        if parts[3:] in (["pause"], ["resume"]) and rec.method == "POST":
            if rec.raw:
                return self.error(h, 400, "invalid_argument", "no body expected")
            if parts[3] == "pause":
                sb["state"], sb["paused_bytes"] = "paused", 1 << 20
            else:
                sb["state"], sb["paused_bytes"] = "running", 0
                sb["expires_at"] = _go_time(datetime.now(timezone.utc) + timedelta(seconds=sb["ttl"]))
            return self.send(h, 200, self.public(sb))
        if parts[3:] == ["snapshot"] and rec.method == "POST":
            if rec.raw:
                return self.error(h, 400, "invalid_argument", "no body expected")
            snap_id = "snap-%04d" % (len(self.snapshots) + 1)
            self.snapshots[snap_id] = {"id": snap_id, "source_sandbox": sid, "template": sb["template"],
                                       "size_bytes": 5 << 20, "created_at": "2024-05-01T12:00:01Z"}
            return self.send(h, 201, self.snapshots[snap_id])
        if parts[3:] == ["fork"] and rec.method == "POST":
            req = rec.json or {}
            count = req.get("count", 1)
            if not 1 <= count <= 16:
                return self.error(h, 400, "invalid_argument", "count must be 1 to 16")
            forks = [self.new_sandbox(sb["template"], req.get("ttl_seconds", sb["ttl"]), sb["metadata"],
                                      sb["cpu"], sb["memory_mb"], sb["on_timeout"]) for _ in range(count)]
            return self.send(h, 201, {"sandboxes": [self.public(f) for f in forks]})
        return self.error(h, 404, "not_found", "no route")

    def route_snapshots(self, h, rec, rest):
        if not rest and rec.method == "GET":
            return self.send(h, 200, {"snapshots": list(self.snapshots.values())})
        snap = self.snapshots.get(rest[0]) if len(rest) == 1 else None
        if snap is None:
            return self.error(h, 404, "not_found", "snapshot %r not found" % "/".join(rest))
        if rec.method == "GET":
            return self.send(h, 200, snap)
        if rec.method == "DELETE":
            del self.snapshots[snap["id"]]
            return self.send(h, 204)
        return self.error(h, 404, "not_found", "no route")

    def stream(self, h):
        h.send_response(200)
        h.send_header("Content-Type", "application/x-ndjson")
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()

        def chunk(data):
            h.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            h.wfile.flush()

        for ev in self.exec_events or []:
            if isinstance(ev, tuple) and ev[0] == "wait":
                self.gate_waits[ev[1]] = self.gates[ev[1]].wait(60)
            elif isinstance(ev, bytes):
                chunk(ev)
            else:
                chunk(json.dumps(ev).encode() + b"\n")
        h.wfile.write(b"0\r\n\r\n")
        h.wfile.flush()


def _go_time(dt):
    return dt.strftime("%Y-%m-%dT%H:%M:%S.%f") + "123Z"


@pytest.fixture(autouse=True)
def isolated_env(monkeypatch, tmp_path):
    """No test sees the caller's PandaStack settings or the real key file."""
    for name in ("PANDASTACK_URL", "PANDASTACK_API_KEY", "PANDASTACK_DATA_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PANDASTACK_DATA_DIR", str(tmp_path / "no-data-dir"))


@pytest.fixture
def server():
    s = FakeServer().start()
    yield s
    s.stop()


@pytest.fixture
def kw(server):
    return {"url": server.url, "api_key": API_KEY}


def last(server, method=None):
    reqs = [r for r in server.requests if method is None or r.method == method]
    return reqs[-1]


# ----- create / connect / list -------------------------------------------------

def test_create_sends_all_fields_and_auth(server, kw):
    sb = Sandbox.create(template="code-interpreter", ttl_seconds=120, env={"A": "1", "B": 2},
                        metadata={"owner": "me"}, cpu=0.5, memory_mb=256, **kw)
    rec = last(server)
    assert (rec.method, rec.path) == ("POST", "/v1/sandboxes")
    assert rec.json == {"template": "code-interpreter", "ttl_seconds": 120, "env": {"A": "1", "B": "2"},
                        "metadata": {"owner": "me"}, "cpu": 0.5, "memory_mb": 256}
    assert rec.headers["Authorization"] == "Bearer " + API_KEY
    assert rec.headers["Content-Type"] == "application/json"
    assert rec.headers["Accept"] == "application/json"
    assert rec.headers["User-Agent"].startswith("pandastack-python/")
    assert sb.id == "sb-0001"
    info = sb.info
    assert isinstance(info, SandboxInfo)
    assert (info.template, info.state, info.metadata, info.cpu, info.memory_mb) == (
        "code-interpreter", "running", {"owner": "me"}, 0.5, 256)
    assert info.created_at == datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=timezone.utc)
    assert info.expires_at.tzinfo is not None
    assert timedelta(seconds=100) < info.expires_at - datetime.now(timezone.utc) <= timedelta(seconds=121)


def test_create_defaults_send_only_template(server, kw):
    Sandbox.create(**kw)
    assert last(server).json == {"template": "base"}


def test_connect_list_refresh_set_timeout(server, kw):
    a = Sandbox.create(metadata={"n": "a"}, **kw)
    b = Sandbox.create(**kw)
    c = Sandbox.connect(a.id, **kw)
    assert (last(server).method, last(server).path) == ("GET", "/v1/sandboxes/" + a.id)
    assert c.id == a.id and c.info.metadata == {"n": "a"}

    infos = Sandbox.list(**kw)
    assert (last(server).method, last(server).path) == ("GET", "/v1/sandboxes")
    assert sorted(i.id for i in infos) == sorted([a.id, b.id])
    assert all(isinstance(i, SandboxInfo) and isinstance(i.expires_at, datetime) for i in infos)

    before = a.info.expires_at
    info = a.set_timeout(3600)
    rec = last(server)
    assert (rec.method, rec.path, rec.json) == ("POST", "/v1/sandboxes/%s/timeout" % a.id, {"ttl_seconds": 3600})
    assert info is a.info and info.expires_at > before + timedelta(seconds=3000)

    server.sandboxes[a.id]["state"] = "stopped"
    assert a.refresh().state == "stopped"
    assert a.info.state == "stopped"
    assert last(server).path == "/v1/sandboxes/" + a.id


def test_list_accepts_null(server, kw):
    server.canned[("GET", "/v1/sandboxes")] = (200, b'{"sandboxes": null}', "application/json")
    assert Sandbox.list(**kw) == []


def test_connect_escapes_id(server, kw):
    with pytest.raises(NotFoundError):
        Sandbox.connect("../x/y", **kw)
    assert last(server).path == "/v1/sandboxes/..%2Fx%2Fy"


# ----- snapshots, fork, pause and resume ---------------------------------------

def test_info_has_on_timeout_and_paused_bytes(server, kw):
    sb = Sandbox.create(on_timeout="pause", **kw)
    assert last(server).json == {"template": "base", "on_timeout": "pause"}
    assert (sb.info.on_timeout, sb.info.paused_bytes) == ("pause", 0)


def test_info_tolerates_missing_new_fields(server, kw):
    server.canned[("GET", "/v1/sandboxes/sb-old")] = (200, json.dumps({
        "id": "sb-old", "template": "base", "state": "running", "created_at": "2024-05-01T12:00:00Z",
        "expires_at": "2024-05-01T12:05:00Z", "metadata": {}, "cpu": 1, "memory_mb": 1024,
    }).encode(), "application/json")
    info = Sandbox.connect("sb-old", **kw).info
    assert (info.on_timeout, info.paused_bytes) == ("kill", 0)


def test_snapshot_and_create_from_it(server, kw):
    sb = Sandbox.create(template="code-interpreter", **kw)
    snap = sb.snapshot()
    rec = last(server)
    assert (rec.method, rec.path, rec.raw) == ("POST", "/v1/sandboxes/%s/snapshot" % sb.id, b"")
    assert isinstance(snap, Snapshot)
    assert (snap.id, snap.source_sandbox, snap.template, snap.size_bytes) == (
        "snap-0001", sb.id, "code-interpreter", 5 << 20)
    assert snap.created_at == datetime(2024, 5, 1, 12, 0, 1, tzinfo=timezone.utc)
    assert "_client" not in repr(snap)

    # No default template is sent with a snapshot: the snapshot's is used.
    clone = Sandbox.create(snapshot_id=snap.id, on_timeout="kill", ttl_seconds=60, **kw)
    assert last(server).json == {"snapshot_id": snap.id, "on_timeout": "kill", "ttl_seconds": 60}
    assert clone.id != sb.id and clone.info.template == "code-interpreter"
    Sandbox.create(template="code-interpreter", snapshot_id=snap.id, **kw)
    assert last(server).json == {"template": "code-interpreter", "snapshot_id": snap.id}
    with pytest.raises(InvalidArgumentError):
        Sandbox.create(template="base", snapshot_id=snap.id, **kw)
    with pytest.raises(NotFoundError):
        Sandbox.create(snapshot_id="snap-nope", **kw)


def test_snapshot_list_get_delete(server, kw):
    sb = Sandbox.create(**kw)
    a, b = sb.snapshot(), sb.snapshot()
    got = Snapshot.get(a.id, **kw)
    assert (last(server).method, last(server).path) == ("GET", "/v1/snapshots/" + a.id)
    assert got == a
    listed = Snapshot.list(**kw)
    assert (last(server).method, last(server).path) == ("GET", "/v1/snapshots")
    assert sorted(s.id for s in listed) == [a.id, b.id]
    assert all(isinstance(s, Snapshot) for s in listed)

    Snapshot.delete(a.id, **kw)
    assert (last(server).method, last(server).path) == ("DELETE", "/v1/snapshots/" + a.id)
    with pytest.raises(NotFoundError):
        Snapshot.get(a.id, **kw)
    with pytest.raises(NotFoundError):
        Snapshot.delete(a.id, **kw)
    with pytest.raises(NotFoundError):
        Sandbox.create(snapshot_id=a.id, **kw)
    # An instance deletes itself, on the server it came from (there is no
    # $PANDASTACK_URL here).
    b.delete()
    assert (last(server).method, last(server).path) == ("DELETE", "/v1/snapshots/" + b.id)
    assert Snapshot.list(**kw) == []
    with pytest.raises(TypeError):
        Snapshot.delete(**kw)


def test_snapshot_paths_are_escaped(server, kw):
    with pytest.raises(NotFoundError):
        Snapshot.get("../sandboxes", **kw)
    assert last(server).path == "/v1/snapshots/..%2Fsandboxes"


def test_snapshot_list_accepts_null_and_rejects_garbage(server, kw):
    server.canned[("GET", "/v1/snapshots")] = (200, b'{"snapshots": null}', "application/json")
    assert Snapshot.list(**kw) == []
    server.canned[("GET", "/v1/snapshots")] = (200, b'{"snapshots": [{"no": "id"}]}', "application/json")
    with pytest.raises(ServerError):
        Snapshot.list(**kw)


def test_snapshot_delete_conflict(server, kw):
    server.canned[("DELETE", "/v1/snapshots/snap-busy")] = (
        409, b'{"error":{"code":"conflict","message":"a sandbox is being created from it"}}', "application/json")
    with pytest.raises(ConflictError) as ei:
        Snapshot.delete("snap-busy", **kw)
    assert "being created" in ei.value.message


def test_fork(server, kw):
    parent = Sandbox.create(metadata={"n": "p"}, ttl_seconds=100, **kw)
    forks = parent.fork(count=2, ttl_seconds=30)
    rec = last(server)
    assert (rec.method, rec.path, rec.json) == ("POST", "/v1/sandboxes/%s/fork" % parent.id,
                                                {"count": 2, "ttl_seconds": 30})
    assert len(forks) == 2 and all(isinstance(f, Sandbox) for f in forks)
    assert len({parent.id} | {f.id for f in forks}) == 3
    assert all(f.url == parent.url and f.info.state == "running" for f in forks)
    left = (forks[0].info.expires_at - datetime.now(timezone.utc)).total_seconds()
    assert 20 < left <= 31, left
    # Each fork is a handle of its own.
    forks[0].kill()
    assert forks[0].id not in server.sandboxes and forks[1].id in server.sandboxes

    assert len(parent.fork()) == 1
    assert last(server).json == {"count": 1}
    with pytest.raises(InvalidArgumentError):
        parent.fork(count=17)


def test_fork_bad_answer(server, kw):
    sb = Sandbox.create(**kw)
    server.canned[("POST", "/v1/sandboxes/%s/fork" % sb.id)] = (201, b'{"sandboxes": null}', "application/json")
    with pytest.raises(ServerError):
        sb.fork()


def test_pause_resume(server, kw):
    sb = Sandbox.create(ttl_seconds=600, **kw)
    info = sb.pause()
    rec = last(server)
    assert (rec.method, rec.path, rec.raw) == ("POST", "/v1/sandboxes/%s/pause" % sb.id, b"")
    assert info is sb.info and (info.state, info.paused_bytes) == ("paused", 1 << 20)
    assert [i.state for i in Sandbox.list(**kw)] == ["paused"]

    info = sb.resume()
    rec = last(server)
    assert (rec.method, rec.path, rec.raw) == ("POST", "/v1/sandboxes/%s/resume" % sb.id, b"")
    assert info is sb.info and (info.state, info.paused_bytes) == ("running", 0)
    left = (info.expires_at - datetime.now(timezone.utc)).total_seconds()
    assert 590 < left <= 601, left

    sb.kill()
    with pytest.raises(NotFoundError):
        sb.pause()
    with pytest.raises(NotFoundError):
        sb.resume()
    with pytest.raises(NotFoundError):
        sb.snapshot()
    with pytest.raises(NotFoundError):
        sb.fork()


def test_connect_resumes_a_paused_sandbox(server, kw):
    sb = Sandbox.create(**kw)
    n = len(server.requests)
    assert Sandbox.connect(sb.id, **kw).info.state == "running"
    assert [(r.method, r.path) for r in server.requests[n:]] == [("GET", "/v1/sandboxes/" + sb.id)]

    sb.pause()
    n = len(server.requests)
    other = Sandbox.connect(sb.id, **kw)
    assert [(r.method, r.path) for r in server.requests[n:]] == [
        ("GET", "/v1/sandboxes/" + sb.id), ("POST", "/v1/sandboxes/%s/resume" % sb.id)]
    assert (other.info.state, other.info.paused_bytes) == ("running", 0)
    assert server.sandboxes[sb.id]["state"] == "running"


# ----- exec -------------------------------------------------------------------

def test_exec_string_is_cmd(server, kw):
    sb = Sandbox.create(**kw)
    res = sb.exec("echo hi | wc -c")
    rec = last(server)
    assert (rec.method, rec.path) == ("POST", "/v1/sandboxes/%s/exec" % sb.id)
    assert rec.json == {"cmd": "echo hi | wc -c", "timeout_seconds": 60}
    assert rec.headers["Accept"] == "application/json"
    assert res == ExecResult(stdout="ok\n", stderr="", exit_code=0, timed_out=False,
                             truncated=False, duration_ms=1.5)


def test_exec_list_is_argv_with_options(server, kw):
    sb = Sandbox.create(**kw)
    sb.exec(["echo", "a b"], timeout_seconds=5, env={"X": "1"}, cwd="/tmp", stdin="in\n")
    assert last(server).json == {"argv": ["echo", "a b"], "timeout_seconds": 5, "env": {"X": "1"},
                                 "cwd": "/tmp", "stdin": "in\n"}
    sb.exec(("true",), stdin=b"bytes", timeout_seconds=None)
    assert last(server).json == {"argv": ["true"], "stdin": "bytes"}


def test_exec_rejects_bad_cmd_types(server, kw):
    sb = Sandbox.create(**kw)
    n = len(server.requests)
    with pytest.raises(TypeError):
        sb.exec(b"echo")
    with pytest.raises(TypeError):
        sb.exec(["echo", 1])
    assert len(server.requests) == n


def test_exec_result_fields(server, kw):
    sb = Sandbox.create(**kw)
    server.exec_result = {"stdout": "", "stderr": "", "exit_code": 124, "timed_out": True,
                          "truncated": True, "duration_ms": 1000.25}
    res = sb.exec("sleep 30", timeout_seconds=1)
    assert (res.exit_code, res.timed_out, res.truncated, res.duration_ms) == (124, True, True, 1000.25)


def test_exec_read_timeout_exceeds_request_timeout(server):
    sb = Sandbox.create(url=server.url, api_key=API_KEY, request_timeout=0.3)
    server.delay = 1.0
    # A plain call times out at request_timeout...
    with pytest.raises(PandaStackConnectionError) as ei:
        sb.refresh()
    assert "timed out" in str(ei.value) and server.url in str(ei.value)
    # ...but exec waits for the command's timeout plus a margin.
    assert sb.exec("sleep 1", timeout_seconds=2).exit_code == 0


def test_exec_stream_callbacks_incremental(server, kw):
    sb = Sandbox.create(**kw)
    got_first = threading.Event()
    server.gates["first"] = got_first
    server.exec_events = [
        {"type": "stdout", "data": "one\n"},
        ("wait", "first"),  # the server holds the rest until the client saw "one"
        {"type": "stderr", "data": "warn\n"},
        {"type": "stdout", "data": "two\n"},
        {"type": "future-kind", "data": "ignored"},
        {"type": "exit", "result": {"stdout": "", "stderr": "", "exit_code": 3, "timed_out": False,
                                    "truncated": False, "duration_ms": 12.0}},
    ]
    out, err = [], []

    def on_out(s):
        out.append(s)
        got_first.set()

    res = sb.exec("x", on_stdout=on_out, on_stderr=err.append)
    assert server.gate_waits["first"] is True, "first chunk was not delivered before the stream ended"
    assert last(server).headers["Accept"] == "application/x-ndjson"
    assert out == ["one\n", "two\n"] and err == ["warn\n"]
    assert (res.stdout, res.stderr, res.exit_code, res.duration_ms) == ("one\ntwo\n", "warn\n", 3, 12.0)


def test_exec_stream_only_stderr_callback(server, kw):
    sb = Sandbox.create(**kw)
    server.exec_events = [{"type": "stdout", "data": "a"}, {"type": "stderr", "data": "b"},
                          {"type": "exit", "result": {"exit_code": 0}}]
    err = []
    res = sb.exec("x", on_stderr=err.append)
    assert err == ["b"] and res.stdout == "a" and res.stderr == "b"


def test_exec_stream_error_event(server, kw):
    sb = Sandbox.create(**kw)
    server.exec_events = [{"type": "stdout", "data": "a"},
                          {"type": "error", "error": {"code": "unavailable", "message": "agent died"}}]
    with pytest.raises(UnavailableError) as ei:
        sb.exec("x", on_stdout=lambda s: None)
    assert (ei.value.code, ei.value.message, ei.value.status) == ("unavailable", "agent died", 503)


def test_exec_stream_cut_short(server, kw):
    sb = Sandbox.create(**kw)
    server.exec_events = [{"type": "stdout", "data": "a"}]
    with pytest.raises(PandaStackConnectionError) as ei:
        sb.exec("x", on_stdout=lambda s: None)
    assert "exit event" in str(ei.value)


def test_exec_stream_garbage_line(server, kw):
    sb = Sandbox.create(**kw)
    server.exec_events = [b"not json\n"]
    with pytest.raises(ServerError):
        sb.exec("x", on_stdout=lambda s: None)


def test_exec_stream_http_error_is_mapped(server, kw):
    sb = Sandbox.create(**kw)
    sb.kill()
    with pytest.raises(NotFoundError):
        sb.exec("x", on_stdout=lambda s: None)


# ----- errors -----------------------------------------------------------------

@pytest.mark.parametrize("status,code,cls", [
    (400, "invalid_argument", InvalidArgumentError),
    (401, "unauthenticated", AuthenticationError),
    (404, "not_found", NotFoundError),
    (409, "conflict", ConflictError),
    (413, "too_large", TooLargeError),
    (429, "quota_exceeded", QuotaExceededError),
    (503, "unavailable", UnavailableError),
    (504, "timeout", ServerTimeoutError),
    (507, "insufficient_storage", InsufficientStorageError),
    (500, "internal", ServerError),
    (502, "bad_gateway", ServerError),
    (418, "teapot", ServerError),
])
def test_error_mapping(server, kw, status, code, cls):
    server.canned[("GET", "/v1/sandboxes/sb-x")] = (
        status, json.dumps({"error": {"code": code, "message": "msg " + code}}).encode(), "application/json")
    with pytest.raises(cls) as ei:
        Sandbox.connect("sb-x", **kw)
    e = ei.value
    assert isinstance(e, PandaStackError)
    assert (e.status, e.code, e.message) == (status, code, "msg " + code)
    assert code in str(e) and str(status) in str(e)


@pytest.mark.parametrize("status,cls", [
    (504, ServerTimeoutError),
    (507, InsufficientStorageError),
])
def test_error_status_without_json(server, kw, status, cls):
    server.canned[("GET", "/v1/sandboxes/sb-x")] = (status, b"<html>proxy</html>", "text/html")
    with pytest.raises(cls) as ei:
        Sandbox.connect("sb-x", **kw)
    assert ei.value.status == status and ei.value.code is None


def test_error_request_id(server, kw):
    body = {"error": {"code": "unavailable", "message": "sandbox failed to start",
                      "request_id": "0123456789abcdef"}}
    # From the body, which wins over the header.
    server.canned[("GET", "/v1/sandboxes/sb-x")] = (
        503, json.dumps(body).encode(), "application/json", {"X-Request-Id": "ffffffffffffffff"})
    with pytest.raises(UnavailableError) as ei:
        Sandbox.connect("sb-x", **kw)
    assert ei.value.request_id == "0123456789abcdef"
    assert "0123456789abcdef" in str(ei.value) and "0123456789abcdef" in repr(ei.value)
    # From the header when the body has none (a proxy's page).
    server.canned[("GET", "/v1/sandboxes/sb-y")] = (
        500, b"oops", "text/plain", {"X-Request-Id": "fedcba9876543210"})
    with pytest.raises(ServerError) as ei:
        Sandbox.connect("sb-y", **kw)
    assert ei.value.request_id == "fedcba9876543210"
    # None when there is neither.
    server.canned[("GET", "/v1/sandboxes/sb-z")] = (404, b"", "text/plain")
    with pytest.raises(NotFoundError) as ei:
        Sandbox.connect("sb-z", **kw)
    assert ei.value.request_id is None and "request" not in str(ei.value)


@pytest.mark.parametrize("code,cls,status", [
    ("timeout", ServerTimeoutError, 504),
    ("insufficient_storage", InsufficientStorageError, 507),
    ("unavailable", UnavailableError, 503),
    ("something_new", ServerError, None),
])
def test_error_from_code(code, cls, status):
    e = error_from_code(code, "m", request_id="0123456789abcdef")
    assert type(e) is cls and (e.status, e.code, e.message, e.request_id) == (status, code, "m", "0123456789abcdef")
    assert error_from_code(code, "m").request_id is None


def test_error_non_json_body(server, kw):
    server.canned[("GET", "/v1/sandboxes/sb-x")] = (502, b"<html>Bad Gateway</html>", "text/html")
    with pytest.raises(ServerError) as ei:
        Sandbox.connect("sb-x", **kw)
    assert ei.value.status == 502 and ei.value.code is None
    assert "Bad Gateway" in ei.value.message and "text/html" in ei.value.message
    server.canned[("GET", "/v1/sandboxes/sb-y")] = (404, b"", "text/plain")
    with pytest.raises(NotFoundError) as ei:
        Sandbox.connect("sb-y", **kw)
    assert "empty body" in ei.value.message


def test_success_non_json_body(server, kw):
    server.canned[("GET", "/v1/sandboxes")] = (200, b"hello", "text/plain")
    with pytest.raises(ServerError) as ei:
        Sandbox.list(**kw)
    assert "not JSON" in str(ei.value)


def test_real_error_paths(server, kw):
    with pytest.raises(NotFoundError):
        Sandbox.create(template="nope", **kw)
    with pytest.raises(InvalidArgumentError) as ei:
        Sandbox.create(ttl_seconds=0, **kw)
    assert ei.value.code == "invalid_argument"
    with pytest.raises(AuthenticationError) as ei:
        Sandbox.list(url=server.url, api_key="wrong")
    assert ei.value.status == 401
    assert last(server).headers["Authorization"] == "Bearer wrong"


def test_connection_error_names_url():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    url = "http://127.0.0.1:%d" % port
    with pytest.raises(PandaStackConnectionError) as ei:
        Sandbox.create(url=url, api_key="k")
    assert url in str(ei.value) and ei.value.url == url
    assert isinstance(ei.value, ConnectionError) and isinstance(ei.value, PandaStackError)


# ----- configuration -----------------------------------------------------------

def test_env_url_and_key(server, monkeypatch):
    monkeypatch.setenv("PANDASTACK_URL", server.url + "/")
    monkeypatch.setenv("PANDASTACK_API_KEY", " " + API_KEY + "\n")
    sb = Sandbox.create()
    assert sb.url == server.url
    assert last(server).headers["Authorization"] == "Bearer " + API_KEY


def test_explicit_args_beat_env(server, monkeypatch):
    monkeypatch.setenv("PANDASTACK_URL", "http://127.0.0.1:1")
    monkeypatch.setenv("PANDASTACK_API_KEY", "env-key")
    Sandbox.list(url=server.url, api_key=API_KEY)
    assert last(server).headers["Authorization"] == "Bearer " + API_KEY


def test_key_file(server, monkeypatch, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "api-key").write_text("\n  " + API_KEY + "  \n")
    monkeypatch.setenv("PANDASTACK_DATA_DIR", str(data))
    monkeypatch.setenv("PANDASTACK_URL", server.url)
    Sandbox.list()
    assert last(server).headers["Authorization"] == "Bearer " + API_KEY
    # The environment variable beats the key file.
    monkeypatch.setenv("PANDASTACK_API_KEY", "from-env")
    with pytest.raises(AuthenticationError):
        Sandbox.list()
    assert last(server).headers["Authorization"] == "Bearer from-env"


def test_no_key_sends_none_and_says_why(server, monkeypatch, tmp_path):
    monkeypatch.setenv("PANDASTACK_DATA_DIR", str(tmp_path / "empty"))
    with pytest.raises(AuthenticationError) as ei:
        Sandbox.list(url=server.url)
    assert "Authorization" not in last(server).headers
    assert str(tmp_path / "empty" / "api-key") in ei.value.message


def test_defaults(monkeypatch):
    monkeypatch.delenv("PANDASTACK_DATA_DIR")
    assert _http.resolve_url() == "http://127.0.0.1:7423"
    assert _http.key_file_path() == "/var/lib/pandastack/api-key"
    assert _http.resolve_url("localhost:9000/") == "http://localhost:9000"


# ----- kill / context manager ----------------------------------------------------

def test_kill_and_second_kill(server, kw):
    sb = Sandbox.create(**kw)
    sb.kill()
    rec = last(server)
    assert (rec.method, rec.path) == ("DELETE", "/v1/sandboxes/" + sb.id)
    assert sb.info.state == "stopped"
    with pytest.raises(NotFoundError):
        sb.kill()


def test_context_manager_kills(server, kw):
    with Sandbox.create(**kw) as sb:
        assert sb.id in server.sandboxes
    assert sb.id not in server.sandboxes
    assert (last(server).method, last(server).path) == ("DELETE", "/v1/sandboxes/" + sb.id)


def test_context_manager_after_manual_kill(server, kw):
    with Sandbox.create(**kw) as sb:
        sb.kill()
    assert [r.method for r in server.requests].count("DELETE") == 2


def test_context_manager_kills_on_exception(server, kw):
    with pytest.raises(ZeroDivisionError):
        with Sandbox.create(**kw) as sb:
            1 / 0
    assert sb.id not in server.sandboxes


def test_context_manager_kill_failure_does_not_hide_body_error(server, kw):
    with pytest.raises(ZeroDivisionError), pytest.warns(RuntimeWarning):
        with Sandbox.create(**kw) as sb:
            server.canned[("DELETE", "/v1/sandboxes/" + sb.id)] = (
                500, b'{"error":{"code":"internal","message":"boom"}}', "application/json")
            1 / 0
    with pytest.raises(ServerError):
        with Sandbox.create(**kw) as sb2:
            server.canned[("DELETE", "/v1/sandboxes/" + sb2.id)] = (
                500, b'{"error":{"code":"internal","message":"boom"}}', "application/json")


# ----- the README program, and misc ---------------------------------------------

SEED = """\
from pandastack import Sandbox
with Sandbox.create(template="code-interpreter", ttl_seconds=300) as sb:
    result = sb.exec("python3 -c 'print(sum(range(100)))'", timeout_seconds=30)
    print(result.stdout, result.exit_code)
"""


def test_seed_program_against_fake(server, monkeypatch):
    monkeypatch.setenv("PANDASTACK_URL", server.url)
    monkeypatch.setenv("PANDASTACK_API_KEY", API_KEY)
    server.exec_result = dict(server.exec_result, stdout="4950\n")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        exec(compile(SEED, "<seed>", "exec"), {})
    assert buf.getvalue() == "4950\n 0\n"
    posts = [r for r in server.requests if r.method == "POST"]
    assert posts[0].json == {"template": "code-interpreter", "ttl_seconds": 300}
    assert posts[1].json == {"cmd": "python3 -c 'print(sum(range(100)))'", "timeout_seconds": 30}
    assert server.requests[-1].method == "DELETE" and not server.sandboxes


@pytest.mark.parametrize("text,expected", [
    ("2024-05-01T12:00:00Z", datetime(2024, 5, 1, 12, 0, 0, tzinfo=timezone.utc)),
    ("2024-05-01T12:00:00.5Z", datetime(2024, 5, 1, 12, 0, 0, 500000, tzinfo=timezone.utc)),
    ("2024-05-01T12:00:00.123456789Z", datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=timezone.utc)),
    ("2024-05-01T14:00:00+02:00", datetime(2024, 5, 1, 12, 0, 0, tzinfo=timezone.utc)),
    ("2024-05-01T07:30:00.1-04:30", datetime(2024, 5, 1, 12, 0, 0, 100000, tzinfo=timezone.utc)),
])
def test_parse_time(text, expected):
    got = parse_time(text)
    assert got == expected and got.tzinfo is not None


def test_parse_time_rejects_garbage():
    assert parse_time(None) is None
    with pytest.raises(ValueError):
        parse_time("yesterday")


def test_exports():
    for name in pandastack.__all__:
        assert hasattr(pandastack, name), name
    assert issubclass(pandastack.PandaStackConnectionError, ConnectionError)
    for cls in (InvalidArgumentError, AuthenticationError, NotFoundError, ConflictError, TooLargeError,
                QuotaExceededError, UnavailableError, ServerError, PandaStackConnectionError):
        assert issubclass(cls, PandaStackError)
