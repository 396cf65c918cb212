"""Plain data types returned by the SDK."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Dict, List, Mapping, Optional

# RFC 3339 as Go writes it (time.RFC3339Nano): up to nine fraction digits,
# "Z" or a numeric offset. datetime.fromisoformat on Python < 3.11 reads
# neither "Z" nor more than six digits, so parse by hand.
_RFC3339 = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?"
    r"(?:([Zz])|([+-])(\d{2}):?(\d{2}))?$"
)


def parse_time(value: Any) -> Optional[datetime]:
    """Parse an RFC 3339 timestamp into an aware datetime (None for null or empty)."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ValueError("timestamp is not a string: %r" % (value,))
    m = _RFC3339.match(value.strip())
    if not m:
        raise ValueError("not an RFC 3339 timestamp: %r" % (value,))
    year, month, day, hour, minute, second = (int(m.group(i)) for i in range(1, 7))
    frac = m.group(7) or ""
    micro = int((frac + "000000")[:6]) if frac else 0
    if m.group(9):
        offset = timedelta(hours=int(m.group(10)), minutes=int(m.group(11)))
        if m.group(9) == "-":
            offset = -offset
        tz = timezone(offset)
    else:
        # "Z", or no zone at all (not RFC 3339, but read it as UTC).
        tz = timezone.utc
    return datetime(year, month, day, hour, minute, second, micro, tzinfo=tz)


def _str_map(value: Any) -> Dict[str, str]:
    if not value:
        return {}
    return {str(k): str(v) for k, v in dict(value).items()}


@dataclass
class NetworkInfo:
    """A sandbox's network as the server reports it (the API's ``SandboxNetwork``).

    ``internet`` opens every public address; ``allow`` and ``deny`` are the
    rules (deny wins); with none of them the sandbox has no egress, but its
    ports can still be reached (:meth:`Sandbox.get_url`). ``public_ports``
    lets anyone reach the ports without a credential. ``access_token`` opens
    the sandbox's ports to whoever has it, besides the API key.
    """

    internet: bool = False
    allow: List[str] = field(default_factory=list)
    deny: List[str] = field(default_factory=list)
    public_ports: bool = False
    access_token: Optional[str] = None

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> "NetworkInfo":
        return cls(
            internet=bool(doc.get("internet", False)),
            allow=[str(r) for r in (doc.get("allow") or [])],
            deny=[str(r) for r in (doc.get("deny") or [])],
            public_ports=bool(doc.get("public_ports", False)),
            access_token=str(doc["access_token"]) if doc.get("access_token") else None,
        )

    def policy(self) -> Dict[str, Any]:
        """The policy as the API takes it (``Sandbox.create(network=...)``, :meth:`Sandbox.set_network`)."""
        body: Dict[str, Any] = {}
        if self.internet:
            body["internet"] = True
        if self.allow:
            body["allow"] = list(self.allow)
        if self.deny:
            body["deny"] = list(self.deny)
        if self.public_ports:
            body["public_ports"] = True
        return body


@dataclass
class SandboxInfo:
    """What the server last said about a sandbox (the API's ``Sandbox``)."""

    id: str
    template: str
    state: str
    created_at: Optional[datetime]
    expires_at: Optional[datetime]
    metadata: Dict[str, str] = field(default_factory=dict)
    cpu: float = 0.0
    memory_mb: int = 0
    disk_mb: int = 0
    pids: int = 0
    #: What the TTL does: "kill" or "pause" (servers that predate pausing
    #: send nothing, which reads as "kill").
    on_timeout: str = "kill"
    #: Size on disk of the saved state while the sandbox is paused; else 0.
    paused_bytes: int = 0
    #: The sandbox's network, or None for a sandbox created without one.
    network: Optional[NetworkInfo] = None

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> "SandboxInfo":
        return cls(
            id=str(doc.get("id", "")),
            template=str(doc.get("template", "")),
            state=str(doc.get("state", "")),
            created_at=parse_time(doc.get("created_at")),
            expires_at=parse_time(doc.get("expires_at")),
            metadata=_str_map(doc.get("metadata")),
            cpu=float(doc.get("cpu") or 0),
            memory_mb=int(doc.get("memory_mb") or 0),
            disk_mb=int(doc.get("disk_mb") or 0),
            pids=int(doc.get("pids") or 0),
            on_timeout=str(doc.get("on_timeout") or "kill"),
            paused_bytes=int(doc.get("paused_bytes") or 0),
            network=NetworkInfo.from_json(doc["network"]) if isinstance(doc.get("network"), dict) else None,
        )


@dataclass
class ExecResult:
    """The outcome of :meth:`Sandbox.exec`.

    ``exit_code`` is 124 when the command ran past its timeout (``timed_out``
    is then True), 128+N when killed by signal N, 127 when not found.
    ``truncated`` is True when stdout or stderr hit the server's output cap.
    """

    stdout: str
    stderr: str
    exit_code: int
    timed_out: bool = False
    truncated: bool = False
    duration_ms: float = 0.0

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> "ExecResult":
        return cls(
            stdout=str(doc.get("stdout") or ""),
            stderr=str(doc.get("stderr") or ""),
            exit_code=int(doc.get("exit_code", -1)),
            timed_out=bool(doc.get("timed_out", False)),
            truncated=bool(doc.get("truncated", False)),
            duration_ms=float(doc.get("duration_ms") or 0.0),
        )


@dataclass
class MetricsSample:
    """One sample of a sandbox's usage, taken by the server."""

    time: Optional[datetime]
    cpu_seconds: float
    cpu_percent: float
    memory_bytes: int
    disk_bytes: int
    processes: int

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "MetricsSample":
        return cls(
            time=parse_time(d.get("time")),
            cpu_seconds=float(d.get("cpu_seconds", 0)),
            cpu_percent=float(d.get("cpu_percent", 0)),
            memory_bytes=int(d.get("memory_bytes", 0)),
            disk_bytes=int(d.get("disk_bytes", 0)),
            processes=int(d.get("processes", 0)),
        )


@dataclass
class SandboxMetrics:
    """A sandbox's recent usage samples, oldest first."""

    sandbox_id: str
    interval_seconds: float
    samples: List[MetricsSample] = field(default_factory=list)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SandboxMetrics":
        return cls(
            sandbox_id=str(d.get("sandbox_id", "")),
            interval_seconds=float(d.get("interval_seconds", 0)),
            samples=[MetricsSample.from_dict(s) for s in d.get("samples") or []],
        )
