"""conntrack datapath with real traffic between two namespaces: tuples, directions, counters, states.

The program sits on veth0 of namespace a (ingress and egress), so a's packets are the original
direction of the flows a opens and b's answers the reply direction.
"""

from __future__ import annotations

import ctypes as ct
import socket
import struct
import time

import pytest

from sluice.lab import netns_socket
from sluice.plugins.conntrack import Config, collector
from sluice.plugins.conntrack.table import CtReport, Tables, addr_bytes, read_stats
from tests.lab.test_conntrack_helpers import conntrack_on_pair, tcp_connection

pytestmark = pytest.mark.lab


@pytest.fixture(scope="module")
def ct_lab(kernel_ready, tmp_path_factory):
    config = Config(interfaces=["veth0"], tcp_table_size=1024, any_table_size=1024, host={"enabled": False})
    with conntrack_on_pair(tmp_path_factory.mktemp("state"), config) as (pair, pin, bpf):
        reports: list[CtReport] = []
        bpf[b"ct_reports"].open_ring_buffer(
            lambda _ctx, data, size: reports.append(CtReport.from_buffer_copy(ct.string_at(data, size)))
        )
        yield pair, pin, config, bpf, reports


def conns(pin_dir, proto, **match):
    with Tables(pin_dir) as t:
        found = [c for c in t.conns() if c.key.proto == proto]
    return [c for c in found if all(getattr(c.key, k) == v for k, v in match.items())]


def one(pin_dir, proto, **match):
    found = conns(pin_dir, proto, **match)
    assert len(found) == 1, found
    return found[0]


def one_when(ready, pin_dir, proto, timeout=5.0, **match):
    """``one(...)`` once ``ready`` holds for it: the reply path may run later under load."""
    deadline = time.monotonic() + timeout
    while True:
        c = one(pin_dir, proto, **match)
        if ready(c) or time.monotonic() > deadline:
            return c
        time.sleep(0.02)


def poll_reports(bpf):
    bpf.ring_buffer_poll(100)


def test_tcp_full_life_fin(ct_lab):
    pair, pin, config, bpf, reports = ct_lab
    cli, peer, srv = tcp_connection(pair)
    port = srv.getsockname()[1]
    cli.sendall(b"x" * 100)
    assert peer.recv(100)
    sport = cli.getsockname()[1]

    c = one(pin, 6, sport=sport, dport=port)
    assert bytes(c.key.saddr) == addr_bytes(pair.addr("a")) and bytes(c.key.daddr) == addr_bytes(
        pair.addr("b")
    )
    assert c.state() == "established"
    assert c.entry.tcp_flags_seen[0] & 0x12 == 0x12  # SYN, ACK from the client
    assert c.entry.tcp_flags_seen[1] & 0x12 == 0x12  # SYN-ACK from the server
    assert c.entry.packets[0] >= 3 and c.entry.packets[1] >= 1
    assert c.entry.bytes[0] >= 100 + 3 * 54
    now = time.clock_gettime(time.CLOCK_MONOTONIC)
    assert config.lifetimes.tcp_established - 2 <= c.remaining(now) <= config.lifetimes.tcp_established

    cli.shutdown(socket.SHUT_WR)  # FIN from the client: its side closes, the entry lives on
    assert peer.recv(10) == b""
    c = one_when(lambda c: c.state() != "established", pin, 6, sport=sport, dport=port)
    assert c.state() == "closing" and c.entry.flags & 0x1 and not c.entry.flags & 0x2
    peer.close()  # FIN from the server: both closing, the close timeout applies
    cli.recv(10)
    cli.close()
    srv.close()
    c = one_when(lambda c: c.state() == "closed", pin, 6, sport=sport, dport=port)
    assert c.state() == "closed"
    assert c.entry.tcp_flags_seen[0] & 0x01 and c.entry.tcp_flags_seen[1] & 0x01
    assert c.remaining(time.clock_gettime(time.CLOCK_MONOTONIC)) <= config.lifetimes.tcp_close

    # Expiry: GC at a "now" past the close timeout removes it (and only things expired by then).
    later = time.clock_gettime(time.CLOCK_MONOTONIC) + config.lifetimes.tcp_close + 1
    stats = collector(pin, config, clock=lambda: later).run()
    assert any(d.key.sport == sport and d.key.dport == port for d in stats.deleted_entries)
    assert conns(pin, 6, sport=sport, dport=port) == []

    poll_reports(bpf)
    mine = [r for r in reports if r.key.proto == 6 and r.key.sport == sport and r.key.dport == port]
    assert mine[0].reason == 1  # new
    # then the first reply, then only on new flags: no per-packet reports
    assert [r.reason for r in mine[1:]].count(5) == 1 and {r.reason for r in mine[1:]} == {2, 5}
    assert len(mine) < sum(c.entry.packets) + 1


def test_tcp_refused_rst_closes_both_sides(ct_lab):
    pair, pin, config, _, _ = ct_lab
    probe = netns_socket(pair.b, 4)
    probe.bind((pair.addr("b"), 0))
    port = probe.getsockname()[1]
    probe.close()  # nobody listens there now: the server answers RST
    cli = netns_socket(pair.a, 4)
    with pytest.raises(ConnectionRefusedError):
        cli.connect((pair.addr("b"), port))
    sport = cli.getsockname()[1]
    cli.close()
    c = one(pin, 6, sport=sport, dport=port)
    assert c.state() == "closed"  # RST before the handshake finished closes both sides
    assert c.entry.tcp_flags_seen[1] & 0x04
    assert c.entry.packets == [1, 1] or list(c.entry.packets) == [1, 1]


def test_tcp_midstream_packets_create_nothing(ct_lab):
    pair, pin, _, _, _ = ct_lab
    before = read_stats(pin)["midstream"]
    # A TCP ACK with no connection behind it (raw socket): b answers RST; neither creates an entry.
    raw = netns_socket(pair.a, 4, socket.SOCK_RAW, socket.IPPROTO_TCP)
    seg = struct.pack("!HHIIBBHHH", 40123, 9, 1, 1, 5 << 4, 0x10, 1024, 0, 0)
    raw.sendto(seg, (pair.addr("b"), 0))
    raw.close()
    deadline = time.monotonic() + 5
    while read_stats(pin)["midstream"] < before + 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert conns(pin, 6, sport=40123, dport=9) == []
    assert read_stats(pin)["midstream"] >= before + 1


def test_udp_v4_and_v6_counters_and_icmp_error_related(ct_lab):
    pair, pin, config, bpf, reports = ct_lab
    for family in (4, 6):
        srv = netns_socket(pair.b, family, socket.SOCK_DGRAM)
        srv.bind((pair.addr("b", family), 0))
        port = srv.getsockname()[1]
        cli = netns_socket(pair.a, family, socket.SOCK_DGRAM)
        cli.bind((pair.addr("a", family), 0))
        for _ in range(3):
            cli.sendto(b"q" * 10, (pair.addr("b", family), port))
        data, src = srv.recvfrom(100)
        srv.sendto(b"answer", src)
        assert cli.recv(100) == b"answer"
        sport = cli.getsockname()[1]
        c = one(pin, 17, sport=sport, dport=port)
        assert bytes(c.key.saddr) == addr_bytes(pair.addr("a", family))
        assert bytes(c.key.daddr) == addr_bytes(pair.addr("b", family))
        assert list(c.entry.packets) == [3, 1]
        hdr = 14 + (20 if family == 4 else 40) + 8
        assert list(c.entry.bytes) == [3 * (hdr + 10), hdr + 6]
        assert c.state() == "open"
        now = time.clock_gettime(time.CLOCK_MONOTONIC)
        assert config.lifetimes.non_tcp - 2 <= c.remaining(now) <= config.lifetimes.non_tcp
        srv.close()

        # The server port is closed now: b answers ICMP port unreachable, related to this flow.
        cli.sendto(b"late", (pair.addr("b", family), port))
        c = one_when(lambda c: c.entry.related, pin, 17, sport=sport, dport=port)
        assert c.entry.related == 1 and c.state() == "related"
        cli.close()
    poll_reports(bpf)
    udp = [r for r in reports if r.key.proto == 17]
    assert {r.reason for r in udp} >= {1, 4}  # new and related
    # Aggregation: three datagrams one way inside one report interval gave one report, not three.
    assert sum(1 for r in udp if r.reason == 1) == 2


def echo(netns: str, dst: str, ident: int, family: int = 4) -> None:
    """One echo request with identifier ``ident``; waits for the reply."""
    if family == 6:  # the kernel fills in ICMPv6 checksums of raw sockets
        sock = netns_socket(netns, 6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
        request = struct.pack("!BBHHH", 128, 0, 0, ident, 1) + b"sluicect"
    else:
        sock = netns_socket(netns, 4, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        body = struct.pack("!BBHHH", 8, 0, 0, ident, 1) + b"sluicect"
        s = sum(struct.unpack(f"!{len(body) // 2}H", body))
        s = (s >> 16) + (s & 0xFFFF)
        request = struct.pack("!BBHHH", 8, 0, ~(s + (s >> 16)) & 0xFFFF, ident, 1) + b"sluicect"
    with sock:
        sock.settimeout(2)
        sock.sendto(request, (dst, 0))
        while True:  # a v6 raw socket also sees other ICMPv6 (neighbour discovery)
            reply = sock.recv(200)
            if family == 4 or reply[0] == 129:
                return


@pytest.mark.parametrize("family", [4, 6])
def test_icmp_echo_tracked_by_id(ct_lab, family):
    pair, pin, _, _, _ = ct_lab
    proto = 1 if family == 4 else 58
    first, second = (0x5151, 0x5252) if family == 4 else (0x6161, 0x6262)
    echo(pair.a, pair.addr("b", family), first, family)
    echo(pair.a, pair.addr("b", family), first, family)
    echo(pair.a, pair.addr("b", family), second, family)
    c = one(pin, proto, sport=first, dport=0)
    assert bytes(c.key.saddr) == addr_bytes(pair.addr("a", family))
    assert bytes(c.key.daddr) == addr_bytes(pair.addr("b", family))
    assert list(c.entry.packets) == [2, 2]
    assert one(pin, proto, sport=second, dport=0).entry.packets[1] == 1
