"""The shared parser and its parse-once context, through BPF_PROG_TEST_RUN.

What a program gets from sluice_parse()/sluice_packet() for crafted frames; the L3-length bounds;
fragments; and the parse-once contract: the first program of a chain (the core's prologue, or the
first plugin) publishes its parse in this CPU's slot and stamps skb->cb[4]; a later program with a
matching stamp reuses it, one with a stale or forged stamp parses the frame again.
"""

from __future__ import annotations

import ctypes as ct
import ipaddress
import os
import shutil
import struct
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sluice.bpf import loader
from sluice.bpf.testrun import SkBuff, skb_ctx, test_run
from sluice.plugins.firewall import frames
from sluice.programs import Program

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(os.geteuid() != 0, reason="loading BPF programs needs root (CAP_BPF, CAP_NET_ADMIN)"),
]

DATA = Path(__file__).parent / "data"
PROLOGUE = Path(__file__).resolve().parents[2] / "core" / "bpf" / "prologue.bpf.c"
OK, NOT_IP, MALFORMED = 0, 1, 2
F_FRAGMENT, F_LATER_FRAG = 0x1, 0x2
STAMP = 4


class Flow(ct.Structure):
    _fields_ = [
        ("saddr", ct.c_uint8 * 16),
        ("daddr", ct.c_uint8 * 16),
        ("sport", ct.c_uint16),
        ("dport", ct.c_uint16),
        ("proto", ct.c_uint8),
        ("family", ct.c_uint8),
        ("tcp_flags", ct.c_uint8),
        ("flags", ct.c_uint8),
    ]


class Pkt(ct.Structure):
    _fields_ = [
        ("flow", Flow),
        ("l3_off", ct.c_uint16),
        ("l4_off", ct.c_uint16),
        ("vlan_id", ct.c_uint16),
        ("dscp", ct.c_uint8),
        ("ttl", ct.c_uint8),
        ("ip_len", ct.c_uint32),
        ("frag_id", ct.c_uint32),
        ("flow_hash", ct.c_uint32),
        ("flow_hash_sym", ct.c_uint32),
    ]


class Seen(ct.Structure):
    _fields_ = [("pkt", Pkt), ("result", ct.c_int32), ("stamp", ct.c_uint32)]


class Probe:
    def __init__(self, bpf, prologue, root: Path):
        self.copy_fd = loader.load_tc(bpf, "probe", "parse_probe_copy")
        self.ptr_fd = loader.load_tc(bpf, "probe", "parse_probe_ptr")
        self.prologue_fd = loader.load_tc(prologue, "core", "sluice_prologue")
        self.seen_table = bpf[b"parse_seen"]

    def run(self, frame: bytes, fd: int | None = None, cb=()) -> tuple[Seen, list[int]]:
        r = test_run(fd or self.ptr_fd, frame, ctx=skb_ctx(cb=cb), data_size_out=0)
        seen = Seen.from_buffer_copy(bytes(self.seen_table[ct.c_int(0)]))
        return seen, cb_of(r.ctx_out)

    def parse(self, frame: bytes) -> Seen:
        return self.run(frame)[0]


def cb_of(ctx_out: bytes) -> list[int]:
    return list(SkBuff.from_buffer_copy(ctx_out.ljust(ct.sizeof(SkBuff), b"\0")).cb)


@pytest.fixture(scope="module")
def probe(kernel_ready):
    root = Path("/sys/fs/bpf") / f"sluice-test-{uuid.uuid4().hex[:8]}"
    root.mkdir()
    # one CPU: the parse-once slot is per CPU, and the chain's programs run on one CPU
    affinity = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(affinity)})
    bpf = prologue = None
    try:
        bpf = loader.compile_program("probe", Program("probe", DATA / "parse_probe.bpf.c"), bpffs=root)
        prologue = loader.compile_program("core", Program("prologue", PROLOGUE), bpffs=root)
        yield Probe(bpf, prologue, root)
    finally:
        os.sched_setaffinity(0, affinity)
        for b in (bpf, prologue):
            if b is not None:
                b.cleanup()
        shutil.rmtree(root, ignore_errors=True)


def addr(text: str) -> bytes:
    a = ipaddress.ip_address(text)
    return (b"\0" * 10 + b"\xff\xff" + a.packed) if a.version == 4 else a.packed


def ip4(src, dst, proto, body, *, ident=1, frag=0, total=None, options=b"", vlans=()):
    hl = 20 + len(options)
    length = total if total is not None else hl + len(body)
    hdr = struct.pack(
        "!BBHHHBBH4s4s",
        0x40 | (hl // 4),
        0x28,
        length,
        ident,
        frag,
        61,
        proto,
        0,
        ipaddress.ip_address(src).packed,
        ipaddress.ip_address(dst).packed,
    )
    return frames.eth(0x0800, vlans) + hdr + options + body


def ip6(src, dst, first_next, exts, body, *, plen=None):
    length = plen if plen is not None else len(exts) + len(body)
    hdr = struct.pack(
        "!IHBB16s16s",
        6 << 28,
        length,
        first_next,
        33,
        ipaddress.ip_address(src).packed,
        ipaddress.ip_address(dst).packed,
    )
    return frames.eth(0x86DD) + hdr + exts + body


TCP = frames.l4(6, 1111, 2222, "SA")
UDP = frames.l4(17, 3333, 53, payload=b"abcd")


def test_ipv4_tcp_fields(probe):
    s = probe.parse(ip4("10.0.0.1", "10.0.0.2", 6, TCP))
    f = s.pkt.flow
    assert s.result == OK
    assert (bytes(f.saddr), bytes(f.daddr)) == (addr("10.0.0.1"), addr("10.0.0.2"))
    assert (f.sport, f.dport, f.proto, f.family, f.tcp_flags, f.flags) == (1111, 2222, 6, 4, 0x12, 0)
    assert (s.pkt.l3_off, s.pkt.l4_off, s.pkt.ip_len, s.pkt.ttl, s.pkt.dscp) == (14, 34, 40, 61, 0x28 >> 2)


def test_ipv4_options_and_qinq_move_the_transport_header(probe):
    s = probe.parse(ip4("10.0.0.1", "10.0.0.2", 17, UDP, options=bytes(8), vlans=(100, 200)))
    assert s.result == OK
    assert (s.pkt.vlan_id, s.pkt.l3_off, s.pkt.l4_off) == (100, 22, 22 + 28)
    assert (s.pkt.flow.sport, s.pkt.flow.dport, s.pkt.flow.proto) == (3333, 53, 17)


def test_three_vlan_tags_are_malformed(probe):
    frame = ip4("10.0.0.1", "10.0.0.2", 17, UDP, vlans=(1, 2, 3))
    assert probe.parse(frame).result == MALFORMED


def test_ipv6_extension_chain(probe):
    exts = bytes([60, 0, 1, 4, 0, 0, 0, 0]) + bytes([6, 1]) + bytes(14)  # hop-by-hop, dstopts (16 bytes)
    s = probe.parse(ip6("fd00::1", "fd00::2", 0, exts, TCP))
    assert s.result == OK
    assert (s.pkt.flow.proto, s.pkt.flow.family, s.pkt.flow.dport) == (6, 6, 2222)
    assert (s.pkt.l4_off, s.pkt.ip_len) == (14 + 40 + 24, 40 + 24 + 20)


def test_hop_by_hop_not_first_is_malformed(probe):
    exts = bytes([0, 0, 1, 4, 0, 0, 0, 0]) + bytes([6, 0, 1, 4, 0, 0, 0, 0])  # dstopts, then hop-by-hop
    assert probe.parse(ip6("fd00::1", "fd00::2", 60, exts, TCP)).result == MALFORMED


def test_not_ip(probe):
    assert probe.parse(frames.eth(0x0806) + bytes(28)).result == NOT_IP


@pytest.mark.parametrize(
    ("frame", "why"),
    [
        (ip4("10.0.0.1", "10.0.0.2", 6, TCP, total=20 + 19), "tot_len ends inside the TCP header"),
        (ip4("10.0.0.1", "10.0.0.2", 6, TCP, total=20 + 20 + 1), "tot_len beyond the frame"),
        (ip4("10.0.0.1", "10.0.0.2", 6, TCP, total=12), "tot_len below the IP header"),
        (
            ip4("10.0.0.1", "10.0.0.2", 17, struct.pack("!HHHH", 1, 2, 40, 0)),
            "UDP length beyond the datagram",
        ),
        (ip4("10.0.0.1", "10.0.0.2", 17, struct.pack("!HHHH", 1, 2, 4, 0)), "UDP length below its header"),
        (ip4("10.0.0.1", "10.0.0.2", 1, bytes([8, 0, 0, 0])), "ICMP shorter than 8 bytes"),
        (ip6("fd00::1", "fd00::2", 6, b"", TCP + bytes(8), plen=8), "plen ends inside the TCP header"),
        (ip6("fd00::1", "fd00::2", 6, b"", TCP, plen=21), "plen beyond the frame"),
        (ip6("fd00::1", "fd00::2", 0, bytes([6, 3]) + bytes(6), TCP), "extension longer than the payload"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_l3_length_bounds_every_read(probe, frame, why):
    assert probe.parse(frame).result == MALFORMED, why


def test_ipv4_fragments(probe):
    first = probe.parse(ip4("10.0.0.1", "10.0.0.2", 6, TCP + bytes(8), ident=0xABCD, frag=0x2000))
    assert first.result == OK
    assert (first.pkt.flow.flags, first.pkt.frag_id, first.pkt.flow.dport) == (F_FRAGMENT, 0xABCD, 2222)
    later = probe.parse(ip4("10.0.0.1", "10.0.0.2", 6, bytes(16), ident=0xABCD, frag=4))
    assert later.result == OK
    assert (later.pkt.flow.flags, later.pkt.frag_id) == (F_FRAGMENT | F_LATER_FRAG, 0xABCD)
    assert (later.pkt.flow.sport, later.pkt.flow.dport) == (0, 0)
    # a first fragment without its whole TCP header, and a later one overlapping it
    assert probe.parse(ip4("10.0.0.1", "10.0.0.2", 6, TCP[:12], frag=0x2000)).result == MALFORMED
    assert probe.parse(ip4("10.0.0.1", "10.0.0.2", 6, bytes(16), frag=1)).result == MALFORMED


def test_ipv6_fragments(probe):
    hop = bytes([44, 0, 1, 4, 0, 0, 0, 0])
    first = probe.parse(ip6("fd00::1", "fd00::2", 0, hop + struct.pack("!BBHI", 6, 0, 1, 0xDEADBEEF), TCP))
    assert first.result == OK
    assert (first.pkt.flow.flags, first.pkt.frag_id, first.pkt.flow.dport) == (F_FRAGMENT, 0xDEADBEEF, 2222)
    later = probe.parse(ip6("fd00::1", "fd00::2", 44, struct.pack("!BBHI", 58, 0, 64, 7), bytes(16)))
    assert later.result == OK
    assert (later.pkt.flow.flags, later.pkt.frag_id, later.pkt.flow.proto) == (
        F_FRAGMENT | F_LATER_FRAG,
        7,
        58,
    )
    atomic = probe.parse(ip6("fd00::1", "fd00::2", 44, struct.pack("!BBHI", 6, 0, 0, 9), TCP))
    assert (atomic.result, atomic.pkt.flow.flags) == (OK, 0)  # offset 0, no M: a whole datagram
    two = struct.pack("!BBHI", 44, 0, 1, 1) + struct.pack("!BBHI", 6, 0, 1, 2)
    assert probe.parse(ip6("fd00::1", "fd00::2", 44, two, TCP)).result == MALFORMED


def test_flow_hashes(probe):
    there = probe.parse(ip4("10.0.0.1", "10.0.0.2", 6, frames.l4(6, 1111, 2222))).pkt
    back = probe.parse(ip4("10.0.0.2", "10.0.0.1", 6, frames.l4(6, 2222, 1111))).pkt
    other = probe.parse(ip4("10.0.0.1", "10.0.0.2", 6, frames.l4(6, 1111, 2223))).pkt
    assert there.flow_hash_sym == back.flow_hash_sym
    assert there.flow_hash != back.flow_hash
    assert other.flow_hash != there.flow_hash and other.flow_hash_sym != there.flow_hash_sym


def test_copy_and_pointer_accessors_agree(probe):
    frame = ip4("10.0.0.1", "10.0.0.2", 6, TCP)
    by_copy, _ = probe.run(frame, probe.copy_fd)
    by_ptr, _ = probe.run(frame, probe.ptr_fd)
    assert bytes(by_copy.pkt) == bytes(by_ptr.pkt) and by_copy.result == by_ptr.result == OK


def test_a_later_program_reuses_the_prologues_parse(probe):
    """Run the prologue, carry its skb->cb into the next program's run, and change the frame in
    between (same length): a program that reused the parse sees the old port, one that parsed
    again would see the new one."""
    frame = ip4("10.0.0.1", "10.0.0.2", 6, frames.l4(6, 1111, 2222))
    changed = ip4("10.0.0.1", "10.0.0.2", 6, frames.l4(6, 1111, 3333))
    r = test_run(probe.prologue_fd, frame, ctx=skb_ctx(), data_size_out=0)
    cb = cb_of(r.ctx_out)
    assert r.retval == -1 and cb[STAMP] != 0  # SLUICE_NEXT, stamped
    seen, cb_after = probe.run(changed, probe.ptr_fd, cb=cb)
    assert seen.pkt.flow.dport == 2222 and cb_after[STAMP] == cb[STAMP]
    seen, _ = probe.run(changed, probe.copy_fd, cb=cb)
    assert seen.pkt.flow.dport == 2222


@pytest.mark.parametrize("forged", [0, 1, 0xFFFFFFFF])
def test_a_stale_or_forged_stamp_parses_again(probe, forged):
    frame = ip4("10.0.0.1", "10.0.0.2", 6, frames.l4(6, 1111, 2222))
    changed = ip4("10.0.0.1", "10.0.0.2", 6, frames.l4(6, 1111, 3333))
    cb = cb_of(test_run(probe.prologue_fd, frame, ctx=skb_ctx(), data_size_out=0).ctx_out)
    if cb[STAMP] == forged:
        forged ^= 0x5A5A
    cb[STAMP] = forged
    seen, cb_after = probe.run(changed, cb=cb)
    assert seen.pkt.flow.dport == 3333
    assert cb_after[STAMP] not in (0, forged)  # it published its own parse for the programs after it


def test_a_stamp_from_another_length_parses_again(probe):
    frame = ip4("10.0.0.1", "10.0.0.2", 6, frames.l4(6, 1111, 2222))
    longer = ip4("10.0.0.1", "10.0.0.2", 6, frames.l4(6, 1111, 3333, payload=b"x"))
    cb = cb_of(test_run(probe.prologue_fd, frame, ctx=skb_ctx(), data_size_out=0).ctx_out)
    assert probe.run(longer, cb=cb)[0].pkt.flow.dport == 3333


BASE = [
    ip4("10.0.0.1", "10.0.0.2", 6, TCP),
    ip4("10.0.0.1", "10.0.0.2", 17, UDP, options=bytes(4), vlans=(7,)),
    ip4("10.0.0.1", "10.0.0.2", 6, TCP + bytes(8), frag=0x2000),
    ip6("fd00::1", "fd00::2", 0, bytes([44, 0, 1, 4, 0, 0, 0, 0]) + struct.pack("!BBHI", 6, 0, 1, 5), TCP),
    ip6("fd00::1", "fd00::2", 17, b"", UDP),
]


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(
    base=st.sampled_from(BASE),
    edits=st.lists(st.tuples(st.integers(0, 119), st.integers(0, 255)), max_size=6),
    cut=st.integers(34, 140),
)
def test_mutated_frames_stay_inside_the_datagram(probe, base, edits, cut):
    frame = bytearray(base)
    for pos, value in edits:
        if pos < len(frame):
            frame[pos] = value
    frame = bytes(frame[:cut])
    try:
        s = probe.parse(frame)
    except OSError:
        return  # the kernel's test run refuses frames too short for their ethertype
    assert s.result in (OK, NOT_IP, MALFORMED)
    if s.result != OK:
        return
    p = s.pkt
    end = p.l3_off + p.ip_len
    assert end <= len(frame)
    minimum = {6: 20, 17: 8, 1: 8, 58: 8}.get(p.flow.proto, 0)
    if not p.flow.flags & F_LATER_FRAG:
        assert p.l4_off + minimum <= end
