"""A hostile corpus: malformed frames and DNS answers, generated deterministically (fixed seed).

Every frame comes from the lab client (src MAC and addresses) toward the gateway's MAC, and every
one it derives from aims at a destination the hostile gateway's policy denies (the "other" server
over TCP/UDP, the server's port 9022) or at the gateway's DNS proxy, so that anything of it that
reaches the server is a leak. ``frames()`` yields (category, frame); ``dns_answers(query)`` the
broken answers a rogue upstream sends back for a query.
"""

from __future__ import annotations

import random
import socket
import struct
from collections.abc import Iterator

from scapy.all import DNS, DNSQR, IP, TCP, UDP, Dot1AD, Dot1Q, Ether, IPv6, Raw

SEED = 0x51CE
CLIENT4, CLIENT6 = "10.99.1.2", "fd00:99:1::2"
OTHER4, OTHER6 = "10.99.2.3", "fd00:99:2::3"
SRV4, SRV6 = "10.99.2.2", "fd00:99:2::2"
GW4 = "10.99.1.1"
CLIENT_MAC, GW_MAC = "02:99:01:00:00:02", "02:99:01:00:00:01"
DENIED_PORT = 9022
ETH = 14


def _eth() -> Ether:
    return Ether(src=CLIENT_MAC, dst=GW_MAC)


def dns_query(name: str = "allowed.test", qid: int = 0x4242, qtype: str = "A") -> bytes:
    return bytes(DNS(id=qid, rd=1, qd=DNSQR(qname=name, qtype=qtype)))


def bases() -> dict[str, bytes]:
    """Well-formed frames (checksums right) that the policy denies, each a seed for mutations."""
    pad = b"hostile!" * 4
    return {
        "v4 tcp other": bytes(_eth() / IP(src=CLIENT4, dst=OTHER4) / TCP(sport=40001, dport=8080) / pad),
        "v4 tcp denied port": bytes(
            _eth() / IP(src=CLIENT4, dst=SRV4) / TCP(sport=40002, dport=DENIED_PORT) / pad
        ),
        "v4 udp other": bytes(_eth() / IP(src=CLIENT4, dst=OTHER4) / UDP(sport=40003, dport=9000) / pad),
        "v6 tcp other": bytes(_eth() / IPv6(src=CLIENT6, dst=OTHER6) / TCP(sport=40004, dport=8080) / pad),
        "v6 tcp denied port": bytes(
            _eth() / IPv6(src=CLIENT6, dst=SRV6) / TCP(sport=40005, dport=DENIED_PORT) / pad
        ),
        "v6 udp other": bytes(_eth() / IPv6(src=CLIENT6, dst=OTHER6) / UDP(sport=40006, dport=9000) / pad),
        "v4 dns query": bytes(_eth() / IP(src=CLIENT4, dst=GW4) / UDP(sport=40007, dport=53) / dns_query()),
    }


def _set(frame: bytes, off: int, fmt: str, *values) -> bytes:
    out = bytearray(frame)
    struct.pack_into(fmt, out, off, *values)
    return bytes(out)


def _v4_checksum(frame: bytes) -> bytes:
    """The IPv4 header checksum recomputed, so the mutation itself is what the receiver judges."""
    ihl = (frame[ETH] & 0xF) * 4
    if ihl < 20 or len(frame) < ETH + ihl:
        return frame
    hdr = bytearray(frame[ETH : ETH + ihl])
    hdr[10:12] = b"\0\0"
    total = sum(struct.unpack(f"!{ihl // 2}H", bytes(hdr)))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return _set(frame, ETH + 10, "!H", ~total & 0xFFFF)


def _truncated(base: dict[str, bytes]) -> Iterator[tuple[str, bytes]]:
    for name, frame in base.items():
        for n in range(len(frame)):
            yield f"truncated {name}", frame[:n]


def _ihl(base: dict[str, bytes]) -> Iterator[tuple[str, bytes]]:
    for name, frame in base.items():
        if not name.startswith("v4"):
            continue
        for ihl in range(16):
            if ihl != 5:
                yield f"ihl {ihl}", _v4_checksum(_set(frame, ETH, "!B", 0x40 | ihl))


def _lengths(base: dict[str, bytes]) -> Iterator[tuple[str, bytes]]:
    for name, frame in base.items():
        l3 = len(frame) - ETH
        claims = {0, 1, 7, 19, 20, 21, 27, 39, 40, 41, l3 - 1, l3 + 1, l3 + 8, 1500, 65535}
        for claim in sorted(c for c in claims if 0 <= c <= 65535):
            if name.startswith("v4"):
                yield "v4 total length", _v4_checksum(_set(frame, ETH + 2, "!H", claim))
            else:
                yield "v6 payload length", _set(frame, ETH + 4, "!H", claim)


def _ext_chains(rng: random.Random) -> Iterator[tuple[str, bytes]]:
    """IPv6 with long chains of hop-by-hop/destination-options/routing headers, whole and cut."""
    tcp = bytes(TCP(sport=40010, dport=8080))
    for length in (1, 2, 3, 5, 8, 9, 12, 16, 17, 24, 32, 33, 48, 64, 100):
        for variant in range(4):
            kinds = [rng.choice((0, 60, 43)) for _ in range(length)]
            if variant == 0:
                kinds = [60] * length  # destination options only
            chain = b""
            for i, kind in enumerate(kinds):
                nh = kinds[i + 1] if i + 1 < length else 6
                if kind == 43:
                    chain += bytes([nh, 0, 0, 0, 0, 0, 0, 0])  # routing type 0, no segments left
                else:
                    chain += bytes([nh, 0, 1, 4, 0, 0, 0, 0])  # PadN
            body = chain + tcp
            hdr = struct.pack(
                "!IHBB16s16s",
                6 << 28,
                len(body),
                kinds[0],
                64,
                socket.inet_pton(socket.AF_INET6, CLIENT6),
                socket.inet_pton(socket.AF_INET6, OTHER6),
            )
            frame = bytes(_eth())[:12] + b"\x86\xdd" + hdr + body
            yield f"v6 chain of {length}", frame
            yield f"v6 chain of {length} cut", frame[: ETH + 40 + len(chain) - 3]
            if variant == 1:  # the chain claims a header length past the frame
                yield (
                    f"v6 chain of {length} overlong",
                    frame[: ETH + 40] + bytes([60, 255]) + frame[ETH + 42 :],
                )


def _vlans(base: dict[str, bytes]) -> Iterator[tuple[str, bytes]]:
    """QinQ and deeper tag stacks in front of each base (the firewall's interface is untagged)."""
    for name, frame in base.items():
        inner = frame[ETH:]
        ethertype = frame[12:14]
        for depth in range(1, 7):
            tpids = [0x88A8] + [0x8100] * (depth - 1) if depth > 1 else [0x8100]
            tags = b"".join(struct.pack("!HH", tpid, 100 + i) for i, tpid in enumerate(tpids))
            yield f"vlan depth {depth} {name}", frame[:12] + tags + ethertype + inner
    for name, pkt in (
        ("qinq v4", _eth() / Dot1AD(vlan=10) / Dot1Q(vlan=20) / IP(src=CLIENT4, dst=OTHER4) / TCP(dport=80)),
        ("qinq v6", _eth() / Dot1AD(vlan=10) / Dot1Q(vlan=20) / IPv6(src=CLIENT6, dst=OTHER6) / UDP(dport=9)),
    ):
        frame = bytes(pkt)
        for n in range(12, len(frame) + 1):
            yield f"{name} cut", frame[:n]


def _tcp_offsets(base: dict[str, bytes]) -> Iterator[tuple[str, bytes]]:
    for name, frame in base.items():
        if "tcp" not in name:
            continue
        l4 = ETH + (20 if name.startswith("v4") else 40)
        for doff in range(16):
            if doff != 5:
                yield "tcp data offset", _set(frame, l4 + 12, "!B", doff << 4 | (frame[l4 + 12] & 0xF))


def _udp_lengths(base: dict[str, bytes]) -> Iterator[tuple[str, bytes]]:
    for name, frame in base.items():
        if "udp" not in name and "dns" not in name:
            continue
        l4 = ETH + (20 if name.startswith("v4") else 40)
        real = len(frame) - l4
        for claim in (0, 1, 7, 8, 9, real - 1, real + 1, real + 100, 65535):
            yield "udp length", _set(frame, l4 + 4, "!H", claim)


def broken_dns(query: bytes) -> Iterator[tuple[str, bytes]]:
    """Answers to ``query`` that must not parse: the header and question copied, the rest broken."""
    qid = query[:2]
    question = query[12:]
    header = qid + b"\x81\x80" + b"\x00\x01\x00\x01\x00\x00\x00\x00"
    a_rec = struct.pack("!HHIH", 1, 1, 300, 4) + socket.inet_aton(OTHER4)
    # a compression pointer to itself, to the flags, past the end
    here = 12 + len(question)
    for target in (here, 2, here + 40, 0x3FFF):  # itself, the flags (a bad label), past the end
        yield "dns pointer loop", header + question + struct.pack("!H", 0xC000 | target) + a_rec
    two = struct.pack("!H", 0xC000 | (here + 2)) + struct.pack("!H", 0xC000 | here)
    yield "dns pointer ping-pong", header + question + two + a_rec
    for label in (0x40, 0x80, 0xBF):
        yield "dns label type", header + question + bytes([label, 1]) + b"\x00" + a_rec
    yield "dns name too long", header + question + (b"\x3f" + b"a" * 63) * 5 + b"\x00" + a_rec
    good = header + question + b"\xc0\x0c" + a_rec
    for n in range(here, len(good)):
        yield "dns truncated record", good[:n]
    for rdlen in (0, 3, 5, 16, 200, 65535):
        yield (
            "dns rdlength",
            header + question + b"\xc0\x0c" + a_rec[:8] + struct.pack("!H", rdlen) + a_rec[10:],
        )
    for count in (2, 50, 65535):
        yield (
            "dns answer count",
            qid
            + b"\x81\x80\x00\x01"
            + struct.pack("!H", count)
            + b"\0" * 4
            + (question + b"\xc0\x0c" + a_rec),
        )


def odd_dns(query: bytes) -> Iterator[tuple[str, bytes]]:
    """Answers that parse but give nothing for the name asked: a CNAME loop, records for others."""
    qid, question = query[:2], query[12:]

    def name(n: str) -> bytes:
        return b"".join(bytes([len(p)]) + p.encode() for p in n.split(".")) + b"\0"

    def rr(owner: bytes, rtype: int, data: bytes) -> bytes:
        return owner + struct.pack("!HHIH", rtype, 1, 300, len(data)) + data

    def answer(*records: bytes) -> bytes:
        return (
            qid
            + b"\x81\x80\x00\x01"
            + struct.pack("!H", len(records))
            + b"\0" * 4
            + question
            + b"".join(records)
        )

    other = socket.inet_aton(OTHER4)
    yield (
        "dns cname loop",
        answer(
            rr(b"\xc0\x0c", 5, name("x.test")),
            rr(name("x.test"), 5, b"\xc0\x0c"),
            rr(name("y.test"), 1, other),
        ),
    )
    yield "dns record for another name", answer(rr(name("other.test"), 1, other))
    # compression pointers to a zero byte (the root name): into the header, into the question
    yield "dns pointer into the header", answer(rr(b"\xc0\x04", 1, other))
    yield "dns pointer into the question", answer(rr(struct.pack("!H", 0xC000 | len(query) - 2), 1, other))
    yield (
        "dns cname to nowhere",
        answer(rr(b"\xc0\x0c", 5, name("gone.test")), rr(name("far.test"), 1, other)),
    )


def dns_payloads(rng: random.Random) -> Iterator[tuple[str, bytes]]:
    """Malformed queries for the proxy itself (UDP to the gateway's port 53)."""
    q = dns_query()
    for n in range(len(q)):
        yield "dns query truncated", q[:n]
    for _, answer in broken_dns(q):
        yield "dns answer sent to the proxy", answer
    for _ in range(60):
        yield "dns query random", q[:2] + bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 80)))


def _udp_to_proxy(payload: bytes) -> bytes:
    return bytes(_eth() / IP(src=CLIENT4, dst=GW4) / UDP(sport=40020, dport=53) / Raw(payload))


def _random(rng: random.Random) -> Iterator[tuple[str, bytes]]:
    def noise(n: int) -> bytes:
        return bytes(rng.getrandbits(8) for _ in range(n))

    head = bytes(_eth())[:12]
    for _ in range(200):
        yield "random frame", noise(rng.randint(0, 200))
    for ethertype in (b"\x08\x00", b"\x86\xdd", b"\x81\x00", b"\x88\xa8"):
        for _ in range(75):
            yield "random after ethernet", head + ethertype + noise(rng.randint(0, 160))
    v4 = bytes(IP(src=CLIENT4, dst=OTHER4, proto=6))[:20]
    v6 = bytes(IPv6(src=CLIENT6, dst=OTHER6, nh=6))[:40]
    for _ in range(250):
        yield "random after ipv4", head + b"\x08\x00" + v4 + noise(rng.randint(0, 80))
        yield "random after ipv6", head + b"\x86\xdd" + v6 + noise(rng.randint(0, 80))


def frames() -> list[tuple[str, bytes]]:
    rng = random.Random(SEED)
    base = bases()
    out: list[tuple[str, bytes]] = []
    for part in (_truncated(base), _ihl(base), _lengths(base), _ext_chains(rng), _vlans(base)):
        out.extend(part)
    out.extend(_tcp_offsets(base))
    out.extend(_udp_lengths(base))
    out.extend((cat, _udp_to_proxy(p)) for cat, p in dns_payloads(rng))
    out.extend(_random(rng))
    return out
