"""The firewall's fragment policy on crafted fragments (BPF_PROG_TEST_RUN).

A non-first fragment carries no ports and an attacker-chosen next-header: it is never judged by
itself and passes only when the first fragment of its datagram (same addresses, protocol and
fragment id) passed. A first fragment must carry its whole transport header inside the IP length,
and a later fragment may not overlap it. The policy allows TCP 80 and UDP 53 to 10.2.0.0/16 and
TCP 443 and ICMPv6 to fd00:2::/64; everything else from the client is denied.
"""

from __future__ import annotations

import ipaddress
import os
import struct

import pytest

from sluice.bpf.testrun import test_run
from sluice.plugins.firewall import frames
from sluice.plugins.firewall.maps import SETTINGS
from sluice.plugins.firewall.policy import Policy, compile_policy
from sluice.plugins.firewall.testing import loaded

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(os.geteuid() != 0, reason="loading BPF programs needs root (CAP_BPF, CAP_NET_ADMIN)"),
]

NEXT, DROP = -1, 2
C4, C6 = "10.1.0.5", "fd00:1::5"
POLICY = Policy.model_validate(
    {
        "networks": [
            {
                "name": "clients",
                "sources": ["10.1.0.0/16", "fd00:1::/64"],
                "default": "deny",
                "rules": [
                    {"action": "allow", "proto": "tcp", "dst": "10.2.0.0/16", "ports": 80},
                    {"action": "allow", "proto": "udp", "dst": "10.2.0.0/16", "ports": 53},
                    {"action": "allow", "proto": "tcp", "dst": "fd00:2::/64", "ports": 443},
                    {"action": "allow", "proto": "icmp", "dst": "fd00:2::/64"},
                ],
            }
        ]
    }
)
MF = 0x2000  # IPv4 "more fragments"


def ip4(dst: str, proto: int, body: bytes, ident: int = 77, frag: int = 0, total: int | None = None) -> bytes:
    """An IPv4 frame from the client; ``frag``: flags | offset in 8-byte units."""
    s, d = ipaddress.ip_address(C4).packed, ipaddress.ip_address(dst).packed
    length = total if total is not None else 20 + len(body)
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, length, ident, frag, 64, proto, 0, s, d)
    return frames.eth(0x0800) + hdr + body


def ip6(dst: str, chain: list[bytes], first_next: int, body: bytes, plen: int | None = None) -> bytes:
    """An IPv6 frame from the client with extension headers ``chain`` (already linked)."""
    s, d = ipaddress.ip_address(C6).packed, ipaddress.ip_address(dst).packed
    exts = b"".join(chain)
    length = plen if plen is not None else len(exts) + len(body)
    return (
        frames.eth(0x86DD) + struct.pack("!IHBB16s16s", 6 << 28, length, first_next, 64, s, d) + exts + body
    )


def frag6(next_header: int, offset_bytes: int, more: bool, ident: int = 0x1234) -> bytes:
    return struct.pack("!BBHI", next_header, 0, offset_bytes | int(more), ident)


def opts6(next_header: int) -> bytes:
    """A hop-by-hop or destination-options header: 8 bytes of PadN."""
    return bytes([next_header, 0, 1, 4, 0, 0, 0, 0])


def tcp(dport: int, flags: str = "S") -> bytes:
    return frames.l4(6, 40000, dport, flags)


def udp(dport: int, payload_len: int) -> bytes:
    """A UDP header whose length covers the whole (fragmented) datagram."""
    return struct.pack("!HHHH", 40000, dport, 8 + payload_len, 0)


@pytest.fixture(scope="module")
def fw(kernel_ready):
    with loaded(["fw_ingress", "fw_egress"]) as (maps, fds):
        yield maps, fds["fw_ingress"]


@pytest.fixture(autouse=True)
def fresh(fw):
    maps, _ = fw
    for name in ("fw_sessions", "fw_frags"):
        maps.map(name).clear()
    maps.init_settings({name: s.default for name, s in SETTINGS.items()})
    maps.apply(compile_policy(POLICY), {})


def out(fw, frame: bytes) -> int:
    return test_run(fw[1], frame, data_size_out=0).retval


def counters(fw) -> dict[str, int]:
    return fw[0].counters()


def test_whole_packets_still_follow_the_policy(fw):
    assert out(fw, ip4("10.2.0.7", 6, tcp(80))) == NEXT
    assert out(fw, ip4("10.2.0.7", 6, tcp(9022))) == DROP


def test_allowed_first_fragment_lets_its_own_later_fragments_through(fw):
    first = ip4("10.2.0.53", 17, udp(53, 40) + bytes(16), ident=77, frag=MF)
    assert out(fw, first) == NEXT
    before = counters(fw)
    assert out(fw, ip4("10.2.0.53", 17, bytes(24), ident=77, frag=3)) == NEXT  # offset 24, last
    assert counters(fw)["fragment_followed"] == before["fragment_followed"] + 1
    # same addresses and protocol, another datagram: its first fragment never passed
    assert out(fw, ip4("10.2.0.53", 17, bytes(24), ident=78, frag=3)) == DROP


def test_later_fragment_without_its_first_is_dropped_and_counted(fw):
    before = counters(fw)
    assert out(fw, ip4("10.2.0.7", 6, bytes(32), ident=9, frag=3)) == DROP
    assert counters(fw)["blocked_fragment"] == before["blocked_fragment"] + 1


def test_later_fragments_of_a_denied_flow_are_dropped(fw):
    first = ip4("10.2.0.7", 6, tcp(9022) + bytes(16), ident=5, frag=MF)
    assert out(fw, first) == DROP
    assert out(fw, ip4("10.2.0.7", 6, bytes(16), ident=5, frag=MF | 5)) == DROP
    assert out(fw, ip4("10.2.0.7", 6, bytes(16), ident=5, frag=7)) == DROP


@pytest.mark.parametrize("carried", [0, 4, 8, 12])
def test_tiny_first_fragment_without_a_whole_tcp_header_is_dropped(fw, carried):
    """A SYN to a denied port split so the first fragment has no (or only part of the) ports/flags."""
    assert out(fw, ip4("10.2.0.7", 6, tcp(9022)[:carried], ident=11, frag=MF)) == DROP


def test_fragment_overlapping_the_transport_header_is_dropped(fw):
    """An allowed first fragment, then a fragment at offset 8 rewriting the TCP header (flags, and
    with a further overlap the ports): it must not ride on the first fragment's verdict."""
    assert out(fw, ip4("10.2.0.7", 6, tcp(80) + bytes(4), ident=21, frag=MF)) == NEXT
    assert out(fw, ip4("10.2.0.7", 6, tcp(9022)[8:] + bytes(4), ident=21, frag=1)) == DROP


def test_ipv4_total_length_beyond_the_frame_is_dropped(fw):
    assert out(fw, ip4("10.2.0.7", 6, tcp(80), total=20 + 20 + 400)) == DROP


def test_ipv4_header_claiming_less_than_its_transport_header_is_dropped(fw):
    """tot_len ends inside the TCP header: the bytes after it are padding, not a header."""
    assert out(fw, ip4("10.2.0.7", 6, tcp(80), total=20 + 12)) == DROP


def test_ipv6_fake_transport_header_in_the_padding_is_dropped(fw):
    """plen=16: a first fragment (8-byte fragment header + 8 bytes), and a TCP header to the allowed
    port 443 that lies mostly in the padding past the payload."""
    frame = ip6("fd00:2::7", [frag6(6, 0, True)], 44, tcp(443), plen=16)
    assert out(fw, frame) == DROP


def test_ipv6_later_fragment_behind_options_is_not_judged_by_its_next_header(fw):
    """A tail fragment whose fragment header says ICMPv6 (allowed, port-less) to fd00:2::7, behind
    hop-by-hop and destination options, of a datagram whose first fragment never passed."""
    chain = [opts6(60), opts6(44), frag6(58, 64, False, ident=0xBEEF)]
    assert out(fw, ip6("fd00:2::7", chain, 0, bytes(32))) == DROP


def test_ipv6_first_fragment_behind_options_follows_the_policy(fw):
    allowed = [opts6(60), opts6(44), frag6(6, 0, True, ident=0xCAFE)]
    assert out(fw, ip6("fd00:2::7", allowed, 0, tcp(443) + bytes(8))) == NEXT
    tail = [opts6(60), opts6(44), frag6(6, 32, False, ident=0xCAFE)]
    assert out(fw, ip6("fd00:2::7", tail, 0, bytes(16))) == NEXT
    denied = [opts6(60), opts6(44), frag6(6, 0, True, ident=0xD00D)]
    assert out(fw, ip6("fd00:2::7", denied, 0, tcp(9022) + bytes(8))) == DROP


def test_ipv6_fragment_header_alone_to_a_denied_port(fw):
    assert out(fw, ip6("fd00:2::7", [frag6(6, 0, True, ident=3)], 44, tcp(9022) + bytes(8))) == DROP
    assert out(fw, ip6("fd00:2::7", [frag6(6, 24, False, ident=3)], 44, bytes(8))) == DROP


def test_ipv6_packet_with_a_v4_mapped_address_is_dropped(fw):
    """IPv4 is keyed v4-mapped in the tries: an IPv6 header naming ::ffff:a.b.c.d would be judged
    by IPv4 rules (10.2.0.0/16 allows TCP 80)."""
    assert out(fw, ip6("::ffff:10.2.0.7", [], 6, tcp(80))) == DROP
