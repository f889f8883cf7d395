"""flowmon's TC program under BPF_PROG_TEST_RUN: aggregation, TCP flag combinations, filters,
sampling counters, a tiny map overflowing (counted, nothing crashes), malformed packets."""

from __future__ import annotations

import os
import shutil
import struct
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sluice.bpf.testrun import test_run
from sluice.plugins.flowmon.config import Config, FilterRule
from sluice.plugins.flowmon.monitor import FlowMonitor, compile_datapath
from sluice.plugins.flowmon.records import KEY, addr_bytes

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(os.geteuid() != 0, reason="loading BPF programs needs root (CAP_BPF, CAP_NET_ADMIN)"),
]
TC_ACT_UNSPEC = -1
SRC_MAC, DST_MAC = bytes.fromhex("020000000001"), bytes.fromhex("020000000002")


def eth(ethertype: int) -> bytes:
    return DST_MAC + SRC_MAC + struct.pack("!H", ethertype)


def ipv4(proto: int, l4: bytes, src="10.0.0.1", dst="10.0.0.2", tos=0) -> bytes:
    ip = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        tos,
        20 + len(l4),
        1,
        0,
        64,
        proto,
        0,
        addr_bytes(src)[12:],
        addr_bytes(dst)[12:],
    )
    return eth(0x0800) + ip + l4


def ipv6(proto: int, l4: bytes, src="fd00::1", dst="fd00::2") -> bytes:
    ip6 = struct.pack("!IHBB16s16s", 6 << 28, len(l4), proto, 64, addr_bytes(src), addr_bytes(dst))
    return eth(0x86DD) + ip6 + l4


def udp(sport=40000, dport=9, payload=b"ping") -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


def tcp(flags: int, sport=40000, dport=80) -> bytes:
    return struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, flags, 65535, 0, 0)


@pytest.fixture(scope="module")
def pin_root(kernel_ready):
    root = Path("/sys/fs/bpf") / f"sluice-test-{uuid.uuid4().hex[:8]}"
    root.mkdir()
    yield root
    shutil.rmtree(root, ignore_errors=True)


def _datapath(root: Path, config: Config):
    bpf = compile_datapath(root, config)
    mon = FlowMonitor(root / "sluice" / "flowmon")
    mon.configure(config)
    fd = bpf.load_func(b"flowmon_ingress", bpf.SCHED_CLS).fd
    return bpf, mon, fd


@pytest.fixture(scope="module")
def datapath(pin_root):
    bpf, mon, fd = _datapath(pin_root / "big", Config())
    yield mon, fd
    mon.close()
    bpf.cleanup()


@pytest.fixture(scope="module")
def tiny(pin_root):
    bpf, mon, fd = _datapath(pin_root / "tiny", Config(max_flows=16))
    yield mon, fd
    mon.close()
    bpf.cleanup()


@pytest.fixture
def mon(datapath):
    m, fd = datapath
    m.configure(Config())
    m.evict()
    return m, fd


def run(fd: int, frame: bytes, repeat: int = 1) -> int:
    return test_run(fd, frame, repeat=repeat, data_size_out=0).retval


def test_aggregates_packets_and_bytes_per_flow(mon):
    m, fd = mon
    frame = ipv4(17, udp(payload=b"x" * 100), tos=46 << 2)
    assert run(fd, frame, repeat=7) == TC_ACT_UNSPEC
    run(fd, ipv6(17, udp(dport=53)), repeat=3)
    flows = {(f.src, f.dport): f for f in m.evict()}
    v4 = flows[("10.0.0.1", 9)]
    # bytes are L3 (IPFIX octetDeltaCount): the IP datagram, not the Ethernet frame
    assert (v4.packets, v4.bytes, v4.proto, v4.family, v4.dscp) == (7, 7 * (len(frame) - 14), 17, 4, 46)
    assert (v4.src_mac, v4.dst_mac) == (SRC_MAC.hex(":"), DST_MAC.hex(":"))
    assert v4.start_ns <= v4.end_ns and v4.direction == 0
    v6 = flows[("fd00::1", 53)]
    assert (v6.packets, v6.bytes, v6.family, v6.dst) == (3, 3 * (40 + 8 + 4), 6, "fd00::2")


def test_tcp_flags_union_with_ack_combinations(mon):
    m, fd = mon
    syn, ack, fin, rst, psh = 0x02, 0x10, 0x01, 0x04, 0x08
    for flags in (syn | ack, ack | psh, fin | ack, rst | ack):
        run(fd, ipv4(6, tcp(flags)))
    (flow,) = m.evict()
    names = set(flow.as_dict()["tcp_flags_names"])
    assert names == {"SYN", "ACK", "PSH", "FIN", "RST", "SYN-ACK", "FIN-ACK", "RST-ACK"}
    run(fd, ipv4(6, tcp(syn)))
    (flow,) = m.evict()
    assert flow.tcp_flags == syn  # a bare SYN sets no *-ACK bit


def test_icmp_type_and_code_are_part_of_the_key(mon):
    m, fd = mon
    run(fd, ipv4(1, bytes([8, 0, 0, 0, 0, 1, 0, 1])), repeat=2)
    run(fd, ipv4(1, bytes([3, 3, 0, 0, 0, 0, 0, 0])))
    got = sorted((f.sport, f.dport, f.packets) for f in m.evict())
    assert got == [(3, 3, 1), (8, 0, 2)]


def test_filter_rules_select_and_count_the_rest(mon):
    m, fd = mon
    m.configure(Config(filters=[FilterRule(cidr="10.0.0.0/24", protocol="udp", dport=9)]))
    before = m.counter_values()["filtered"]
    run(fd, ipv4(17, udp(dport=9)), repeat=2)
    run(fd, ipv4(17, udp(dport=10)), repeat=3)
    run(fd, ipv4(17, udp(dport=9), src="192.168.0.1", dst="192.168.0.2"))
    flows = m.evict()
    assert [(f.dport, f.packets) for f in flows] == [(9, 2)]
    assert m.counter_values()["filtered"] - before == 4


def test_cidr_and_peer_match_either_direction_in_both_families(mon):
    m, fd = mon
    m.configure(
        Config(filters=[FilterRule(cidr="10.0.0.1/32", peer="10.0.0.2/32"), FilterRule(cidr="fd00::/16")])
    )
    run(fd, ipv4(17, udp(), src="10.0.0.1", dst="10.0.0.2"))
    run(fd, ipv4(17, udp(), src="10.0.0.2", dst="10.0.0.1"))  # the reply direction matches too
    run(fd, ipv4(17, udp(), src="10.0.0.1", dst="10.0.0.3"))  # wrong peer
    run(fd, ipv6(17, udp(), src="fd00::1", dst="2001:db8::1"))  # one end in fd00::/16
    run(fd, ipv6(17, udp(), src="2001:db8::1", dst="2001:db8::2"))
    got = sorted((f.src, f.dst) for f in m.evict())
    assert got == [("10.0.0.1", "10.0.0.2"), ("10.0.0.2", "10.0.0.1"), ("fd00::1", "2001:db8::1")]


def test_reject_rule_and_direction(mon):
    m, fd = mon
    m.configure(
        Config(filters=[FilterRule(port=22, action="reject"), FilterRule(direction="ingress", sampling=1)])
    )
    run(fd, ipv4(6, tcp(0x10, dport=22)))
    run(fd, ipv4(6, tcp(0x10, dport=80)))
    assert [f.dport for f in m.evict()] == [80]
    m.configure(Config(filters=[FilterRule(direction="egress")]))
    run(fd, ipv4(6, tcp(0x10, dport=80)))  # the test run is an ingress program
    assert m.evict() == []


def test_sampling_counts_every_packet_either_way(mon):
    m, fd = mon
    m.configure(Config(sampling=4))
    before = m.counter_values()["sampled_out"]
    n = 4000
    run(fd, ipv4(17, udp()), repeat=n)
    (flow,) = m.evict()
    sampled_out = m.counter_values()["sampled_out"] - before
    assert flow.packets + sampled_out == n
    assert flow.sampling == 4
    # Binomial(4000, 1/4): mean 1000, sd ~27; 6 sd either way never fails by chance in practice.
    assert 1000 - 165 < flow.packets < 1000 + 165


def test_tiny_map_overflow_is_counted_and_recovers(tiny):
    m, fd = tiny
    m.evict()
    c0 = m.counter_values()
    for port in range(40):
        assert run(fd, ipv4(17, udp(sport=1000 + port), src="10.1.0.1")) == TC_ACT_UNSPEC
    c1 = m.counter_values()
    in_map = c1["inserted"] - c0["inserted"]
    lost = c1["map_full_packets"] - c0["map_full_packets"]
    assert in_map == 16 and lost == 24  # every packet is either in a flow or counted as lost
    assert c1["lost_flows"] - c0["lost_flows"] == 24
    for port in range(16, 40):  # the lost flows again: their packets count, the flows do not
        run(fd, ipv4(17, udp(sport=1000 + port), src="10.1.0.1"))
    c2 = m.counter_values()
    assert (c2["map_full_packets"] - c1["map_full_packets"], c2["lost_flows"] - c1["lost_flows"]) == (24, 0)
    assert m.fill() == 16
    flows = m.evict()
    assert len(flows) == 16 and m.fill() == 0
    run(fd, ipv4(17, udp(sport=5)))
    assert [f.sport for f in m.evict()] == [5]


def test_flow_key_layout_matches_the_map(datapath):
    m, _ = datapath
    assert m.flows.info.key_size == KEY.size


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    ethertype=st.sampled_from([0x0800, 0x86DD, 0x8100, 0x0806]),
    body=st.binary(min_size=40, max_size=120),  # the kernel refuses test runs shorter than an IP header
)
def test_malformed_frames_always_pass_and_never_crash(datapath, ethertype, body):
    _, fd = datapath
    assert run(fd, eth(ethertype) + body) == TC_ACT_UNSPEC


def test_truncated_headers_are_counted_as_malformed(mon):
    m, fd = mon
    before = m.counter_values()["malformed"]
    full = ipv4(6, tcp(0x02))
    bad_version = full[:14] + bytes([0x55]) + full[15:]
    for frame in (full[: 14 + 20 + 5], bad_version):  # TCP header cut short; IP version 5
        run(fd, frame)
    assert m.counter_values()["malformed"] - before == 2
    assert m.evict() == []


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tcp_transport=st.booleans(), payload=st.binary(min_size=0, max_size=120), doff=st.integers(0, 15))
def test_garbage_dns_payloads_never_crash(datapath, tcp_transport, payload, doff):
    m, fd = datapath
    if tcp_transport:
        hdr = struct.pack("!HHIIBBHHH", 40000, 53, 1, 0, doff << 4, 0x18, 65535, 0, 0)
        frame = ipv4(6, hdr + payload)
    else:
        frame = ipv4(17, udp(dport=53, payload=payload))
    assert run(fd, frame) == TC_ACT_UNSPEC
    for f in m.peek():
        assert len(f.dns_qname) <= 64  # whatever the bytes, the name decodes


def test_fill_is_resynced_when_the_map_was_drained_by_someone_else(tiny):
    m, fd = tiny
    m.evict()
    for port in range(5):
        run(fd, ipv4(17, udp(sport=2000 + port)))
    m.flows.clear()  # as when a restart replaced the map: the counters say 5, the map holds 0
    assert m.fill() == 5
    m.resync_fill()
    assert m.fill() == 0
