"""sluice.bpf.testrun: verdicts of a tiny TC program on crafted frames via BPF_PROG_TEST_RUN."""

from __future__ import annotations

import errno
import os
import struct
from pathlib import Path

import pytest

from sluice.bpf import libbpf as lb
from sluice.bpf.testrun import SkBuff, skb_ctx, test_run

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(os.geteuid() != 0, reason="loading BPF programs needs root (CAP_BPF, CAP_NET_ADMIN)"),
]

DATA = Path(__file__).parent / "data"
TC_ACT_UNSPEC, TC_ACT_SHOT = -1, 2
UDP, TCP = 17, 6


def eth(ethertype: int) -> bytes:
    return bytes.fromhex("020000000002020000000001") + struct.pack("!H", ethertype)


def l4(dport: int) -> bytes:
    """An 8-byte UDP/TCP-port-sized header with ``dport``, then a 4-byte payload."""
    return struct.pack("!HHHH", 40000, dport, 8 + 4, 0) + b"ping"


def frame(proto: int = UDP, dport: int = 9, *, ihl: int = 5, frag: int = 0) -> bytes:
    """Ethernet + IPv4 (``ihl`` words of header) + L4."""
    total = ihl * 4 + 12
    ip = struct.pack(
        "!BBHHHBBH4s4s", 0x40 | ihl, 0, total, 1, frag, 64, proto, 0, bytes([10, 0, 0, 1]), bytes(4)
    )
    return eth(0x0800) + ip + bytes(ihl * 4 - 20) + l4(dport)


def frame6(dport: int = 9) -> bytes:
    ip6 = struct.pack("!IHBB16s16s", 6 << 28, 12, UDP, 64, bytes(15) + b"\x01", bytes(15) + b"\x02")
    return eth(0x86DD) + ip6 + l4(dport)


@pytest.fixture(scope="module")
def prog_fd(kernel_ready):  # kernel_ready (tests/conftest.py): headers for BCC
    bcc = pytest.importorskip("bcc", reason="BCC's Python bindings (python3-bpfcc) are not installed")
    try:
        b = bcc.BPF(src_file=str(DATA / "udp_discard.bpf.c").encode())
    except Exception as e:
        pytest.fail(
            f"BCC could not compile udp_discard.bpf.c: {e}; without matching headers set BCC_KERNEL_SOURCE"
        )
    fn = b.load_func(b"udp_discard", bcc.BPF.SCHED_CLS)
    yield fn.fd
    b.cleanup()


def test_program_info(prog_fd):
    info = lb.prog_info(prog_fd)
    assert info.type == lb.ProgType.SCHED_CLS and info.type_name == "sched_cls"
    assert info.name == "udp_discard" and len(info.tag) == 16 and info.id > 0


@pytest.mark.parametrize(
    ("data", "verdict"),
    [
        (frame(UDP, 9), TC_ACT_SHOT),
        (frame(UDP, 53), TC_ACT_UNSPEC),
        (frame(TCP, 9), TC_ACT_UNSPEC),
        (frame(UDP, 9, ihl=6), TC_ACT_SHOT),  # IP options move the UDP header
        (frame(UDP, 9, frag=0x0001), TC_ACT_UNSPEC),  # a later fragment: no UDP header to read
        (frame6(9), TC_ACT_UNSPEC),  # the program looks at IPv4 only
        (frame(UDP, 9)[: 14 + 20 + 3], TC_ACT_UNSPEC),  # truncated inside the UDP header
        (frame(UDP, 9, ihl=6)[: 14 + 24 + 3], TC_ACT_UNSPEC),  # ... behind IP options
        (eth(0x0806), TC_ACT_UNSPEC),  # an Ethernet header and nothing else
    ],
    ids=[
        "udp9",
        "udp53",
        "tcp9",
        "udp9-options",
        "udp9-fragment",
        "ipv6",
        "truncated-udp",
        "truncated-opt",
        "eth-only",
    ],
)
def test_verdicts(prog_fd, data, verdict):
    r = test_run(prog_fd, data)
    assert r.retval == verdict
    assert r.data_out == data  # the program does not touch the packet
    assert r.ctx_out is None


def test_frame_shorter_than_ethernet_is_rejected(prog_fd):
    with pytest.raises(OSError) as e:
        test_run(prog_fd, frame()[:13])
    assert e.value.errno == errno.EINVAL


def test_truncated_ip_header(prog_fd):
    # Newer kernels (seen on 6.18) refuse an IPv4/IPv6 ethertype without a whole IP header; older
    # ones run the program, which must then leave the packet alone.
    try:
        r = test_run(prog_fd, frame(UDP, 9)[: 14 + 19])
    except OSError as e:
        assert e.errno == errno.EINVAL
    else:
        assert r.retval == TC_ACT_UNSPEC


def test_repeat_reports_mean_duration(prog_fd):
    r = test_run(prog_fd, frame(UDP, 9), repeat=10_000)
    assert r.retval == TC_ACT_SHOT
    assert 0 <= r.duration_ns < 100_000


def test_no_data_out(prog_fd):
    r = test_run(prog_fd, frame(UDP, 53), data_size_out=0)
    assert r.retval == TC_ACT_UNSPEC and r.data_out == b""


def test_skb_ctx_round_trip(prog_fd):
    data = frame(UDP, 53)
    r = test_run(prog_fd, data, ctx=skb_ctx(mark=7, priority=3, cb=(1, 2)))
    assert r.retval == TC_ACT_UNSPEC
    out = SkBuff.from_buffer_copy(r.ctx_out.ljust(len(bytes(SkBuff())), b"\0"))
    assert (out.mark, out.priority, list(out.cb)) == (7, 3, [1, 2, 0, 0, 0])
    assert out.wire_len == len(data)  # the kernel reports wire_len back, not len


def test_ctx_fields_the_kernel_does_not_take_are_rejected(prog_fd):
    bad = SkBuff(len=100)  # skb->len comes from the data, not from the context
    with pytest.raises(OSError) as e:
        test_run(prog_fd, frame(), ctx=bytes(bad))
    assert e.value.errno == errno.EINVAL
