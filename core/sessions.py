"""The session records that owners publish, replication stores and owners restore.

A session is opaque to everyone but its owner: ``key`` and ``value`` are the owner's map key and
the part of its value worth replicating, as bytes. ``attrs`` carries decoded, human-readable
fields (tuple, tunnel metadata) for listings and for status comparisons.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any, Literal

SessionEventKind = Literal["created", "updated", "deleted"]


@dataclass(frozen=True)
class Session:
    owner: str
    key: bytes
    value: bytes
    attrs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SessionEvent:
    kind: SessionEventKind
    session: Session
    time_ns: int

    @property
    def owner(self) -> str:
        return self.session.owner


@dataclass(frozen=True)
class FlowTuple:
    src: ipaddress.IPv4Address | ipaddress.IPv6Address
    dst: ipaddress.IPv4Address | ipaddress.IPv6Address
    sport: int
    dport: int
    proto: int


@dataclass(frozen=True)
class NatTranslation:
    """How the reply direction of ``original`` looks after NAT (netfilter's reply tuple)."""

    original: FlowTuple
    reply: FlowTuple
