"""Unit tests of templates (Template.build/list/get/delete) against a local HTTP server that
answers as docs/API.md ("Templates") says.

They check what the SDK sends (the query, the context as a gzip tar: ignored files left out,
links sent as links, a Dockerfile from elsewhere), that the build log is read as it streams
(an event is seen before the server writes the next), and how answers and errors are read.
"""

import gzip
import io
import json
import os
import queue
import tarfile
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from pandastack import (BuildError, ConflictError, InvalidArgumentError, NotFoundError, Template,
                        TemplateBuildEvent)
from pandastack.template import _Dockerignore

API_KEY = "tpl-key"
PATIENCE = 60  # seconds any wait in a test may take before the test fails

TEMPLATE_DOC = {"name": "myapp", "tag": "v1", "ref": "myapp:v1", "description": "", "packages": [],
                "ready": True, "builtin": False, "hash": "abc123", "base": "base", "size_bytes": 4096,
                "built_at": "2026-01-02T03:04:05Z", "env": ["A=1"], "working_dir": "/app",
                "cmd": ["python3", "app.py"], "exposed_ports": ["8000/tcp"]}
BASE_DOC = {"name": "base", "ref": "base", "description": "Debian", "packages": ["curl"], "ready": True,
            "builtin": True}


def error_body(code, message):
    return json.dumps({"error": {"code": code, "message": message}}).encode()


class FakeTemplates:
    """Answers the template routes; records every request (with the build's archive)."""

    def __init__(self):
        self.requests = []
        self.events = queue.Queue()  # the build's events, until None
        self.build_status = None  # (status, body) to refuse a build with
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                fake.handle(self)

            do_POST = do_DELETE = do_GET

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = "http://127.0.0.1:%d" % self.server.server_address[1]

    def stop(self):
        self.events.put(None)
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
        req = {"method": h.command, "path": u.path, "query": urllib.parse.parse_qsl(u.query),
               "headers": dict(h.headers), "body": body}
        self.requests.append(req)
        if h.headers.get("Authorization") != "Bearer " + API_KEY:
            return self.send(h, 401, error_body("unauthenticated", "no"))
        if u.path == "/v1/templates" and h.command == "GET":
            return self.send(h, 200, json.dumps({"templates": [BASE_DOC, TEMPLATE_DOC]}).encode())
        if u.path == "/v1/templates/myapp%3Av1" or u.path == "/v1/templates/myapp:v1":
            if h.command == "GET":
                return self.send(h, 200, json.dumps(TEMPLATE_DOC).encode())
            return self.send(h, 409, error_body("conflict", "template myapp:v1 is used by sandbox sb-1"))
        if u.path.startswith("/v1/templates/"):
            return self.send(h, 404, error_body("not_found", "template not found"))
        if u.path == "/v1/templates" and h.command == "POST":
            if self.build_status:
                return self.send(h, *self.build_status)
            h.send_response(200)
            h.send_header("Content-Type", "application/x-ndjson")
            h.send_header("Transfer-Encoding", "chunked")
            h.end_headers()
            while True:
                ev = self.events.get()
                if ev is None:
                    break
                b = json.dumps(ev).encode() + b"\n"
                h.wfile.write(b"%x\r\n%s\r\n" % (len(b), b))
                h.wfile.flush()
                if ev.get("type") in ("template", "error"):
                    break  # the last event, as the server's
            h.wfile.write(b"0\r\n\r\n")
            h.wfile.flush()
            return
        return self.send(h, 404, error_body("not_found", "no route"))


@pytest.fixture
def fake():
    f = FakeTemplates()
    yield f
    f.stop()


def make_context(tmp_path):
    ctx = tmp_path / "ctx"
    (ctx / "src" / "cache").mkdir(parents=True)
    (ctx / "Dockerfile").write_text("FROM base\nCOPY src/ /app/\n")
    (ctx / "src" / "app.py").write_text("print('hi')\n")
    (ctx / "src" / "run.sh").write_text("#!/bin/sh\n")
    os.chmod(ctx / "src" / "run.sh", 0o755)
    (ctx / "src" / "cache" / "x.bin").write_text("cached")
    (ctx / "src" / "cache" / "keep.txt").write_text("kept")
    (ctx / "secret.key").write_text("no")
    (ctx / ".dockerignore").write_text("# ignore\n*.key\nsrc/cache\n!src/cache/keep.txt\n")
    os.symlink("/etc/shadow", str(ctx / "abs-link"))
    os.symlink("../../outside", str(ctx / "src" / "rel-link"))
    return ctx


def archive(req):
    assert req["headers"].get("Content-Type") == "application/x-tar"
    assert req["headers"].get("Content-Encoding") == "gzip"
    tar = tarfile.open(fileobj=io.BytesIO(gzip.decompress(req["body"])), mode="r:")
    return {m.name: m for m in tar.getmembers()}, tar


def test_build_streams_the_log_and_returns_the_template(fake, tmp_path):
    ctx = make_context(tmp_path)
    seen = queue.Queue()
    result = {}

    def run():
        try:
            result["t"] = Template.build("myapp", str(ctx), tag="v1", build_args={"B": 2, "A": "x=y"},
                                         no_cache=True, on_log=seen.put, url=fake.url, api_key=API_KEY)
        except Exception as e:  # reported by the assertions below
            result["e"] = e

    th = threading.Thread(target=run)
    th.start()
    # Each event reaches on_log before the server writes the next.
    fake.events.put({"type": "step", "step": 1, "steps": 2, "line": 1, "instruction": "FROM base"})
    ev = seen.get(timeout=PATIENCE)
    assert isinstance(ev, TemplateBuildEvent) and (ev.type, ev.step, ev.steps, ev.instruction) == (
        "step", 1, 2, "FROM base")
    fake.events.put({"type": "cached", "step": 1, "steps": 2})
    assert seen.get(timeout=PATIENCE).type == "cached"
    fake.events.put({"type": "output", "step": 2, "steps": 2, "text": "compiling\n"})
    assert seen.get(timeout=PATIENCE).text == "compiling\n"
    fake.events.put({"type": "done", "step": 2, "steps": 2, "elapsed_ms": 12.5})
    assert seen.get(timeout=PATIENCE).elapsed_ms == 12.5
    fake.events.put({"type": "template", "template": TEMPLATE_DOC})
    th.join(PATIENCE)
    assert "e" not in result, result.get("e")
    t = result["t"]
    assert (t.ref, t.hash, t.base, t.size_bytes, t.cmd, t.working_dir) == (
        "myapp:v1", "abc123", "base", 4096, ["python3", "app.py"], "/app")
    assert t.built_at is not None and t.built_at.year == 2026
    assert seen.get(timeout=PATIENCE).template == t

    req = fake.requests[-1]
    assert req["method"] == "POST" and req["path"] == "/v1/templates"
    assert req["query"] == [("name", "myapp"), ("dockerfile", "Dockerfile"), ("tag", "v1"),
                            ("build_arg", "A=x=y"), ("build_arg", "B=2"), ("no_cache", "true")]
    members, tar = archive(req)
    assert sorted(members) == [".dockerignore", "Dockerfile", "abs-link", "src", "src/app.py",
                               "src/cache/keep.txt", "src/rel-link", "src/run.sh"]
    assert members["abs-link"].issym() and members["abs-link"].linkname == "/etc/shadow"
    assert members["src/rel-link"].issym() and members["src/rel-link"].linkname == "../../outside"
    assert members["src/run.sh"].mode & 0o111
    assert members["src/app.py"].uid == 0 and members["src/app.py"].uname == ""
    assert tar.extractfile("src/app.py").read() == b"print('hi')\n"


def test_build_dockerfile_outside_the_context(fake, tmp_path):
    ctx = make_context(tmp_path)
    other = tmp_path / "elsewhere.Dockerfile"
    other.write_text("FROM base\n")
    fake.events.put({"type": "template", "template": TEMPLATE_DOC})
    Template.build("myapp:v1", str(ctx), dockerfile=str(other), url=fake.url, api_key=API_KEY)
    req = fake.requests[-1]
    q = dict(req["query"])
    assert q["name"] == "myapp:v1" and q["dockerfile"].startswith(".pandastack-dockerfile-")
    members, tar = archive(req)
    assert tar.extractfile(q["dockerfile"]).read() == b"FROM base\n"
    # One in a subdirectory of the context is named by its path there.
    fake.events.put({"type": "template", "template": TEMPLATE_DOC})
    (ctx / "src" / "Dockerfile.dev").write_text("FROM base\n")
    Template.build("myapp", str(ctx), dockerfile="src/Dockerfile.dev", url=fake.url, api_key=API_KEY)
    assert dict(fake.requests[-1]["query"])["dockerfile"] == "src/Dockerfile.dev"
    with pytest.raises(ValueError):
        Template.build("myapp", str(ctx), dockerfile="missing", url=fake.url, api_key=API_KEY)
    with pytest.raises(ValueError):
        Template.build("myapp", str(ctx / "Dockerfile"), url=fake.url, api_key=API_KEY)


def test_build_failures(fake, tmp_path):
    ctx = make_context(tmp_path)
    fake.build_status = (400, error_body("invalid_argument", "Dockerfile line 3: HEALTHCHECK is not supported"))
    with pytest.raises(InvalidArgumentError) as e:
        Template.build("myapp", str(ctx), url=fake.url, api_key=API_KEY)
    assert "line 3" in str(e.value) and e.value.status == 400

    fake.build_status = None
    fake.events.put({"type": "step", "step": 2, "steps": 2, "line": 2, "instruction": "RUN exit 3"})
    fake.events.put({"type": "error", "error": {"code": "invalid_argument",
                                                "message": "line 2: RUN exit 3: exit status 3",
                                                "request_id": "req-1"}})
    logs = []
    with pytest.raises(BuildError) as e:
        Template.build("myapp", str(ctx), on_log=logs.append, url=fake.url, api_key=API_KEY)
    assert e.value.step == 2 and "line 2" in str(e.value) and e.value.code == "invalid_argument"
    assert e.value.request_id == "req-1"
    assert [x.type for x in logs] == ["step", "error"] and logs[-1].error is e.value

    # A stream that ends without a result is an error, not a template.
    fake.events.put({"type": "step", "step": 1, "steps": 1, "line": 1, "instruction": "FROM base"})
    fake.events.put(None)
    with pytest.raises(Exception) as e:
        Template.build("myapp", str(ctx), url=fake.url, api_key=API_KEY)
    assert "without a result" in str(e.value)


def test_list_get_delete(fake):
    ts = Template.list(url=fake.url, api_key=API_KEY)
    assert [(t.ref, t.builtin) for t in ts] == [("base", True), ("myapp:v1", False)]
    assert ts[0].packages == ["curl"]
    t = Template.get("myapp:v1", url=fake.url, api_key=API_KEY)
    assert t.ref == "myapp:v1" and t.exposed_ports == ["8000/tcp"] and t.env == ["A=1"]
    assert fake.requests[-1]["path"] in ("/v1/templates/myapp%3Av1", "/v1/templates/myapp:v1")
    with pytest.raises(NotFoundError):
        Template.get("nope", url=fake.url, api_key=API_KEY)
    with pytest.raises(ConflictError) as e:
        Template.delete("myapp:v1", url=fake.url, api_key=API_KEY)
    assert "sb-1" in str(e.value)
    with pytest.raises(NotFoundError):
        Template.delete("../sandboxes", url=fake.url, api_key=API_KEY)
    assert fake.requests[-1]["method"] == "DELETE" and fake.requests[-1]["path"] == "/v1/templates/..%2Fsandboxes"


def test_dockerignore_patterns():
    d = _Dockerignore("# c\n\n*.log\n/build\n**/*.key\n!keep.log\nsub/*/tmp\ndocs/[a-c]?.md\n")
    cases = {"a.log": True, "keep.log": False, "dir/a.log": False, "build": True, "build/x/y": True,
             "builder": False, "x.key": True, "a/b/c.key": True, "a/b/c.keys": False, "sub/1/tmp": True,
             "sub/1/tmp/f": True, "sub/1/2/tmp": False, "docs/ab.md": True, "docs/db.md": False,
             "Dockerfile": False}
    for path, want in cases.items():
        assert d.excludes(path) == want, path
    with pytest.raises(ValueError):
        _Dockerignore("a[\n")
