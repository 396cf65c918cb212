"""The Template class: build templates from a Dockerfile, list, inspect and delete them."""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
import stat
import tarfile
import tempfile
import urllib.parse
from dataclasses import dataclass, field
from datetime import datetime
from typing import IO, Any, Callable, List, Mapping, Optional, Tuple

from ._http import DEFAULT_REQUEST_TIMEOUT, HTTPClient, path_escape
from .errors import PandaStackError, ServerError
from .models import parse_time


@dataclass
class TemplateBuildEvent:
    """One event of a build's log, as ``on_log`` receives it.

    ``type`` is ``step`` (a step begins: ``step``/``steps``, its Dockerfile ``line`` and
    ``instruction``), ``cached`` (its result came from the cache), ``output`` (``text`` a RUN
    printed), ``done`` (the step finished after ``elapsed_ms``), and last ``template`` or
    ``error``.
    """

    type: str
    step: int = 0
    steps: int = 0
    line: int = 0
    instruction: str = ""
    text: str = ""
    elapsed_ms: float = 0.0
    template: Optional["Template"] = None
    error: Optional[PandaStackError] = None


class BuildError(PandaStackError):
    """A build that failed once it had started (a RUN exiting non-zero, a COPY of a missing
    file): the message names the Dockerfile line; ``step`` is the step that failed."""

    def __init__(self, message: str, *, code: Optional[str] = None, request_id: Optional[str] = None,
                 step: int = 0):
        super().__init__(message, code=code, request_id=request_id)
        self.step = step


@dataclass
class Template:
    """A template sandboxes start from: a built-in one or one you built from a Dockerfile.

    Build one, then start sandboxes from it by its ``ref`` (``NAME:TAG``)::

        t = Template.build("myapp", "./myapp", tag="v1", on_log=lambda e: print(e.text or e.instruction))
        with Sandbox.create(template=t.ref) as sb:
            print(sb.exec("cat /app/VERSION").stdout)
        Template.delete("myapp:v1")   # ConflictError while a sandbox or snapshot uses it
    """

    name: str
    ref: str
    tag: str = ""
    description: str = ""
    builtin: bool = False
    ready: bool = False
    hash: str = ""
    base: str = ""
    size_bytes: int = 0
    built_at: Optional[datetime] = None
    packages: List[str] = field(default_factory=list)
    env: List[str] = field(default_factory=list)
    working_dir: str = ""
    user: str = ""
    cmd: List[str] = field(default_factory=list)
    entrypoint: List[str] = field(default_factory=list)
    exposed_ports: List[str] = field(default_factory=list)

    @classmethod
    def from_json(cls, doc: Any, where: str = "the server") -> "Template":
        if not isinstance(doc, dict) or not doc.get("name"):
            raise ServerError("unexpected answer from %s, not a template: %r" % (where, doc))
        try:
            return cls(
                name=str(doc["name"]),
                ref=str(doc.get("ref") or doc["name"]),
                tag=str(doc.get("tag") or ""),
                description=str(doc.get("description") or ""),
                builtin=bool(doc.get("builtin")),
                ready=bool(doc.get("ready")),
                hash=str(doc.get("hash") or ""),
                base=str(doc.get("base") or ""),
                size_bytes=int(doc.get("size_bytes") or 0),
                built_at=parse_time(doc.get("built_at")),
                packages=[str(x) for x in doc.get("packages") or []],
                env=[str(x) for x in doc.get("env") or []],
                working_dir=str(doc.get("working_dir") or ""),
                user=str(doc.get("user") or ""),
                cmd=[str(x) for x in doc.get("cmd") or []],
                entrypoint=[str(x) for x in doc.get("entrypoint") or []],
                exposed_ports=[str(x) for x in doc.get("exposed_ports") or []],
            )
        except (TypeError, ValueError) as e:
            raise ServerError("unexpected template from %s: %s" % (where, e)) from None

    @classmethod
    def list(cls, *, url: Optional[str] = None, api_key: Optional[str] = None,
             request_timeout: Optional[float] = DEFAULT_REQUEST_TIMEOUT) -> List["Template"]:
        """The built-in templates and your own."""
        client = HTTPClient(url, api_key, request_timeout)
        doc = client.call("GET", "/v1/templates")
        if not isinstance(doc, dict) or not isinstance(doc.get("templates", []), (list, type(None))):
            raise ServerError("GET %s/v1/templates: unexpected answer %r" % (client.base_url, doc))
        return [cls.from_json(item, client.base_url) for item in (doc.get("templates") or [])]

    @classmethod
    def get(cls, name: str, *, url: Optional[str] = None, api_key: Optional[str] = None,
            request_timeout: Optional[float] = DEFAULT_REQUEST_TIMEOUT) -> "Template":
        """The template ``name`` (``NAME`` or ``NAME:TAG``); raises NotFoundError if there is none."""
        client = HTTPClient(url, api_key, request_timeout)
        return cls.from_json(client.call("GET", _path(name)), client.base_url)

    @classmethod
    def delete(cls, name: str, *, url: Optional[str] = None, api_key: Optional[str] = None,
               request_timeout: Optional[float] = DEFAULT_REQUEST_TIMEOUT) -> None:
        """Delete your template ``name`` (``NAME`` or ``NAME:TAG``).

        Raises NotFoundError if there is none, ConflictError while a sandbox or snapshot uses it
        (the message names them) and for a built-in template.
        """
        HTTPClient(url, api_key, request_timeout).call("DELETE", _path(name))

    @classmethod
    def build(cls, name: str, context_dir: str, dockerfile: str = "Dockerfile", tag: Optional[str] = None,
              build_args: Optional[Mapping[str, Any]] = None, no_cache: bool = False,
              on_log: Optional[Callable[[TemplateBuildEvent], None]] = None,
              url: Optional[str] = None, api_key: Optional[str] = None) -> "Template":
        """Build the template ``name`` (``NAME`` or ``NAME:TAG``; ``tag`` defaults to ``latest``)
        from a Dockerfile and its build context, and return it once it is stored.

        ``context_dir`` is sent as a tar archive (less what its ``.dockerignore`` excludes;
        symbolic links are sent as links, never followed); ``dockerfile`` is relative to it or
        absolute (one outside the context is sent along). ``on_log`` gets each event of the
        build's log as it arrives (:class:`TemplateBuildEvent`). A Dockerfile the server refuses
        raises InvalidArgumentError naming its line; a step that fails, :class:`BuildError`.
        Interrupting the call (Ctrl-C) closes the connection, which cancels the build.
        """
        if not name:
            raise ValueError("Template.build needs a name")
        ctx = os.path.realpath(context_dir)
        if not os.path.isdir(ctx):
            raise ValueError("Template.build: the build context %r is not a directory" % context_dir)
        df_name, df_outside = _dockerfile_in_context(ctx, dockerfile)
        ignore = _Dockerignore.read(ctx)

        query: List[Tuple[str, str]] = [("name", name), ("dockerfile", df_name)]
        if tag:
            query.append(("tag", tag))
        for k in sorted(build_args or {}):
            query.append(("build_arg", "%s=%s" % (k, (build_args or {})[k])))
        if no_cache:
            query.append(("no_cache", "true"))
        path = "/v1/templates?" + urllib.parse.urlencode(query)

        # No timeout: a RUN step may be silent for as long as it takes. The archive goes to a
        # temporary file (not memory) so that it is sent with its length.
        client = HTTPClient(url, api_key, None)
        with tempfile.TemporaryFile() as body:
            _write_context(body, ctx, df_name, df_outside, ignore)
            size = body.tell()
            body.seek(0)
            headers = {"Content-Type": "application/x-tar", "Content-Encoding": "gzip",
                       "Content-Length": str(size)}
            with client.open("POST", path, accept="application/x-ndjson", raw=(body, headers)) as resp:
                step = 0
                for raw_line in client.iter_lines("POST", resp):
                    if not raw_line.strip():
                        continue
                    try:
                        doc = json.loads(raw_line.decode("utf-8"))
                    except (ValueError, UnicodeDecodeError):
                        raise ServerError("POST %s%s: a build log line is not JSON: %r" % (
                            client.base_url, path, raw_line[:200])) from None
                    ev = _event(doc, client.base_url, step)
                    if ev.type == "step":
                        step = ev.step
                    if on_log is not None:
                        on_log(ev)
                    if ev.type == "template":
                        if ev.template is None:
                            raise ServerError("the build's last event has no template: %r" % doc)
                        return ev.template
                    if ev.type == "error":
                        raise ev.error  # type: ignore[misc]
        raise ServerError("POST %s%s: the build log ended without a result" % (client.base_url, path))


def _path(name: str) -> str:
    return "/v1/templates/" + path_escape(name)


def _event(doc: Any, where: str, step: int) -> TemplateBuildEvent:
    if not isinstance(doc, dict) or not isinstance(doc.get("type"), str):
        raise ServerError("unexpected build event from %s: %r" % (where, doc))
    ev = TemplateBuildEvent(
        type=doc["type"], step=int(doc.get("step") or 0), steps=int(doc.get("steps") or 0),
        line=int(doc.get("line") or 0), instruction=str(doc.get("instruction") or ""),
        text=str(doc.get("text") or ""), elapsed_ms=float(doc.get("elapsed_ms") or 0))
    if ev.type == "template" and doc.get("template") is not None:
        ev.template = Template.from_json(doc["template"], where)
    if ev.type == "error":
        err = doc.get("error") if isinstance(doc.get("error"), dict) else {}
        ev.error = BuildError(str(err.get("message") or "the build failed"), code=err.get("code") or None,
                              request_id=err.get("request_id") or None, step=step)
    return ev


def _dockerfile_in_context(ctx: str, dockerfile: str) -> Tuple[str, Optional[str]]:
    """The Dockerfile's path in the archive, and its file when it lies outside the context."""
    path = dockerfile or "Dockerfile"
    if not os.path.isabs(path):
        path = os.path.join(ctx, path)
    path = os.path.realpath(path)
    if not os.path.isfile(path):
        raise ValueError("Template.build: no Dockerfile at %s" % path)
    rel = os.path.relpath(path, ctx)
    if rel != os.pardir and not rel.startswith(os.pardir + os.sep):
        return rel.replace(os.sep, "/"), None
    return ".pandastack-dockerfile-" + hashlib.sha256(path.encode()).hexdigest()[:12], path


class _Dockerignore:
    """A .dockerignore: patterns (``*``, ``?``, ``[...]``, ``**`` for any number of directories),
    each also matching what is under a match; the last matching one decides, ``!`` re-includes."""

    def __init__(self, text: str = ""):
        self.rules: List[Tuple[Any, bool]] = []
        self.has_exceptions = False
        for number, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            negate = line.startswith("!")
            if negate:
                line = line[1:].strip()
                self.has_exceptions = True
            pattern = posixpath.normpath("/" + line.replace(os.sep, "/")).lstrip("/")
            if not pattern or pattern == ".":
                continue
            try:
                self.rules.append((re.compile(_glob_regexp(pattern)), negate))
            except (re.error, ValueError) as e:
                raise ValueError(".dockerignore line %d: %r: %s" % (number, line, e)) from None

    @classmethod
    def read(cls, ctx: str) -> "_Dockerignore":
        try:
            with open(os.path.join(ctx, ".dockerignore"), "r", encoding="utf-8") as f:
                return cls(f.read())
        except FileNotFoundError:
            return cls()

    def excludes(self, rel: str) -> bool:
        out = False
        for rx, negate in self.rules:
            if rx.match(rel):
                out = not negate
        return out


def _glob_regexp(pattern: str) -> str:
    out = ["^"]
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**", i):
            i += 2
            if pattern.startswith("/", i):
                i += 1
                out.append("(?:.*/)?")
            else:
                out.append(".*")
            continue
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            j = pattern.find("]", i + 1)
            if j < 0:
                raise ValueError("unterminated [")
            cls = pattern[i + 1:j]
            if cls.startswith(("!", "^")):
                cls = "^/" + cls[1:]
            out.append("[" + cls.replace("\\", "\\\\") + "]")
            i = j
        elif c == "\\" and i + 1 < len(pattern):
            i += 1
            out.append(re.escape(pattern[i]))
        else:
            out.append(re.escape(c))
        i += 1
    out.append("(?:/.*)?$")
    return "".join(out)


def _write_context(f: IO[bytes], ctx: str, df_name: str, df_outside: Optional[str],
                   ignore: _Dockerignore) -> None:
    """Write the context as a gzip tar: files, directories and symbolic links (as links, never
    followed); sockets, devices and pipes are left out, and whatever ``ignore`` excludes."""

    def add(tar: tarfile.TarFile, path: str, arcname: str) -> None:
        st = os.lstat(path)
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode) or stat.S_ISLNK(st.st_mode)):
            return
        info = tar.gettarinfo(path, arcname)
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        if info.isreg():
            with open(path, "rb") as src:
                tar.addfile(info, src)
        else:
            tar.addfile(info)

    with tarfile.open(fileobj=f, mode="w:gz", compresslevel=1, format=tarfile.PAX_FORMAT) as tar:
        for root, dirs, files in os.walk(ctx, followlinks=False):
            rel_root = os.path.relpath(root, ctx).replace(os.sep, "/")
            rel_root = "" if rel_root == "." else rel_root + "/"
            kept = []
            for d in sorted(dirs):
                rel = rel_root + d
                full = os.path.join(root, d)
                if os.path.islink(full):
                    # os.walk lists links to directories as directories; send the link.
                    if not ignore.excludes(rel):
                        add(tar, full, rel)
                    continue
                if ignore.excludes(rel):
                    if ignore.has_exceptions:
                        kept.append(d)  # something under it may be re-included
                    continue
                add(tar, full, rel)
                kept.append(d)
            dirs[:] = kept
            for name in sorted(files):
                rel = rel_root + name
                if rel not in (df_name, ".dockerignore") and ignore.excludes(rel):
                    continue
                add(tar, os.path.join(root, name), rel)
        if df_outside is not None:
            add(tar, df_outside, df_name)
