"""Fragments through a lab gateway running every plugin, crafted with scapy, counted at the server.

The gateway's firewall denies TCP 9022 and allows TCP 8080 to the server (default deny). Each case
sends the fragments of one datagram (its own fragment id) from the client's eth0 and names the
fragments that may reach the server; a packet socket on the server's eth0 must see exactly those,
and the server's input hook (after the kernel reassembled) must count 0 packets to port 9022.
Allowed fragmented traffic must get through: crafted fragments of a SYN to 8080, and real UDP
datagrams larger than the MTU that the client's kernel fragments and the server echoes.
"""

from __future__ import annotations

import os
import shutil
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from scapy.all import (
    IP,
    TCP,
    Ether,
    ICMPv6EchoRequest,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
    Raw,
)

from tests.lab.hostile_gateway import (
    ALLOWED_TCP,
    CLIENT,
    CLIENT_MAC,
    DENIED_TCP,
    GW_MAC,
    SERVER_NFT,
    SRV,
    UDP_PORT,
    Capture,
    Gateway,
    client_raw,
    server_counters,
)
from tests.netlab import lab

pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(os.geteuid() != 0, reason="lab tests need root: namespaces and BPF"),
]

MF = 1  # scapy's IPv4 flags value for "more fragments"


@dataclass
class Case:
    name: str
    frames: list[bytes]
    passes: set[int]  # indices of the frames that may (and must) reach the server


def eth4(ip) -> bytes:
    return bytes(Ether(src=CLIENT_MAC, dst=GW_MAC) / ip)


def tcp4_bytes(dport: int, sport: int, flags: str = "S", payload: bytes = b"") -> bytes:
    """The TCP segment (with its checksum over the whole datagram) of a v4 packet to the server."""
    pkt = IP(src=CLIENT[4], dst=SRV[4]) / TCP(sport=sport, dport=dport, flags=flags, seq=1000) / payload
    return bytes(pkt[TCP])


def tcp6_bytes(dport: int, sport: int, flags: str = "S", payload: bytes = b"") -> bytes:
    pkt = IPv6(src=CLIENT[6], dst=SRV[6]) / TCP(sport=sport, dport=dport, flags=flags, seq=1000) / payload
    return bytes(pkt[TCP])


def frag4(ident: int, offset_bytes: int, more: bool, data: bytes, proto: int = 6) -> bytes:
    return eth4(
        IP(src=CLIENT[4], dst=SRV[4], id=ident, proto=proto, flags=MF if more else 0, frag=offset_bytes // 8)
        / Raw(data)
    )


def frag6(ident: int, offset_bytes: int, more: bool, data: bytes, nh: int = 6, before=None) -> bytes:
    """An IPv6 fragment; ``before``: extension headers in front of the fragment header."""
    hdr = IPv6(src=CLIENT[6], dst=SRV[6])
    if before is not None:
        hdr = hdr / before
    return bytes(
        Ether(src=CLIENT_MAC, dst=GW_MAC)
        / hdr
        / IPv6ExtHdrFragment(nh=nh, offset=offset_bytes // 8, m=int(more), id=ident)
        / Raw(data)
    )


def split(data: bytes, cuts: list[int]) -> list[tuple[int, bool, bytes]]:
    """(offset, more, piece) for ``data`` cut at ``cuts`` (multiples of 8)."""
    edges = [0, *cuts, len(data)]
    return [(a, b < len(data), data[a:b]) for a, b in zip(edges, edges[1:], strict=False)]


def cases() -> list[Case]:
    out: list[Case] = []
    pad = bytes(64)  # payload after the header, so there is something to fragment
    d4 = tcp4_bytes(DENIED_TCP, 41000, payload=pad)
    a4 = tcp4_bytes(ALLOWED_TCP, 41001, payload=pad)
    ident = 0x5100

    def v4(name: str, pieces, passes=(), proto: int = 6) -> None:
        nonlocal ident
        ident += 1
        out.append(Case(name, [frag4(ident, o, m, p, proto) for o, m, p in pieces], set(passes)))

    # a SYN to the denied port: the first fragment carries the whole header (and the port)
    v4("v4 SYN to the denied port", split(d4, [24, 48]))
    # tiny first fragments: 8 bytes (ports, no flags) and 16 bytes (no flags either)
    v4("v4 tiny first fragment (8 bytes)", split(d4, [8, 32]))
    v4("v4 tiny first fragment (16 bytes)", split(d4, [16]))
    # a first fragment with no transport header at all (0 bytes), the header in the next one
    v4("v4 first fragment without ports", [(0, True, b""), (0, False, d4)])
    # only the later fragments of a denied flow (the first never sent), even claiming ICMP/UDP
    v4("v4 later fragments only", split(d4, [24, 48])[1:])
    v4("v4 later fragments claiming ICMP", split(d4, [24, 48])[1:], proto=1)
    # overlap: a denied first fragment, and later ones rewriting its header toward the allowed port
    v4("v4 overlap onto a denied first fragment", [(0, True, d4[:24]), (8, False, a4[8:])])
    # overlap the other way: an allowed first fragment, then a fragment at offset 8 rewriting the
    # flags/offset of the header it passed on; only the first and the honest tail may arrive
    v4(
        "v4 overlap onto an allowed first fragment",
        [(0, True, a4[:24]), (8, True, d4[8:24]), (24, False, a4[24:])],
        passes={0, 2},
    )
    v4("v4 allowed SYN in fragments", split(a4, [24, 48]), passes={0, 1, 2})

    d6 = tcp6_bytes(DENIED_TCP, 42000, payload=pad)
    a6 = tcp6_bytes(ALLOWED_TCP, 42001, payload=pad)
    dst_opt_then_tcp = bytes(IPv6ExtHdrDestOpt(nh=6)) + d6  # the fragmentable part: options, then TCP

    def v6(name: str, pieces, passes=(), nh: int = 6, before=None) -> None:
        nonlocal ident
        ident += 1
        out.append(Case(name, [frag6(ident, o, m, p, nh, before) for o, m, p in pieces], set(passes)))

    v6("v6 fragment header alone, SYN to the denied port", split(d6, [24, 48]))
    v6("v6 fragment header behind hop-by-hop", split(d6, [24]), before=IPv6ExtHdrHopByHop())
    v6(
        "v6 fragment header behind hop-by-hop, routing, destination options",
        split(d6, [24]),
        before=IPv6ExtHdrHopByHop() / IPv6ExtHdrRouting(addresses=[]) / IPv6ExtHdrDestOpt(),
    )
    # the first fragment carries only a destination-options header: no ports in it
    v6("v6 first fragment without ports", split(dst_opt_then_tcp, [8]), nh=60)
    v6("v6 tiny first fragment (8 bytes)", split(d6, [8, 32]))
    v6("v6 later fragments only", split(d6, [24, 48])[1:])
    v6("v6 later fragments claiming ICMPv6", split(d6, [24, 48])[1:], nh=58)
    v6("v6 overlap onto a denied first fragment", [(0, True, d6[:24]), (8, False, a6[8:])])
    v6(
        "v6 overlap onto an allowed first fragment",
        [(0, True, a6[:24]), (8, True, d6[8:24]), (24, False, a6[24:])],
        passes={0, 2},
    )
    v6("v6 allowed SYN in fragments", split(a6, [24, 48]), passes={0, 1, 2})

    # the reproduction: a first fragment whose payload length says 16 bytes (a destination
    # options header and the fragment header), with a fake allowed TCP header in the padding after it
    ident += 1
    lying = bytearray(frag6(ident, 0, True, a6[:24], nh=6, before=IPv6ExtHdrDestOpt()))
    lying[18:20] = (16).to_bytes(2, "big")
    tail = frag6(ident, 24, False, bytes(bytes(ICMPv6EchoRequest(id=1))[:8]) + bytes(16), nh=58)
    out.append(Case("v6 first fragment hiding TCP past its payload length", [bytes(lying), tail], set()))
    return out


@pytest.fixture(scope="module")
def env(kernel_ready, tmp_path_factory):
    root = tmp_path_factory.mktemp("frags")
    bpffs = Path("/sys/fs/bpf") / f"sluice-test-{uuid.uuid4().hex[:8]}"
    bpffs.mkdir()
    try:
        with lab() as lab_:
            lab_.exec("server", ["nft", "-f", "-"], input=SERVER_NFT)
            gw = Gateway(lab_, root, bpffs)
            capture = Capture(lab_)
            try:
                gw.start()
                yield lab_, gw, capture
            finally:
                capture.close()
                gw.stop()
    finally:
        shutil.rmtree(bpffs, ignore_errors=True)


def frame_key(frame: bytes) -> bytes:
    """What identifies one sent frame at the server: its IP packet past the hop limit / TTL."""
    if frame[12:14] == b"\x08\x00":
        ip = bytearray(frame[14:])
        ip[8] = 0  # TTL
        ip[10:12] = b"\0\0"  # header checksum (changes with the TTL)
        return bytes(ip[: int.from_bytes(ip[2:4], "big")])
    ip = bytearray(frame[14:])
    ip[7] = 0  # hop limit
    return bytes(ip[: 40 + int.from_bytes(ip[4:6], "big")])


def settle(capture: Capture, count: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while len(capture.frames) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # anything that should not arrive has had time to


def test_every_fragment_case_reaches_the_server_exactly_as_the_policy_says(env):
    lab_, gw, capture = env
    before = server_counters(lab_)
    all_cases = cases()
    expected: set[bytes] = set()
    forbidden: dict[bytes, str] = {}
    capture.clear()
    with client_raw(lab_) as raw:
        for case in all_cases:
            for i, frame in enumerate(case.frames):
                raw.send(frame)
                if i in case.passes:
                    expected.add(frame_key(frame))
                else:
                    forbidden[frame_key(frame)] = f"{case.name} #{i}"
    settle(capture, len(expected))
    got = {frame_key(f) for f in capture.frames}
    leaked = sorted(forbidden[k] for k in got if k in forbidden)
    assert leaked == [], f"fragments that reached the server: {leaked}"
    missing = [k for k in expected if k not in got]
    assert missing == [], f"{len(missing)} allowed fragments never arrived"
    after = server_counters(lab_)
    assert after["denied_port"] == before["denied_port"] == 0  # nothing reassembled to 9022
    assert after["allowed_port"] > before["allowed_port"]  # the allowed SYNs, reassembled
    counters = gw.counters()
    assert counters["blocked_fragment"] > 0 and counters["fragment_followed"] > 0
    assert gw.alive()


@pytest.mark.parametrize("family", [4, 6])
def test_real_fragmented_udp_is_echoed(env, family):
    """A 4000-byte datagram the client's kernel fragments (MTU 1500), and the server's echo."""
    lab_, _, _ = env
    payload = bytes(range(250)) * 16
    with lab_.socket("client", family, socket.SOCK_DGRAM) as u:
        u.settimeout(5)
        server = lab_.socket("server", family, socket.SOCK_DGRAM)
        with server:
            server.bind((SRV[family], UDP_PORT))
            server.settimeout(5)
            u.sendto(payload, (SRV[family], UDP_PORT))
            data, peer = server.recvfrom(65535)
            assert data == payload
            server.sendto(data, peer)
            assert u.recvfrom(65535)[0] == payload
