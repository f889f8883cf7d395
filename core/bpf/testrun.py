"""Run a loaded program on a crafted packet in the kernel (BPF_PROG_TEST_RUN), no interface needed.

This is how plugin tests check verdicts and how benchmarks measure per-packet cost: the kernel
builds an skb (TC) or xdp_buff (XDP) from ``data``, runs the program ``repeat`` times and reports
the last return value, the packet as the program left it, and the mean time per run. The same skb
is reused across repetitions, so a program that rewrites the packet sees its own output again.

TC programs (SCHED_CLS) need ``data`` to start with an Ethernet header: at least 14 bytes, or the
kernel answers EINVAL. Newer kernels (seen on 6.18) also refuse, with EINVAL, an IPv4 or IPv6
ethertype whose IP header (20 or 40 bytes) is not all there; test truncated IP headers with that in
mind, truncated L4 headers run normally.
"""

from __future__ import annotations

import ctypes as ct
from dataclasses import dataclass

from sluice.bpf import libbpf as lb

ETH_HLEN = 14


@dataclass(frozen=True)
class TestRunResult:
    __test__ = False  # not a pytest class

    retval: int  # signed: TC_ACT_UNSPEC is -1
    data_out: bytes
    duration_ns: int  # mean per repetition
    ctx_out: bytes | None = None


class SkBuff(ct.Structure):
    """``struct __sk_buff`` (linux/bpf.h). Test runs of TC programs accept only ``mark``,
    ``priority``, ``ingress_ifindex``, ``ifindex``, ``cb``, ``tstamp``, ``wire_len``,
    ``gso_segs``, ``gso_size`` and ``hwtstamp`` as input; everything else must be zero."""

    _fields_ = [
        ("len", ct.c_uint32),
        ("pkt_type", ct.c_uint32),
        ("mark", ct.c_uint32),
        ("queue_mapping", ct.c_uint32),
        ("protocol", ct.c_uint32),
        ("vlan_present", ct.c_uint32),
        ("vlan_tci", ct.c_uint32),
        ("vlan_proto", ct.c_uint32),
        ("priority", ct.c_uint32),
        ("ingress_ifindex", ct.c_uint32),
        ("ifindex", ct.c_uint32),
        ("tc_index", ct.c_uint32),
        ("cb", ct.c_uint32 * 5),
        ("hash", ct.c_uint32),
        ("tc_classid", ct.c_uint32),
        ("data", ct.c_uint32),
        ("data_end", ct.c_uint32),
        ("napi_id", ct.c_uint32),
        ("family", ct.c_uint32),
        ("remote_ip4", ct.c_uint32),
        ("local_ip4", ct.c_uint32),
        ("remote_ip6", ct.c_uint32 * 4),
        ("local_ip6", ct.c_uint32 * 4),
        ("remote_port", ct.c_uint32),
        ("local_port", ct.c_uint32),
        ("data_meta", ct.c_uint32),
        ("flow_keys", ct.c_uint64),
        ("tstamp", ct.c_uint64),
        ("wire_len", ct.c_uint32),
        ("gso_segs", ct.c_uint32),
        ("sk", ct.c_uint64),
        ("gso_size", ct.c_uint32),
        ("tstamp_type", ct.c_uint8),
        ("hwtstamp", ct.c_uint64),
    ]


def skb_ctx(*, mark: int = 0, priority: int = 0, ifindex: int = 0, ingress_ifindex: int = 0, cb=()) -> bytes:
    """A ``__sk_buff`` to pass as ``ctx``: what a TC program sees in ``skb->mark`` and friends.

    ``ifindex`` > 1 must name an existing interface (the skb is then attributed to it); by default
    the kernel uses loopback.
    """
    skb = SkBuff(mark=mark, priority=priority, ifindex=ifindex, ingress_ifindex=ingress_ifindex)
    skb.cb[: len(cb)] = list(cb)
    return bytes(skb)


def test_run(
    prog_fd: int, data: bytes, repeat: int = 1, ctx: bytes | None = None, data_size_out: int | None = None
) -> TestRunResult:
    """Run the program ``repeat`` times on ``data``; see the module docstring.

    ``data_size_out`` bounds the returned packet (default: room for 1 KiB of growth, e.g. an
    encapsulation); a packet that grew beyond it raises ENOSPC. 0 asks for no packet back. With
    ``ctx``, the context as the program left it comes back in ``ctx_out``.
    """
    if data_size_out is None:
        data_size_out = len(data) + 1024
    data_in = ct.create_string_buffer(bytes(data), len(data))
    # The kernel copies the whole output packet when data_size_out is 0 and data_out is set, so
    # never pass one without the other.
    out = ct.create_string_buffer(data_size_out) if data_size_out else None
    opts = lb.TestRunOpts(
        data_in=ct.addressof(data_in),
        data_size_in=len(data),
        data_out=ct.addressof(out) if out is not None else None,
        data_size_out=data_size_out,
        repeat=repeat,
    )
    ctx_in = ctx_out = None
    if ctx is not None:
        ctx_in = ct.create_string_buffer(bytes(ctx), len(ctx))
        # The kernel writes back its full context struct and fails with ENOSPC if it does not fit.
        ctx_out = ct.create_string_buffer(max(len(ctx), 1024))
        opts.ctx_in, opts.ctx_size_in = ct.addressof(ctx_in), len(ctx)
        opts.ctx_out, opts.ctx_size_out = ct.addressof(ctx_out), len(ctx_out)
    lb.prog_test_run_opts(prog_fd, opts)
    return TestRunResult(
        retval=ct.c_int32(opts.retval).value,
        data_out=out.raw[: opts.data_size_out] if out is not None else b"",
        duration_ns=opts.duration,
        ctx_out=ctx_out.raw[: opts.ctx_size_out] if ctx_out is not None else None,
    )


test_run.__test__ = False  # importing it into a test module must not make it a test
