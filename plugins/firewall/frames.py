"""Crafted Ethernet frames for BPF_PROG_TEST_RUN: the firewall's tests and benchmarks share them."""

from __future__ import annotations

import ipaddress
import struct

ETH_SRC, ETH_DST = bytes.fromhex("020000000001"), bytes.fromhex("020000000002")
TCP_FLAGS = {"F": 0x01, "S": 0x02, "R": 0x04, "P": 0x08, "A": 0x10}


def eth(ethertype: int, vlans: tuple[int, ...] = ()) -> bytes:
    tags = b"".join(struct.pack("!HH", 0x8100, vid) for vid in vlans)
    return ETH_DST + ETH_SRC + tags + struct.pack("!H", ethertype)


def l4(proto: int, sport: int, dport: int, flags: str = "S", payload: bytes = b"") -> bytes:
    if proto == 6:
        bits = sum(TCP_FLAGS[c] for c in flags)
        return struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, bits, 65535, 0, 0) + payload
    if proto == 17:
        return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    if proto in (1, 58):  # echo: sport is the type, dport the identifier
        return struct.pack("!BBHHH", sport, 0, 0, dport, 1) + payload
    return payload


def packet(
    src: str,
    dst: str,
    proto: int = 6,
    sport: int = 40000,
    dport: int = 80,
    flags: str = "S",
    payload: bytes = b"",
    vlans: tuple[int, ...] = (),
    ttl: int = 64,
) -> bytes:
    """One frame from ``src`` to ``dst`` (IPv4 or IPv6 by the addresses); ``ttl``: TTL or hop limit."""
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    body = l4(proto, sport, dport, flags, payload)
    if s.version == 4:
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(body), 1, 0, ttl, proto, 0, s.packed, d.packed)
        return eth(0x0800, vlans) + ip + body
    ip6 = struct.pack("!IHBB16s16s", 6 << 28, len(body), proto, ttl, s.packed, d.packed)
    return eth(0x86DD, vlans) + ip6 + body


def echo(src: str, dst: str, ident: int = 7, reply: bool = False) -> bytes:
    v6 = ":" in src
    kind = (129 if reply else 128) if v6 else (0 if reply else 8)
    return packet(src, dst, 58 if v6 else 1, kind, ident)


# ---- GENEVE (Gateway Load Balancer style: inner IP packet, no inner Ethernet) ----

LB_MAC, APPLIANCE_MAC = bytes.fromhex("02aa00000001"), bytes.fromhex("02bb00000002")
LB_IP, APPLIANCE_IP = "10.50.0.1", "10.50.0.2"
AWS_OPTIONS = b"".join(
    struct.pack("!HBB", 0x0108, kind, 2) + bytes([kind] * 8) for kind in (1, 2, 3)
)  # three 8-byte options of class 0x0108, like AWS GWLB's (endpoint id, flow cookie, ...)


def geneve_header(
    vni: int, options: bytes = AWS_OPTIONS, ptype: int = 0x0800, optlen: int | None = None
) -> bytes:
    words = len(options) // 4 if optlen is None else optlen
    return struct.pack("!BBHI", words & 0x3F, 0, ptype, vni << 8) + options


def geneve(
    inner: bytes,
    vni: int = 0x123456,
    options: bytes = AWS_OPTIONS,
    sport: int = 55555,
    optlen: int | None = None,
    lb: tuple[bytes, str] = (LB_MAC, LB_IP),
    appliance: tuple[bytes, str] = (APPLIANCE_MAC, APPLIANCE_IP),
) -> bytes:
    """An Ethernet/IPv4/UDP(6081)/GENEVE frame from the load balancer ``lb`` (MAC, IPv4) to the
    ``appliance`` carrying ``inner`` (an IP packet without Ethernet: frames.packet(...)[14:])."""
    ptype = 0x86DD if inner[0] >> 4 == 6 else 0x0800
    payload = geneve_header(vni, options, ptype, optlen) + inner
    udp = struct.pack("!HHHH", sport, 6081, 8 + len(payload), 0)
    s, d = ipaddress.ip_address(lb[1]).packed, ipaddress.ip_address(appliance[1]).packed
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp) + len(payload), 1, 0, 64, 17, 0, s, d)
    ip = ip[:10] + struct.pack("!H", _checksum(ip)) + ip[12:]
    return appliance[0] + lb[0] + b"\x08\x00" + ip + udp + payload


def _checksum(data: bytes) -> int:
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    return ~(total + (total >> 16)) & 0xFFFF


def geneve_returned(frame: bytes) -> bytes:
    """What the appliance must send back: MACs and outer IPv4 addresses swapped, nothing else."""
    eth = frame[6:12] + frame[0:6] + frame[12:14]
    ip = frame[14:26] + frame[30:34] + frame[26:30]
    return eth + ip + frame[34:]


def icmp_error(src: str, dst: str, quoted: bytes) -> bytes:
    """An ICMP error from ``src`` to ``dst`` quoting ``quoted`` (a frame: its IP packet is quoted).
    IPv4: destination unreachable / port unreachable; IPv6: packet too big."""
    inner = quoted[14:]
    if ":" in src:
        body = struct.pack("!BBHI", 2, 0, 0, 1280) + inner[:48]
        return packet(src, dst, 58, 0, 0)[:14] + _ip6(src, dst, 58, body)
    body = struct.pack("!BBHI", 3, 3, 0, 0) + inner[:28]
    return _ip4_frame(src, dst, 1, body)


def _ip6(src: str, dst: str, proto: int, body: bytes) -> bytes:
    s, d = ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed
    return struct.pack("!IHBB16s16s", 6 << 28, len(body), proto, 64, s, d) + body


def _ip4_frame(src: str, dst: str, proto: int, body: bytes) -> bytes:
    s, d = ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(body), 1, 0, 64, proto, 0, s, d)
    return eth(0x0800) + ip + body
