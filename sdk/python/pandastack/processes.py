"""Background processes of a sandbox (docs/API.md, "Processes").

    proc = sb.exec("python3 -m http.server 8000", background=True, tag="web")
    for event in proc.output():              # what it printed so far, then live
        print(event.type, event.data)
        if "Serving" in event.data:
            break
    proc.kill(); print(proc.wait())          # 137: killed by SIGKILL

    sb = Sandbox.connect(sandbox_id)          # later, from another program
    for info in sb.processes.list():
        print(info.pid, info.tag, info.state)
    proc = sb.processes.connect(pid)          # output produced meanwhile is replayed

A background process runs until it exits, is signalled, reaches its timeout
or the sandbox ends: a client that stops reading, disconnects or exits does
not end it. The server keeps the last 1 MiB of each of its output streams (a
``dropped`` event says how much older output is gone).
"""

from __future__ import annotations

import base64
import http.client
import json
import socket
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

from ._http import USER_AGENT, HTTPClient, str_map
from .errors import (PandaStackConnectionError, PandaStackError, ServerError, error_from_code,
                     error_from_response)
from .models import parse_time

# Bytes of input sent per request: their base64 fits in the server's 1 MiB body limit.
STDIN_PIECE = 512 << 10

# What the HTTP read timeout of a wait allows beyond the caller's own timeout.
WAIT_MARGIN = 0.0

SignalLike = Union[str, int]


class WaitTimeoutError(PandaStackError, TimeoutError):
    """:meth:`Process.wait` ran out of time; the process goes on. Also a built-in :class:`TimeoutError`."""


@dataclass
class ProcessInfo:
    """What the server said about a background process (the API's ``Process``).

    ``state`` is "running" or "exited"; once exited, ``exit_code`` is its
    exit status (128+N when signal N ended it, 124 when its timeout did,
    with ``timed_out``). ``stdout_bytes`` and ``stderr_bytes`` count what it
    wrote in all.
    """

    pid: int
    tag: str = ""
    argv: List[str] = field(default_factory=list)
    user: str = ""
    cwd: str = ""
    pty: bool = False
    stdin: bool = False
    state: str = ""
    started_at: Optional[datetime] = None
    exit_code: Optional[int] = None
    timed_out: bool = False
    exited_at: Optional[datetime] = None
    stdout_bytes: int = 0
    stderr_bytes: int = 0

    @property
    def running(self) -> bool:
        return self.state == "running"

    @classmethod
    def from_json(cls, doc: Any) -> "ProcessInfo":
        if not isinstance(doc, dict) or not isinstance(doc.get("pid"), int) or isinstance(doc.get("pid"), bool):
            raise ServerError("unexpected process description: %r" % (doc,))
        code = doc.get("exit_code")
        try:
            return cls(pid=doc["pid"], tag=str(doc.get("tag") or ""),
                       argv=[str(a) for a in doc.get("argv") or []], user=str(doc.get("user") or ""),
                       cwd=str(doc.get("cwd") or ""), pty=bool(doc.get("pty")), stdin=bool(doc.get("stdin")),
                       state=str(doc.get("state") or ""), started_at=parse_time(doc.get("started_at")),
                       exit_code=int(code) if code is not None else None, timed_out=bool(doc.get("timed_out")),
                       exited_at=parse_time(doc.get("exited_at")),
                       stdout_bytes=int(doc.get("stdout_bytes") or 0),
                       stderr_bytes=int(doc.get("stderr_bytes") or 0))
        except (TypeError, ValueError) as e:
            raise ServerError("unexpected process description %r: %s" % (doc, e)) from None


@dataclass
class ProcessEvent:
    """One event of a process's output.

    ``type`` is "stdout" or "stderr" (``data``: text), "dropped" (``stream``
    and ``bytes``: older output the server no longer held), and last "exit"
    (the process exited; ``process`` has its exit code) or "end" (without
    follow: everything kept so far was sent; ``process`` is still running).
    """

    type: str
    data: str = ""
    stream: str = ""
    bytes: int = 0
    process: Optional[ProcessInfo] = None

    @classmethod
    def from_json(cls, doc: Dict[str, Any]) -> "ProcessEvent":
        proc = doc.get("process")
        return cls(type=str(doc.get("type") or ""), data=str(doc.get("data") or ""),
                   stream=str(doc.get("stream") or ""), bytes=int(doc.get("bytes") or 0),
                   process=ProcessInfo.from_json(proc) if isinstance(proc, dict) else None)


def signal_name(sig: SignalLike) -> Union[str, int]:
    """A signal as the API takes it: "TERM", "SIGTERM", 15 or ``signal.SIGTERM``."""
    name = getattr(sig, "name", None)  # signal.Signals
    if isinstance(name, str):
        return name
    if isinstance(sig, bool) or not isinstance(sig, (str, int)):
        raise TypeError("signal must be a name, a number or a signal.Signals, not %s" % type(sig).__name__)
    return sig


def _start_body(cmd: Union[str, Sequence[str]], *, env: Optional[Mapping[str, str]] = None,
                cwd: Optional[str] = None, user: Optional[str] = None, tag: Optional[str] = None,
                stdin: bool = False, timeout_seconds: Optional[float] = None,
                pty: Optional[Tuple[int, int]] = None) -> Dict[str, Any]:
    body: Dict[str, Any] = {}
    if isinstance(cmd, str):
        body["cmd"] = cmd
    elif isinstance(cmd, (bytes, bytearray)):
        raise TypeError("cmd must be a str or a list of str, not bytes")
    else:
        argv = list(cmd)
        if not all(isinstance(a, str) for a in argv):
            raise TypeError("cmd as a list must hold only str, got %r" % (argv,))
        body["argv"] = argv
    if env is not None:
        body["env"] = str_map(env)
    if cwd is not None:
        body["cwd"] = cwd
    if user is not None:
        body["user"] = user
    if tag is not None:
        body["tag"] = tag
    if stdin:
        body["stdin"] = True
    if timeout_seconds is not None:
        body["timeout_seconds"] = timeout_seconds
    if pty is not None:
        cols, rows = pty
        body["pty"] = {"cols": int(cols), "rows": int(rows)}
    return body


class Processes:
    """The background processes of one sandbox; get them as ``sb.processes``."""

    def __init__(self, client: HTTPClient, sandbox_path: str):
        self._client = client
        self._base = sandbox_path + "/processes"

    def start(self, cmd: Union[str, Sequence[str]], *, env: Optional[Mapping[str, str]] = None,
              cwd: Optional[str] = None, user: Optional[str] = None, tag: Optional[str] = None,
              stdin: Union[bool, str, bytes] = False, timeout_seconds: Optional[float] = None,
              pty: Optional[Tuple[int, int]] = None) -> "Process":
        """Start ``cmd`` in the background and return its :class:`Process` once it runs.

        ``cmd`` is a string run by ``/bin/sh -c`` or a list of arguments run
        directly. ``stdin=True`` keeps its input open for
        :meth:`Process.send_stdin`; a str or bytes is given as its whole
        input (then closed); otherwise it reads an empty input.
        ``timeout_seconds`` kills it, with its children, after that long
        (exit code 124); by default it has none. ``pty=(cols, rows)`` runs it
        on a pseudo-terminal of that size (its output is the terminal's, as
        stdout; it takes input). ``tag`` is your name for it, shown in
        :meth:`list`. It runs as the unprivileged ``user`` unless
        ``user="root"``.
        """
        data: Optional[bytes] = None
        if isinstance(stdin, (str, bytes, bytearray)):
            data = stdin.encode("utf-8") if isinstance(stdin, str) else bytes(stdin)
        elif not isinstance(stdin, bool):
            raise TypeError("stdin must be a bool, str or bytes, not %s" % type(stdin).__name__)
        body = _start_body(cmd, env=env, cwd=cwd, user=user, tag=tag, stdin=data is not None or bool(stdin),
                           timeout_seconds=timeout_seconds, pty=pty)
        doc = self._client.call("POST", self._base, body)
        proc = Process(self._client, self._base, ProcessInfo.from_json(doc))
        if data is not None:
            if data:
                proc.send_stdin(data)
            proc.close_stdin()
        return proc

    def list(self) -> List[ProcessInfo]:
        """The running background processes and those that exited recently, oldest first."""
        doc = self._client.call("GET", self._base)
        if not isinstance(doc, dict) or not isinstance(doc.get("processes", []), (list, type(None))):
            raise ServerError("GET %s: unexpected answer %r" % (self._base, doc))
        return [ProcessInfo.from_json(p) for p in doc.get("processes") or []]

    def connect(self, pid: Union[int, ProcessInfo]) -> "Process":
        """A handle on background process ``pid`` (raises NotFoundError if there is none).

        Works for a process another client or an earlier program started;
        its :meth:`Process.output` replays what it wrote meanwhile.
        """
        if isinstance(pid, ProcessInfo):
            pid = pid.pid
        if isinstance(pid, bool) or not isinstance(pid, int):
            raise TypeError("pid must be an int, not %s" % type(pid).__name__)
        proc = Process(self._client, self._base, ProcessInfo(pid=pid))
        proc.refresh()
        return proc


class Process:
    """A handle on a background process: :meth:`wait`, :meth:`kill`, :meth:`signal`,
    :meth:`send_stdin`, :meth:`close_stdin`, :meth:`output`, :meth:`refresh`.

    Iterating it follows its output (``for event in proc: ...``) until it exits.
    """

    def __init__(self, client: HTTPClient, processes_path: str, info: ProcessInfo):
        self._client = client
        self._info = info
        self._path = processes_path + "/" + str(info.pid)

    @property
    def pid(self) -> int:
        """The process's id inside the sandbox."""
        return self._info.pid

    @property
    def tag(self) -> str:
        return self._info.tag

    @property
    def info(self) -> ProcessInfo:
        """What the server last said about the process; :meth:`refresh` asks again."""
        return self._info

    @property
    def exit_code(self) -> Optional[int]:
        """The exit code once :meth:`wait`, :meth:`refresh` or the output's end has seen it exit; else None."""
        return self._info.exit_code

    def __repr__(self) -> str:
        return "Process(pid=%d, tag=%r, state=%r, exit_code=%r)" % (
            self.pid, self._info.tag, self._info.state, self._info.exit_code)

    def refresh(self) -> ProcessInfo:
        """Ask the server about the process; returns the new :attr:`info`."""
        self._info = ProcessInfo.from_json(self._client.call("GET", self._path))
        return self._info

    def wait(self, timeout: Optional[float] = None) -> int:
        """Block until the process exits and return its exit code.

        128+N when signal N ended it, 124 when its timeout did. ``timeout``
        (seconds; default none) bounds the wait: past it
        :class:`WaitTimeoutError` is raised and the process goes on. A pause
        of the sandbox ends the wait with ConflictError; wait again after
        the resume.
        """
        http_timeout = None if timeout is None else timeout + WAIT_MARGIN
        try:
            with _open(self._client, "POST", self._path + "/wait", None, http_timeout) as resp:
                data = self._client.read_all("POST", resp)
        except PandaStackConnectionError as e:
            if timeout is not None and "timed out" in str(e):
                raise WaitTimeoutError("process %d did not exit within %g s (it goes on)" % (self.pid, timeout)) from None
            raise
        try:
            doc = json.loads(data.decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            raise ServerError("wait for process %d: answer is not JSON: %r" % (self.pid, data[:200])) from None
        self._info = ProcessInfo.from_json(doc)
        if self._info.exit_code is None:
            raise ServerError("wait for process %d: the server answered without an exit code" % self.pid)
        return self._info.exit_code

    def signal(self, sig: SignalLike) -> None:
        """Send ``sig`` ("TERM", "SIGTERM", 15 or ``signal.SIGTERM``) to the process's group."""
        self._client.call("POST", self._path + "/signal", {"signal": signal_name(sig)})

    def kill(self) -> None:
        """Send SIGKILL to the process's group; :meth:`wait` then returns 137."""
        self.signal("SIGKILL")

    def send_stdin(self, data: Union[str, bytes, bytearray, memoryview]) -> None:
        """Give ``data`` to the process's input (started with ``stdin=True`` or on a pty).

        Waits while the process has much input it has not read.
        """
        if isinstance(data, str):
            data = data.encode("utf-8")
        elif isinstance(data, (bytes, bytearray, memoryview)):
            data = bytes(data)
        else:
            raise TypeError("data must be str or bytes, not %s" % type(data).__name__)
        for i in range(0, len(data), STDIN_PIECE):
            piece = base64.b64encode(data[i:i + STDIN_PIECE]).decode("ascii")
            self._client.call("POST", self._path + "/stdin", {"data_base64": piece})

    def close_stdin(self) -> None:
        """End the process's input (on a pty: ^D)."""
        self._client.call("POST", self._path + "/stdin", {"eof": True})

    def resize(self, cols: int, rows: int) -> None:
        """Change the window size of the process's terminal (it must run on a pty)."""
        self._client.call("POST", self._path + "/resize", {"cols": int(cols), "rows": int(rows)})

    def output(self, follow: bool = True, timeout: Optional[float] = None) -> "OutputStream":
        """Attach to the process's output: an iterator of :class:`ProcessEvent`.

        First what it wrote since it started (as far as the server keeps
        it), then, with ``follow``, its output as it comes, until its
        "exit" event; without ``follow`` it ends with an "end" event.
        ``timeout`` (seconds, default none) bounds the wait for the next
        event. Closing the stream (or leaving its ``with`` block) detaches;
        the process goes on.
        """
        path = self._path + "/output?follow=" + ("true" if follow else "false")
        cm = _open(self._client, "GET", path, None, timeout, accept="application/x-ndjson")
        resp = cm.__enter__()
        return OutputStream(self, cm, resp)

    def __iter__(self) -> Iterator[ProcessEvent]:
        with self.output() as events:
            yield from events

    def _set_info(self, info: ProcessInfo) -> None:
        self._info = info


class OutputStream:
    """An attach to a process's output: an iterator of :class:`ProcessEvent` and a context manager."""

    def __init__(self, proc: Process, cm: Any, resp: http.client.HTTPResponse):
        self._proc = proc
        self._cm = cm
        self._resp = resp
        self._done = False
        self._closed = False

    def __iter__(self) -> "OutputStream":
        return self

    def __next__(self) -> ProcessEvent:
        while True:
            if self._done or self._closed:
                self.close()
                raise StopIteration
            try:
                line = self._resp.readline()
            except (OSError, http.client.HTTPException, ValueError) as e:
                if self._closed:
                    raise StopIteration from None
                self.close()
                raise self._proc._client._connection_error("GET", "output of process %d" % self._proc.pid, e) from e
            if not line:
                self.close()
                raise PandaStackConnectionError(
                    "the output stream of process %d ended before its exit or end event" % self._proc.pid,
                    url=self._proc._client.base_url)
            line = line.strip()
            if not line:
                continue
            try:
                doc = json.loads(line.decode("utf-8"))
            except (ValueError, UnicodeDecodeError):
                self.close()
                raise ServerError("bad output event %r" % (line[:200],)) from None
            if not isinstance(doc, dict):
                self.close()
                raise ServerError("bad output event %r" % (doc,))
            kind = doc.get("type")
            if kind == "error":
                err = doc.get("error") or {}
                self.close()
                raise error_from_code(err.get("code"), str(err.get("message") or "the output stream failed"),
                                      err.get("request_id") if isinstance(err.get("request_id"), str) else None)
            ev = ProcessEvent.from_json(doc)
            if kind in ("exit", "end"):
                self._done = True
                if ev.process is not None:
                    self._proc._set_info(ev.process)
            return ev

    def close(self) -> None:
        """Detach; the process goes on."""
        if not self._closed:
            self._closed = True
            try:
                self._cm.__exit__(None, None, None)
            except (OSError, http.client.HTTPException):
                pass

    def __enter__(self) -> "OutputStream":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


@contextmanager
def _open(client: HTTPClient, method: str, path: str, body: Any, timeout: Optional[float],
          accept: str = "application/json") -> Iterator[http.client.HTTPResponse]:
    """As HTTPClient.open, but ``timeout=None`` means no timeout (a wait or a follow may be long)."""
    hdrs = {"Accept": accept, "User-Agent": USER_AGENT}
    data = None
    if body is not None:
        data = json.dumps(body).encode("utf-8")
        hdrs["Content-Type"] = "application/json"
    elif method == "POST":
        data = b""
    if client.api_key:
        hdrs["Authorization"] = "Bearer " + client.api_key
    req = urllib.request.Request(client.base_url + path, data=data, headers=hdrs, method=method)
    try:
        resp = client._opener.open(req, timeout=timeout if timeout is not None else socket.getdefaulttimeout())
    except urllib.error.HTTPError as e:
        try:
            raw = e.read()
        except (OSError, http.client.HTTPException):
            raw = b""
        finally:
            e.close()
        h = e.headers
        raise error_from_response(e.code, raw, h.get("Content-Type", "") if h else "", req.full_url,
                                  request_id=h.get("X-Request-Id") if h else None) from None
    except urllib.error.URLError as e:
        raise client._connection_error(method, req.full_url, e.reason) from e
    except (OSError, http.client.HTTPException) as e:
        raise client._connection_error(method, req.full_url, e) from e
    try:
        yield resp
    finally:
        resp.close()
