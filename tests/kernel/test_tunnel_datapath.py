"""tunnel.bpf.c on crafted frames through BPF_PROG_TEST_RUN: verdicts, rewrites, choice, trace."""

from __future__ import annotations

import errno
import os
import struct

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from sluice.bpf.testrun import test_run
from sluice.plugins.tunnel.engine import Tunnel, read_entries
from sluice.plugins.tunnel.metrics import read_counters, read_nexthop_stats
from sluice.plugins.tunnel.model import Nexthop, Route
from sluice.plugins.tunnel.testing import compiled_tunnel
from sluice.plugins.tunnel.trace import decode_detail
from sluice.trace import TraceSession

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(os.geteuid() != 0, reason="loading BPF programs needs root (CAP_BPF)"),
]

NEXT, REDIRECT = -1, 7
SRC_MAC, DST_MAC = bytes.fromhex("020000000001"), bytes.fromhex("020000000002")
A = Nexthop(peer="a", underlay="10.99.3.2", vni=100)
B = Nexthop(peer="b", underlay="10.99.3.3", vni=100)
C6 = Nexthop(peer="c", underlay="fd00:99:3::a:b0c:d0e", vni=300)
PLAIN = Nexthop(peer="p", underlay="10.99.3.9", protocol="none", device="lo")


def ipv4(dst: str, proto: int = 17, sport: int = 40000, dport: int = 9, payload: bytes = b"data") -> bytes:
    l4 = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    if proto == 6:
        l4 = struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, 0x02, 1024, 0, 0) + payload
    src = bytes([10, 50, 0, 1])
    ip = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 1, 0, 64, proto, 0, src, bytes(map(int, dst.split(".")))
    )
    return DST_MAC + SRC_MAC + b"\x08\x00" + ip + l4


def ipv6(dst: str, sport: int = 40000) -> bytes:
    import ipaddress

    l4 = struct.pack("!HHHH", sport, 9, 12, 0) + b"data"
    ip6 = struct.pack("!IHBB16s16s", 6 << 28, len(l4), 17, 64, ipaddress.ip_address("fd00:50::1").packed,
                      ipaddress.ip_address(dst).packed)  # fmt: skip
    return DST_MAC + SRC_MAC + b"\x86\xdd" + ip6 + l4


def resolve(nh: Nexthop) -> int:
    return 1  # loopback: test runs never perform the redirect


@pytest.fixture(scope="module")
def compiled(kernel_ready):
    yield from compiled_tunnel()


@pytest.fixture
def tunnel(compiled):
    trie, stats = compiled.raw("tunnel_routes"), compiled.raw("tunnel_nh_stats")
    t = Tunnel(trie, resolve, stats=stats)
    yield t
    trie.clear()
    trie.close()
    stats.close()


@pytest.fixture(scope="module")
def tracer(compiled):
    with TraceSession(compiled.root) as session:
        yield session


def run_traced(compiled, tracer, frame: bytes):
    tracer.poll(0)
    r = test_run(compiled.prog_fd, frame)
    events = [e for e in tracer.poll(50) if e.plugin == "tunnel"]
    assert len(events) == 1, events
    return r, events[0]


def test_miss_passes_to_the_kernel(compiled, tunnel, tracer):
    before = read_counters(compiled.root / "sluice" / "tunnel")["miss"]
    r, ev = run_traced(compiled, tracer, ipv4("10.7.7.7"))
    assert r.retval == NEXT and ev.reason == "miss"
    assert r.data_out == ipv4("10.7.7.7")
    assert read_counters(compiled.root / "sluice" / "tunnel")["miss"] == before + 1


def test_single_nexthop_encapsulates_and_rewrites_the_mac(compiled, tunnel, tracer):
    tunnel.replace_api_routes(
        [Route(dst="10.1.0.0/16", nexthops=[A]), Route(dst="10.1.2.0/24", nexthops=[B])]
    )
    r, ev = run_traced(compiled, tracer, ipv4("10.1.9.9"))
    assert r.retval == REDIRECT and ev.reason == "encap"
    assert r.data_out[:6] == bytes.fromhex("020a630302ff")  # 02:<10.99.3.2>:ff
    assert r.data_out[6:] == ipv4("10.1.9.9")[6:]
    d = decode_detail(ev.detail, ev.reason)
    assert d["route"] == "10.1.0.0/16" and d["candidates"] == 1 and d["chosen"] == 0
    assert (d["protocol"], d["vni"], d["set_key"], d["redirect"]) == ("vxlan", 100, 0, REDIRECT)
    # the trace names the matched route (the longer one here), not the /32 lookup key
    _, ev = run_traced(compiled, tracer, ipv4("10.1.2.3"))
    assert decode_detail(ev.detail, ev.reason)["route"] == "10.1.2.0/24"


def test_single_nexthop_is_used_even_when_unhealthy(compiled, tunnel, tracer):
    tunnel.replace_api_routes([Route(dst="10.1.0.0/16", nexthops=[A])])
    tunnel.set_health("a", False)
    r, ev = run_traced(compiled, tracer, ipv4("10.1.0.1"))
    assert r.retval == REDIRECT
    assert decode_detail(ev.detail, ev.reason)["healthy_mask"] == 0


def test_none_healthy_passes(compiled, tunnel, tracer):
    tunnel.replace_api_routes([Route(dst="10.1.0.0/16", nexthops=[A, B])])
    tunnel.set_health("a", False)
    tunnel.set_health("b", False)
    before = read_counters(compiled.root / "sluice" / "tunnel")["no_healthy"]
    r, ev = run_traced(compiled, tracer, ipv4("10.1.0.1"))
    assert r.retval == NEXT and ev.reason == "no-healthy"
    assert r.data_out == ipv4("10.1.0.1")  # untouched
    assert read_counters(compiled.root / "sluice" / "tunnel")["no_healthy"] == before + 1


def test_ecmp_spreads_sticks_and_moves_only_withdrawn_flows(compiled, tunnel, tracer):
    tunnel.replace_api_routes([Route(dst="10.1.0.0/16", nexthops=[A, B])])
    frames = [ipv4("10.1.0.1", sport=20000 + i) for i in range(64)]

    def choices():
        return [decode_detail(run_traced(compiled, tracer, f)[1].detail, "encap")["chosen"] for f in frames]

    first = choices()
    assert set(first) == {0, 1}  # both nexthops get flows
    assert choices() == first  # every flow stays where it was
    tunnel.set_health("b", False)
    after = choices()
    assert after == [0] * len(frames)  # b's flows moved to a, a's never moved
    tunnel.set_health("b", True)
    assert choices() == first  # restored: the same flows come back
    # reordering the nexthops does not move any flow (the weight is the nexthop's, not the slot's)
    tunnel.replace_api_routes([Route(dst="10.1.0.0/16", nexthops=[B, A])])
    assert [1 - c for c in choices()] == first


def test_ipv6_overlay_over_ipv6_underlay(compiled, tunnel, tracer):
    tunnel.replace_api_routes([Route(dst="fd00:7::/48", nexthops=[C6])])
    r, ev = run_traced(compiled, tracer, ipv6("fd00:7::1"))
    assert r.retval == REDIRECT
    assert r.data_out[:6] == bytes.fromhex("020b0c0d0eff")  # last 4 bytes of the v6 underlay
    d = decode_detail(ev.detail, ev.reason)
    assert d["route"] == "fd00:7::/48" and d["set_key"] == 0 and d["vni"] == 300


def test_ipv4_overlay_over_ipv6_underlay_and_back(compiled, tunnel, tracer):
    tunnel.replace_api_routes(
        [Route(dst="10.1.0.0/16", nexthops=[C6]), Route(dst="fd00:7::/48", nexthops=[A])]
    )
    assert run_traced(compiled, tracer, ipv4("10.1.0.1"))[0].retval == REDIRECT
    assert run_traced(compiled, tracer, ipv6("fd00:7::1"))[0].retval == REDIRECT


def test_plain_redirect_keeps_the_frame(compiled, tunnel, tracer):
    tunnel.replace_api_routes([Route(dst="10.1.0.0/16", nexthops=[PLAIN])])
    r, ev = run_traced(compiled, tracer, ipv4("10.1.0.1"))
    assert r.retval == REDIRECT and r.data_out == ipv4("10.1.0.1")
    assert decode_detail(ev.detail, ev.reason)["set_key"] is None


def test_nexthop_counters(compiled, tunnel, tracer):
    tunnel.replace_api_routes([Route(dst="10.1.0.0/16", nexthops=[A])])
    stats = {
        s["underlay"]: s for s in read_nexthop_stats(compiled.root / "sluice" / "tunnel", tunnel.stats_slots)
    }
    assert stats["10.99.3.2"]["packets"] == 0  # a newly assigned slot starts from zero
    frame = ipv4("10.1.0.1", proto=6)
    test_run(compiled.prog_fd, frame, repeat=3)
    stats = {
        s["underlay"]: s for s in read_nexthop_stats(compiled.root / "sluice" / "tunnel", tunnel.stats_slots)
    }
    assert stats["10.99.3.2"]["packets"] == 3
    assert stats["10.99.3.2"]["bytes"] == 3 * len(frame)
    assert stats["10.99.3.2"]["protocol"] == "vxlan" and stats["10.99.3.2"]["vni"] == 100


def vlan(frame: bytes) -> bytes:
    """The same frame behind an 802.1Q tag. The kernel's test run insists on a whole IP header
    after an IP ethertype, so truncated IP headers reach the program only behind a tag."""
    return frame[:12] + b"\x81\x00\x00\x07" + frame[12:]


def bad_ihl(frame: bytes, ihl: int) -> bytes:
    return frame[:14] + bytes([0x40 | ihl]) + frame[15:]


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        (vlan(ipv4("10.1.0.1"))[: 18 + 12], "malformed"),  # truncated IPv4 header
        (ipv4("10.1.0.1")[: 14 + 20 + 3], "malformed"),  # truncated UDP header
        (ipv4("10.1.0.1", proto=6)[: 14 + 20 + 10], "malformed"),  # truncated TCP header
        (bad_ihl(ipv4("10.1.0.1"), 15), "malformed"),  # options longer than the packet
        (bad_ihl(ipv4("10.1.0.1"), 3), "malformed"),  # header shorter than 20 bytes
        (vlan(ipv6("fd00:7::1"))[: 18 + 30], "malformed"),  # truncated IPv6 header
        (ipv6("fd00:7::1")[: 14 + 40 + 5], "malformed"),  # truncated UDP after IPv6
        (DST_MAC + SRC_MAC + b"\x08\x06" + bytes(28), "not-ip"),  # ARP
        (DST_MAC + SRC_MAC + b"\x88\xcc", "not-ip"),  # an Ethernet header only (LLDP)
    ],
    ids=[
        "ipv4-trunc",
        "udp-trunc",
        "tcp-trunc",
        "ihl-long",
        "ihl-short",
        "ipv6-trunc",
        "udp6-trunc",
        "arp",
        "eth-only",
    ],
)
def test_malformed_and_foreign_frames_pass_untouched(compiled, tunnel, tracer, frame, reason):
    tunnel.replace_api_routes([Route(dst="0.0.0.0/0", nexthops=[A]), Route(dst="::/0", nexthops=[A])])
    r, ev = run_traced(compiled, tracer, frame)
    assert (r.retval, ev.reason) == (NEXT, reason)
    assert r.data_out == frame


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(min_size=14, max_size=200), st.sampled_from([b"\x08\x00", b"\x86\xdd", b"\x81\x00"]))
def test_random_frames_never_hurt(compiled, tunnel, body, ethertype):
    if not read_entries(tunnel.trie):
        tunnel.replace_api_routes([Route(dst="0.0.0.0/0", nexthops=[A]), Route(dst="::/0", nexthops=[A])])
    frame = DST_MAC + SRC_MAC + ethertype + body
    try:
        r = test_run(compiled.prog_fd, frame)
    except OSError as exc:  # the kernel refuses IP ethertypes without a whole IP header
        assert exc.errno == errno.EINVAL
        assume(False)
    assert r.retval in (NEXT, REDIRECT)
    if r.retval == NEXT:
        assert r.data_out == frame  # passed frames are never modified
    else:
        assert r.data_out[:6] == bytes.fromhex("020a630302ff") and r.data_out[6:] == frame[6:]
