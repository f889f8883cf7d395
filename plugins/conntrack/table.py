"""The conntrack maps as user space sees them: layouts, decoding, tenants' tables.

Mirrors conntrack.bpf.c; keep the two in step. Every table is reached through the pinned outer
maps (``ct_tcp``, ``ct_any``: array-of-maps indexed by slot) and ``ct_tenants`` (tenant id →
slot; tenant 0 is slot 0), so the CLI needs nothing but the pin directory: a user-space lookup in
an outer map returns the inner map's id.
"""

from __future__ import annotations

import ctypes as ct
import errno
import ipaddress
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sluice.bpf.maps import Map, MapType

CLOCK_MONOTONIC_COARSE = 6  # linux/time.h; Python's time module does not name it
KINDS = ("tcp", "any")  # the TCP table and the everything-else table, per tenant

F_TX_CLOSING, F_RX_CLOSING, F_SEEN_NON_SYN, F_RELATED = 0x1, 0x2, 0x4, 0x8
REPORT_REASONS = {1: "new", 2: "flags", 3: "interval", 4: "related", 5: "reply"}
STATS = (
    "packets",
    "created_tcp",
    "created_any",
    "midstream",
    "related",
    "related_orphan",
    "malformed",
    "no_table",
    "reports",
    "reports_lost",
    "create_failed",
    "icmp_other",
    "reopened",
    "fragments",
)
PROTOCOLS = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmp6", 132: "sctp"}
PROTO_NUMBERS = {name: number for number, name in PROTOCOLS.items()}
TCP_FLAG_NAMES = ((0x01, "F"), (0x02, "S"), (0x04, "R"), (0x08, "P"), (0x10, "A"), (0x20, "U"))


class CtKey(ct.Structure):
    _fields_ = [
        ("saddr", ct.c_uint8 * 16),
        ("daddr", ct.c_uint8 * 16),
        ("sport", ct.c_uint16),
        ("dport", ct.c_uint16),
        ("proto", ct.c_uint8),
        ("flags", ct.c_uint8),
        ("pad", ct.c_uint16),
    ]


class CtEntry(ct.Structure):
    _fields_ = [
        ("packets", ct.c_uint64 * 2),
        ("bytes", ct.c_uint64 * 2),
        ("created_ns", ct.c_uint64),
        ("last_seen_ns", ct.c_uint64),
        ("lifetime", ct.c_uint32),
        ("related", ct.c_uint32),
        ("last_report", ct.c_uint32 * 2),
        ("flags", ct.c_uint16),
        ("tcp_flags_seen", ct.c_uint8 * 2),
        ("tenant", ct.c_uint32),
        ("ifindex", ct.c_uint32),
        ("pad", ct.c_uint32),
    ]


class CtSettings(ct.Structure):
    _fields_ = [
        ("tcp_established", ct.c_uint32),
        ("tcp_syn", ct.c_uint32),
        ("tcp_close", ct.c_uint32),
        ("non_tcp", ct.c_uint32),
        ("report_interval", ct.c_uint32),
        ("iface_tenants", ct.c_uint32),
    ]


class CtIface(ct.Structure):
    _fields_ = [("tenant", ct.c_uint32), ("from_vni", ct.c_uint32)]


class CtReport(ct.Structure):
    _fields_ = [("key", CtKey), ("entry", CtEntry), ("reason", ct.c_uint32), ("dir", ct.c_uint32)]


def monotonic_s() -> float:
    """The datapath's clock in seconds (bpf_ktime_get_coarse_ns is CLOCK_MONOTONIC_COARSE)."""
    return time.clock_gettime(CLOCK_MONOTONIC_COARSE)


def addr(raw) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    a = ipaddress.IPv6Address(bytes(raw))
    return a.ipv4_mapped or a


def addr_bytes(text: str | ipaddress.IPv4Address | ipaddress.IPv6Address) -> bytes:
    """16 bytes, IPv4 v4-mapped, as the datapath stores addresses."""
    a = ipaddress.ip_address(text) if isinstance(text, str) else text
    return a.packed if a.version == 6 else b"\0" * 10 + b"\xff\xff" + a.packed


def make_key(src: str, dst: str, sport: int, dport: int, proto: int) -> CtKey:
    k = CtKey(sport=sport, dport=dport, proto=proto)
    k.saddr[:] = list(addr_bytes(src))
    k.daddr[:] = list(addr_bytes(dst))
    return k


def tcp_flags_text(bits: int) -> str:
    return "".join(name for bit, name in TCP_FLAG_NAMES if bits & bit) or "-"


def tcp_state(e: CtEntry) -> str:
    closing = e.flags & (F_TX_CLOSING | F_RX_CLOSING)
    if closing == F_TX_CLOSING | F_RX_CLOSING:
        return "closed"
    if closing:
        return "closing"
    if e.tcp_flags_seen[0] & 0x02 and e.tcp_flags_seen[1] & 0x02:
        return "established"
    return "syn"


@dataclass(frozen=True)
class Conn:
    """One decoded entry, for listings, JSON and tests."""

    tenant: int
    kind: str
    key: CtKey
    entry: CtEntry

    @property
    def proto(self) -> str:
        return PROTOCOLS.get(self.key.proto, str(self.key.proto))

    def remaining(self, now: float) -> int:
        return int(self.entry.lifetime) - int(now)

    def state(self) -> str:
        if self.key.proto == 6:
            return tcp_state(self.entry)
        return "related" if self.entry.flags & F_RELATED else "open"

    def matches(self, ips: set[bytes]) -> bool:
        return bytes(self.key.saddr) in ips or bytes(self.key.daddr) in ips

    def as_dict(self, now: float) -> dict[str, Any]:
        k, e = self.key, self.entry
        return {
            "tenant": self.tenant,
            "proto": self.proto,
            "src": str(addr(k.saddr)),
            "dst": str(addr(k.daddr)),
            "sport": k.sport,
            "dport": k.dport,
            "state": self.state(),
            "packets": {"original": e.packets[0], "reply": e.packets[1]},
            "bytes": {"original": e.bytes[0], "reply": e.bytes[1]},
            "tcp_flags": {
                "original": tcp_flags_text(e.tcp_flags_seen[0]),
                "reply": tcp_flags_text(e.tcp_flags_seen[1]),
            }
            if k.proto == 6
            else None,
            "closing": {"original": bool(e.flags & F_TX_CLOSING), "reply": bool(e.flags & F_RX_CLOSING)},
            "related": e.related,
            "lifetime": e.lifetime,
            "remaining_s": self.remaining(now),
            "ifindex": e.ifindex,
        }

    def line(self, now: float) -> str:
        k, e = self.key, self.entry
        flags = (
            f" flags={tcp_flags_text(e.tcp_flags_seen[0])}/{tcp_flags_text(e.tcp_flags_seen[1])}"
            if k.proto == 6
            else ""
        )
        left = self.remaining(now)
        expiry = f"expires_in={left}s" if left >= 0 else "expired"  # GC has not removed it yet
        return (
            f"{self.proto:<5} tenant={self.tenant} {addr(k.saddr)}:{k.sport} -> {addr(k.daddr)}:{k.dport} "
            f"{self.state()} {expiry} "
            f"orig={e.packets[0]}p/{e.bytes[0]}B reply={e.packets[1]}p/{e.bytes[1]}B{flags}"
            + (f" related={e.related}" if e.related else "")
        )


class Tables:
    """The pinned outer maps and the tenants' inner tables behind them."""

    def __init__(self, pin_dir: Path):
        self.pin_dir = pin_dir
        missing = [n for n in ("ct_tcp", "ct_any", "ct_tenants") if not (pin_dir / n).exists()]
        if missing:
            raise FileNotFoundError(f"{pin_dir / missing[0]} not found: is the conntrack plugin running?")
        self.outer = {k: Map.open_pinned(pin_dir / f"ct_{k}", ct.c_uint32, ct.c_uint32) for k in KINDS}
        self.slots = Map.open_pinned(pin_dir / "ct_tenants", ct.c_uint32, ct.c_uint32)

    def close(self) -> None:
        for m in (*self.outer.values(), self.slots):
            m.close()

    def __enter__(self) -> Tables:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _slot(self, tenant: int) -> int | None:
        return 0 if tenant == 0 else self.slots.get(tenant)

    def tenants(self) -> list[int]:
        default = [0] if self.outer["tcp"].get(0) is not None else []
        return default + sorted(self.slots.keys())

    def table(self, kind: str, tenant: int) -> Map | None:
        """The inner table (a fresh Map the caller closes), None when the tenant has none."""
        slot = self._slot(tenant)
        map_id = self.outer[kind].get(slot) if slot is not None else None
        if map_id is None:
            return None
        try:
            return Map.from_id(map_id, CtKey, CtEntry)
        except FileNotFoundError:  # removed meanwhile
            return None

    def each(self, tenant: int | None = None) -> Iterator[tuple[int, str, Map]]:
        """(tenant, kind, table) for every table, or for one tenant's."""
        for t in [tenant] if tenant is not None else self.tenants():
            for kind in KINDS:
                m = self.table(kind, t)
                if m is not None:
                    with m:
                        yield t, kind, m

    def add_tenant(self, tenant: int, sizes: dict[str, int]) -> bool:
        """Create the tenant's tables (no-op when present); True when created.

        Tenant 0's tables are the program's pinned inner-map templates (``ct_*_inner``): the
        datapath uses them by name for tenant 0, so slot 0 must hold exactly those (whatever else
        is there is replaced). Another new tenant gets the lowest free slot and fresh tables
        (whatever a crash left in that slot is replaced); its tenant → slot entry is written last,
        so the datapath never finds a slot without its tables.
        """
        slot = self._slot(tenant)
        fresh = slot is None
        if fresh:
            used = {v for _, v in self.slots.items()}
            slot = next((i for i in range(1, self.outer["tcp"].info.max_entries) if i not in used), None)
            if slot is None:
                raise ValueError(
                    f"tenant {tenant}: all {self.outer['tcp'].info.max_entries - 1} tenant slots are taken"
                )
        created = False
        for kind in KINDS:
            if tenant == 0:
                inner = Map.open_pinned(self.pin_dir / f"ct_{kind}_inner", CtKey, CtEntry)
                if self.outer[kind].get(slot) == inner.info.id:
                    inner.close()
                    continue
            elif not fresh and self.outer[kind].get(slot) is not None:
                continue
            else:
                inner = Map.create(
                    MapType.LRU_HASH, CtKey, CtEntry, sizes[kind], name=f"ct_{kind}_{tenant}"[:15]
                )
            with inner:
                try:
                    self.outer[kind].set(slot, inner.fd)
                except OSError as e:
                    if e.errno == errno.EINVAL:
                        raise ValueError(
                            f"tenant {tenant}: a {sizes[kind]}-entry {kind} table does not fit the pinned "
                            f"outer map (table size changed? remove {self.pin_dir} and restart)"
                        ) from None
                    raise
            created = True
        if tenant and fresh:
            self.slots.set(tenant, slot)
        return created

    def remove_tenant(self, tenant: int) -> bool:
        """Drop the tenant's tables (the kernel frees them once no program holds them)."""
        if tenant == 0:
            raise ValueError("tenant 0 holds the default tables: flush them instead")
        slot = self.slots.get(tenant)
        if slot is None:
            return False
        self.slots.delete(tenant)  # unpublish first: packets of the tenant then find no table
        for kind in KINDS:
            self.outer[kind].delete(slot)
        return True

    def conns(self, tenant: int | None = None) -> Iterator[Conn]:
        for t, kind, m in self.each(tenant):
            for k, e in m.items():
                yield Conn(t, kind, k, e)

    def select(
        self,
        tenant: int | None = None,
        proto: str | None = None,
        ips: set[bytes] = frozenset(),
        port: int | None = None,
        state: str | None = None,
        limit: int | None = None,
    ) -> list[Conn]:
        """Entries matching every filter given (protocol name, either address, either port, state)."""
        if proto is not None and proto not in PROTO_NUMBERS:
            raise ValueError(f"proto {proto!r}: one of {', '.join(sorted(PROTO_NUMBERS))}")
        out = []
        for c in self.conns(tenant):
            if proto and c.key.proto != PROTO_NUMBERS[proto]:
                continue
            if (ips and not c.matches(ips)) or (port is not None and port not in (c.key.sport, c.key.dport)):
                continue
            if state and c.state() != state:
                continue
            out.append(c)
            if limit and len(out) >= limit:
                break
        return out


def set_settings(pin_dir: Path, settings: CtSettings) -> None:
    """Write the datapath settings; ``iface_tenants`` always says how many interfaces have a tenant."""
    with Map.open_pinned(pin_dir / "ct_ifaces", ct.c_uint32, CtIface) as ifaces:
        settings.iface_tenants = ifaces.count()
    with Map.open_pinned(pin_dir / "ct_settings", ct.c_uint32, CtSettings) as m:
        m.set(0, settings)


def set_ifaces(pin_dir: Path, tenants: dict[int, tuple[int, bool]]) -> None:
    """Make ct_ifaces exactly ``{ifindex: (tenant, from_vni)}``: new ones first, then stale ones go,
    so an interface kept across a reload never falls back to tenant 0 meanwhile."""
    with Map.open_pinned(pin_dir / "ct_ifaces", ct.c_uint32, CtIface) as m:
        for ifindex, (tenant, from_vni) in tenants.items():
            m.set(ifindex, CtIface(tenant, int(from_vni)))
        m.delete_batch([k for k in m.keys() if k not in tenants])  # noqa: SIM118 (a Map, not a dict)
    with Map.open_pinned(pin_dir / "ct_settings", ct.c_uint32, CtSettings) as m:
        current = m.get(0)
        current.iface_tenants = len(tenants)
        m.set(0, current)


def read_stats(pin_dir: Path) -> dict[str, int]:
    with Map.open_pinned(pin_dir / "ct_stats", ct.c_uint32, ct.c_uint64) as m:
        return {STATS[i]: sum(per_cpu) for i, per_cpu in m.items() if i < len(STATS)}
