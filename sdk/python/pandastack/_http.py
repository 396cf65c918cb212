"""A small JSON-over-HTTP client for the PandaStack API, on urllib.request.

Internal: the public surface is :class:`pandastack.Sandbox`.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import urllib.error
import urllib.parse
import urllib.request
from contextlib import contextmanager
from typing import Any, Dict, Iterator, Mapping, Optional, Tuple

from .errors import PandaStackConnectionError, ServerError, error_from_response

__version__ = "0.1.0"

DEFAULT_URL = "http://127.0.0.1:7423"
DEFAULT_DATA_DIR = "/var/lib/pandastack"
KEY_FILE_NAME = "api-key"
DEFAULT_REQUEST_TIMEOUT = 60.0
USER_AGENT = "pandastack-python/" + __version__

_LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")


def resolve_url(url: Optional[str] = None) -> str:
    """The server URL: the argument, else $PANDASTACK_URL, else the default."""
    value = url or os.environ.get("PANDASTACK_URL") or DEFAULT_URL
    value = value.strip()
    if "://" not in value:
        value = "http://" + value
    return value.rstrip("/")


def key_file_path() -> str:
    """Where the server writes its API key: $PANDASTACK_DATA_DIR/api-key."""
    data_dir = os.environ.get("PANDASTACK_DATA_DIR") or DEFAULT_DATA_DIR
    return os.path.join(data_dir, KEY_FILE_NAME)


def resolve_api_key(api_key: Optional[str] = None) -> Tuple[Optional[str], str]:
    """The API key and a note on where it came from (or why there is none).

    Order: the argument, $PANDASTACK_API_KEY, then the server's key file.
    Returns (None, reason) when no key was found; requests are then sent
    without one and the server's 401 carries the reason.
    """
    if api_key:
        return api_key.strip(), "the api_key argument"
    env = os.environ.get("PANDASTACK_API_KEY")
    if env and env.strip():
        return env.strip(), "$PANDASTACK_API_KEY"
    path = key_file_path()
    try:
        with open(path, "r", encoding="utf-8") as f:
            key = f.read().strip()
    except OSError as e:
        return None, ("no API key: pass api_key, set $PANDASTACK_API_KEY, or make the key "
                      "file %s readable (%s)" % (path, e.strerror or e))
    if not key:
        return None, "no API key: the key file %s is empty" % path
    return key, "the key file %s" % path


class HTTPClient:
    """Sends JSON requests to one server with one API key. Holds no connections."""

    def __init__(self, url: Optional[str] = None, api_key: Optional[str] = None,
                 request_timeout: Optional[float] = DEFAULT_REQUEST_TIMEOUT):
        self.base_url = resolve_url(url)
        self.api_key, self._key_source = resolve_api_key(api_key)
        self.request_timeout = request_timeout
        host = urllib.parse.urlsplit(self.base_url).hostname or ""
        if host in _LOOPBACK:
            # Never send a local daemon's traffic (and key) through a proxy.
            self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        else:
            self._opener = urllib.request.build_opener()

    def __repr__(self) -> str:
        return "HTTPClient(url=%r)" % self.base_url

    def _request(self, method: str, path: str, body: Any, accept: str,
                 raw: Optional[Tuple[Any, Mapping[str, str]]] = None) -> urllib.request.Request:
        headers = {"Accept": accept, "User-Agent": USER_AGENT}
        data = None
        if raw is not None:
            # A body sent as it is (bytes or a file), with its own headers.
            data = raw[0]
            headers.update(raw[1])
        elif body is not None:
            data = json.dumps(body).encode("utf-8")
            headers["Content-Type"] = "application/json"
        if self.api_key:
            headers["Authorization"] = "Bearer " + self.api_key
        return urllib.request.Request(self.base_url + path, data=data, headers=headers, method=method)

    @contextmanager
    def open(self, method: str, path: str, body: Any = None, *,
             timeout: Optional[float] = None,
             accept: str = "application/json",
             raw: Optional[Tuple[Any, Mapping[str, str]]] = None) -> Iterator[http.client.HTTPResponse]:
        """Send a request and yield the successful (2xx) response; raise the mapped error otherwise.

        ``raw`` is ``(data, headers)``: a body sent as it is instead of ``body`` as JSON.
        """
        req = self._request(method, path, body, accept, raw)
        url = req.full_url
        if timeout is None:
            timeout = self.request_timeout
        try:
            resp = self._opener.open(req, timeout=timeout)
        except urllib.error.HTTPError as e:
            try:
                data = e.read()
            except (OSError, http.client.HTTPException):
                data = b""
            finally:
                e.close()
            headers = e.headers
            err = error_from_response(e.code, data, headers.get("Content-Type", "") if headers else "", url,
                                      request_id=headers.get("X-Request-Id") if headers else None)
            if e.code == 401 and not self.api_key:
                err.message += " (" + self._key_source + ")"
            raise err from None
        except urllib.error.URLError as e:
            raise self._connection_error(method, url, e.reason) from e
        except (OSError, http.client.HTTPException) as e:
            raise self._connection_error(method, url, e) from e
        try:
            yield resp
        finally:
            resp.close()

    def read_all(self, method: str, resp: http.client.HTTPResponse) -> bytes:
        try:
            return resp.read()
        except (OSError, http.client.HTTPException) as e:
            raise self._connection_error(method, resp.geturl(), e) from e

    def iter_lines(self, method: str, resp: http.client.HTTPResponse) -> Iterator[bytes]:
        """Yield the response's lines as they arrive (for NDJSON streams)."""
        url = resp.geturl()
        while True:
            try:
                line = resp.readline()
            except (OSError, http.client.HTTPException) as e:
                raise self._connection_error(method, url, e) from e
            if not line:
                return
            yield line

    def _connection_error(self, method: str, url: str, reason: Any) -> PandaStackConnectionError:
        if isinstance(reason, socket.timeout) or "timed out" in str(reason):
            what = "timed out"
        else:
            what = "failed"
        return PandaStackConnectionError(
            "cannot reach the PandaStack server at %s: %s %s %s: %s" % (
                self.base_url, method, url, what, reason or type(reason).__name__),
            url=self.base_url)

    def call(self, method: str, path: str, body: Any = None, *,
             timeout: Optional[float] = None) -> Any:
        """Send a request and return the decoded JSON answer (None for an empty body, e.g. 204)."""
        with self.open(method, path, body, timeout=timeout) as resp:
            data = self.read_all(method, resp)
            status = resp.status
            ctype = resp.headers.get("Content-Type", "")
        if not data.strip():
            return None
        try:
            return json.loads(data.decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            text = data.decode("utf-8", errors="replace")[:500]
            raise ServerError("%s %s%s: answer %d is not JSON (%s): %s" % (
                method, self.base_url, path, status, ctype or "no content type", text),
                status=status) from None


def path_escape(segment: str) -> str:
    """Quote one path segment (a sandbox id) so it cannot change the route."""
    return urllib.parse.quote(segment, safe="")


def str_map(value: Optional[Mapping[Any, Any]]) -> Optional[Dict[str, str]]:
    if value is None:
        return None
    return {str(k): str(v) for k, v in value.items()}
