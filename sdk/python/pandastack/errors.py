"""Exceptions raised by the PandaStack SDK.

Every error the server reports arrives as
``{"error": {"code": ..., "message": ..., "request_id": ...}}`` with a 4xx/5xx
status; :func:`error_from_response` turns it into the matching subclass of
:class:`PandaStackError`. The request id (also the ``X-Request-Id`` header) is
what the server's log files the error's details under: quote it when reporting
a problem.
"""

from __future__ import annotations

import json
from typing import Optional


class PandaStackError(Exception):
    """Base class of every error the SDK raises.

    Attributes:
        status: the HTTP status of the answer, or None when there was none
            (a connection failure, an error event inside an exec stream).
        code: the server's machine-readable error code (``not_found``, ...),
            or None when the answer carried none.
        message: the human-readable message.
        request_id: the server's id of the request, or None when unknown.
    """

    def __init__(self, message: str, *, status: Optional[int] = None, code: Optional[str] = None,
                 request_id: Optional[str] = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.request_id = request_id

    def __str__(self) -> str:
        parts = []
        if self.status is not None:
            parts.append(str(self.status))
        if self.code:
            parts.append(self.code)
        text = self.message
        if parts:
            text = "%s: %s" % (" ".join(parts), text)
        if self.request_id:
            text += " (request %s)" % self.request_id
        return text

    def __repr__(self) -> str:
        return "%s(status=%r, code=%r, message=%r, request_id=%r)" % (
            type(self).__name__, self.status, self.code, self.message, self.request_id)


class InvalidArgumentError(PandaStackError):
    """400 invalid_argument: malformed request, bad TTL or limits, empty command."""


class AuthenticationError(PandaStackError):
    """401 unauthenticated: missing or wrong API key."""


class NotFoundError(PandaStackError):
    """404 not_found: unknown (or already killed) sandbox, unknown template or route."""


class ConflictError(PandaStackError):
    """409 conflict: the sandbox is not running."""


class TooLargeError(PandaStackError):
    """413 too_large: the request body is over the server's limit."""


class QuotaExceededError(PandaStackError):
    """429 quota_exceeded: too many sandboxes, or (exec) too many commands running on the server."""


class UnavailableError(PandaStackError):
    """503 unavailable: template not built yet, or the sandbox's agent is not answering."""


class ServerTimeoutError(PandaStackError):
    """504 timeout: something the request waited for inside the server did not answer in time."""


class InsufficientStorageError(PandaStackError):
    """507 insufficient_storage: the server's disk cannot take what the request would write."""


class ServerError(PandaStackError):
    """Any other error status (500 internal, unexpected 5xx), or an answer the SDK cannot read."""


class PandaStackConnectionError(PandaStackError, ConnectionError):
    """The server could not be reached, or the connection broke or timed out.

    Also an instance of the built-in :class:`ConnectionError`.
    """

    def __init__(self, message: str, *, url: Optional[str] = None):
        PandaStackError.__init__(self, message)
        self.url = url


_BY_STATUS = {
    400: InvalidArgumentError,
    401: AuthenticationError,
    404: NotFoundError,
    409: ConflictError,
    413: TooLargeError,
    429: QuotaExceededError,
    503: UnavailableError,
    504: ServerTimeoutError,
    507: InsufficientStorageError,
}

_BY_CODE = {
    "invalid_argument": (InvalidArgumentError, 400),
    "unauthenticated": (AuthenticationError, 401),
    "not_found": (NotFoundError, 404),
    "conflict": (ConflictError, 409),
    "too_large": (TooLargeError, 413),
    "quota_exceeded": (QuotaExceededError, 429),
    "unavailable": (UnavailableError, 503),
    "timeout": (ServerTimeoutError, 504),
    "insufficient_storage": (InsufficientStorageError, 507),
    "internal": (ServerError, 500),
}


def error_from_code(code: Optional[str], message: str, request_id: Optional[str] = None) -> PandaStackError:
    """The exception for an error that came without an HTTP status (an exec stream's error event)."""
    cls, status = _BY_CODE.get(code or "", (ServerError, None))
    return cls(message, status=status, code=code, request_id=request_id or None)


def error_from_response(status: int, body: bytes, content_type: str = "", url: str = "",
                        request_id: Optional[str] = None) -> PandaStackError:
    """The exception for an error answer with the given status and body.

    ``request_id`` is the answer's ``X-Request-Id`` header; the body's
    ``request_id`` wins when it has one.
    """
    cls = _BY_STATUS.get(status, ServerError)
    code: Optional[str] = None
    message: Optional[str] = None
    try:
        doc = json.loads(body.decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        doc = None
    if isinstance(doc, dict) and isinstance(doc.get("error"), dict):
        err = doc["error"]
        if isinstance(err.get("code"), str):
            code = err["code"]
        if isinstance(err.get("message"), str):
            message = err["message"]
        if isinstance(err.get("request_id"), str) and err["request_id"]:
            request_id = err["request_id"]
    if message is None:
        text = body.decode("utf-8", errors="replace").strip()
        if len(text) > 500:
            text = text[:500] + "..."
        where = (" from %s" % url) if url else ""
        if text:
            message = "unexpected error answer%s (%s): %s" % (
                where, content_type or "no content type", text)
        else:
            message = "unexpected error answer%s with an empty body" % where
    return cls(message, status=status, code=code, request_id=request_id or None)
