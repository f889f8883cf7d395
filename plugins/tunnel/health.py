"""Built-in peer health checks: probes, rise/fall thresholds and flap damping.

A peer goes down after ``fall`` failed probes in a row and up after ``rise`` good ones. Each
transition adds a penalty that halves every ``damping_halflife`` seconds; while the penalty is
above ``damping_suppress`` the peer is held down (a flapping peer stays withdrawn) until it decays
below ``damping_reuse``. Transitions go through :meth:`Tunnel.set_health`, the same path as
`sluice tunnel health set`.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Literal

import pydantic

PENALTY_PER_FLAP = 1.0


class HealthConfig(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")

    enabled: bool = False
    probe: Literal["icmp", "tcp"] = "icmp"
    port: int = pydantic.Field(0, ge=0, le=65535, description="tcp: the port to connect to")
    interval: float = pydantic.Field(1.0, gt=0, le=3600)
    timeout: float = pydantic.Field(0.5, gt=0, le=60)
    rise: int = pydantic.Field(2, ge=1, le=100)
    fall: int = pydantic.Field(2, ge=1, le=100)
    damping_halflife: float = pydantic.Field(60.0, gt=0)
    damping_suppress: float = pydantic.Field(3.0, gt=0)
    damping_reuse: float = pydantic.Field(1.5, gt=0)
    targets: dict[str, str] = pydantic.Field(
        default_factory=dict, description="peer → address to probe (default: the peer's first underlay)"
    )

    @pydantic.model_validator(mode="after")
    def _check(self) -> HealthConfig:
        if self.probe == "tcp" and not self.port:
            raise ValueError("health.probe = 'tcp' needs health.port")
        if self.timeout > self.interval:
            raise ValueError("health.timeout must not exceed health.interval")
        if self.damping_reuse >= self.damping_suppress:
            raise ValueError("health.damping_reuse must be below health.damping_suppress")
        return self


@dataclass
class PeerState:
    """Thresholds and damping for one peer. Pure: fed probe results and times, says the state."""

    cfg: HealthConfig
    up: bool = True
    streak: int = 0  # consecutive results disagreeing with ``up``
    penalty: float = 0.0
    suppressed: bool = False
    stamp: float = field(default_factory=time.monotonic)

    def _decay(self, now: float) -> None:
        self.penalty *= 0.5 ** ((now - self.stamp) / self.cfg.damping_halflife)
        self.stamp = now
        if self.suppressed and self.penalty < self.cfg.damping_reuse:
            self.suppressed = False

    def feed(self, ok: bool, now: float) -> bool | None:
        """Record one probe result; returns the new state on a transition, else None."""
        self._decay(now)
        if ok == self.up:
            self.streak = 0
            return None
        self.streak += 1
        if self.streak < (self.cfg.rise if ok else self.cfg.fall):
            return None
        if ok and self.suppressed:
            return None  # flapping: held down until the penalty decays
        self.up, self.streak = ok, 0
        self.penalty += PENALTY_PER_FLAP
        if self.penalty > self.cfg.damping_suppress:
            self.suppressed = True
        return ok


def icmp_echo(address: str, timeout: float) -> bool:
    """One ICMP(v6) echo; True when the reply came within ``timeout``."""
    v6 = ":" in address
    family, proto = (socket.AF_INET6, socket.IPPROTO_ICMPV6) if v6 else (socket.AF_INET, socket.IPPROTO_ICMP)
    ident = secrets.randbelow(0x10000)
    body = struct.pack("!HH", ident, 1) + b"sluice-tunnel-health"
    kind = 128 if v6 else 8
    header = struct.pack("!BBH", kind, 0, 0 if v6 else _checksum(struct.pack("!BBH", kind, 0, 0) + body))
    deadline = time.monotonic() + timeout
    with socket.socket(family, socket.SOCK_RAW, proto) as sock:
        sock.sendto(header + body, (address, 0))
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            try:
                data, src = sock.recvfrom(2048)
            except (TimeoutError, OSError):
                return False
            icmp = data if v6 else data[(data[0] & 0xF) * 4 :]
            if (
                len(icmp) >= 6
                and icmp[0] == (129 if v6 else 0)
                and icmp[4:6] == body[:2]
                and src[0] == address
            ):
                return True
    return False


def tcp_connect(address: str, port: int, timeout: float) -> bool:
    try:
        with socket.create_connection((address, port), timeout=timeout):
            return True
    except OSError:
        return False


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


class HealthChecker:
    """Probes every peer on its interval and reports transitions through ``set_health``."""

    def __init__(self, cfg: HealthConfig, tunnel, log=None):
        self.cfg = cfg
        self.tunnel = tunnel  # engine.Tunnel: peers(), peer_health(), set_health()
        self.log = log
        self.states: dict[str, PeerState] = {}

    def probe(self, address: str) -> bool:
        if self.cfg.probe == "tcp":
            return tcp_connect(address, self.cfg.port, self.cfg.timeout)
        return icmp_echo(address, self.cfg.timeout)

    def target(self, peer: str, underlays: set) -> str:
        return self.cfg.targets.get(peer) or str(sorted(underlays, key=str)[0])

    async def round(self) -> None:
        """Probe every peer once, concurrently; apply transitions."""
        peers, current = self.tunnel.peers(), self.tunnel.peer_health()
        for gone in set(self.states) - set(peers):
            del self.states[gone]
        names = sorted(peers)
        results = await asyncio.gather(
            *(asyncio.to_thread(self.probe, self.target(p, peers[p])) for p in names), return_exceptions=True
        )
        now = time.monotonic()
        for peer, ok in zip(names, results, strict=True):
            state = self.states.setdefault(peer, PeerState(self.cfg, up=current.get(peer, True), stamp=now))
            change = state.feed(ok is True, now)
            if change is None:
                continue
            if self.log is not None:
                self.log.warning("peer health changed", peer=peer, up=change, penalty=round(state.penalty, 2))
            with contextlib.suppress(KeyError):  # the peer's routes went away meanwhile
                await asyncio.to_thread(self.tunnel.set_health, peer, change, "probe")

    async def run(self) -> None:
        while True:
            started = time.monotonic()
            await self.round()
            await asyncio.sleep(max(0.0, self.cfg.interval - (time.monotonic() - started)))
