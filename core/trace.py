"""Reading the per-packet trace every program writes through sluice_verdict() (sluice/trace.h).

Tracing is switched on by writing the filter into the pinned one-slot array ``sluice_trace_cfg``
and off again when the reader stops; events come from the pinned ring buffer
``sluice_trace_events``. Both live in ``<bpffs>/sluice/core`` and need no compile to open.
"""

from __future__ import annotations

import ctypes as ct
import ipaddress
import os
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from sluice.bpf import libbpf
from sluice.bpf.ringbuf import PinnedRingBuffer

PROTOS = {
    "tcp": socket.IPPROTO_TCP,
    "udp": socket.IPPROTO_UDP,
    "icmp": socket.IPPROTO_ICMP,
    "icmp6": socket.IPPROTO_ICMPV6,
}
PROTO_NAMES = {v: k for k, v in PROTOS.items()}
VERDICTS = {
    -1: "next",
    0: "pass",
    2: "drop",
    7: "redirect",
    1: "reclassify",
    3: "queued",
    4: "repeat",
    5: "stolen",
    6: "trap",
}


LEASE_NS = 5_000_000_000  # tracing switches itself off this long after the reader last renewed


class Flow(ct.Structure):
    _fields_ = [
        ("saddr", ct.c_uint8 * 16),
        ("daddr", ct.c_uint8 * 16),
        ("sport", ct.c_uint16),
        ("dport", ct.c_uint16),
        ("proto", ct.c_uint8),
        ("family", ct.c_uint8),
        ("tcp_flags", ct.c_uint8),
        ("flags", ct.c_uint8),
    ]


class TraceCfg(ct.Structure):
    _fields_ = [
        ("expires_ns", ct.c_uint64),
        ("enabled", ct.c_uint32),
        ("ifindex", ct.c_uint32),
        ("addr", ct.c_uint8 * 16),
        ("port", ct.c_uint16),
        ("proto", ct.c_uint8),
        ("has_addr", ct.c_uint8),
    ]


class TraceEvent(ct.Structure):
    _fields_ = [
        ("ts_ns", ct.c_uint64),
        ("pkt", ct.c_uint64),
        ("ifindex", ct.c_uint32),
        ("len", ct.c_uint32),
        ("verdict", ct.c_int32),
        ("mark", ct.c_uint32),
        ("plugin", ct.c_char * 16),
        ("fn", ct.c_char * 32),
        ("reason", ct.c_char * 24),
        ("flow", Flow),
        ("detail", ct.c_uint64 * 4),
    ]


def addr_of(raw: bytes) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    a = ipaddress.IPv6Address(bytes(raw))
    return a.ipv4_mapped or a


def addr_bytes(text: str) -> bytes:
    a = ipaddress.ip_address(text)
    return (ipaddress.IPv6Address(f"::ffff:{a}") if a.version == 4 else a).packed


def parse_filter(expr: str) -> dict:
    """``"proto tcp port 80 host 10.0.0.1"`` (any subset, any order) → filter fields."""
    words, out = expr.split(), {}
    if len(words) % 2:
        raise ValueError(f"trace filter {expr!r}: expected pairs like 'proto tcp', 'port 80', 'host ADDR'")
    for key, value in zip(words[::2], words[1::2], strict=True):
        if key == "proto":
            if value not in PROTOS:
                raise ValueError(f"trace filter: unknown proto {value!r} (one of {', '.join(PROTOS)})")
            out["proto"] = PROTOS[value]
        elif key == "port":
            if not value.isdigit() or not 0 < int(value) < 65536:
                raise ValueError(f"trace filter: port {value!r} is not 1..65535")
            out["port"] = int(value)
        elif key == "host":
            try:
                out["addr"] = addr_bytes(value)
            except ValueError:
                raise ValueError(f"trace filter: host {value!r} is not an IP address") from None
        else:
            raise ValueError(f"trace filter: unknown key {key!r} (proto, port, host)")
    return out


@dataclass
class Event:
    ts_ns: int
    pkt: int
    ifindex: int
    length: int
    verdict: str
    plugin: str
    fn: str
    reason: str
    src: str
    dst: str
    sport: int
    dport: int
    proto: str
    detail: list[int]

    @classmethod
    def from_raw(cls, ev: TraceEvent) -> Event:
        f = ev.flow
        return cls(
            ts_ns=ev.ts_ns,
            pkt=ev.pkt,
            ifindex=ev.ifindex,
            length=ev.len,
            verdict=VERDICTS.get(ev.verdict, str(ev.verdict)),
            plugin=ev.plugin.decode(errors="replace"),
            fn=ev.fn.decode(errors="replace"),
            reason=ev.reason.decode(errors="replace"),
            src=str(addr_of(bytes(f.saddr))),
            dst=str(addr_of(bytes(f.daddr))),
            sport=f.sport,
            dport=f.dport,
            proto=PROTO_NAMES.get(f.proto, str(f.proto)),
            detail=list(ev.detail),
        )


class TraceSession:
    """Switch tracing on with a filter, yield events, switch it off on close.

    While the session polls it renews the switch's lease; ``events`` is the ring buffer itself
    (polling it does not renew).
    """

    def __init__(self, bpffs: Path, ifindex: int = 0, **filt):
        core = bpffs / "sluice" / "core"
        if not (core / "sluice_trace_cfg").exists():
            raise FileNotFoundError(f"no trace maps under {core}: is a sluice program loaded?")
        self.cfg_fd = libbpf.obj_get(core / "sluice_trace_cfg")
        try:
            self.events = PinnedRingBuffer(core / "sluice_trace_events", TraceEvent, Event.from_raw)
        except OSError:
            os.close(self.cfg_fd)
            raise
        self.cfg = TraceCfg(enabled=1, ifindex=ifindex, port=filt.get("port", 0), proto=filt.get("proto", 0))
        if "addr" in filt:
            self.cfg.addr[:] = list(filt["addr"])
            self.cfg.has_addr = 1
        self._set(self.cfg)

    def _set(self, cfg: TraceCfg) -> None:
        if cfg.enabled:
            cfg.expires_ns = time.monotonic_ns() + LEASE_NS
            self._renewed = time.monotonic_ns()
        libbpf.map_update_elem(self.cfg_fd, ct.c_uint32(0), cfg, what="sluice_trace_cfg")

    def poll(self, timeout_ms: int = 200) -> list[Event]:
        if time.monotonic_ns() - self._renewed > LEASE_NS // 4:
            self._set(self.cfg)  # renew the lease while we are alive to read
        return self.events.poll(timeout_ms)

    def follow(
        self, stop: Callable[[], bool] = lambda: False, timeout_s: float | None = None
    ) -> Iterator[Event]:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not stop() and (deadline is None or time.monotonic() < deadline):
            yield from self.poll()

    def close(self) -> None:
        if self.cfg_fd >= 0:
            self._set(TraceCfg(enabled=0))
            self.events.close()
            os.close(self.cfg_fd)
            self.cfg_fd = -1

    def __enter__(self) -> TraceSession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
