"""The Snapshot class: saved sandboxes that new sandboxes start from."""

from __future__ import annotations

import types
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Callable, List, Optional

from ._http import DEFAULT_REQUEST_TIMEOUT, HTTPClient, path_escape
from .errors import ServerError
from .models import parse_time


class _class_or_instance_method:
    """A method bound to the instance when called on one, else to the class.

    It lets ``Snapshot.delete("snap-…")`` and ``snap.delete()`` both work.
    """

    def __init__(self, func: Callable[..., Any]):
        self.func = func
        self.__doc__ = func.__doc__

    def __get__(self, obj: Any, owner: type) -> Callable[..., Any]:
        return types.MethodType(self.func, owner if obj is None else obj)


@dataclass
class Snapshot:
    """A saved sandbox: the memory of every process and the writable files.

    Make one with :meth:`Sandbox.snapshot`; start sandboxes from it with
    ``Sandbox.create(snapshot_id=snap.id)``. It is kept until deleted::

        snap = sb.snapshot()
        clone = Sandbox.create(snapshot_id=snap.id)
        snap.delete()    # or Snapshot.delete(snap.id)
    """

    id: str
    source_sandbox: str
    template: str
    size_bytes: int
    created_at: Optional[datetime]
    # The server the snapshot came from, for delete() on this object.
    _client: Optional[HTTPClient] = field(default=None, repr=False, compare=False)

    @classmethod
    def from_json(cls, doc: Any, client: Optional[HTTPClient] = None) -> "Snapshot":
        where = client.base_url if client is not None else "the server"
        if not isinstance(doc, dict) or not doc.get("id"):
            raise ServerError("unexpected answer from %s, not a snapshot: %r" % (where, doc))
        try:
            return cls(
                id=str(doc["id"]),
                source_sandbox=str(doc.get("source_sandbox") or ""),
                template=str(doc.get("template") or ""),
                size_bytes=int(doc.get("size_bytes") or 0),
                created_at=parse_time(doc.get("created_at")),
                _client=client,
            )
        except (TypeError, ValueError) as e:
            raise ServerError("unexpected snapshot from %s: %s" % (where, e)) from None

    @classmethod
    def list(cls, *, url: Optional[str] = None, api_key: Optional[str] = None,
             request_timeout: Optional[float] = DEFAULT_REQUEST_TIMEOUT) -> List["Snapshot"]:
        """The caller's snapshots."""
        client = HTTPClient(url, api_key, request_timeout)
        doc = client.call("GET", "/v1/snapshots")
        if not isinstance(doc, dict) or not isinstance(doc.get("snapshots", []), (list, type(None))):
            raise ServerError("GET %s/v1/snapshots: unexpected answer %r" % (client.base_url, doc))
        return [cls.from_json(item, client) for item in (doc.get("snapshots") or [])]

    @classmethod
    def get(cls, id: str, *, url: Optional[str] = None, api_key: Optional[str] = None,
            request_timeout: Optional[float] = DEFAULT_REQUEST_TIMEOUT) -> "Snapshot":
        """The snapshot ``id`` (raises NotFoundError if there is none)."""
        client = HTTPClient(url, api_key, request_timeout)
        return cls.from_json(client.call("GET", _path(id)), client)

    @_class_or_instance_method
    def delete(this: Any, id: Optional[str] = None, *, url: Optional[str] = None,
               api_key: Optional[str] = None,
               request_timeout: Optional[float] = DEFAULT_REQUEST_TIMEOUT) -> None:
        """Delete a snapshot: ``Snapshot.delete(id)``, or ``snap.delete()``.

        Raises NotFoundError if there is none, ConflictError while a sandbox
        is being created from it.
        """
        client: Optional[HTTPClient] = None
        if isinstance(this, Snapshot):
            if id is None:
                id = this.id
            if url is None and api_key is None and this._client is not None:
                client = this._client
        if not id:
            raise TypeError("Snapshot.delete() needs the id of the snapshot to delete")
        if client is None:
            client = HTTPClient(url, api_key, request_timeout)
        client.call("DELETE", _path(id))


def _path(id: str) -> str:
    return "/v1/snapshots/" + path_escape(id)
