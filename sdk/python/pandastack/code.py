"""Results of code run in a sandbox's live interpreter (:meth:`Sandbox.run_code`).

The names follow Jupyter and E2B's code interpreter: a cell's
:class:`Execution` has ``results`` (each a :class:`Result` with ``text``,
``html``, ``png``, …), ``logs`` (``stdout`` and ``stderr`` chunks), ``error``
and ``text``, the main result's text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Union

from ._http import path_escape, str_map
from .errors import PandaStackConnectionError, ServerError, error_from_code

# The keys a result may have, in this order, and the MIME types they come from.
RESULT_KEYS = ("text", "html", "markdown", "svg", "png", "jpeg", "pdf", "latex", "json", "javascript")


@dataclass
class Result:
    """One result of a cell: its value (``is_main_result``) or something it displayed.

    Each attribute holds the result in one format, or None: ``text``
    (text/plain), ``html``, ``markdown``, ``svg``, ``png``, ``jpeg`` and
    ``pdf`` (base64), ``latex``, ``json`` (the decoded value),
    ``javascript``; ``extra`` maps other MIME types to their values.
    A matplotlib figure has ``png``; a pandas DataFrame ``html`` and ``text``.
    """

    text: Optional[str] = None
    html: Optional[str] = None
    markdown: Optional[str] = None
    svg: Optional[str] = None
    png: Optional[str] = None
    jpeg: Optional[str] = None
    pdf: Optional[str] = None
    latex: Optional[str] = None
    json: Any = None
    javascript: Optional[str] = None
    is_main_result: bool = False
    extra: Dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> "Result":
        kw: Dict[str, Any] = {}
        for key in RESULT_KEYS:
            value = doc.get(key)
            if value is not None and value != "":
                kw[key] = value
        return cls(is_main_result=bool(doc.get("is_main_result", False)),
                   extra=dict(doc.get("extra") or {}), **kw)

    def formats(self) -> List[str]:
        """The keys this result has a value for (``["text", "png"]``), then ``extra``'s MIME types."""
        have = [k for k in RESULT_KEYS if getattr(self, k) is not None]
        return have + sorted(self.extra)

    def __repr__(self) -> str:
        return "Result(%s%s)" % (", ".join(self.formats()), ", main" if self.is_main_result else "")

    # Jupyter front ends (IPython.display) show these.
    def _repr_html_(self) -> Optional[str]:
        return self.html

    def _repr_png_(self) -> Optional[str]:
        return self.png

    def _repr_markdown_(self) -> Optional[str]:
        return self.markdown


@dataclass
class Logs:
    """What a cell printed, in the chunks it came in."""

    stdout: List[str] = field(default_factory=list)
    stderr: List[str] = field(default_factory=list)

    @classmethod
    def from_json(cls, doc: Optional[Mapping[str, Any]]) -> "Logs":
        doc = doc or {}
        return cls(stdout=[str(s) for s in doc.get("stdout") or []],
                   stderr=[str(s) for s in doc.get("stderr") or []])


@dataclass
class ExecutionError:
    """The exception a cell raised: ``name`` ("ValueError"), ``value`` (its message), ``traceback``."""

    name: str
    value: str
    traceback: str = ""

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> "ExecutionError":
        return cls(name=str(doc.get("name") or ""), value=str(doc.get("value") or ""),
                   traceback=str(doc.get("traceback") or ""))


@dataclass
class Execution:
    """Everything a cell produced.

    ``error`` is None unless the cell raised (a cell that raises is not a
    Python exception of the SDK: check it). ``timed_out`` is True when the
    cell was interrupted at its timeout (its context keeps its variables);
    ``truncated`` when output went over the server's cap.
    """

    results: List[Result] = field(default_factory=list)
    logs: Logs = field(default_factory=Logs)
    error: Optional[ExecutionError] = None
    execution_count: int = 0
    context: str = ""
    timed_out: bool = False
    truncated: bool = False
    duration_ms: float = 0.0

    @property
    def text(self) -> Optional[str]:
        """The text of the main result (the cell's value), or None."""
        for r in self.results:
            if r.is_main_result:
                return r.text
        return None

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> "Execution":
        err = doc.get("error")
        return cls(
            results=[Result.from_json(r) for r in doc.get("results") or []],
            logs=Logs.from_json(doc.get("logs")),
            error=ExecutionError.from_json(err) if isinstance(err, dict) else None,
            execution_count=int(doc.get("execution_count") or 0),
            context=str(doc.get("context") or ""),
            timed_out=bool(doc.get("timed_out", False)),
            truncated=bool(doc.get("truncated", False)),
            duration_ms=float(doc.get("duration_ms") or 0.0),
        )


@dataclass
class CodeContext:
    """A live interpreter in a sandbox; pass it (or its ``id``) as ``run_code(context=...)``.

    ``state`` is "starting", "idle", "busy" or "dead" (its interpreter died;
    ``error`` says why: :meth:`Sandbox.restart_code_context` brings it back).
    """

    id: str
    language: str = "python"
    cwd: str = ""
    user: str = ""
    state: str = ""
    error: Optional[str] = None

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> "CodeContext":
        return cls(id=str(doc.get("id") or ""), language=str(doc.get("language") or "python"),
                   cwd=str(doc.get("cwd") or ""), user=str(doc.get("user") or ""),
                   state=str(doc.get("state") or ""), error=doc.get("error") or None)


# ----- the Sandbox methods (mixed into pandastack.Sandbox) --------------------

DEFAULT_CODE_TIMEOUT = 60.0
# What the HTTP read timeout of a cell allows beyond twice its own timeout
# (a busy context's wait, then the cell): the server may first start the
# context's interpreter (up to 150 s) and needs time to interrupt and report.
CODE_TIMEOUT_MARGIN = 200.0

ContextRef = Union[str, CodeContext, None]


def _context_id(context: ContextRef) -> Optional[str]:
    if context is None or isinstance(context, str):
        return context
    if isinstance(context, CodeContext):
        return context.id
    raise TypeError("context must be a context id (str) or a CodeContext, not %s" % type(context).__name__)


class CodeMixin:
    """The code-interpreter methods of :class:`pandastack.Sandbox`."""

    def run_code(self, code: str, context: ContextRef = None, language: Optional[str] = None,
                 on_stdout: Optional[Callable[[str], Any]] = None,
                 on_stderr: Optional[Callable[[str], Any]] = None,
                 on_result: Optional[Callable[[Result], Any]] = None,
                 on_error: Optional[Callable[[ExecutionError], Any]] = None,
                 timeout_seconds: Optional[float] = DEFAULT_CODE_TIMEOUT) -> Execution:
        """Run ``code`` in a live Python interpreter of the sandbox and return its :class:`Execution`.

        Variables, imports and definitions persist from one call to the
        next in the same ``context`` (a :class:`CodeContext` or its id; by
        default the sandbox's default Python context). The last expression's
        value is the main result; matplotlib figures come back as PNG,
        DataFrames as HTML and text, ``display()`` adds results. A cell
        running past ``timeout_seconds`` is interrupted (KeyboardInterrupt,
        ``timed_out=True``) and its context keeps its variables. With any of
        the callbacks the run is streamed: each is called as output, results
        and the error arrive, and the returned Execution still holds all.
        A cell that raises is not an SDK error: check ``execution.error``.
        """
        if not isinstance(code, str):
            raise TypeError("code must be a str, not %s" % type(code).__name__)
        body: Dict[str, Any] = {"code": code}
        ctx_id = _context_id(context)
        if ctx_id is not None:
            body["context"] = ctx_id
        if language is not None:
            body["language"] = language
        if timeout_seconds is not None:
            body["timeout_seconds"] = timeout_seconds
        cell_timeout = timeout_seconds if timeout_seconds is not None else DEFAULT_CODE_TIMEOUT
        http_timeout = 2 * cell_timeout + CODE_TIMEOUT_MARGIN
        client = self._client  # type: ignore[attr-defined]
        if client.request_timeout is not None:
            http_timeout = max(http_timeout, client.request_timeout)
        path = self._path("/code")  # type: ignore[attr-defined]
        if on_stdout is None and on_stderr is None and on_result is None and on_error is None:
            doc = client.call("POST", path, body, timeout=http_timeout)
            if not isinstance(doc, dict):
                raise ServerError("run_code in %s: unexpected answer %r" % (self.id, doc))  # type: ignore[attr-defined]
            return Execution.from_json(doc)
        return self._run_code_stream(path, body, http_timeout, on_stdout, on_stderr, on_result, on_error)

    def _run_code_stream(self, path: str, body: Dict[str, Any], http_timeout: float,
                         on_stdout: Optional[Callable[[str], Any]],
                         on_stderr: Optional[Callable[[str], Any]],
                         on_result: Optional[Callable[[Result], Any]],
                         on_error: Optional[Callable[[ExecutionError], Any]]) -> Execution:
        client = self._client  # type: ignore[attr-defined]
        sid = self.id  # type: ignore[attr-defined]
        exe = Execution()
        with client.open("POST", path, body, timeout=http_timeout, accept="application/x-ndjson") as resp:
            for raw in client.iter_lines("POST", resp):
                line = raw.strip()
                if not line:
                    continue
                try:
                    event = json.loads(line.decode("utf-8"))
                except (ValueError, UnicodeDecodeError):
                    raise ServerError("run_code in %s: bad stream line %r" % (sid, raw[:200])) from None
                if not isinstance(event, dict):
                    raise ServerError("run_code in %s: bad stream event %r" % (sid, event))
                kind = event.get("type")
                if kind in ("stdout", "stderr"):
                    data = str(event.get("data") or "")
                    getattr(exe.logs, kind).append(data)
                    cb = on_stdout if kind == "stdout" else on_stderr
                    if cb is not None and data:
                        cb(data)
                elif kind == "result":
                    result = Result.from_json(event.get("result") or {})
                    exe.results.append(result)
                    if on_result is not None:
                        on_result(result)
                elif kind == "execution_error":
                    exe.error = ExecutionError.from_json(event.get("execution_error") or {})
                    if on_error is not None:
                        on_error(exe.error)
                elif kind == "end":
                    end = Execution.from_json(event.get("execution") or {})
                    # The end carries no results or logs: they were streamed.
                    end.results, end.logs = exe.results, exe.logs
                    end.error = end.error or exe.error
                    return end
                elif kind == "error":
                    err = event.get("error") or {}
                    raise error_from_code(err.get("code"), str(err.get("message") or "code stream failed"),
                                          err.get("request_id") if isinstance(err.get("request_id"), str) else None)
                # Unknown event types are skipped: newer servers may add some.
        raise PandaStackConnectionError(
            "run_code in %s: the stream from %s ended before the cell's end event" % (sid, client.base_url),
            url=client.base_url)

    def create_code_context(self, language: Optional[str] = None, cwd: Optional[str] = None,
                            env: Optional[Mapping[str, str]] = None,
                            user: Optional[str] = None) -> CodeContext:
        """Start a new live interpreter (its variables are its own) and return it once it answers.

        ``language`` is "python" (the default); ``cwd`` its working
        directory (the user's home by default); ``env`` adds to the
        sandbox's environment; ``user`` is "user" (the default) or "root".
        """
        body: Dict[str, Any] = {}
        if language is not None:
            body["language"] = language
        if cwd is not None:
            body["cwd"] = cwd
        if env is not None:
            body["env"] = str_map(env)
        if user is not None:
            body["user"] = user
        doc = self._client.call("POST", self._path("/code/contexts"), body,  # type: ignore[attr-defined]
                                timeout=self._code_call_timeout())
        return _code_context(doc, self)

    def list_code_contexts(self) -> List[CodeContext]:
        """The sandbox's started code contexts, oldest first (the default one has id "python")."""
        doc = self._client.call("GET", self._path("/code/contexts"))  # type: ignore[attr-defined]
        if not isinstance(doc, dict) or not isinstance(doc.get("contexts", []), (list, type(None))):
            raise ServerError("list_code_contexts of %s: unexpected answer %r" % (self.id, doc))  # type: ignore[attr-defined]
        return [_code_context(c, self) for c in doc.get("contexts") or []]

    def restart_code_context(self, context: ContextRef = "python") -> CodeContext:
        """Give the context a fresh interpreter: its variables are gone, a running cell ends.

        This is how a context whose interpreter died comes back.
        """
        ctx_id = _context_id(context) or "python"
        doc = self._client.call("POST", self._path("/code/contexts/" + path_escape(ctx_id) + "/restart"),  # type: ignore[attr-defined]
                                timeout=self._code_call_timeout())
        return _code_context(doc, self)

    def delete_code_context(self, context: ContextRef) -> None:
        """End the context and its interpreter."""
        ctx_id = _context_id(context)
        if not ctx_id:
            raise ValueError("delete_code_context needs a context (an id or a CodeContext)")
        self._client.call("DELETE", self._path("/code/contexts/" + path_escape(ctx_id)))  # type: ignore[attr-defined]

    def _code_call_timeout(self) -> Optional[float]:
        # Starting an interpreter may take the server up to 150 s.
        rt = self._client.request_timeout  # type: ignore[attr-defined]
        return None if rt is None else max(rt, 180.0)


def _code_context(doc: Any, sb: Any) -> CodeContext:
    if not isinstance(doc, dict) or not doc.get("id"):
        raise ServerError("code context of %s: unexpected answer %r" % (sb.id, doc))
    return CodeContext.from_json(doc)
