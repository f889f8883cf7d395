"""The user-space half of flowmon: interface attachment, configuration push, eviction.

Everything here is synchronous (it does netlink and bpf syscalls); the agent runs it in a thread.
Tests drive it directly: compile, :class:`Attacher` in a lab namespace, :meth:`FlowMonitor.evict`.
"""

from __future__ import annotations

import contextlib
import ctypes as ct
import fnmatch
import gc
import ipaddress
import os
from collections.abc import Callable, Iterator, Sequence
from itertools import repeat
from pathlib import Path

from pyroute2 import IPRoute

from sluice.bpf import loader, tc
from sluice.bpf.maps import Map
from sluice.plugins.flowmon import btf
from sluice.plugins.flowmon.config import Config, FilterRule
from sluice.plugins.flowmon.records import (
    DROP_KEY,
    FLOW,
    KEY,
    Flow,
    addr_bytes,
    decode_flow,
    merge_drop,
    mono_to_wall_offset_ns,
)
from sluice.programs import Program, Tracepoint

PLUGIN = "flowmon"
SOURCE = Path(__file__).parent / "flowmon.bpf.c"
ORDER = 100  # observers first: flowmon sees packets before policy may drop them
FUNCTIONS = {"ingress": "flowmon_ingress", "egress": "flowmon_egress"}
# flowmon_counters indexes (enum flowmon_counter in flowmon.bpf.c)
COUNTERS = {
    "inserted": 0,
    "map_full_packets": 1,
    "map_full_bytes": 2,
    "malformed": 3,
    "sampled_out": 4,
    "filtered": 5,
    "evicted": 6,
    "lost_flows": 7,
    "drops_unattributed": 8,
}
EVICTED = COUNTERS["evicted"]
F_RTT, F_DNS, F_INGRESS_COUNTS = 0x1, 0x2, 0x4


class CfgStruct(ct.Structure):
    _fields_ = [
        ("sampling", ct.c_uint32),
        ("n_rules", ct.c_uint32),
        ("dns_port", ct.c_uint32),
        ("features", ct.c_uint32),
    ]


class RuleStruct(ct.Structure):
    _fields_ = [
        ("addr", ct.c_uint8 * 16),
        ("mask", ct.c_uint8 * 16),
        ("peer", ct.c_uint8 * 16),
        ("peer_mask", ct.c_uint8 * 16),
        ("port", ct.c_uint16),
        ("sport", ct.c_uint16),
        ("dport", ct.c_uint16),
        ("proto", ct.c_uint8),
        ("direction", ct.c_uint8),
        ("accept", ct.c_uint8),
        ("pad", ct.c_uint8 * 3),
        ("sampling", ct.c_uint32),
    ]


def _net16(cidr: str) -> tuple[bytes, bytes]:
    """A network as (16-byte address, 16-byte mask) in the v4-mapped space; ::/0 matches both families."""
    net = ipaddress.ip_network(cidr, strict=False)
    bits = net.prefixlen + (96 if net.version == 4 else 0)
    if net.version == 6 and net.prefixlen == 0:
        bits = 0
    mask = ((1 << 128) - 1) ^ ((1 << (128 - bits)) - 1)
    addr = int.from_bytes(addr_bytes(net.network_address), "big") & mask
    return addr.to_bytes(16, "big"), mask.to_bytes(16, "big")


def rule_struct(rule: FilterRule) -> RuleStruct:
    r = RuleStruct()
    a, m = _net16(rule.cidr)
    p, pm = _net16(rule.peer)
    r.addr[:], r.mask[:], r.peer[:], r.peer_mask[:] = a, m, p, pm
    r.port, r.sport, r.dport, r.proto = rule.port, rule.sport, rule.dport, int(rule.protocol)
    r.direction = {"any": 0, "ingress": 1, "egress": 2}[rule.direction]
    r.accept = rule.action == "accept"
    r.sampling = rule.sampling
    return r


def cflags(config: Config, drops: bool) -> list[str]:
    """Compile-time settings; with drops, the kernel struct offsets of the running kernel (BTF)."""
    flags = [f"-DFLOWMON_MAX_FLOWS={config.max_flows}"]
    if drops:
        skb = btf.member_offsets("sk_buff", ["head", "network_header", "dev", "skb_iif", "sk"])
        dev = btf.member_offsets("net_device", ["nd_net", "ifindex"])
        # possible_net_t and sock_common start their structs: their first member is the pointer
        net = btf.member_offsets("net", ["ns"])["ns"] + btf.member_offsets("ns_common", ["inum"])["inum"]
        sk_net = btf.member_offsets("sock", ["__sk_common"])["__sk_common"]
        sk_net += btf.member_offsets("sock_common", ["skc_net"])["skc_net"]
        flags += [
            "-DFLOWMON_DROPS=1",
            f"-DFLOWMON_SKB_HEAD={skb['head']}",
            f"-DFLOWMON_SKB_NETWORK_HEADER={skb['network_header']}",
            f"-DFLOWMON_SKB_DEV={skb['dev']}",
            f"-DFLOWMON_SKB_IIF={skb['skb_iif']}",
            f"-DFLOWMON_SKB_SK={skb['sk']}",
            f"-DFLOWMON_DEV_NET={dev['nd_net']}",
            f"-DFLOWMON_DEV_IFINDEX={dev['ifindex']}",
            f"-DFLOWMON_NET_INUM={net}",
            f"-DFLOWMON_SK_NET={sk_net}",
        ]
    return flags


def program(config: Config, drops: bool) -> Program:
    """The BPF program; TC attach points are managed by :class:`Attacher`, only the drop
    tracepoint is declared (attached by the core, or by :func:`compile_datapath`)."""
    attach = [Tracepoint("skb:kfree_skb", "flowmon_kfree_skb")] if drops else []
    return Program(PLUGIN, SOURCE, attach, cflags(config, drops))


def compile_datapath(bpffs: Path, config: Config, drops: bool = False):
    """Compile (and with drops, attach the tracepoint) outside the agent: tests and benchmarks."""
    bpf = loader.compile_program(PLUGIN, program(config, drops), bpffs=bpffs)
    if drops:
        bpf.attach_tracepoint(tp=b"skb:kfree_skb", fn_name=b"flowmon_kfree_skb")
    return bpf


def netns_inode() -> int:
    """The inode number of this thread's network namespace (what the kernel's ns.inum holds)."""
    return os.stat("/proc/thread-self/ns/net").st_ino


def interface_wanted(name: str, include: Sequence[str], exclude: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in include) and not any(
        fnmatch.fnmatchcase(name, p) for p in exclude
    )


class Attacher:
    """Keeps flowmon's TC programs on every interface the include/exclude globs select, including
    interfaces that appear later (:meth:`sync` is called periodically) and ones re-created under
    the same name (a new ifindex). Runs in the caller's network namespace.

    The attached interfaces are also listed in ``flowmon_ifaces`` (ifindex -> namespace inode):
    drops are recorded only for them, and a packet forwarded between two of them is counted at
    its ingress only."""

    def __init__(self, bpf, log=None):
        self.fds = {d: loader.load_tc(bpf, PLUGIN, fn) for d, fn in FUNCTIONS.items()}
        self.ifaces = Map.from_bcc(bpf[b"flowmon_ifaces"])
        self.netns = netns_inode()
        self.attached: dict[str, int] = {}  # name -> ifindex
        self.swept = False  # filters left by an earlier run on interfaces no longer wanted
        self.log = log
        self.errors: dict[str, str] = {}  # name -> last attach error

    def sync(self, include: Sequence[str], exclude: Sequence[str]) -> list[str]:
        """Attach where wanted and missing, detach where no longer wanted; returns new attachments."""
        added = []
        with IPRoute() as ipr:
            links = {link.get_attr("IFLA_IFNAME"): link["index"] for link in ipr.get_links()}
            for name in [n for n in self.attached if n not in links]:
                self.ifaces.delete(self.attached.pop(name))  # gone: its filters went with it
            if not self.swept:  # once per run: the previous run's config may have selected more
                ours = {tc.filter_name(PLUGIN, fn) for fn in FUNCTIONS.values()}
                for f in tc.list_filters(ipr):
                    if f.name in ours and not interface_wanted(f.iface, include, exclude):
                        tc.detach(ipr, f.ifindex, f.direction, f.prio)
                for index, ns in list(self.ifaces.items()):  # this namespace's entries of that run
                    if ns == self.netns:
                        self.ifaces.delete(index)
                self.swept = True
            for name, index in sorted(links.items()):
                wanted = interface_wanted(name, include, exclude)
                if not wanted:
                    if name in self.attached:
                        self._detach(ipr, name, index)
                    continue
                if self.attached.get(name) == index:
                    continue
                try:
                    self._attach(ipr, name)
                except (tc.AttachError, OSError) as exc:
                    if self.errors.get(name) != str(exc) and self.log:
                        self.log.warning("cannot attach", iface=name, error=str(exc))
                    self.errors[name] = str(exc)
                    continue
                self.errors.pop(name, None)
                self.attached[name] = index
                self.ifaces.set(index, self.netns)
                added.append(name)
        return added

    def _attach(self, ipr, name: str) -> None:
        ours = {tc.filter_name(PLUGIN, fn) for fn in FUNCTIONS.values()}
        for f in tc.list_filters(ipr, name):
            if f.prio == ORDER and f.name not in ours:
                raise tc.AttachError(
                    f"{name} {f.direction} order {ORDER} is taken by {f.name or 'a foreign filter'}"
                )
        for direction, fn in FUNCTIONS.items():
            tc.attach(ipr, name, direction, ORDER, self.fds[direction], tc.filter_name(PLUGIN, fn))

    def _detach(self, ipr, name: str, index: int) -> None:
        for direction in FUNCTIONS:
            tc.detach(ipr, index, direction, ORDER)
        self.attached.pop(name, None)
        self.ifaces.delete(index)

    def detach_all(self) -> None:
        with IPRoute() as ipr:
            for name, index in list(self.attached.items()):
                self._detach(ipr, name, index)


@contextlib.contextmanager
def _no_gc():
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class FlowMonitor:
    """The maps of one flowmon datapath (by their pins) and the eviction that drains them."""

    def __init__(self, pin_dir: Path, reasons: dict[int, str] | None = None):
        self.pin_dir = pin_dir
        self.flows = Map.open_pinned(pin_dir / "flowmon_flows")
        if (self.flows.info.key_size, self.flows.info.value_size) != (KEY.size, FLOW.size):
            raise ValueError(f"{self.flows.what}: layout differs from this flowmon version")
        self.counters = Map.open_pinned(pin_dir / "flowmon_counters", ct.c_uint32, ct.c_uint64)
        self.cfg = Map.open_pinned(pin_dir / "flowmon_cfg", ct.c_uint32, CfgStruct)
        self.rules = Map.open_pinned(pin_dir / "flowmon_rules", ct.c_uint32, RuleStruct)
        self.drops = Map.open_pinned(pin_dir / "flowmon_drops")
        self.lost = Map.open_pinned(pin_dir / "flowmon_lost")
        self.drop_reasons = Map.open_pinned(pin_dir / "flowmon_drop_reasons", ct.c_uint32, ct.c_uint64)
        self.reasons = reasons or {}
        self.capacity = self.flows.info.max_entries
        self.nat_lookup: Callable[[Flow], dict | None] | None = None

    def close(self) -> None:
        for m in (self.flows, self.counters, self.cfg, self.rules, self.drops, self.drop_reasons, self.lost):
            m.close()

    def configure(self, config: Config) -> None:
        """Push sampling, filter rules and feature switches: the datapath uses them at once."""
        for i, rule in enumerate(config.filters):
            self.rules.set(i, rule_struct(rule))
        features = (F_RTT if config.rtt else 0) | (F_DNS if config.dns else 0)
        if all(rule.direction == "any" for rule in config.filters):
            features |= F_INGRESS_COUNTS  # egress captures nothing ingress would not
        self.cfg.set(0, CfgStruct(config.sampling, len(config.filters), config.dns_port, features))

    def counter_values(self) -> dict[str, int]:
        return {name: sum(self.counters.get(i) or [0]) for name, i in COUNTERS.items()}

    def fill(self) -> int:
        """Flows in the map now, without walking it: created by the datapath minus evicted by us."""
        c = self.counter_values()
        return max(0, c["inserted"] - c["evicted"])

    def reason_counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for value, per_cpu in self.drop_reasons.items():
            n = sum(per_cpu)
            if n:
                name = self.reasons.get(value, str(value))
                out[name] = out.get(name, 0) + n
        return out

    def resync_fill(self) -> None:
        """Make ``fill()`` true again after a restart: the counters survive in their pin, but
        the flow map may be a new one (another size) or may have been drained by someone else."""
        inserted = self.counter_values()["inserted"]
        self._set_evicted(inserted - self.flows.count())

    def _set_evicted(self, total: int) -> None:
        self.counters.set(EVICTED, [total] + [0] * (self.counters.ncpus - 1))

    def _add_evicted(self, n: int) -> None:
        self._set_evicted(sum(self.counters.get(EVICTED) or [0]) + n)

    def evict_chunks(self, chunk: int = 4096, with_drops: bool = True) -> Iterator[list[Flow]]:
        """Drain the flow map chunk by chunk (batched lookup-and-delete), each chunk decoded, its
        drops merged and NAT looked up. Chunks keep memory flat: a million-flow eviction never
        holds a million objects, which makes it about twice as fast as draining all first."""
        offset = mono_to_wall_offset_ns()
        self.lost.clear(chunk)  # a new period: a flow lost again counts as lost again
        drops: dict[tuple, list[tuple[int, bytes]]] = {}
        for kb, vb in self.drops.pop_all(chunk) if with_drops else ():
            *key, reason = DROP_KEY.unpack(kb)
            drops.setdefault(tuple(key), []).append((reason, vb))
        for _, keys, values in self.flows.items_raw(chunk, delete=True):
            with _no_gc():  # thousands of acyclic objects: GC passes would cost more than the decode
                flows = list(map(Flow, KEY.iter_unpack(keys), FLOW.iter_unpack(values), repeat(offset)))
            self._add_evicted(len(flows))
            if drops:
                extra = []
                for f in flows:
                    per_reason = drops.pop(f.k, None)
                    if per_reason:  # the flow carries its first reason, others get a record each
                        merge_drop(f, *per_reason[0], offset, self.reasons)
                        extra += self._drop_records(f.k, per_reason[1:], offset)
                flows += extra
            yield self._with_nat(flows)
        if drops:  # dropped before TC saw them this period (or TC never sees them)
            yield self._with_nat([f for k, rs in drops.items() for f in self._drop_records(k, rs, offset)])

    def _drop_records(self, key: tuple, per_reason: list[tuple[int, bytes]], offset: int) -> list[Flow]:
        """Drop-only records, one per reason."""
        out = []
        for reason, vb in per_reason:
            f = Flow(key)
            merge_drop(f, reason, vb, offset, self.reasons)
            out.append(f)
        return out

    def _with_nat(self, flows: list[Flow]) -> list[Flow]:
        if self.nat_lookup:
            for f in flows:
                if f.proto in (6, 17):
                    f.nat = self.nat_lookup(f)
        return flows

    def evict(self, chunk: int = 4096, with_drops: bool = True) -> list[Flow]:
        """Everything :meth:`evict_chunks` yields, in one list."""
        return [f for part in self.evict_chunks(chunk, with_drops) for f in part]

    def peek(self) -> list[Flow]:
        """The flows aggregated since the last eviction, without removing them."""
        offset = mono_to_wall_offset_ns()
        return [decode_flow(k, v, offset) for k, v in self.flows.items()]
