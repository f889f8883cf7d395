"""tunnel end to end: host A's BPF program routes overlay traffic through VXLAN to peers B and C,
which decapsulate with standard kernel vxlan devices. Real packets, real capture."""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import socket
import struct
import subprocess
import threading
import time

import pytest

from sluice import lab as sl
from sluice.plugins.tunnel import devices
from sluice.plugins.tunnel.health import HealthChecker, HealthConfig
from sluice.plugins.tunnel.metrics import read_nexthop_stats
from sluice.plugins.tunnel.testing import (
    UNDERLAY,
    VNI_V4,
    VNI_V6,
    overlay_addr,
    overlay_lab,
    plugin_in_netns,
    tunnel_config,
)
from tests.netlab import ping, unique_prefix

pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(os.geteuid() != 0, reason="namespaces and BPF need root"),
]


@pytest.fixture(scope="module")
def topo(kernel_ready, tmp_path_factory):
    with overlay_lab(unique_prefix()) as names:
        state = tmp_path_factory.mktemp("tunnel-state")
        with plugin_in_netns(names["a"], tunnel_config(), state) as ctx:
            yield names, ctx


@contextlib.contextmanager
def capture(ns: str, dev: str, expr: str):
    """tcpdump in ``ns``; yields a list that holds the captured frames' bytes after the block."""
    path = f"/tmp/sluice-tunnel-{os.getpid()}-{threading.get_ident()}-{time.monotonic_ns()}.pcap"
    proc = subprocess.Popen(
        ["ip", "netns", "exec", ns, "tcpdump", "-i", dev, "--immediate-mode", "-U", "-n", "-w", path, expr],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    frames: list[bytes] = []
    try:
        proc.stderr.readline()  # "listening on ...": the capture is armed
        yield frames
        _written_out(path)
    finally:
        proc.terminate()
        proc.wait(timeout=5)
        with contextlib.suppress(FileNotFoundError):
            frames.extend(_read_pcap(path))
            os.unlink(path)


def _written_out(path: str, timeout: float = 10.0) -> None:
    """Wait until tcpdump has written frames and stopped writing: on a loaded host it runs
    late, and terminating it earlier loses what it has not read yet."""
    deadline, last = time.monotonic() + timeout, -1
    while time.monotonic() < deadline:
        size = os.path.getsize(path) if os.path.exists(path) else 0
        if size > 24 and size == last:  # more than the file header, unchanged for a while
            return
        last = size
        time.sleep(0.2)


def _read_pcap(path: str) -> list[bytes]:
    with open(path, "rb") as f:
        data = f.read()
    out, off = [], 24
    while off + 16 <= len(data):
        incl = struct.unpack_from("<I", data, off + 8)[0]
        out.append(data[off + 16 : off + 16 + incl])
        off += 16 + incl
    return out


def vxlan_vnis(frames: list[bytes]) -> set[int]:
    """VNIs of VXLAN packets (outer IPv4 or IPv6, UDP 4789) among the captured Ethernet frames."""
    vnis = set()
    for f in frames:
        ethertype = struct.unpack_from("!H", f, 12)[0]
        l4 = 14 + ((f[14] & 0xF) * 4 if ethertype == 0x0800 else 40)
        if len(f) >= l4 + 16 and struct.unpack_from("!H", f, l4 + 2)[0] == 4789:
            vnis.add(int.from_bytes(f[l4 + 12 : l4 + 15], "big"))
    return vnis


def test_devices_created_external_with_encap_mtu(topo):
    names, _ = topo
    with sl.in_netns(names["a"]):
        found = {d["name"]: d for d in devices.describe()}
    vx = found["sluice-vxlan"]
    assert vx["external"] and vx["port"] == 4789
    assert vx["mtu"] == 1500 - 70  # a v6 underlay is in use: 40 + 8 + 8 + 14
    assert vx["mac"] == "02:0a:62:01:01:ff"  # the tunnel MAC of A's underlay address
    assert "sluice-geneve" not in found  # only kinds in use


@pytest.mark.parametrize(("target", "vni", "family"), [("b", VNI_V4, 4), ("b6", VNI_V4, 4),
                                                        ("b-v6u", VNI_V6, 6), ("b6-v6u", VNI_V6, 6)])  # fmt: skip
def test_ping_through_vxlan_with_vni_on_the_wire(topo, target, vni, family):
    names, _ = topo
    outer = "ip6" if family == 6 else "ip"
    with capture(names["b"], "eth0", f"{outer} and udp port 4789") as frames:
        ping(names["a"], overlay_addr(target), timeout=5)
    assert vni in vxlan_vnis(frames)  # the echo left A encapsulated with the route's VNI


def test_tcp_through_vxlan(topo):
    names, _ = topo
    server = sl.netns_socket(names["b"], 4)
    server.bind((overlay_addr("b"), 5001))
    server.listen(1)
    payload = os.urandom(200_000)  # many full-size segments: the MTU accounting must hold
    received = bytearray()

    def serve():
        conn, _ = server.accept()
        with conn:
            while chunk := conn.recv(65536):
                received.extend(chunk)

    t = threading.Thread(target=serve)
    t.start()
    with capture(names["b"], "eth0", "udp port 4789") as frames, server:
        with sl.netns_socket(names["a"], 4) as client:
            client.settimeout(5)
            client.connect((overlay_addr("b"), 5001))
            client.sendall(payload)
        t.join(timeout=10)
    assert bytes(received) == payload
    assert vxlan_vnis(frames) == {VNI_V4}


class Flows:
    """UDP flows from A to the ECMP anycast address; receivers in B and C record who got what."""

    def __init__(self, names: dict, n: int = 32):
        self.receivers = {}
        for peer in "bc":
            s = sl.netns_socket(names[peer], 4, socket.SOCK_DGRAM)
            s.bind((overlay_addr("ecmp"), 7000))
            self.receivers[peer] = s
        self.senders = []
        for _ in range(n):
            s = sl.netns_socket(names["a"], 4, socket.SOCK_DGRAM)
            s.connect((overlay_addr("ecmp"), 7000))
            self.senders.append(s)

    def round(self, packets: int = 3) -> dict[int, set[str]]:
        """Send ``packets`` per flow; returns source port → the peers that received it."""
        for s in self.senders:
            for _ in range(packets):
                s.send(b"x")
        seen: dict[int, set[str]] = {}
        expected, got = packets * len(self.senders), 0
        deadline = time.monotonic() + 10
        peer_of = {r: peer for peer, r in self.receivers.items()}
        while got < expected and (left := deadline - time.monotonic()) > 0:
            for r in select.select(list(peer_of), [], [], left)[0]:
                _, (_, sport) = r.recvfrom(64)
                seen.setdefault(sport, set()).add(peer_of[r])
                got += 1
        assert got == expected, f"{expected - got} of {expected} packets lost"
        return seen

    def close(self):
        for s in [*self.senders, *self.receivers.values()]:
            s.close()


def where(seen: dict[int, set[str]]) -> dict[int, str]:
    assert all(len(peers) == 1 for peers in seen.values()), "a flow was split across peers"
    return {sport: next(iter(peers)) for sport, peers in seen.items()}


def test_ecmp_spreads_flows_and_withdrawal_moves_only_its_flows(topo):
    names, ctx = topo
    flows = Flows(names)
    try:
        first = where(flows.round())
        assert set(first.values()) == {"b", "c"}  # spread over both peers
        assert where(flows.round()) == first  # and each flow stays on its peer
        with sl.in_netns(names["a"]):
            ctx.tunnel.set_health("c", False)
        try:
            after = where(flows.round())
            assert set(after.values()) == {"b"}
            assert all(after[p] == "b" for p, peer in first.items() if peer == "b")  # b's flows never moved
        finally:
            with sl.in_netns(names["a"]):
                ctx.tunnel.set_health("c", True)
        assert where(flows.round()) == first  # restored: c gets exactly its flows back
    finally:
        flows.close()
    stats = {
        (s["underlay"], s["vni"])
        for s in read_nexthop_stats(ctx.pin_dir, ctx.tunnel.stats_slots)
        if s["packets"]
    }
    assert {(UNDERLAY[("b", 4)], VNI_V4), (UNDERLAY[("c", 4)], VNI_V4)} <= stats


def test_health_probe_withdraws_a_dead_peer_and_restores_it(topo):
    names, ctx = topo
    cfg = HealthConfig(  # a live peer must answer within timeout even on a loaded host
        enabled=True, interval=2, timeout=2, rise=1, fall=1, damping_suppress=50, damping_reuse=1
    )
    checker = HealthChecker(cfg, ctx.tunnel)

    def probe_round():
        with sl.in_netns(names["a"]):
            asyncio.run(checker.round())

    probe_round()
    assert ctx.tunnel.peer_health() == {"b": True, "c": True}
    flows = Flows(names, n=16)
    try:
        first = where(flows.round())
        sl.run_ip("-n", names["c"], "link", "set", "eth0", "down")  # c dies
        try:
            probe_round()  # one probe interval later (fall = 1)
            assert ctx.tunnel.peer_health()["c"] is False
            after = where(flows.round())
            assert set(after.values()) == {"b"}
            assert all(after[p] == "b" for p, peer in first.items() if peer == "b")
        finally:
            sl.run_ip("-n", names["c"], "link", "set", "eth0", "up")
            sl.wait_links_ready([(names["c"], "eth0")], timeout=30)
        for _ in range(20):  # the carrier and neighbour need a moment; each round is one probe
            probe_round()
            if ctx.tunnel.peer_health()["c"]:
                break
        assert ctx.tunnel.peer_health()["c"] is True
        assert where(flows.round()) == first
    finally:
        flows.close()
    assert ctx.tunnel_transitions[("c", "down", "probe")] >= 1


@pytest.mark.parametrize("kind", ["geneve", "ipip", "wireguard"])
def test_other_kinds_end_to_end(topo, kind):
    names, ctx = topo
    if not ctx.features.has(f"tunnel:{kind}"):
        pytest.skip(f"tunnel:{kind}: kernel has no {kind} device")
    pytest.fail(f"tunnel:{kind} is available here but has no end-to-end test yet")  # pragma: no cover
