"""Files in a sandbox: ``sb.files`` (docs/API.md, "Files").

    sb.files.write("/home/user/hello.txt", "hi")
    print(sb.files.read("/home/user/hello.txt"))
    sb.files.upload_dir("./project", "/home/user/project")
    for event in sb.files.watch("/home/user/project", recursive=True):
        print(event.type, event.path)

Paths are absolute paths in the sandbox, resolved there with the permissions
of the user a call runs as: the sandbox's unprivileged default user, or the
one ``user=`` names ("root"). What a call creates belongs to that user.
Contents stream both ways; only :meth:`Files.read` and
:meth:`Files.read_bytes` hold a whole file in memory.
"""

from __future__ import annotations

import errno
import http.client
import io
import json
import os
import select
import stat as stat_mod
import tarfile
import threading
import urllib.error
import urllib.parse
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import IO, Any, BinaryIO, Dict, Iterator, List, Optional, Union

from ._http import USER_AGENT, HTTPClient
from .errors import NotFoundError, PandaStackError, ServerError, error_from_code, error_from_response
from .models import parse_time

# Bytes read or written at a time when streaming.
CHUNK = 1 << 20

Data = Union[str, bytes, bytearray, memoryview, IO[bytes], IO[str]]


@dataclass
class FileInfo:
    """A file, directory or link in a sandbox, as lstat sees it (the API's ``FileInfo``)."""

    path: str
    name: str
    type: str  # "file", "dir", "symlink" or "other"
    size: int = 0
    mode: int = 0  # permission bits, with setuid, setgid and sticky
    mod_time: Optional[datetime] = None
    owner: str = ""
    group: str = ""
    symlink_target: Optional[str] = None

    @property
    def is_dir(self) -> bool:
        return self.type == "dir"

    @classmethod
    def from_json(cls, doc: Any) -> "FileInfo":
        if not isinstance(doc, dict) or not isinstance(doc.get("path"), str):
            raise ServerError("unexpected file description: %r" % (doc,))
        return cls(path=doc["path"], name=str(doc.get("name") or ""), type=str(doc.get("type") or ""),
                   size=int(doc.get("size") or 0), mode=int(doc.get("mode") or 0),
                   mod_time=parse_time(doc.get("mod_time")), owner=str(doc.get("owner") or ""),
                   group=str(doc.get("group") or ""), symlink_target=doc.get("symlink_target") or None)


@dataclass
class FileEvent:
    """One change in a watched directory: ``created``, ``written``, ``removed``, ``renamed`` or ``overflow``."""

    type: str
    path: str = ""
    old_path: Optional[str] = None  # where a renamed entry was
    is_dir: bool = False

    @classmethod
    def from_json(cls, doc: Dict[str, Any]) -> "FileEvent":
        return cls(type=str(doc.get("type") or ""), path=str(doc.get("path") or ""),
                   old_path=doc.get("old_path") or None, is_dir=bool(doc.get("is_dir")))


@dataclass
class UploadResult:
    """What a directory upload made (the API's ``UploadResult``)."""

    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    links: int = 0
    bytes: int = 0
    skipped: List[Dict[str, str]] = field(default_factory=list)  # {"name", "reason"}

    @classmethod
    def from_json(cls, doc: Any) -> "UploadResult":
        if not isinstance(doc, dict):
            raise ServerError("unexpected upload result: %r" % (doc,))
        return cls(files=int(doc.get("files") or 0), dirs=int(doc.get("dirs") or 0),
                   symlinks=int(doc.get("symlinks") or 0), links=int(doc.get("links") or 0),
                   bytes=int(doc.get("bytes") or 0), skipped=list(doc.get("skipped") or []))


class Files:
    """The filesystem of one sandbox; get it as ``sb.files``."""

    def __init__(self, client: HTTPClient, sandbox_path: str, user: Optional[str] = None):
        self._client = client
        self._base = sandbox_path + "/files"
        self._user = user

    def as_user(self, user: str) -> "Files":
        """The same filesystem, every call acting as ``user`` ("root", or "user" for the default)."""
        return Files(self._client, self._base[: -len("/files")], user)

    # ----- requests ---------------------------------------------------------

    def _url(self, route: str, path: Optional[str], user: Optional[str], **params: Any) -> str:
        q: Dict[str, str] = {}
        if path is not None:
            q["path"] = path
        if user or self._user:
            q["user"] = user or self._user or ""
        for k, v in params.items():
            if v is None or v is False:
                continue
            q[k] = "true" if v is True else str(v)
        url = self._base + route
        if q:
            url += "?" + urllib.parse.urlencode(q)
        return url

    @contextmanager
    def _open(self, method: str, url: str, data: Any = None, headers: Optional[Dict[str, str]] = None,
              accept: str = "application/json", timeout: Any = "default") -> Iterator[http.client.HTTPResponse]:
        """Send a request with a raw body and yield the 2xx answer; raise the mapped error otherwise."""
        c = self._client
        hdrs = {"Accept": accept, "User-Agent": USER_AGENT}
        if c.api_key:
            hdrs["Authorization"] = "Bearer " + c.api_key
        hdrs.update(headers or {})
        req = urllib.request.Request(c.base_url + url, data=data, headers=hdrs, method=method)
        if timeout == "default":
            timeout = c.request_timeout
        try:
            resp = c._opener.open(req, timeout=timeout)
        except urllib.error.HTTPError as e:
            try:
                body = e.read()
            except (OSError, http.client.HTTPException):
                body = b""
            finally:
                e.close()
            h = e.headers
            raise error_from_response(e.code, body, h.get("Content-Type", "") if h else "", req.full_url,
                                      request_id=h.get("X-Request-Id") if h else None) from None
        except urllib.error.URLError as e:
            raise c._connection_error(method, req.full_url, e.reason) from e
        except (OSError, http.client.HTTPException) as e:
            raise c._connection_error(method, req.full_url, e) from e
        try:
            yield resp
        finally:
            resp.close()

    def _json(self, method: str, url: str, data: Any = None, headers: Optional[Dict[str, str]] = None) -> Any:
        with self._open(method, url, data, headers) as resp:
            body = self._client.read_all(method, resp)
        if not body.strip():
            return None
        try:
            return json.loads(body.decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            raise ServerError("%s %s: answer is not JSON: %r" % (method, url, body[:200])) from None

    def _post(self, route: str, body: Dict[str, Any], user: Optional[str]) -> Any:
        if user or self._user:
            body["user"] = user or self._user
        return self._json("POST", self._base + route, json.dumps(body).encode("utf-8"),
                          {"Content-Type": "application/json"})

    def _put(self, url: str, body: Any, headers: Dict[str, str]) -> Any:
        """PUT a streamed body (bytes or a binary file object) and return the decoded JSON answer.

        Sent on a connection of its own with http.client, watching for an
        early answer between chunks, as curl does: the server answers an
        upload it refuses (a full disk, a bad path) before it has read the
        body, then closes the connection, and a client that only reads the
        answer after sending everything would see the connection reset
        instead of the error.
        """
        c = self._client
        u = urllib.parse.urlsplit(c.base_url + url)
        conn_cls = http.client.HTTPSConnection if u.scheme == "https" else http.client.HTTPConnection
        timeout = c.request_timeout
        conn = conn_cls(u.hostname or "", u.port, timeout=timeout)
        hdrs = {"Accept": "application/json", "User-Agent": USER_AGENT}
        if c.api_key:
            hdrs["Authorization"] = "Bearer " + c.api_key
        hdrs.update(headers)
        if isinstance(body, (bytes, bytearray, memoryview)):
            hdrs["Content-Length"] = str(len(body))
        chunked = "Content-Length" not in hdrs
        if chunked:
            hdrs["Transfer-Encoding"] = "chunked"
        full = c.base_url + url
        send_error: Optional[BaseException] = None
        try:
            try:
                conn.putrequest("PUT", u.path + ("?" + u.query if u.query else ""), skip_accept_encoding=True)
                for k, v in hdrs.items():
                    conn.putheader(k, v)
                conn.endheaders()
                sock = conn.sock
                answered = False
                for chunk in _chunks(body):
                    if select.select([sock], [], [], 0)[0]:
                        answered = True  # the server answered early: stop sending
                        break
                    if chunked:
                        sock.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
                    else:
                        sock.sendall(chunk)
                if chunked and not answered:
                    sock.sendall(b"0\r\n\r\n")
            except (BrokenPipeError, ConnectionResetError) as e:
                send_error = e  # the answer may be there all the same
            except OSError as e:
                raise c._connection_error("PUT", full, e) from e
            try:
                resp = conn.getresponse()
                data = resp.read()
            except (OSError, http.client.HTTPException) as e:
                raise c._connection_error("PUT", full, send_error or e) from e
            if resp.status >= 300:
                raise error_from_response(resp.status, data, resp.getheader("Content-Type", "") or "", full,
                                          request_id=resp.getheader("X-Request-Id"))
        finally:
            conn.close()
        try:
            return json.loads(data.decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            raise ServerError("PUT %s: answer is not JSON: %r" % (url, data[:200])) from None

    # ----- reading ----------------------------------------------------------

    @contextmanager
    def open(self, path: str, *, user: Optional[str] = None, offset: Optional[int] = None,
             length: Optional[int] = None) -> Iterator[BinaryIO]:
        """A binary stream of a file's bytes, for ``with``: read it as it comes.

        A transfer that the server cuts short (the sandbox died) raises
        instead of ending early.
        """
        url = self._url("", path, user, offset=offset, length=length)
        with self._open("GET", url, accept="application/octet-stream") as resp:
            yield resp  # type: ignore[misc]

    def read_bytes(self, path: str, *, user: Optional[str] = None, offset: Optional[int] = None,
                   length: Optional[int] = None) -> bytes:
        """A file's content (or ``length`` bytes from ``offset``) as bytes."""
        with self.open(path, user=user, offset=offset, length=length) as f:
            try:
                return f.read()
            except (OSError, http.client.HTTPException) as e:
                raise self._client._connection_error("GET", path, e) from e

    def read(self, path: str, *, user: Optional[str] = None, encoding: str = "utf-8",
             errors: str = "strict") -> str:
        """A file's content as text."""
        return self.read_bytes(path, user=user).decode(encoding, errors)

    def read_to(self, path: str, fileobj: IO[bytes], *, user: Optional[str] = None) -> int:
        """Stream a file's content into ``fileobj`` (opened for binary writing); returns the bytes copied."""
        n = 0
        with self.open(path, user=user) as f:
            while True:
                try:
                    chunk = f.read(CHUNK)
                except (OSError, http.client.HTTPException) as e:
                    raise self._client._connection_error("GET", path, e) from e
                if not chunk:
                    return n
                fileobj.write(chunk)
                n += len(chunk)

    # ----- writing ----------------------------------------------------------

    def write(self, path: str, data: Data, *, user: Optional[str] = None, mode: Optional[int] = None,
              parents: bool = False) -> FileInfo:
        """Write ``data`` (str, bytes or a readable file object, streamed) to a file.

        The content goes to a temporary file beside it, renamed over the path
        once complete: readers never see half of it, a failed write leaves the
        old file, and a symlink at the path is replaced (not followed).
        ``mode`` is the permission bits (``0o644`` by default, or a replaced
        file's); ``parents`` makes missing directories. More than the
        sandbox's disk holds raises :class:`InsufficientStorageError`.
        """
        headers = {"Content-Type": "application/octet-stream"}
        body: Any
        if isinstance(data, str):
            body = data.encode("utf-8")
        elif isinstance(data, (bytes, bytearray, memoryview)):
            body = bytes(data)
        elif hasattr(data, "read"):
            body = _binary_stream(data)
            size = _remaining_size(body)
            if size is not None:
                headers["Content-Length"] = str(size)
        else:
            raise TypeError("data must be str, bytes or a readable file object, not %s" % type(data).__name__)
        url = self._url("", path, user, mode=None if mode is None else format(mode, "o"), parents=parents)
        return FileInfo.from_json(self._put(url, body, headers))

    # ----- the rest ---------------------------------------------------------

    def stat(self, path: str, *, user: Optional[str] = None) -> FileInfo:
        """Describe a path (a symlink itself); raises :class:`NotFoundError` when it does not exist."""
        return FileInfo.from_json(self._json("GET", self._url("/stat", path, user)))

    def exists(self, path: str, *, user: Optional[str] = None) -> bool:
        """Whether a path exists (a dangling symlink does)."""
        try:
            self.stat(path, user=user)
        except NotFoundError:
            return False
        return True

    def list(self, path: str, depth: int = 1, *, user: Optional[str] = None) -> List[FileInfo]:
        """A directory's entries down to ``depth`` (1: its own), parents before their children.

        At most 10,000 entries; symlinked directories are listed, not entered.
        """
        doc = self._json("GET", self._url("/list", path, user, depth=depth))
        if not isinstance(doc, dict) or not isinstance(doc.get("entries", []), (list, type(None))):
            raise ServerError("unexpected listing: %r" % (doc,))
        return [FileInfo.from_json(e) for e in (doc.get("entries") or [])]

    def make_dir(self, path: str, *, parents: bool = True, mode: Optional[int] = None,
                 user: Optional[str] = None) -> FileInfo:
        """Make a directory; with ``parents`` (the default) its parents too, and an existing one is fine."""
        body: Dict[str, Any] = {"path": path, "parents": parents}
        if mode is not None:
            body["mode"] = mode
        return FileInfo.from_json(self._post("/mkdir", body, user))

    def remove(self, path: str, *, recursive: bool = False, user: Optional[str] = None) -> None:
        """Remove a file, symlink (never followed) or directory (empty unless ``recursive``)."""
        self._post("/remove", {"path": path, "recursive": recursive}, user)

    def rename(self, src: str, dst: str, *, user: Optional[str] = None) -> FileInfo:
        """Move ``src`` to ``dst`` (a file at ``dst`` is replaced); returns the entry at ``dst``."""
        return FileInfo.from_json(self._post("/rename", {"from": src, "to": dst}, user))

    # ----- directories as tar streams ---------------------------------------

    def upload_dir(self, local: str, remote: str, *, user: Optional[str] = None) -> UploadResult:
        """Copy the contents of the local directory ``local`` into ``remote`` (made when missing).

        The archive is made while it is sent: regular files, directories and
        symlinks (as links); other files are left out.
        """
        if not os.path.isdir(local):
            raise NotADirectoryError(errno.ENOTDIR, "not a directory", local)
        r, w = os.pipe()
        failure: List[BaseException] = []

        def produce() -> None:
            try:
                with os.fdopen(w, "wb") as out:
                    write_tar(out, local)
            except BaseException as e:  # reported after the request
                failure.append(e)

        producer = threading.Thread(target=produce, name="pandastack-upload-dir", daemon=True)
        producer.start()
        try:
            with os.fdopen(r, "rb") as body:
                doc = self._put(self._url("/tar", remote, user), body, {"Content-Type": "application/x-tar"})
        finally:
            producer.join()
        if failure and not isinstance(failure[0], BrokenPipeError):
            raise failure[0]
        return UploadResult.from_json(doc)

    def upload_tar(self, remote: str, archive: Union[bytes, IO[bytes]], *, gzip: bool = False,
                   user: Optional[str] = None) -> UploadResult:
        """Extract a tar archive (bytes or a binary file object; gzip-compressed with ``gzip``) into ``remote``."""
        headers = {"Content-Type": "application/x-tar"}
        if gzip:
            headers["Content-Encoding"] = "gzip"
        body: Any = archive
        if hasattr(archive, "read"):
            size = _remaining_size(archive)
            if size is not None:
                headers["Content-Length"] = str(size)
        return UploadResult.from_json(self._put(self._url("/tar", remote, user), body, headers))

    def download_dir(self, remote: str, local: str, *, user: Optional[str] = None) -> None:
        """Copy a directory of the sandbox (its contents), or a file (under its base name), into ``local``.

        ``local`` is made when missing. The archive comes from the sandbox and
        is not trusted: a name with ``..`` or whose parents include a symlink
        is refused, an existing file or symlink at a name is replaced rather
        than written through, hard links must point to a regular file inside
        ``local``, setuid and setgid bits are dropped, and devices, FIFOs and
        sockets are skipped.
        """
        with self._open("GET", self._url("/tar", remote, user), accept="application/x-tar") as resp:
            extract_tar(resp, local)

    # ----- watch ------------------------------------------------------------

    def watch(self, path: str, recursive: bool = False, *, user: Optional[str] = None,
              timeout: Optional[float] = None) -> "Watch":
        """Watch a directory: iterate the returned :class:`Watch` for :class:`FileEvent` s.

        The watch is in place when this returns: every change made after it
        is reported. Iteration ends when the watch is closed or the directory
        goes away; ``timeout`` (seconds, default none) bounds the wait for
        the next event. Use it as a context manager, or call ``close()``.
        """
        url = self._url("/watch", path, user, recursive=recursive)
        cm = self._open("GET", url, accept="application/x-ndjson", timeout=timeout)
        resp = cm.__enter__()
        return Watch(cm, resp, self._client)


class Watch:
    """A watch in progress: an iterator of :class:`FileEvent` and a context manager."""

    def __init__(self, cm: Any, resp: http.client.HTTPResponse, client: HTTPClient):
        self._cm = cm
        self._resp = resp
        self._client = client
        self._closed = False

    def __iter__(self) -> Iterator[FileEvent]:
        return self

    def __next__(self) -> FileEvent:
        while True:
            if self._closed:
                raise StopIteration
            try:
                line = self._resp.readline()
            except (OSError, http.client.HTTPException, ValueError) as e:
                if self._closed:
                    raise StopIteration from None
                raise self._client._connection_error("GET", "watch", e) from e
            if not line:
                self.close()
                raise StopIteration
            line = line.strip()
            if not line:
                continue
            try:
                doc = json.loads(line.decode("utf-8"))
            except (ValueError, UnicodeDecodeError):
                raise ServerError("bad watch event %r" % (line[:200],)) from None
            if not isinstance(doc, dict):
                raise ServerError("bad watch event %r" % (doc,))
            if doc.get("type") == "error":
                err = doc.get("error") or {}
                self.close()
                raise error_from_code(err.get("code"), str(err.get("message") or "watch failed"),
                                      err.get("request_id") if isinstance(err.get("request_id"), str) else None)
            return FileEvent.from_json(doc)

    def close(self) -> None:
        """End the watch."""
        if not self._closed:
            self._closed = True
            try:
                self._cm.__exit__(None, None, None)
            except (OSError, http.client.HTTPException):
                pass

    def __enter__(self) -> "Watch":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _binary_stream(data: Any) -> Any:
    """A file object opened in text mode is sent as UTF-8 bytes."""
    if isinstance(data, io.TextIOBase):
        return _EncodingReader(data)
    return data


class _EncodingReader(io.RawIOBase):
    """Reads a text file as UTF-8 bytes."""

    def __init__(self, text: IO[str]):
        self._text = text
        self._buf = b""

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        while not self._buf:
            s = self._text.read(CHUNK // 4)
            if not s:
                return 0
            self._buf = s.encode("utf-8")
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n


def _chunks(body: Any) -> Iterator[bytes]:
    """The body in pieces of at most CHUNK bytes."""
    if isinstance(body, (bytes, bytearray, memoryview)):
        view = memoryview(body)
        for i in range(0, len(view), CHUNK):
            yield bytes(view[i:i + CHUNK])
        return
    while True:
        chunk = body.read(CHUNK)
        if not chunk:
            return
        if isinstance(chunk, str):
            chunk = chunk.encode("utf-8")
        yield bytes(chunk)


def _remaining_size(f: Any) -> Optional[int]:
    """The bytes left in a regular file object, or None when unknown (a pipe, a socket)."""
    try:
        st = os.fstat(f.fileno())
        if not stat_mod.S_ISREG(st.st_mode):
            return None
        return max(st.st_size - f.tell(), 0)
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        pass
    try:
        pos = f.tell()
        end = f.seek(0, os.SEEK_END)
        f.seek(pos)
        return max(end - pos, 0)
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return None


def write_tar(out: IO[bytes], local: str) -> None:
    """Write a tar stream of the contents of ``local`` (names relative to it) to ``out``."""
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tf:
        for dirpath, dirnames, filenames in os.walk(local):
            dirnames.sort()
            for name in sorted(dirnames) + sorted(filenames):
                full = os.path.join(dirpath, name)
                rel = os.path.relpath(full, local).replace(os.sep, "/")
                st = os.lstat(full)
                if not (stat_mod.S_ISREG(st.st_mode) or stat_mod.S_ISDIR(st.st_mode) or stat_mod.S_ISLNK(st.st_mode)):
                    continue
                info = tf.gettarinfo(full, arcname=rel)
                if info.isreg():
                    with open(full, "rb") as f:
                        tf.addfile(info, f)
                else:
                    tf.addfile(info)


def extract_tar(stream: IO[bytes], local: str) -> None:
    """Extract a tar stream from a sandbox into ``local``, with the rules of :meth:`Files.download_dir`."""
    os.makedirs(local, exist_ok=True)
    root = os.path.realpath(local)
    with tarfile.open(fileobj=stream, mode="r|") as tf:
        for member in tf:
            name = _safe_name(member.name)
            if name is None or not (member.isdir() or member.isreg() or member.issym() or member.islnk()):
                continue
            parent = _real_parents(root, name)
            dest = os.path.join(parent, os.path.basename(name))
            if member.isdir():
                if not os.path.isdir(dest) or os.path.islink(dest):
                    _clear(dest)
                    os.mkdir(dest, 0o755)
                os.chmod(dest, (member.mode & 0o777) | 0o700)
                continue
            _clear(dest)
            if member.isreg():
                src = tf.extractfile(member)
                flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
                fd = os.open(dest, flags, 0o600)
                with os.fdopen(fd, "wb") as out:
                    while src is not None:
                        chunk = src.read(CHUNK)
                        if not chunk:
                            break
                        out.write(chunk)
                os.chmod(dest, member.mode & 0o777)
                os.utime(dest, (member.mtime, member.mtime))
            elif member.issym():
                os.symlink(member.linkname, dest)
            else:
                target = _safe_name(member.linkname)
                src_path = os.path.join(_real_parents(root, target, make=False), os.path.basename(target)) if target else ""
                try:
                    ok = bool(target) and stat_mod.S_ISREG(os.lstat(src_path).st_mode)
                except OSError:
                    ok = False
                if not ok:
                    raise PandaStackError("archive entry %r is a hard link to %r, not to a regular file of the archive"
                                          % (member.name, member.linkname))
                os.link(src_path, dest, follow_symlinks=False)


def _safe_name(name: str) -> Optional[str]:
    """A clean name relative to the target (a leading / dropped); refuses ".."; None for the target itself."""
    parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
    if ".." in parts:
        raise PandaStackError("archive entry %r leaves the target directory" % name)
    return "/".join(parts) or None


def _real_parents(root: str, name: str, make: bool = True) -> str:
    """Make (with ``make``) the parents of ``name`` under ``root``; refuse any that is a symlink.

    Returns the parent's path.
    """
    cur = root
    for part in name.split("/")[:-1]:
        cur = os.path.join(cur, part)
        try:
            st = os.lstat(cur)
        except FileNotFoundError:
            if not make:
                raise PandaStackError("archive entry %r: %s does not exist" % (name, cur)) from None
            os.mkdir(cur, 0o755)
            st = os.lstat(cur)
        if stat_mod.S_ISLNK(st.st_mode):
            raise PandaStackError("archive entry %r goes through the symlink %s" % (name, cur))
        if not stat_mod.S_ISDIR(st.st_mode):
            raise PandaStackError("archive entry %r goes through %s, which is not a directory" % (name, cur))
    return cur


def _clear(path: str) -> None:
    """Remove what is at ``path`` (a file or symlink) before an entry is made there."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat_mod.S_ISDIR(st.st_mode):
        raise PandaStackError("archive entry at %s: a directory is in the way" % path)
    os.unlink(path)
