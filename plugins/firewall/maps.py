"""The firewall's maps as Python sees them: layouts (mirroring firewall.bpf.c), named settings and
counters, and the two-generation policy swap.

Everything here works on a running agent's maps (``ctx.table``) and on the pins alone (the CLI
with the agent down), through :class:`FirewallMaps`.
"""

from __future__ import annotations

import ctypes as ct
import ipaddress
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from sluice.bpf.maps import Map
from sluice.trace import Flow  # struct sluice_flow

from .policy import DNS_SLOTS, RULE_SLOTS, Compiled, Slot

# ---- layouts ---------------------------------------------------------------------------------


class AddrKey(ct.Structure):
    _fields_ = [("prefixlen", ct.c_uint32), ("addr", ct.c_uint8 * 16)]


class DstKey(ct.Structure):
    _fields_ = [("prefixlen", ct.c_uint32), ("net_id", ct.c_uint32), ("addr", ct.c_uint8 * 16)]


class DnsKey(ct.Structure):
    _fields_ = [("net_id", ct.c_uint32), ("addr", ct.c_uint8 * 16)]


class CSlot(ct.Structure):
    _fields_ = [
        ("order", ct.c_uint32),
        ("port_lo", ct.c_uint16),
        ("port_hi", ct.c_uint16),
        ("proto", ct.c_uint8),
        ("action", ct.c_uint8),
        ("pad", ct.c_uint8 * 2),
    ]


class Rules(ct.Structure):
    _fields_ = [("count", ct.c_uint32), ("slots", CSlot * RULE_SLOTS)]


class DnsAllow(ct.Structure):
    _fields_ = [
        ("expires_ns", ct.c_uint64),
        ("count", ct.c_uint32),
        ("pad", ct.c_uint32),
        ("slots", CSlot * DNS_SLOTS),
    ]


class NetCfg(ct.Structure):
    _fields_ = [("default_action", ct.c_uint8), ("pad", ct.c_uint8 * 3), ("flags", ct.c_uint32)]


class SessionKey(ct.Structure):
    _fields_ = [
        ("saddr", ct.c_uint8 * 16),
        ("daddr", ct.c_uint8 * 16),
        ("sport", ct.c_uint16),
        ("dport", ct.c_uint16),
        ("proto", ct.c_uint8),
        ("pad", ct.c_uint8 * 3),
    ]


class FragKey(ct.Structure):
    """fw_frags: a datagram whose first fragment passed (its later fragments follow it)."""

    _fields_ = [
        ("saddr", ct.c_uint8 * 16),
        ("daddr", ct.c_uint8 * 16),
        ("id", ct.c_uint32),
        ("proto", ct.c_uint8),
        ("pad", ct.c_uint8 * 3),
    ]


class SessionValue(ct.Structure):
    _fields_ = [
        ("first_seen_ns", ct.c_uint64),
        ("last_seen_ns", ct.c_uint64),
        ("packets", ct.c_uint64 * 2),
        ("bytes", ct.c_uint64 * 2),
        ("net_id", ct.c_uint32),
        ("rule_order", ct.c_uint32),
        ("tcp_state", ct.c_uint8),
        ("tcp_flags", ct.c_uint8 * 2),
        ("flags", ct.c_uint8),
        ("reason", ct.c_uint8),
        ("pad", ct.c_uint8),
        ("nat_port", ct.c_uint16),
    ]


class NatKey(ct.Structure):  # struct fw_nat_key: a reply as it arrives at the SNAT address
    _fields_ = [
        ("peer", ct.c_uint8 * 16),
        ("peer_port", ct.c_uint16),
        ("nat_port", ct.c_uint16),
        ("proto", ct.c_uint8),
        ("pad", ct.c_uint8 * 3),
    ]


class IlbCfg(ct.Structure):
    _fields_ = [("addr", ct.c_uint8 * 4), ("port_lo", ct.c_uint16), ("port_hi", ct.c_uint16)]


def nat_key(key: SessionKey, nat_port: int) -> NatKey:
    return NatKey(peer=key.daddr, peer_port=key.dport, nat_port=nat_port, proto=key.proto)


class Tunnel(ct.Structure):  # struct fw_tunnel: GENEVE metadata of a flow
    _fields_ = [
        ("type", ct.c_uint8),
        ("pad", ct.c_uint8 * 3),
        ("vni", ct.c_uint32),
        ("cookie", ct.c_uint8 * 8),
        ("outer_src", ct.c_uint8 * 16),
        ("outer_dst", ct.c_uint8 * 16),
        ("outer_src_mac", ct.c_uint8 * 6),
        ("outer_dst_mac", ct.c_uint8 * 6),
        ("outer_sport", ct.c_uint16),
        ("outer_dport", ct.c_uint16),
        ("ifindex", ct.c_uint32),
        ("last_seen_ns", ct.c_uint64),
    ]


def tunnel_dict(t: Tunnel) -> dict:
    return {
        "tunnel": "geneve" if t.type == 1 else str(t.type),
        "vni": t.vni,
        "flow_cookie": bytes(t.cookie).hex(),
        "outer_src": addr_text(t.outer_src),
        "outer_dst": addr_text(t.outer_dst),
        "outer_src_mac": bytes(t.outer_src_mac).hex(":"),
        "outer_dst_mac": bytes(t.outer_dst_mac).hex(":"),
        "outer_sport": t.outer_sport,
        "outer_dport": t.outer_dport,
        "ingress_ifindex": t.ifindex,
    }


class AuditEvent(ct.Structure):
    _fields_ = [
        ("ts_ns", ct.c_uint64),
        ("flow", Flow),
        ("ifindex", ct.c_uint32),
        ("net_id", ct.c_uint32),
        ("rule_order", ct.c_uint32),
        ("action", ct.c_uint8),
        ("reason", ct.c_uint8),
        ("audit_mode", ct.c_uint8),
        ("direction", ct.c_uint8),
    ]


assert ct.sizeof(SessionKey) == 40 and ct.sizeof(SessionValue) == 64 and ct.sizeof(AuditEvent) == 64
assert ct.sizeof(Tunnel) == 80

# ---- names -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    index: int
    default: int
    help: str


SETTINGS: dict[str, Setting] = {
    "audit-mode": Setting(0, 0, "1: pass everything, report what would have been blocked"),
    "monitor": Setting(1, 0, "1: an audit event for every policy decision, allows included"),
    "drop-unsolicited": Setting(2, 1, "1: drop packets toward clients that belong to no session"),
    "drop-malformed": Setting(3, 1, "1: drop packets whose headers do not parse (fail closed)"),
    "require-syn": Setting(4, 1, "1: a TCP session starts only with a SYN"),
    "drop-unmatched-sources": Setting(5, 0, "1: drop packets from sources in no network"),
    "tcp-established-timeout": Setting(6, 300, "seconds an idle established TCP session lives"),
    "tcp-syn-timeout": Setting(7, 3, "seconds a TCP session waits for the SYN-ACK"),
    "tcp-closing-timeout": Setting(8, 10, "seconds a TCP session lives after FIN or RST"),
    "udp-timeout": Setting(9, 60, "seconds an idle UDP session lives"),
    "icmp-timeout": Setting(10, 30, "seconds an idle ICMP session lives"),
    "other-timeout": Setting(11, 60, "seconds an idle session of other protocols lives"),
    "audit-rate": Setting(12, 1000, "audit events per second per CPU at most (the rest are counted)"),
    "ilb-snat": Setting(
        13, 1, "ILB mode: 1 SNATs new allowed IPv4 TCP/UDP flows leaving the egress interface"
    ),
}
SETTINGS_INITIALISED = 31  # fw_settings slot set to 1 once defaults were written

COUNTERS = [
    "allowed_new",
    "allowed_established",
    "replies",
    "blocked_policy",
    "blocked_unsolicited",
    "blocked_malformed",
    "blocked_no_syn",
    "audit_would_block",
    "bypass",
    "session_full",
    "audit_events",
    "audit_lost",
    "audit_rate_limited",
    "blocked_unmatched",
    "redirected",  # GENEVE mode: returned to the load balancer
    "nat_exhausted",  # ILB mode: no free SNAT port for a new flow
    "fragment_followed",  # a non-first fragment passed because its first fragment did
    "blocked_fragment",  # a non-first fragment whose first fragment never passed
]
REASONS = {
    1: "rule",
    2: "dns",
    3: "default",
    4: "unsolicited",
    5: "malformed",
    6: "no-syn",
    7: "session-full",
    8: "unmatched-source",
    9: "orphan-fragment",
}
TCP_STATES = {0: "-", 1: "syn-sent", 2: "established", 3: "closing", 4: "closed"}
PROTO_NAMES = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmp6"}

POLICY_MAPS = ("fw_src", "fw_bypass", "fw_dst", "fw_dns", "fw_nets")
MAP_TYPES: dict[str, tuple[type, type]] = {
    "fw_active": (ct.c_uint32, ct.c_uint32),
    "fw_settings": (ct.c_uint32, ct.c_uint32),
    "fw_counters": (ct.c_uint32, ct.c_uint64),
    "fw_sessions": (SessionKey, SessionValue),
    "fw_geneve_flows": (SessionKey, Tunnel),
    "fw_nat": (NatKey, SessionKey),
    "fw_frags": (FragKey, ct.c_uint64),
    "fw_ilb": (ct.c_uint32, IlbCfg),
    "fw_src": (AddrKey, ct.c_uint32),
    "fw_bypass": (AddrKey, ct.c_uint32),
    "fw_dst": (DstKey, Rules),
    "fw_dns": (DnsKey, DnsAllow),
    "fw_nets": (ct.c_uint32, NetCfg),
}


def addr_text(raw) -> str:
    a = ipaddress.IPv6Address(bytes(raw))
    return str(a.ipv4_mapped or a)


def now_ns() -> int:
    """CLOCK_MONOTONIC, the clock of bpf_ktime_get_ns()."""
    return time.monotonic_ns()


def _cslots(slots: list[Slot], n: int):
    arr = (CSlot * n)()
    for i, s in enumerate(slots[:n]):
        arr[i] = CSlot(s.order, s.port_lo, s.port_hi, s.proto, s.action)
    return arr


def dns_value(expires_ns: int, slots: list[Slot]) -> DnsAllow:
    return DnsAllow(expires_ns=expires_ns, count=min(len(slots), DNS_SLOTS), slots=_cslots(slots, DNS_SLOTS))


# ---- the maps --------------------------------------------------------------------------------


class FirewallMaps:
    """Typed access to every firewall map, opened through ``opener(map_name) -> Map``."""

    def __init__(self, opener: Callable[[str], Map], pin_dir: Path | None = None):
        self.pin_dir = pin_dir
        self._maps: dict[str, Map] = {}
        self._opener = opener
        self.lock = threading.RLock()  # policy writes (apply, DNS learning) never interleave

    @classmethod
    def from_pins(cls, pin_dir: Path) -> FirewallMaps:
        def opener(name: str) -> Map:
            base = name.rstrip("01").rstrip("_")
            key, value = MAP_TYPES[base]
            path = pin_dir / name
            if not path.exists():
                raise FileNotFoundError(f"{path} not found: is the firewall plugin loaded?")
            return Map.open_pinned(path, key_type=key, value_type=value)

        return cls(opener, pin_dir)

    def map(self, name: str) -> Map:
        if name not in self._maps:
            self._maps[name] = self._opener(name)
        return self._maps[name]

    def close(self) -> None:
        for m in self._maps.values():
            m.close()
        self._maps.clear()

    def __enter__(self) -> FirewallMaps:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- generations ----

    def active(self) -> int:
        return 1 if self.map("fw_active").get(0, 0) else 0

    def gen_map(self, base: str, gen: int) -> Map:
        return self.map(f"{base}_{gen}")

    def apply(self, compiled: Compiled, dns: dict[tuple[int, bytes], tuple[int, list[Slot]]]) -> int:
        """Write a whole policy into the inactive generation, then switch to it. Returns it.

        The generation left behind is cleared at the next apply, not now: a packet that read the
        old generation number a moment ago may still be looking things up in it.
        """
        with self.lock:
            gen = 1 - self.active()
            for base in POLICY_MAPS:
                self.gen_map(base, gen).clear()
            self.gen_map("fw_src", gen).update_batch(
                (AddrKey(plen, (ct.c_uint8 * 16)(*addr)), net_id)
                for (plen, addr), net_id in compiled.sources.items()
            )
            self.gen_map("fw_bypass", gen).update_batch(
                (AddrKey(plen, (ct.c_uint8 * 16)(*addr)), 1) for plen, addr in compiled.bypass
            )
            self.gen_map("fw_nets", gen).update_batch(
                (net_id, NetCfg(default_action=action)) for net_id, action in compiled.nets.items()
            )
            self.gen_map("fw_dst", gen).update_batch(
                (
                    DstKey(plen + 32, net_id, (ct.c_uint8 * 16)(*addr)),
                    Rules(count=len(slots), slots=_cslots(slots, RULE_SLOTS)),
                )
                for (net_id, plen, addr), slots in compiled.dst.items()
            )
            self.gen_map("fw_dns", gen).update_batch(
                (DnsKey(net_id, (ct.c_uint8 * 16)(*addr)), dns_value(exp, slots))
                for (net_id, addr), (exp, slots) in dns.items()
            )
            self.map("fw_active").set(0, gen)
            return gen

    def set_dns(self, net_id: int, addr: bytes, expires_ns: int, slots: list[Slot]) -> None:
        """Write one learned allow into the active generation (or remove it when no slot is left)."""
        with self.lock:
            m = self.gen_map("fw_dns", self.active())
            key = DnsKey(net_id, (ct.c_uint8 * 16)(*addr))
            if slots:
                m.set(key, dns_value(expires_ns, slots))
            else:
                m.delete(key)

    # ---- settings and counters ----

    def init_settings(self, overrides: dict[str, int]) -> None:
        m = self.map("fw_settings")
        if not m.get(SETTINGS_INITIALISED, 0):
            for s in SETTINGS.values():
                m.set(s.index, s.default)
            m.set(SETTINGS_INITIALISED, 1)
        for name, value in overrides.items():
            self.set_setting(name, value)

    def get_setting(self, name: str) -> int:
        return self.map("fw_settings").get(setting(name).index, 0)

    def set_setting(self, name: str, value: int) -> None:
        s = setting(name)
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**32:
            raise ValueError(f"setting {name}: value {value!r} is not an integer 0..4294967295")
        self.map("fw_settings").set(s.index, value)

    def settings(self) -> dict[str, int]:
        values = self.map("fw_settings")
        return {name: values.get(s.index, 0) for name, s in SETTINGS.items()}

    def counters(self) -> dict[str, int]:
        per_cpu = dict(self.map("fw_counters").items())
        return {name: sum(per_cpu.get(i, [0])) for i, name in enumerate(COUNTERS)}

    # ---- sessions ----

    def sessions(self) -> Iterator[tuple[SessionKey, SessionValue]]:
        return self.map("fw_sessions").items()

    def session_rows(self) -> list[dict]:
        """Every session as a dict (session_dict), with its GENEVE metadata when it has some."""
        tunnels = {bytes(k): t for k, t in self.map("fw_geneve_flows").items()}
        rows = []
        for k, v in self.sessions():
            row = session_dict(k, v)
            if (t := tunnels.get(bytes(k))) is not None:
                row.update(tunnel_dict(t))
            rows.append(row)
        return rows


def setting(name: str) -> Setting:
    try:
        return SETTINGS[name]
    except KeyError:
        raise KeyError(f"unknown setting {name!r} (settings: {', '.join(SETTINGS)})") from None


def session_dict(key: SessionKey, value: SessionValue, now: int | None = None) -> dict:
    """A session for people and JSON: addresses, ports, state, per-direction counters, ages."""
    now = now_ns() if now is None else now
    return {
        "src": addr_text(key.saddr),
        "dst": addr_text(key.daddr),
        "sport": key.sport,
        "dport": key.dport,
        "proto": PROTO_NAMES.get(key.proto, str(key.proto)),
        "state": TCP_STATES.get(value.tcp_state, str(value.tcp_state)) if key.proto == 6 else "-",
        "packets_out": value.packets[0],
        "packets_in": value.packets[1],
        "bytes_out": value.bytes[0],
        "bytes_in": value.bytes[1],
        "age_s": round(max(0, now - value.first_seen_ns) / 1e9, 1),
        "idle_s": round(max(0, now - value.last_seen_ns) / 1e9, 1),
        "net_id": value.net_id,
        "rule": value.rule_order,
        "reason": REASONS.get(value.reason, str(value.reason)),
        "audit": bool(value.flags & 1),
        "nat_port": value.nat_port,
    }
