"""Host (netfilter) conntrack over netlink in lab namespaces with nftables rules: queries, events,
NAT translations from real DNAT and SNAT, and the circuit breaker under an event storm."""

from __future__ import annotations

import ipaddress
import socket
import struct
import subprocess
import threading
import time

import pytest
from click.testing import CliRunner

from sluice.lab import netns_socket, run_ip
from sluice.plugins.conntrack import HostConfig
from sluice.plugins.conntrack.cli import ct
from sluice.plugins.conntrack.host import HostConntrack
from sluice.sessions import FlowTuple
from tests.lab.test_conntrack_helpers import tcp_connection
from tests.netlab import netns_pair

pytestmark = pytest.mark.lab

B_RULES = """
table inet sluicect {
    chain input { type filter hook input priority 0; ct state established,related accept; }
}
table ip sluicenat {
    chain prerouting { type nat hook prerouting priority -100; udp dport 5555 dnat to 10.99.0.2:6666; }
}
"""
A_RULES = """
table ip sluicenat {
    chain postrouting { type nat hook postrouting priority 100; ip daddr 10.99.0.2 udp dport 7777 snat to 10.99.0.11; }
}
"""
A_SNAT = "10.99.0.11"


def nft(ns: str, rules: str) -> None:
    if not shutil_which("nft"):
        pytest.skip("nftables: no nft binary")
    subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=rules, text=True, check=True)


def shutil_which(name):
    import shutil

    return shutil.which(name)


@pytest.fixture(scope="module")
def nat_pair():
    with netns_pair() as pair:
        run_ip("-n", pair.a, "addr", "add", f"{A_SNAT}/24", "dev", pair.ifname)
        nft(pair.b, B_RULES)
        nft(pair.a, A_RULES)
        yield pair


def flow(src, dst, sport, dport, proto):
    return FlowTuple(ipaddress.ip_address(src), ipaddress.ip_address(dst), sport, dport, proto)


def wait_for(predicate, poll, timeout=3.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        poll()
        if predicate():
            return True
    return False


def test_dump_get_exists_and_events_see_a_real_connection(nat_pair):
    pair = nat_pair
    host = HostConntrack(HostConfig(), netns=pair.b)
    seen = []
    host.observers.append(lambda kind, conn: seen.append((kind, conn)))
    host.open_events(1.0)
    try:
        cli, peer, srv = tcp_connection(pair)
        port = srv.getsockname()[1]
        peer.sendall(b"hi")
        cli.recv(10)
        sport = cli.getsockname()[1]
        mine = flow(pair.addr("a"), pair.addr("b"), sport, port, 6)
        assert wait_for(lambda: any(k == "new" and c.orig == mine for k, c in seen), lambda: host.poll(0.1))

        dumped = [c for c in host.dump() if c.orig == mine]
        assert len(dumped) == 1 and dumped[0].tcp_state == "ESTABLISHED" and not dumped[0].natted
        assert f"src={pair.addr('a')} dst={pair.addr('b')} sport={sport} dport={port}" in dumped[0].line()
        got = host.get(mine)
        assert got is not None and got.reply == flow(pair.addr("b"), pair.addr("a"), port, sport, 6)
        assert host.exists(mine) and not host.exists(flow(pair.addr("a"), pair.addr("b"), 1, 2, 6))
        for s in (cli, peer, srv):
            s.close()
    finally:
        host.stop()


def test_nat_translations_from_real_dnat_and_snat(nat_pair):
    pair = nat_pair
    at_b = HostConntrack(HostConfig(), netns=pair.b)  # DNAT happens in b
    at_a = HostConntrack(HostConfig(), netns=pair.a)  # SNAT happens in a
    at_b.open_events(1.0)
    at_a.open_events(1.0)
    try:
        dnat_srv = netns_socket(pair.b, 4, socket.SOCK_DGRAM)
        dnat_srv.bind((pair.addr("b"), 6666))
        snat_srv = netns_socket(pair.b, 4, socket.SOCK_DGRAM)
        snat_srv.bind((pair.addr("b"), 7777))
        cli = netns_socket(pair.a, 4, socket.SOCK_DGRAM)
        cli.bind((pair.addr("a"), 0))
        sport = cli.getsockname()[1]
        cli.sendto(b"to-vip", (pair.addr("b"), 5555))
        assert dnat_srv.recv(100) == b"to-vip"  # the DNAT rule delivered it to 6666
        cli.sendto(b"snat-me", (pair.addr("b"), 7777))
        _, seen_from = snat_srv.recvfrom(100)
        assert seen_from[0] == A_SNAT

        vip = flow(pair.addr("a"), pair.addr("b"), sport, 5555, 17)
        assert wait_for(lambda: at_b.nat.lookup(vip) is not None, lambda: at_b.poll(0.1))
        t = at_b.nat.lookup(vip)
        assert t.reply == flow(pair.addr("b"), pair.addr("a"), 6666, sport, 17)
        # The same translation answers for the flow as seen after DNAT.
        assert at_b.nat.lookup(flow(pair.addr("a"), pair.addr("b"), sport, 6666, 17)) == t

        out = flow(pair.addr("a"), pair.addr("b"), sport, 7777, 17)
        assert wait_for(lambda: at_a.nat.lookup(out) is not None, lambda: at_a.poll(0.1))
        t = at_a.nat.lookup(out)
        assert t.reply.src == ipaddress.ip_address(pair.addr("b")) and t.reply.dst == ipaddress.ip_address(
            A_SNAT
        )
        assert t.reply.dport == seen_from[1]

        # The hook answers from the cache, and a plain flow has no translation.
        from sluice.plugins import conntrack as plugin

        plugin.STATE.host = at_b
        try:
            assert plugin.sluice_nat_lookup(flow=vip).reply.sport == 6666
            assert plugin.sluice_nat_lookup(flow=flow(pair.addr("a"), pair.addr("b"), 1, 2, 17)) is None
        finally:
            plugin.STATE.host = None

        # `sluice ct nat` answers the same from the host's table, by either tuple.
        for asked in (
            f"udp {pair.addr('a')}:{sport} {pair.addr('b')}:5555",
            f"udp {pair.addr('a')}:{sport} {pair.addr('b')}:6666",
        ):
            out = CliRunner().invoke(ct, ["nat", "--netns", pair.b, asked])
            assert out.exit_code == 0, out.output
            assert f"reply {pair.addr('b')}:6666 -> {pair.addr('a')}:{sport}" in out.output

        # A fresh consumer fills its cache from a dump of what exists already.
        fresh = HostConntrack(HostConfig(events=False), netns=pair.b)
        fresh.start()
        assert fresh.nat.lookup(vip) is not None
        for s in (cli, dnat_srv, snat_srv):
            s.close()
    finally:
        at_a.stop()
        at_b.stop()


def test_events_of_other_namespaces_carry_their_nsid(nat_pair):
    pair = nat_pair
    # The veth between them already gave b an id in a: `nsid N (iproute2 netns name: B)`.
    ids = run_ip("-n", pair.a, "netns", "list-id").stdout.splitlines()
    nsid = int(next(ln.split()[1] for ln in ids if ln.rstrip(")").endswith(pair.b)))
    host = HostConntrack(HostConfig(all_netns=True), netns=pair.a)
    seen = []
    host.observers.append(lambda kind, conn: seen.append(conn))
    host.open_events(1.0)
    try:
        cli, peer, srv = tcp_connection(pair)  # tracked in b (its input chain has a ct rule)
        sport, port = cli.getsockname()[1], srv.getsockname()[1]
        mine = flow(pair.addr("a"), pair.addr("b"), sport, port, 6)
        assert wait_for(lambda: any(c.orig == mine and c.nsid == nsid for c in seen), lambda: host.poll(0.1))
        assert host.nat.lookup(mine) is None  # other namespaces never feed the NAT cache
        for s in (cli, peer, srv):
            s.close()
    finally:
        host.stop()


def udp_storm(ns: str, dst: str, first_port: int, count: int) -> None:
    """``count`` one-datagram UDP flows (distinct source ports) from ``ns`` to ``dst``: one NEW each."""
    raw = netns_socket(ns, 4, socket.SOCK_RAW, socket.IPPROTO_UDP)
    with raw:
        for i in range(count):
            raw.sendto(struct.pack("!HHHH", 1024 + (first_port + i) % 60000, 9, 8, 0), (dst, 0))


@pytest.mark.slow
def test_circuit_breaker_trips_and_samples_under_an_event_storm(nat_pair):
    pair = nat_pair
    host = HostConntrack(HostConfig(event_rate_limit=500), netns=pair.b)
    host.open_events(1.0)
    consumer = threading.Thread(target=host.consume_forever, kwargs={"tick_s": 0.2}, daemon=True)
    consumer.start()
    try:
        sent = 0
        for _ in range(8):  # about 4K flows per tick: far above 500/s
            udp_storm(pair.a, pair.addr("b"), sent, 4000)
            sent += 4000
            time.sleep(0.2)
        deadline = time.monotonic() + 5
        while host.breaker.throttles == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert host.breaker.throttles >= 1 and host.breaker.rate < 1.0
        assert host.stats.reopens >= 1  # the subscription was reopened with the sampler
        assert host.stats.received < sent  # the kernel dropped the unsampled part
        assert consumer.is_alive()
        # Still consuming: more flows keep arriving (sampled, then at full rate once it is calm).
        before = host.stats.received
        deadline = time.monotonic() + 10
        while host.stats.received == before and time.monotonic() < deadline:
            udp_storm(pair.a, pair.addr("b"), sent, 300)
            sent += 300
            time.sleep(0.2)
        assert host.stats.received > before and consumer.is_alive()
    finally:
        host.stop()
        consumer.join(timeout=3)
    assert not consumer.is_alive()  # stop() ends the consumer loop
