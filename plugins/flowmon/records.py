"""Flow records: the BPF map layouts (flowmon.bpf.c) decoded into :class:`Flow`.

Layouts are ``struct`` formats rather than ctypes structures: eviction decodes every entry of the
map, and one ``Struct.unpack_from`` per entry is several times cheaper than a ctypes copy.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
import time

# struct flowmon_key / flowmon_flow / flowmon_drop_key / flowmon_drop (flowmon.bpf.c); sizes
# checked against the map.
KEY = struct.Struct("<16s16sHHB3x")
FLOW = struct.Struct("<6QI4IIHHHB4BBB6s6s48s7x")
DROP_KEY = struct.Struct("<16s16sHHB3xI")  # the flow key and the drop reason
DROP = struct.Struct("<QQQH6x")
MAX_SEEN = 4
QNAME_LEN = 48

PROTOCOLS = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmp6", 132: "sctp", 47: "gre"}
PROTOCOL_NUMBERS = {v: k for k, v in PROTOCOLS.items()}
DIRECTIONS = ("ingress", "egress")
TCP_FLAG_NAMES = (
    (0x01, "FIN"), (0x02, "SYN"), (0x04, "RST"), (0x08, "PSH"), (0x10, "ACK"), (0x20, "URG"),
    (0x40, "ECE"), (0x80, "CWR"), (0x100, "SYN-ACK"), (0x200, "FIN-ACK"), (0x400, "RST-ACK"),
)  # fmt: skip
DNS_RCODES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED"}
V4_PREFIX = bytes(10) + b"\xff\xff"


def addr_of(raw: bytes) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """A 16-byte address as the datapath stores it (IPv4 v4-mapped) as a Python address."""
    if raw[:12] == V4_PREFIX:
        return ipaddress.IPv4Address(raw[12:])
    return ipaddress.IPv6Address(raw)


def addr_bytes(addr: str | ipaddress.IPv4Address | ipaddress.IPv6Address) -> bytes:
    a = ipaddress.ip_address(addr) if isinstance(addr, str) else addr
    return V4_PREFIX + a.packed if a.version == 4 else a.packed


def mac_str(raw: bytes) -> str:
    return raw.hex(":")


def flag_names(flags: int) -> list[str]:
    return [name for bit, name in TCP_FLAG_NAMES if flags & bit]


def qname_of(wire: bytes) -> str:
    """Decode a (possibly truncated) DNS name in wire format; a truncated tail is dropped."""
    labels, i = [], 0
    while i < len(wire):
        n = wire[i]
        if n == 0 or n & 0xC0 or i + 1 + n > len(wire):
            break
        labels.append(wire[i + 1 : i + 1 + n].decode("ascii", "replace"))
        i += 1 + n
    return ".".join(labels)


def mono_to_wall_offset_ns() -> int:
    """Add to a CLOCK_MONOTONIC time (bpf_ktime_get_ns) to get Unix time in ns."""
    return time.time_ns() - time.monotonic_ns()


# Indexes into FLOW's unpacked tuple.
(V_FIRST, V_LAST, V_PACKETS, V_BYTES, V_RTT, V_DNS_LATENCY, V_IF_FIRST, V_SEEN_IF, V_SAMPLING, V_FLAGS,
 V_DNS_ID, V_DNS_FLAGS, V_DIR_FIRST, V_SEEN_DIR, V_N_SEEN, V_DSCP, V_SRC_MAC, V_DST_MAC, V_QNAME) = (
    0, 1, 2, 3, 4, 5, 6, 7, 11, 12, 13, 14, 15, 16, 20, 21, 22, 23, 24)  # fmt: skip
EMPTY = FLOW.unpack(bytes(FLOW.size))


def _text(raw: bytes) -> str:
    return (
        socket.inet_ntop(socket.AF_INET, raw[12:])
        if raw[:12] == V4_PREFIX
        else socket.inet_ntop(socket.AF_INET6, raw)
    )


def _wire_name(name: str) -> bytes:
    out = b"".join(bytes([len(label)]) + label.encode() for label in name.split(".") if label) + b"\0"
    return out[:QNAME_LEN]


class Flow:
    """One evicted flow: what the datapath aggregated since the flow's previous eviction.

    It keeps the unpacked map key and value and decodes fields on access: eviction of a
    large map then costs one unpack per flow, and the IPFIX encoder reads the raw fields directly.
    Times are wall clock (Unix ns): ``offset`` converts the datapath's CLOCK_MONOTONIC.
    """

    __slots__ = (
        "k",
        "v",
        "offset",
        "drop_packets",
        "drop_bytes",
        "drop_reason",
        "drop_tcp_flags",
        "nat",
    )

    def __init__(self, k: tuple, v: tuple = EMPTY, offset: int = 0):
        """``k`` and ``v``: KEY's and FLOW's unpacked tuples (a drop-only flow has no value)."""
        self.k, self.v, self.offset = k, v, offset
        self.drop_packets = self.drop_bytes = self.drop_tcp_flags = 0
        self.drop_reason = ""
        self.nat: dict | None = None

    @classmethod
    def make(cls, src: str, dst: str, sport: int, dport: int, proto: int, **fields) -> Flow:
        """A flow from field values (tests, tools); unknown field names raise TypeError."""
        v = list(EMPTY)
        setters = {
            "packets": V_PACKETS, "bytes": V_BYTES, "start_ns": V_FIRST, "end_ns": V_LAST, "rtt_ns": V_RTT,
            "dns_latency_ns": V_DNS_LATENCY, "ifindex": V_IF_FIRST, "sampling": V_SAMPLING, "tcp_flags": V_FLAGS,
            "dns_id": V_DNS_ID, "dns_flags": V_DNS_FLAGS, "direction": V_DIR_FIRST, "dscp": V_DSCP,
        }  # fmt: skip
        for name, value in fields.items():
            if name in setters:
                v[setters[name]] = value
            elif name in ("src_mac", "dst_mac"):
                v[V_SRC_MAC if name == "src_mac" else V_DST_MAC] = bytes.fromhex(value.replace(":", ""))
            elif name == "dns_qname":
                v[V_QNAME] = _wire_name(value)
            else:
                raise TypeError(f"Flow.make: unknown field {name!r}")
        return cls((addr_bytes(src), addr_bytes(dst), sport, dport, proto), tuple(v))

    src = property(lambda self: _text(self.k[0]))
    dst = property(lambda self: _text(self.k[1]))
    sport = property(lambda self: self.k[2])  # ICMP: type
    dport = property(lambda self: self.k[3])  # ICMP: code
    proto = property(lambda self: self.k[4])
    family = property(lambda self: 4 if self.k[0][:12] == V4_PREFIX else 6)
    packets = property(lambda self: self.v[V_PACKETS])
    bytes = property(lambda self: self.v[V_BYTES])
    start_ns = property(lambda self: self.v[V_FIRST] + self.offset)
    end_ns = property(lambda self: self.v[V_LAST] + self.offset)
    tcp_flags = property(lambda self: self.v[V_FLAGS])
    dscp = property(lambda self: self.v[V_DSCP])
    src_mac = property(lambda self: mac_str(self.v[V_SRC_MAC]))
    dst_mac = property(lambda self: mac_str(self.v[V_DST_MAC]))
    ifindex = property(lambda self: self.v[V_IF_FIRST])  # interface that first saw (and counts) it
    direction = property(lambda self: self.v[V_DIR_FIRST])  # 0 ingress, 1 egress
    sampling = property(lambda self: self.v[V_SAMPLING] or 1)
    rtt_ns = property(lambda self: self.v[V_RTT])
    # "tc-handshake": SYN to SYN-ACK seen in TC on this host (fentry is not available here)
    rtt_method = property(lambda self: "tc-handshake" if self.v[V_RTT] else "")
    dns_id = property(lambda self: self.v[V_DNS_ID])
    dns_flags = property(lambda self: self.v[V_DNS_FLAGS])
    dns_latency_ns = property(lambda self: self.v[V_DNS_LATENCY])
    dns_qname = property(lambda self: qname_of(self.v[V_QNAME]) if self.v[V_QNAME][0] else "")

    @property
    def seen(self) -> list[tuple[int, int]]:
        """Other (ifindex, direction) pairs the flow crossed: listed there, not counted again."""
        v, n = self.v, min(self.v[V_N_SEEN], MAX_SEEN)
        return [(v[V_SEEN_IF + i], v[V_SEEN_DIR + i]) for i in range(n)]

    @property
    def is_dns(self) -> bool:
        return bool(self.v[V_QNAME][0] or self.dns_id or self.dns_flags)

    @property
    def dns_rcode(self) -> int:
        return self.dns_flags & 0xF

    def __repr__(self) -> str:
        return f"<Flow {self.proto} {self.src}:{self.sport} -> {self.dst}:{self.dport} {self.packets}p {self.bytes}B>"

    FIELDS = (
        "src", "dst", "sport", "dport", "proto", "family", "packets", "bytes", "start_ns", "end_ns",
        "tcp_flags", "dscp", "src_mac", "dst_mac", "ifindex", "sampling", "rtt_ns", "rtt_method", "dns_id",
        "dns_flags", "dns_latency_ns", "dns_qname", "drop_packets", "drop_bytes", "drop_reason",
        "drop_tcp_flags", "nat",
    )  # fmt: skip

    def as_dict(self, ifnames: dict[int, str] | None = None) -> dict:
        d = {name: getattr(self, name) for name in self.FIELDS}
        names = ifnames or {}
        d["proto_name"] = PROTOCOLS.get(self.proto, str(self.proto))
        d["interface"] = names.get(self.ifindex, str(self.ifindex))
        d["direction"] = DIRECTIONS[self.direction & 1]
        d["seen"] = [
            {"interface": names.get(i, str(i)), "direction": DIRECTIONS[dr & 1]} for i, dr in self.seen
        ]
        d["tcp_flags_names"] = flag_names(self.tcp_flags)
        if self.proto in (1, 58):
            d["icmp_type"], d["icmp_code"] = self.sport, self.dport
        if self.is_dns:
            d["dns_rcode"] = DNS_RCODES.get(self.dns_rcode, str(self.dns_rcode))
            d["dns_response"] = bool(self.dns_flags & 0x8000)
        return d


def decode_flow(kb: bytes, vb: bytes, offset_ns: int) -> Flow:
    return Flow(KEY.unpack(kb), FLOW.unpack(vb), offset_ns)


def merge_drop(flow: Flow, reason: int, vb: bytes, offset_ns: int, reasons: dict[int, str]) -> None:
    """Add the drops of one reason (a flowmon_drops value) to ``flow``."""
    packets, nbytes, last_ns, tcp_flags = DROP.unpack(vb)
    flow.drop_packets += packets
    flow.drop_bytes += nbytes
    flow.drop_reason = reasons.get(reason, str(reason))
    flow.drop_tcp_flags = tcp_flags
    if not flow.v[V_FIRST]:  # drop-only: its times are the drop's
        v = list(flow.v)
        v[V_FIRST] = v[V_LAST] = last_ns
        flow.v, flow.offset = tuple(v), offset_ns
