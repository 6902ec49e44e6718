"""The contract between the proxy and the rules."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Peer:
    """The connecting process (SO_PEERCRED on the gate's socket)."""
    pid: int
    uid: int
    gid: int


@dataclass
class Request:
    method: str                        # "POST"
    path: str                          # normalized, API version prefix removed: "/containers/create"
    version: str                       # "1.41" from "/v1.41/...", "" when absent
    query: dict[str, list[str]]        # parsed query string
    headers: list[tuple[bytes, bytes]]
    body: bytes                        # the whole body (only for requests the rules asked to see)
    peer: Peer | None = None
    raw_target: str = ""               # the request target as received, for messages


@dataclass
class Decision:
    allow: bool
    body: bytes | None = None          # a re-encoded body to forward instead of the original
    status: int = 403
    message: str = ""                  # "isobox gate: <rule>: <what> (policy /etc/isobox/policy.toml)"
    extra: dict = field(default_factory=dict)


def allow(body: bytes | None = None) -> Decision:
    return Decision(True, body=body)


def refuse(message: str, status: int = 403) -> Decision:
    return Decision(False, status=status, message=message)
