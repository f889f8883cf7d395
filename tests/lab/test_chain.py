"""TC chains: declared order, pass-through, chain end, and the per-packet trace, with real packets."""

import ctypes as ct
import socket
import subprocess
import time
from pathlib import Path

import pytest

from sluice.bpf import libbpf, tc
from sluice.bpf.maps import Map
from sluice.datapath import Datapath
from sluice.lab import in_netns, netns_socket
from sluice.programs import TC, Program, Tracepoint, phase_of
from sluice.trace import TraceCfg, TraceSession
from tests.netlab import netns_pair

pytestmark = pytest.mark.lab

PROBE_C = (
    Path(__file__).resolve().parents[1]
    / "plugins"
    / "sluice-chainprobe"
    / "sluice_chainprobe"
    / "chainprobe.bpf.c"
)


@pytest.fixture
def pair():
    with netns_pair() as p:
        yield p


def program(*points):
    """Programs at TC priorities: 100 → observe 0, 200 → classify 0, 300 → enforce 0 ..."""
    return Program(
        "chainprobe", PROBE_C, [TC("veth0", "ingress", fn, *phase_of(prio)) for fn, prio in points]
    )


def udp_delivered(pair, port: int) -> bool:
    """Send one datagram a → b:port; True when b's socket receives it."""
    rx = netns_socket(pair.b, 4, socket.SOCK_DGRAM)
    tx = netns_socket(pair.a, 4, socket.SOCK_DGRAM)
    with rx, tx:
        rx.bind((pair.addr("b"), port))
        rx.settimeout(0.5)
        tx.sendto(b"probe", (pair.addr("b"), port))
        try:
            return rx.recv(100) == b"probe"
        except TimeoutError:
            return False


def seen(dp_bpf, slot):
    return Map.from_bcc(dp_bpf[b"probe_seen"]).get(ct.c_uint32(slot))


def test_chain_runs_in_order_and_passes_through(pair, bpffs, state_dir):
    with in_netns(pair.b):
        dp = Datapath(bpffs, state_dir, [])
        bpf = dp.load("chainprobe", [program(("probe_count", 100), ("probe_drop", 300))])["chainprobe"]
        Map.from_bcc(bpf[b"probe_drop_port"]).set(ct.c_uint32(0), ct.c_uint32(9))
        with __import__("pyroute2").IPRoute() as ipr:
            chain = [(f.prio, f.name) for f in tc.list_filters(ipr, "veth0") if f.direction == "ingress"]
    assert chain == [
        (1, "sluice:core:sluice_prologue"),  # the core's parse-once program runs first
        (100, "sluice:chainprobe:probe_count"),
        (300, "sluice:chainprobe:probe_drop"),
    ]

    assert not udp_delivered(pair, 9)  # the second program drops it...
    assert udp_delivered(pair, 10)  # ...and passes the rest on to the stack
    assert seen(bpf, 0) >= 2 and seen(bpf, 2) >= 2  # both programs saw both packets

    # A program that ends the chain (TC_ACT_OK) placed between them: the drop never runs.
    with in_netns(pair.b):
        bpf = dp.load(
            "chainprobe", [program(("probe_count", 100), ("probe_pass", 200), ("probe_drop", 300))]
        )["chainprobe"]
    drops_before = seen(bpf, 2)
    assert udp_delivered(pair, 9)
    assert seen(bpf, 1) >= 1 and seen(bpf, 2) == drops_before

    with in_netns(pair.b):
        removed = dp.detach()
        with __import__("pyroute2").IPRoute() as ipr:
            assert tc.list_filters(ipr, "veth0") == []
    assert len(removed) == 4  # the three programs and the prologue they no longer need


def test_trace_shows_every_programs_verdict(pair, bpffs, state_dir):
    with in_netns(pair.b):
        dp = Datapath(bpffs, state_dir, [])
        bpf = dp.load("chainprobe", [program(("probe_count", 100), ("probe_drop", 300))])["chainprobe"]
    Map.from_bcc(bpf[b"probe_drop_port"]).set(ct.c_uint32(0), ct.c_uint32(9))
    try:
        with TraceSession(bpffs, proto=socket.IPPROTO_UDP, port=9) as trace:
            assert not udp_delivered(pair, 9)
            udp_delivered(pair, 10)  # filtered out by port
            events, deadline = [], time.monotonic() + 3
            while len(events) < 2 and time.monotonic() < deadline:
                events += trace.poll(100)
        assert [(e.fn, e.verdict, e.reason) for e in events] == [
            ("probe_count", "next", "counted"),
            ("probe_drop", "drop", "udp-port"),
        ]
        assert events[0].pkt == events[1].pkt  # one packet, seen by both programs
        assert events[0].src == pair.addr("a") and events[0].dport == 9 and events[0].plugin == "chainprobe"
    finally:
        with in_netns(pair.b):
            dp.detach()


def test_trace_switch_is_off_after_the_reader_closes(pair, bpffs, state_dir):
    with in_netns(pair.b):
        dp = Datapath(bpffs, state_dir, [])
        dp.load("chainprobe", [program(("probe_count", 100))])
    try:
        with TraceSession(bpffs):
            pass
        with Map.open_pinned(bpffs / "sluice" / "core" / "sluice_trace_cfg") as cfg:
            ((_, value),) = cfg.items()
            assert bytes(value)[:4] == b"\0\0\0\0"
    finally:
        with in_netns(pair.b):
            dp.detach()


def test_tracepoint_program_sees_real_drops(pair, bpffs, state_dir):
    drops = Program(
        "drops",
        PROBE_C.parent / "drops.bpf.c",
        [Tracepoint("skb:kfree_skb", "tracepoint__skb__kfree_skb")],
    )
    dp = Datapath(bpffs, state_dir, [])
    bpf = dp.load("chainprobe", [drops])["drops"]
    table = Map.from_bcc(bpf[b"probe_drops"])
    before = sum(dict(table.items()).values())
    tx = netns_socket(pair.a, 4, socket.SOCK_DGRAM)
    with tx:
        for _ in range(20):  # nobody listens on b:7: the kernel frees each datagram
            tx.sendto(b"x", (pair.addr("b"), 7))
    time.sleep(0.2)
    after = sum(dict(table.items()).values())
    assert after - before >= 20
    bpf.cleanup()


def test_clsact_stays_when_another_tool_filters_on_it(pair, bpffs, state_dir):
    ns = pair.b
    subprocess.run(
        ["ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", "veth0", "clsact"], capture_output=True
    )
    with in_netns(ns):
        dp = Datapath(bpffs, state_dir, [])
        dp.load("chainprobe", [program(("probe_count", 100))])  # sluice adds the clsact qdisc
    u32 = ["tc", "filter", "add", "dev", "veth0", "ingress", "prio", "5000", "protocol", "ip",
           "u32", "match", "ip", "dport", "7", "0xffff", "flowid", "1:1"]  # fmt: skip
    added = subprocess.run(["ip", "netns", "exec", ns, *u32], capture_output=True, text=True)
    if added.returncode:
        pytest.skip(f"cls_u32: {added.stderr.strip()}")
    with in_netns(ns):
        dp.detach()
    shown = subprocess.run(
        ["ip", "netns", "exec", ns, "tc", "filter", "show", "dev", "veth0", "ingress"],
        capture_output=True,
        text=True,
    ).stdout
    assert "u32" in shown and "sluice" not in shown  # ours gone, theirs (and the qdisc) kept


def test_a_trace_nobody_renews_switches_itself_off(pair, bpffs, state_dir):
    with in_netns(pair.b):
        dp = Datapath(bpffs, state_dir, [])
        dp.load("chainprobe", [program(("probe_count", 100))])
    try:
        with TraceSession(bpffs, proto=socket.IPPROTO_UDP, port=9) as trace:
            udp_delivered(pair, 9)
            assert [e.fn for e in trace.poll(300)] == ["probe_count"]
            expired = TraceCfg.from_buffer_copy(bytes(trace.cfg))
            expired.expires_ns = time.monotonic_ns() - 1  # as if the reader died a lease ago
            libbpf.map_update_elem(trace.cfg_fd, ct.c_uint32(0), expired)
            udp_delivered(pair, 9)
            assert trace.events.poll(300) == []  # the ring itself: polling it renews nothing
    finally:
        with in_netns(pair.b):
            dp.detach()
