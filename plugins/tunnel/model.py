"""Routes as data: the config/API model, and its byte layout in the LPM trie (tunnel.bpf.c).

One trie serves both families: IPv4 prefixes are stored v4-mapped (``::ffff:a.b.c.d``) with
prefixlen + 96. The value repeats the route's own prefix so a trace shows the matched route,
not the lookup key.
"""

from __future__ import annotations

import ctypes as ct
import enum
import functools
import ipaddress
import struct
from typing import Annotated

import pydantic

MAX_NEXTHOPS = 4
STATS_SLOTS, NO_STATS = 4096, 0xFFFF  # tunnel.bpf.c's TUNNEL_STATS_SLOTS, TUNNEL_NO_STATS
DEFAULT_DEVICES = {"vxlan": "sluice-vxlan", "geneve": "sluice-geneve", "ipip": "sluice-ipip"}
# Bytes the outer headers add: outer IP (20 or 40) + UDP 8 + VXLAN/GENEVE 8 + inner Ethernet 14.
ENCAP_OVERHEAD = {"vxlan": 30, "geneve": 30, "ipip": 0}


def one_line(exc: pydantic.ValidationError) -> str:
    """The first problem of a validation error as ``where: what`` (API and CLI answers)."""
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "value"
    return f"{where}: {first['msg'].removeprefix('Value error, ')}"


class Protocol(enum.IntEnum):
    """Values shared with tunnel.bpf.c (and the anchor's numbering)."""

    GENEVE = 1
    VXLAN = 2
    IPIP = 3
    WIREGUARD = 4
    NONE = 5

    @property
    def label(self) -> str:
        return self.name.lower()

    @property
    def collect_md(self) -> bool:
        """Encapsulated by a shared external-mode device from the per-packet tunnel key."""
        return self in (Protocol.GENEVE, Protocol.VXLAN, Protocol.IPIP)

    @classmethod
    def parse(cls, value: object) -> Protocol:
        if isinstance(value, Protocol):
            return value
        if isinstance(value, str):
            try:
                return cls[value.strip().upper()]
            except KeyError:
                pass
        names = ", ".join(p.label for p in cls)
        raise ValueError(f"unknown protocol {value!r} (one of {names})")


IPAddr = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNet = ipaddress.IPv4Network | ipaddress.IPv6Network


def _address(value: object) -> IPAddr:
    try:
        return ipaddress.ip_address(str(value))
    except ValueError:
        raise ValueError(f"{value!r} is not an IP address") from None


def _network(value: object) -> IPNet:
    try:
        return ipaddress.ip_network(str(value), strict=True)
    except ValueError as exc:
        raise ValueError(f"{value!r} is not a CIDR with its host bits clear ({exc})") from None


Address = Annotated[IPAddr, pydantic.BeforeValidator(_address), pydantic.PlainSerializer(str)]
Network = Annotated[IPNet, pydantic.BeforeValidator(_network), pydantic.PlainSerializer(str)]
ProtocolField = Annotated[
    Protocol, pydantic.BeforeValidator(Protocol.parse), pydantic.PlainSerializer(lambda p: p.label)
]


class Nexthop(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

    peer: str = pydantic.Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")
    underlay: Address
    vni: int = pydantic.Field(0, ge=0, le=0xFFFFFF)
    protocol: ProtocolField = Protocol.VXLAN
    device: str = pydantic.Field(
        "", max_length=15, description="default: the plugin's device for the protocol"
    )

    @pydantic.model_validator(mode="after")
    def _device_needed(self) -> Nexthop:
        if not self.protocol.collect_md and not self.device:
            raise ValueError(f"protocol {self.protocol.label} redirects to a device: set 'device'")
        return self

    @property
    def device_name(self) -> str:
        return self.device or DEFAULT_DEVICES[self.protocol.label]

    def describe(self) -> str:
        vni = f" vni {self.vni}" if self.protocol.collect_md else ""
        return f"via {self.underlay} peer {self.peer} {self.protocol.label}{vni} dev {self.device_name}"


class Route(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

    dst: Network
    nexthops: tuple[Nexthop, ...] = pydantic.Field(min_length=1, max_length=MAX_NEXTHOPS)

    @pydantic.field_validator("nexthops")
    @classmethod
    def _distinct(cls, nexthops: tuple[Nexthop, ...]) -> tuple[Nexthop, ...]:
        seen = set()
        for nh in nexthops:
            ident = (nh.underlay, nh.vni, nh.protocol)
            if ident in seen:
                raise ValueError(f"nexthop {nh.underlay} vni {nh.vni} {nh.protocol.label} is listed twice")
            seen.add(ident)
        return nexthops

    @functools.cached_property
    def key(self) -> bytes:
        """The trie key (computed once per route object: reconciles re-render every route)."""
        return key_bytes(self.dst)

    @functools.cached_property
    def value_head(self) -> tuple[bytes, int]:
        """The value's prefix and prefixlen fields."""
        return mapped(self.dst.network_address), self.dst.prefixlen + (96 if self.dst.version == 4 else 0)


# ---- the kernel layout ------------------------------------------------------------------------


class LpmKey(ct.Structure):
    _fields_ = [("prefixlen", ct.c_uint32), ("addr", ct.c_uint8 * 16)]


class NexthopValue(ct.Structure):
    _fields_ = [
        ("remote", ct.c_uint8 * 16),  # v4-mapped for an IPv4 underlay
        ("vni", ct.c_uint32),
        ("ifindex", ct.c_uint32),
        ("healthy", ct.c_uint8),
        ("protocol", ct.c_uint8),
        ("stats", ct.c_uint16),  # slot in the per-CPU stats array
    ]


class RouteValue(ct.Structure):
    _fields_ = [
        ("prefix", ct.c_uint8 * 16),
        ("prefixlen", ct.c_uint32),  # in the trie's terms (v4: + 96)
        ("count", ct.c_uint32),
        ("nh", NexthopValue * MAX_NEXTHOPS),
    ]


class NexthopStats(ct.Structure):
    _fields_ = [("packets", ct.c_uint64), ("bytes", ct.c_uint64)]


# Indexes of the per-CPU counters array (enum tunnel_counter in tunnel.bpf.c).
COUNTERS = ("miss", "no_healthy", "redirect_error", "set_key_error", "malformed", "encapsulated", "not_ip")


V4_MAPPED = bytes(10) + b"\xff\xff"


def mapped(addr: IPAddr) -> bytes:
    """16 bytes: the address itself (v6) or v4-mapped (v4)."""
    return V4_MAPPED + addr.packed if addr.version == 4 else addr.packed


def unmapped(raw: bytes) -> IPAddr:
    a = ipaddress.IPv6Address(bytes(raw))
    return a.ipv4_mapped or a


def trie_key(net: IPNet) -> LpmKey:
    key = LpmKey(prefixlen=net.prefixlen + (96 if net.version == 4 else 0))
    key.addr[:] = list(mapped(net.network_address))
    return key


def network_of(prefix: bytes, prefixlen: int) -> IPNet:
    """The route a trie key or value stands for."""
    a = ipaddress.IPv6Address(bytes(prefix))
    if a.ipv4_mapped is not None and prefixlen >= 96:
        return ipaddress.IPv4Network(f"{a.ipv4_mapped}/{prefixlen - 96}")
    return ipaddress.IPv6Network(f"{a}/{prefixlen}")


def lookup_key(addr: IPAddr) -> LpmKey:
    """The key a packet to ``addr`` looks up (a full-length prefix)."""
    key = LpmKey(prefixlen=128)
    key.addr[:] = list(mapped(addr))
    return key


def tunnel_mac(underlay: IPAddr) -> str:
    """02:<last 4 bytes of the underlay address>:ff: the inner destination MAC a receiver owns."""
    return ":".join(f"{b:02x}" for b in (2, *underlay.packed[-4:], 0xFF))


# The same layouts as struct.Struct, for rendering many routes fast (ctypes is ~10x slower).
_HEAD = struct.Struct("<16sII")  # prefix, prefixlen, count
_SLOT = struct.Struct("<16sIIBBH")  # remote, vni, ifindex, healthy, protocol, stats slot
_KEY = struct.Struct("<I16s")
_PADDING = [bytes(_SLOT.size * (MAX_NEXTHOPS - n)) for n in range(MAX_NEXTHOPS + 1)]
assert _HEAD.size + MAX_NEXTHOPS * _SLOT.size == ct.sizeof(RouteValue) and _KEY.size == ct.sizeof(LpmKey)


def key_bytes(net: IPNet) -> bytes:
    """``bytes(trie_key(net))``, fast."""
    return _KEY.pack(net.prefixlen + (96 if net.version == 4 else 0), mapped(net.network_address))


def slot_bytes(nh: Nexthop, ifindex: int, healthy: bool, stats: int = NO_STATS) -> bytes:
    return _SLOT.pack(mapped(nh.underlay), nh.vni, ifindex, int(healthy), int(nh.protocol), stats)


def value_bytes(route: Route, slots: list[bytes]) -> bytes:
    """The trie value of ``route`` with its usable nexthops' :func:`slot_bytes`."""
    prefix, prefixlen = route.value_head
    return _HEAD.pack(prefix, prefixlen, len(slots)) + b"".join(slots) + _PADDING[len(slots)]


def decode_value(raw: RouteValue) -> dict:
    """A trie value as plain data (for `routes`, `lookup` and traces)."""
    return {
        "dst": str(network_of(bytes(raw.prefix), raw.prefixlen)),
        "nexthops": [
            {
                "underlay": str(unmapped(bytes(nh.remote))),
                "vni": nh.vni,
                "ifindex": nh.ifindex,
                "healthy": bool(nh.healthy),
                "protocol": _protocol_label(nh.protocol),
            }
            for nh in raw.nh[: min(raw.count, MAX_NEXTHOPS)]
        ],
    }


def _protocol_label(value: int) -> str:
    try:
        return Protocol(value).label
    except ValueError:
        return str(value)
