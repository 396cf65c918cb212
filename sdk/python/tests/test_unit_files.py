"""Unit tests of sb.files against a fake server that follows docs/API.md ("Files").

They check what the SDK sends (methods, paths, queries, streamed bodies), how
it reads answers and errors, and that archives from a sandbox cannot write
outside the local directory they are extracted into.
"""

import io
import json
import os
import tarfile
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from pandastack import (ConflictError, FileEvent, FileInfo, InsufficientStorageError, NotFoundError,
                        PandaStackError, Sandbox, SandboxInfo, UnavailableError)
from pandastack._http import HTTPClient
from pandastack.files import extract_tar, write_tar

API_KEY = "files-key"


def info(path, type_="file", size=0):
    return {"path": path, "name": os.path.basename(path), "type": type_, "size": size, "mode": 420,
            "mod_time": "2025-01-02T03:04:05.123456789Z", "owner": "user", "group": "user"}


class FakeFiles:
    """Answers the file routes of sandbox sb-1; records every request."""

    def __init__(self):
        self.requests = []
        self.override = None  # (status, body bytes, content type) for the next answers
        self.tar_answer = b""
        self.watch_lines = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                fake.handle(self)

            do_PUT = do_POST = do_GET

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = "http://127.0.0.1:%d" % self.server.server_address[1]

    def stop(self):
        self.server.shutdown()
        self.server.server_close()

    def read_body(self, h):
        if h.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = b""
            while True:
                size = int(h.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    h.rfile.readline()
                    return out, True
                out += h.rfile.read(size)
                h.rfile.readline()
        n = int(h.headers.get("Content-Length") or 0)
        return h.rfile.read(n), False

    def send(self, h, status, body=b"", ctype="application/json"):
        h.send_response(status)
        h.send_header("Content-Type", ctype)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    def handle(self, h):
        u = urllib.parse.urlsplit(h.path)
        q = dict(urllib.parse.parse_qsl(u.query))
        body, chunked = self.read_body(h)
        self.requests.append({"method": h.command, "path": u.path, "query": q, "body": body, "chunked": chunked,
                              "headers": dict(h.headers)})
        if h.headers.get("Authorization") != "Bearer " + API_KEY:
            return self.send(h, 401, json.dumps({"error": {"code": "unauthenticated", "message": "no"}}).encode())
        if self.override is not None:
            status, b, ct = self.override
            return self.send(h, status, b, ct)
        route = u.path[len("/v1/sandboxes/sb-1/files"):]
        if route == "" and h.command == "GET":
            return self.send(h, 200, ("content of " + q["path"]).encode(), "application/octet-stream")
        if route == "" and h.command == "PUT":
            return self.send(h, 200, json.dumps(info(q["path"], size=len(body))).encode())
        if route == "/stat":
            if q["path"] == "/missing":
                return self.send(h, 404, json.dumps({"error": {"code": "not_found", "message": "no such file"}}).encode())
            return self.send(h, 200, json.dumps(info(q["path"])).encode())
        if route == "/list":
            return self.send(h, 200, json.dumps({"entries": [info(q["path"] + "/a"), info(q["path"] + "/d", "dir")],
                                                 "truncated": False}).encode())
        if route in ("/mkdir", "/rename"):
            doc = json.loads(body)
            return self.send(h, 200, json.dumps(info(doc.get("path") or doc.get("to"), "dir")).encode())
        if route == "/remove":
            h.send_response(204)
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        if route == "/tar" and h.command == "PUT":
            return self.send(h, 200, json.dumps({"files": 1, "dirs": 0, "symlinks": 0, "links": 0, "bytes": len(body),
                                                 "skipped": []}).encode())
        if route == "/tar":
            return self.send(h, 200, self.tar_answer, "application/x-tar")
        if route == "/watch":
            b = b"".join(json.dumps(line).encode() + b"\n" for line in self.watch_lines)
            return self.send(h, 200, b, "application/x-ndjson")
        return self.send(h, 404, json.dumps({"error": {"code": "not_found", "message": "no route"}}).encode())


@pytest.fixture
def fake():
    f = FakeFiles()
    yield f
    f.stop()


@pytest.fixture
def sb(fake):
    client = HTTPClient(fake.url, API_KEY)
    return Sandbox(SandboxInfo(id="sb-1", template="base", state="running", created_at=None, expires_at=None), client)


def test_read_and_write_requests(fake, sb):
    assert sb.files.read("/home/user/a b.txt") == "content of /home/user/a b.txt"
    r = fake.requests[-1]
    assert (r["method"], r["path"], r["query"]) == ("GET", "/v1/sandboxes/sb-1/files", {"path": "/home/user/a b.txt"})
    assert sb.files.read_bytes("/f", user="root", offset=2, length=3) == b"content of /f"
    assert fake.requests[-1]["query"] == {"path": "/f", "user": "root", "offset": "2", "length": "3"}

    fi = sb.files.write("/f", "héllo", mode=0o640, parents=True)
    r = fake.requests[-1]
    assert isinstance(fi, FileInfo) and fi.size == len("héllo".encode()) and fi.mod_time.year == 2025
    assert (r["method"], r["query"], r["body"]) == ("PUT", {"path": "/f", "mode": "640", "parents": "true"}, "héllo".encode())
    sb.files.write("/f", b"\x00\xff")
    assert fake.requests[-1]["body"] == b"\x00\xff" and fake.requests[-1]["query"] == {"path": "/f"}


def test_write_streams_file_objects(fake, sb, tmp_path):
    p = tmp_path / "big"
    data = os.urandom(3 << 20)
    p.write_bytes(data)
    with open(p, "rb") as f:
        f.seek(10)
        sb.files.write("/big", f)
    r = fake.requests[-1]
    assert r["body"] == data[10:] and not r["chunked"] and r["headers"]["Content-Length"] == str(len(data) - 10)
    # A stream of unknown size goes chunked; a text file as UTF-8.
    rd, wr = os.pipe()
    with os.fdopen(wr, "wb") as w:
        w.write(b"from a pipe")
    with os.fdopen(rd, "rb") as f:
        sb.files.write("/p", f)
    assert fake.requests[-1]["body"] == b"from a pipe" and fake.requests[-1]["chunked"]
    t = tmp_path / "t.txt"
    t.write_text("ünïcode", encoding="utf-8")
    with open(t, encoding="utf-8") as f:
        sb.files.write("/t", f)
    assert fake.requests[-1]["body"] == "ünïcode".encode()
    with pytest.raises(TypeError):
        sb.files.write("/x", 42)


def test_read_to_streams(fake, sb):
    out = io.BytesIO()
    assert sb.files.read_to("/f", out) == len(b"content of /f")
    assert out.getvalue() == b"content of /f"


def test_small_operations(fake, sb):
    assert sb.files.stat("/f").path == "/f"
    assert sb.files.exists("/f") and not sb.files.exists("/missing")
    with pytest.raises(NotFoundError):
        sb.files.stat("/missing")
    entries = sb.files.list("/d", depth=2)
    assert [e.name for e in entries] == ["a", "d"] and entries[1].is_dir
    assert fake.requests[-1]["query"] == {"path": "/d", "depth": "2"}
    sb.files.make_dir("/d/e", mode=0o700)
    assert json.loads(fake.requests[-1]["body"]) == {"path": "/d/e", "parents": True, "mode": 448}
    sb.files.as_user("root").remove("/d", recursive=True)
    assert json.loads(fake.requests[-1]["body"]) == {"path": "/d", "recursive": True, "user": "root"}
    assert sb.files.rename("/a", "/b").path == "/b"
    assert json.loads(fake.requests[-1]["body"]) == {"from": "/a", "to": "/b"}
    assert fake.requests[-1]["path"] == "/v1/sandboxes/sb-1/files/rename"


@pytest.mark.parametrize("status,code,exc", [
    (409, "conflict", ConflictError),
    (507, "insufficient_storage", InsufficientStorageError),
    (503, "unavailable", UnavailableError),
])
def test_errors(fake, sb, status, code, exc):
    fake.override = (status, json.dumps({"error": {"code": code, "message": "m", "request_id": "r1"}}).encode(),
                     "application/json")
    with pytest.raises(exc) as e:
        sb.files.write("/f", b"x")
    assert e.value.request_id == "r1"


def test_upload_dir_streams_a_tar(fake, sb, tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a").write_text("a")
    (tmp_path / "sub" / "b").write_bytes(b"b" * 100000)
    os.symlink("a", tmp_path / "link")
    os.mkfifo(tmp_path / "fifo")
    res = sb.files.upload_dir(str(tmp_path), "/home/user/up")
    r = fake.requests[-1]
    assert r["method"] == "PUT" and r["path"].endswith("/files/tar") and r["chunked"]
    assert res.files == 1
    with tarfile.open(fileobj=io.BytesIO(r["body"])) as tf:
        names = sorted((m.name, m.type) for m in tf.getmembers())
    assert names == [("a", tarfile.REGTYPE), ("link", tarfile.SYMTYPE), ("sub", tarfile.DIRTYPE), ("sub/b", tarfile.REGTYPE)]
    with pytest.raises(NotADirectoryError):
        sb.files.upload_dir(str(tmp_path / "a"), "/x")


def test_download_dir_round_trip(fake, sb, tmp_path):
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f").write_text("deep")
    os.chmod(src / "d" / "f", 0o640)
    os.symlink("f", src / "d" / "l")
    buf = io.BytesIO()
    write_tar(buf, str(src))
    fake.tar_answer = buf.getvalue()
    dst = tmp_path / "out" / "new"
    sb.files.download_dir("/home/user/src", str(dst))
    assert (dst / "d" / "f").read_text() == "deep"
    assert oct(os.stat(dst / "d" / "f").st_mode & 0o777) == oct(0o640)
    assert os.readlink(dst / "d" / "l") == "f"


def _archive(entries):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for ti, data in entries:
            tf.addfile(ti, io.BytesIO(data) if data is not None else None)
    buf.seek(0)
    return buf


def _ti(name, type_=tarfile.REGTYPE, data=b"", linkname="", mode=0o644):
    ti = tarfile.TarInfo(name)
    ti.type, ti.linkname, ti.mode = type_, linkname, mode
    if type_ == tarfile.REGTYPE:
        ti.size = len(data)
        return ti, data
    return ti, None


@pytest.mark.parametrize("name,entries,plant,fails", [
    ("dot-dot", [_ti("../evil", data=b"x")], None, True),
    ("absolute name stays inside", [_ti("/evil", data=b"x")], None, False),
    ("symlink then a file through it", [_ti("l", tarfile.SYMTYPE, linkname="OUTSIDE"), _ti("l/evil", data=b"x")], None, True),
    ("planted symlink", [_ti("p/evil", data=b"x")], "p", True),
    ("file over a planted symlink replaces it", [_ti("v", data=b"x", mode=0o6755)], "v", False),
    ("hard link outside", [_ti("h", tarfile.LNKTYPE, linkname="../outside/keep")], None, True),
    ("hard link absolute", [_ti("h", tarfile.LNKTYPE, linkname="/etc/passwd")], None, True),
    ("hard link to a symlink", [_ti("s", tarfile.SYMTYPE, linkname="/etc/passwd"), _ti("h", tarfile.LNKTYPE, linkname="s")], None, True),
    ("device skipped", [_ti("null", tarfile.CHRTYPE)], None, False),
    ("fifo skipped", [_ti("fifo", tarfile.FIFOTYPE)], None, False),
])
def test_extract_tar_is_safe(tmp_path, name, entries, plant, fails):
    target, outside = tmp_path / "target", tmp_path / "outside"
    target.mkdir()
    outside.mkdir()
    (outside / "keep").write_text("keep")
    if plant == "p":
        os.symlink(outside, target / "p")
    elif plant == "v":
        os.symlink(outside / "keep", target / "v")
    fixed = []
    for ti, data in entries:
        ti.linkname = ti.linkname.replace("OUTSIDE", str(outside))
        fixed.append((ti, data))
    archive = _archive(fixed)
    if fails:
        with pytest.raises(PandaStackError):
            extract_tar(archive, str(target))
    else:
        extract_tar(archive, str(target))
    assert sorted(os.listdir(outside)) == ["keep"] and (outside / "keep").read_text() == "keep"
    assert not (tmp_path / "evil").exists()
    if name == "absolute name stays inside":
        assert (target / "evil").read_text() == "x"
    if name == "file over a planted symlink replaces it":
        st = os.lstat(target / "v")
        assert not os.path.islink(target / "v") and st.st_mode & 0o7777 == 0o755
    if name.endswith("skipped"):
        assert os.listdir(target) == []


def test_watch_iterates_events(fake, sb):
    fake.watch_lines = [{"type": "created", "path": "/d/a"}, {"type": "renamed", "path": "/d/b", "old_path": "/d/a"}]
    with sb.files.watch("/d", recursive=True) as w:
        events = list(w)
    assert events == [FileEvent("created", "/d/a"), FileEvent("renamed", "/d/b", "/d/a")]
    assert fake.requests[-1]["query"] == {"path": "/d", "recursive": "true"}
    fake.watch_lines = [{"type": "created", "path": "/d/a"},
                        {"type": "error", "error": {"code": "unavailable", "message": "the sandbox died", "request_id": "x"}}]
    w = sb.files.watch("/d")
    assert next(w).path == "/d/a"
    with pytest.raises(UnavailableError):
        next(w)
    w.close()
