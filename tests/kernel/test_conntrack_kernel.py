"""conntrack in the kernel without a lab: GC on real tables with a controlled clock, tenants, and
crafted or malformed packets through BPF_PROG_TEST_RUN."""

from __future__ import annotations

import asyncio
import ctypes as ct
import shutil
import socket
import struct
import time
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sluice.bpf import libbpf as lb
from sluice.bpf.loader import compile_program, load_tc
from sluice.bpf.maps import Map, MapType
from sluice.bpf.testrun import skb_ctx, test_run
from sluice.lab import in_netns, run_ip
from sluice.plugins.conntrack import Config, collector, configure_datapath, program
from sluice.plugins.conntrack.config import TenantIface
from sluice.plugins.conntrack.gc import GcFilter, GcStats
from sluice.plugins.conntrack.table import (
    REPORT_REASONS,
    CtEntry,
    CtKey,
    CtReport,
    CtSettings,
    Tables,
    addr_bytes,
    make_key,
    monotonic_s,
    read_stats,
    set_ifaces,
)
from tests.netlab import netns_pair

pytestmark = pytest.mark.kernel
TC_ACT_UNSPEC = -1
SIZE = 4096


@pytest.fixture(scope="module")
def ct_prog(kernel_ready):
    root = Path("/sys/fs/bpf") / f"sluice-test-{uuid.uuid4().hex[:8]}"
    root.mkdir()
    config = Config(interfaces=[], tcp_table_size=SIZE, any_table_size=SIZE, host={"enabled": False})
    try:
        bpf = compile_program("conntrack", program(config), bpffs=root)
        fd = load_tc(bpf, "conntrack", "ct_tc")
        pin = root / "sluice" / "conntrack"
        configure_datapath(pin, config)
        yield pin, config, fd, bpf
        bpf.cleanup()
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def tables(ct_prog):
    pin, config, _, _ = ct_prog
    with Tables(pin) as t:
        for tenant in t.tenants():
            if tenant != 0:
                t.remove_tenant(tenant)
        for _, _, m in t.each():
            m.clear()
        yield t


def udp_frame(src="10.1.0.1", dst="10.1.0.2", sport=1000, dport=53, payload=b"hello") -> bytes:
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0,
                     socket.inet_aton(src), socket.inet_aton(dst))  # fmt: skip
    return bytes.fromhex("020000000002020000000001") + b"\x08\x00" + ip + udp


def test_tenant_zero_tables_are_the_programs_templates(ct_prog, tables):
    pin, config, fd, bpf = ct_prog
    ids = {kind: lb.map_info(bpf[f"ct_{kind}_inner".encode()].map_fd).id for kind in ("tcp", "any")}
    for kind, template_id in ids.items():
        with tables.table(kind, 0) as m:
            assert m.info.id == template_id  # no second preallocated table per kind
    # Slot 0 holding anything else (a crash, an older build) is put right at the next start: the
    # datapath uses the templates by name for tenant 0, so user space must read those.
    with Map.create(MapType.LRU_HASH, CtKey, CtEntry, SIZE) as stray:
        tables.outer["any"].set(0, stray.fd)
    configure_datapath(pin, config)
    test_run(fd, udp_frame(sport=9400))
    with tables.table("any", 0) as m:
        assert m.info.id == ids["any"] and [k.sport for k in m.keys()] == [9400]  # noqa: SIM118 (a Map)


def test_restart_reuses_tables_and_reload_applies_settings(ct_prog, tables, tmp_path):
    pin, config, fd, _ = ct_prog
    test_run(fd, udp_frame(sport=9100))
    # A second compile against the same pins (an agent restart) finds the same tables and entries.
    again = compile_program("conntrack", program(config), bpffs=pin.parent.parent)
    try:
        configure_datapath(pin, config)
        with tables.table("any", 0) as m:
            assert [k.sport for k in m.keys()] == [9100]  # noqa: SIM118 (a Map)
            assert lb.map_info(again[b"ct_any_inner"].map_fd).id == m.info.id
        # A reload with other lifetimes: the next packet gets the new non-TCP lifetime.
        reloaded = config.model_copy(update={"lifetimes": config.lifetimes.model_copy(update={"non_tcp": 7})})
        configure_datapath(pin, reloaded)
        test_run(fd, udp_frame(sport=9101))
        with tables.table("any", 0) as m:
            e = m.get(make_key("10.1.0.1", "10.1.0.2", 9101, 53, 17))
        assert e.lifetime - int(monotonic_s()) in (6, 7)
    finally:
        configure_datapath(pin, config)
        again.cleanup()


def test_reports_only_on_news_or_once_per_interval(ct_prog, tables):
    pin, config, fd, bpf = ct_prog
    reports = []
    bpf[b"ct_reports"].open_ring_buffer(
        lambda _c, data, size: reports.append(CtReport.from_buffer_copy(ct.string_at(data, size)))
    )
    short = config.model_copy(
        update={"lifetimes": config.lifetimes.model_copy(update={"report_interval": 2})}
    )
    configure_datapath(pin, short)
    try:
        for _ in range(20):  # twenty packets inside one interval: one report (new)
            test_run(fd, udp_frame(sport=9300))
        time.sleep(2.05)  # two clock seconds pass (1 s could split a burst): one more report
        for _ in range(5):
            test_run(fd, udp_frame(sport=9300))
        bpf.ring_buffer_poll(100)
        mine = [REPORT_REASONS[r.reason] for r in reports if r.key.sport == 9300]
        assert mine == ["new", "interval"]
        assert [r.entry.packets[0] for r in reports if r.key.sport == 9300] == [1, 21]
    finally:
        configure_datapath(pin, config)


def fill(table, n: int, lifetime_of) -> list:
    keys = [make_key("10.2.0.1", "10.2.0.2", 1024 + i, 80, 17) for i in range(n)]
    table.update_batch((k, CtEntry(lifetime=lifetime_of(i))) for i, k in enumerate(keys))
    return keys


def test_gc_removes_exactly_the_expired(ct_prog, tables):
    pin, config, _, _ = ct_prog
    base = int(monotonic_s())
    with tables.table("any", 0) as m:
        fill(m, 200, lambda i: base + i)  # lifetimes base .. base+199
    seen = []
    gc = collector(pin, config, clock=lambda: base + 150)
    gc.observers.append(seen.append)
    stats = gc.run()
    assert stats.scanned == 200 and stats.deleted == 150
    assert sorted(e.entry.lifetime for e in stats.deleted_entries) == list(range(base, base + 150))
    with tables.table("any", 0) as m:
        assert sorted(e.lifetime for _, e in m.items()) == list(range(base + 150, base + 200))
    assert seen == [stats] and stats.alive["0/any"] == 50


def test_gc_dry_run_and_filters(ct_prog, tables):
    pin, config, _, _ = ct_prog
    base = int(monotonic_s()) + 1000  # nothing expired
    with tables.table("any", 0) as m:
        fill(m, 10, lambda i: base)
        m.set(make_key("10.3.0.1", "10.3.0.9", 5, 6, 17), CtEntry(lifetime=base))
    gc = collector(pin, config)
    assert gc.run(dry_run=True).deleted == 0
    assert gc.run(GcFilter(match_ips={addr_bytes("10.3.0.9")}), dry_run=True).deleted == 1
    with tables.table("any", 0) as m:
        assert m.count() == 11  # dry run deleted nothing
    stats = gc.run(GcFilter(expired=False, callback=lambda c: c.key.sport in (1024, 1025)))
    assert sorted(c.key.sport for c in stats.deleted_entries) == [1024, 1025]
    stats = gc.run(GcFilter(match_ips={addr_bytes("10.3.0.9")}))
    assert [c.key.dport for c in stats.deleted_entries] == [6]


def test_gc_interval_adapts_as_cilium(ct_prog, tables):
    pin, config, _, _ = ct_prog
    base = int(monotonic_s())
    gc = collector(pin, config, clock=lambda: base)
    assert gc.interval == 300
    gc.run()  # nothing deleted: grows by half
    assert gc.interval == 450
    with tables.table("any", 0) as m:
        fill(m, SIZE // 2, lambda i: base - 1)  # half the table expired: shrinks by (1 - 0.5)
    gc.run()
    assert gc.interval == 225
    with tables.table("any", 0) as m:
        fill(m, 400, lambda i: base - 1)  # ~10 %: unchanged
    gc.run()
    assert gc.interval == 225
    for _ in range(40):
        gc.run()
    assert gc.interval == config.gc.max_interval  # capped
    gc.interval = 12.0
    with tables.table("any", 0) as m:
        fill(m, SIZE // 2, lambda i: base - 1)
    gc.run()
    assert gc.interval == config.gc.min_interval  # floored


def test_gc_keeps_entries_the_datapath_refreshed_during_the_walk(ct_prog, tables):
    pin, config, fd, _ = ct_prog
    now = monotonic_s()
    with tables.table("any", 0) as m:
        for sport in (2000, 2001):
            test_run(fd, udp_frame(sport=sport))  # real entries, then aged: expired 10 s ago
            key = make_key("10.1.0.1", "10.1.0.2", sport, 53, 17)
            aged = m.get(key)
            aged.lifetime = int(now) - 10
            m.set(key, aged)
    gc = collector(pin, config, clock=lambda: now)
    stats = GcStats(started=now)
    picked = gc.scan(tables, GcFilter(), now, stats)
    assert sorted(c.key.sport for _, c in picked) == [2000, 2001]
    # After the walk saw both expired, a reply packet of the first flow renews it (now + 60 s).
    test_run(fd, udp_frame(src="10.1.0.2", dst="10.1.0.1", sport=53, dport=2000))
    gc.reap(tables, picked, GcFilter(), stats, dry_run=False)
    assert [c.key.sport for c in stats.deleted_entries] == [2001]
    assert stats.refreshed == 1
    with tables.table("any", 0) as m:
        ((key, entry),) = list(m.items())
    assert key.sport == 2000 and list(entry.packets) == [1, 1]


def test_two_tenants_keep_identical_tuples_apart(ct_prog, tables):
    pin, config, fd, _ = ct_prog
    with netns_pair() as pair, in_netns(pair.a):
        run_ip("link", "add", "ct1", "type", "veth", "peer", "name", "ct2")
        ifindexes = [socket.if_nametoindex("ct1"), socket.if_nametoindex("ct2")]
        tables.add_tenant(7, config.sizes)
        tables.add_tenant(8, config.sizes)
        set_ifaces(pin, {ifindexes[0]: (7, False), ifindexes[1]: (8, False)})
        frame = udp_frame(sport=3000, dport=4000)
        assert test_run(fd, frame, ctx=skb_ctx(ifindex=ifindexes[0])).retval == TC_ACT_UNSPEC
        test_run(fd, frame, ctx=skb_ctx(ifindex=ifindexes[1]))
        test_run(fd, frame, ctx=skb_ctx(ifindex=ifindexes[1]))
        by_tenant = {c.tenant: c for c in tables.conns() if c.key.sport == 3000}
        assert sorted(by_tenant) == [7, 8]
        assert by_tenant[7].entry.packets[0] == 1 and by_tenant[8].entry.packets[0] == 2
        assert by_tenant[7].entry.tenant == 7 and by_tenant[8].entry.ifindex == ifindexes[1]

        # Removing a tenant at run time: its packets find no table and are counted, nothing else.
        before = read_stats(pin)["no_table"]
        assert tables.remove_tenant(7)
        test_run(fd, frame, ctx=skb_ctx(ifindex=ifindexes[0]))
        assert read_stats(pin)["no_table"] == before + 1
        assert 7 not in tables.tenants() and {c.tenant for c in tables.conns()} == {8}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(min_size=54, max_size=120), st.sampled_from([b"\x08\x00", b"\x86\xdd"]))
def test_malformed_packets_pass_untouched(ct_prog, raw, ethertype):
    _, _, fd, _ = ct_prog
    frame = raw[:12] + ethertype + raw[14:]
    result = test_run(fd, frame)
    assert result.retval == TC_ACT_UNSPEC  # an observer never drops, whatever the bytes
    assert result.data_out == frame


def test_crafted_malformed_packets_are_counted_not_tracked(ct_prog, tables):
    pin, _, fd, _ = ct_prog
    good = udp_frame(sport=7000)
    bad_ihl = good[:14] + bytes([0x44]) + good[15:]
    truncated_tcp = good[:14] + good[14:23] + bytes([6]) + good[24:34] + b"\x00\x50"
    icmp_err = struct.pack("!BBHI", 3, 3, 0, 0) + b"\x45\x00"  # quotes 2 bytes of a header
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp_err), 1, 0, 64, 1, 0,
                     socket.inet_aton("10.1.0.2"), socket.inet_aton("10.1.0.1"))  # fmt: skip
    short_icmp_error = good[:14] + ip + icmp_err
    before = read_stats(pin)["malformed"]
    for frame in (bad_ihl, truncated_tcp, short_icmp_error):
        assert test_run(fd, frame).retval == TC_ACT_UNSPEC
    assert read_stats(pin)["malformed"] == before + 3
    assert list(tables.conns()) == []


def test_gc_wakes_early_when_the_datapath_fills_a_table(ct_prog, tables):
    pin, _, fd, _ = ct_prog
    config = Config(interfaces=[], tcp_table_size=SIZE, any_table_size=SIZE, gc={"pressure_ratio": 0.01})
    gc = collector(pin, config)

    async def scenario():
        task = asyncio.create_task(gc.loop(poll_s=0.02))
        while gc.runs < 1:
            await asyncio.sleep(0.01)
        assert not gc.under_pressure()
        for sport in range(8000, 8000 + int(0.01 * SIZE) + 1):  # 1 % of the table, created by packets
            test_run(fd, udp_frame(sport=sport))
        while gc.runs < 2:  # the interval is 450 s: only the pressure signal can start this run
            await asyncio.sleep(0.01)
        task.cancel()

    asyncio.run(asyncio.wait_for(scenario(), timeout=30))
    assert gc.wakeups == 1 and gc.interval > 300


def tcp_frame(src: str, dst: str, sport: int, dport: int, flags: int) -> bytes:
    tcp = struct.pack("!HHIIBBHHH", sport, dport, 1, 1, 5 << 4, flags, 1024, 0, 0)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 1, 0, 64, 6, 0,
                     socket.inet_aton(src), socket.inet_aton(dst))  # fmt: skip
    return bytes.fromhex("020000000002020000000001") + b"\x08\x00" + ip + tcp


SYN, ACK, FIN, RST = 0x02, 0x10, 0x01, 0x04
TX, RX, NON_SYN = 0x1, 0x2, 0x4
_ports = iter(range(20000, 60000))


def tcp_model(packets):
    """The datapath's TCP rules (Cilium's), in Python: the entry the packets should leave."""
    entry, creator = None, None
    for side, flags in packets:
        if entry is None:
            if flags & SYN and not flags & ACK:
                entry, creator = {"flags": 0, "seen": [flags, 0], "packets": [1, 0]}, side
            continue
        d = 0 if side == creator else 1
        entry["packets"][d] += 1
        if flags & SYN and not flags & ACK and entry["flags"] & (TX | RX):
            entry["flags"] &= ~(TX | RX | NON_SYN)
            entry["seen"] = [0, 0]
        handshake = entry["seen"][0] & SYN and entry["seen"][1] & SYN
        if flags & RST:
            entry["flags"] |= (RX if d else TX) if handshake else TX | RX
        elif flags & FIN:
            entry["flags"] |= RX if d else TX
        if not flags & SYN:
            entry["flags"] |= NON_SYN
        entry["seen"][d] |= flags
    return entry, creator


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from("ab"), st.sampled_from([SYN, SYN | ACK, ACK, FIN | ACK, RST, RST | ACK, ACK | 0x08])), max_size=12))  # fmt: skip
def test_tcp_state_machine_matches_the_model(ct_prog, packets):
    pin, _, fd, _ = ct_prog
    port = next(_ports)
    ends = {"a": ("10.5.0.1", port), "b": ("10.5.0.2", 443)}
    for side, flags in packets:
        (src, sport), (dst, dport) = ends[side], ends["b" if side == "a" else "a"]
        assert test_run(fd, tcp_frame(src, dst, sport, dport, flags)).retval == TC_ACT_UNSPEC
    want, creator = tcp_model(packets)
    with Tables(pin) as t:
        found = [c for c in t.conns(0) if c.key.proto == 6 and port in (c.key.sport, c.key.dport)]
    if want is None:
        assert found == []
        return
    (c,) = found
    assert (c.key.sport == port) == (creator == "a")  # keyed by the creator's direction
    assert c.entry.flags & (TX | RX | NON_SYN) == want["flags"]
    assert list(c.entry.tcp_flags_seen) == want["seen"]
    assert list(c.entry.packets) == want["packets"]


def test_config_naming_a_missing_interface_changes_nothing(ct_prog, tables):
    pin, config, _, _ = ct_prog
    bad = config.model_copy(
        update={
            "lifetimes": config.lifetimes.model_copy(update={"non_tcp": 5}),
            "tenants": [TenantIface(interface="no-such-if0", tenant=3)],
            "tenant_tables": [3],
        }
    )
    with pytest.raises(ValueError, match="no-such-if0"):
        configure_datapath(pin, bad)
    assert tables.tenants() == [0]
    with Map.open_pinned(pin / "ct_settings", ct.c_uint32, CtSettings) as m:
        assert m.get(0).non_tcp == config.lifetimes.non_tcp
