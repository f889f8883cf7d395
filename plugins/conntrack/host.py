"""The host's netfilter conntrack over netlink: dump/get/exists, an event consumer, a NAT cache.

* Queries (dump, get, exists) go through pyroute2's ``Conntrack`` socket, per network namespace.
* Events (NEW, DESTROY) are read from a plain NETLINK_NETFILTER socket joined to the conntrack
  multicast groups and decoded by a small parser of just the attributes we use: pyroute2's
  generic decoder costs tens of µs per message, which caps a consumer far below the event rates
  a busy host produces.
* Rate limit (Datadog's circuit breaker): an EWMA of events/s (0.2·now + 0.8·before) is taken
  every tick; above the limit the socket is reopened with a classic-BPF filter that keeps a
  random fraction of messages in the kernel (rate × limit / ewma × 0.95), so the excess never
  reaches user space. The sampling rate is reported; when the sampled rate falls well under the
  limit the rate is doubled back toward 1.
* NAT translations (reply tuple ≠ reversed original) from dumps and NEW events fill an LRU cache
  that answers ``sluice_nat_lookup``; a translation nobody asked for within ``orphan_timeout``
  after its connection was destroyed (or after it was added, when never destroyed) is an orphan
  and expires.
"""

from __future__ import annotations

import contextlib
import ctypes as ct
import dataclasses
import errno
import ipaddress
import os
import re
import select
import socket
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from sluice.plugins.conntrack.config import HostConfig
from sluice.sessions import FlowTuple, NatTranslation

NETLINK_NETFILTER = 12
NFNLGRP_CONNTRACK_NEW, NFNLGRP_CONNTRACK_DESTROY = 1, 3
SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, NETLINK_LISTEN_ALL_NSID = 270, 1, 8
SO_ATTACH_FILTER, SO_RCVBUFFORCE = 26, 33
IPCTNL_MSG_CT_NEW, IPCTNL_MSG_CT_DELETE = 0, 2
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_CREATE = 0x400
# CTA_* attribute numbers (linux/netfilter/nfnetlink_conntrack.h)
CTA_TUPLE_ORIG, CTA_TUPLE_REPLY, CTA_STATUS, CTA_PROTOINFO, CTA_TIMEOUT, CTA_MARK = 1, 2, 3, 4, 7, 8
CTA_TUPLE_IP, CTA_TUPLE_PROTO = 1, 2
CTA_PROTO_NUM, CTA_PROTO_SRC_PORT, CTA_PROTO_DST_PORT = 1, 2, 3
CTA_PROTO_ICMP_ID, CTA_PROTO_ICMPV6_ID = 4, 7
CTA_PROTOINFO_TCP, CTA_PROTOINFO_TCP_STATE = 1, 1
NLA_TYPE_MASK = 0x3FFF
TCP_STATES = ("NONE", "SYN_SENT", "SYN_RECV", "ESTABLISHED", "FIN_WAIT", "CLOSE_WAIT", "LAST_ACK",
              "TIME_WAIT", "CLOSE", "SYN_SENT2")  # fmt: skip
IPS_SEEN_REPLY, IPS_ASSURED = 0x2, 0x4
PROTO_NAMES = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6", 132: "sctp"}

# classic BPF (linux/filter.h)
BPF_LD_W_ABS, BPF_JGT_K, BPF_RET_K = 0x20, 0x25, 0x06
SKF_AD_RANDOM = 0xFFFFF000 + 56


class NotPermitted(PermissionError):
    """Netlink conntrack needs CAP_NET_ADMIN (Datadog's ErrNotPermitted)."""


def _not_permitted(what: str) -> NotPermitted:
    return NotPermitted(f"host conntrack: {what} needs CAP_NET_ADMIN (run as root)")


@dataclass(frozen=True)
class HostConn:
    """One netfilter conntrack entry: both tuples, state and timeout, as ``conntrack -L`` shows."""

    orig: FlowTuple
    reply: FlowTuple
    status: int = 0
    timeout: int | None = None
    tcp_state: str | None = None
    mark: int = 0
    nsid: int | None = None  # events with all_netns: the peer namespace's id (None: ours)

    @property
    def natted(self) -> bool:
        o, r = self.orig, self.reply
        return (r.src, r.dst, r.sport, r.dport) != (o.dst, o.src, o.dport, o.sport)

    def line(self) -> str:
        o, r = self.orig, self.reply
        proto = PROTO_NAMES.get(o.proto, str(o.proto))
        head = f"{proto:<8} {o.proto} {self.timeout if self.timeout is not None else '-'} "
        head += f"{self.tcp_state} " if self.tcp_state else ""
        orig = f"src={o.src} dst={o.dst} sport={o.sport} dport={o.dport}"
        reply = f"src={r.src} dst={r.dst} sport={r.sport} dport={r.dport}"
        seen = "" if self.status & IPS_SEEN_REPLY else " [UNREPLIED]"
        assured = " [ASSURED]" if self.status & IPS_ASSURED else ""
        where = f" nsid={self.nsid}" if self.nsid is not None else ""
        return f"{head}{orig}{seen} {reply}{assured} mark={self.mark}{where}"

    def as_dict(self) -> dict:
        return {
            "orig": flow_dict(self.orig),
            "reply": flow_dict(self.reply),
            "status": self.status,
            "timeout": self.timeout,
            "tcp_state": self.tcp_state,
            "mark": self.mark,
            "natted": self.natted,
            "nsid": self.nsid,
        }


def flow_dict(f: FlowTuple) -> dict:
    return {"src": str(f.src), "dst": str(f.dst), "sport": f.sport, "dport": f.dport, "proto": f.proto}


def reverse(f: FlowTuple) -> FlowTuple:
    return FlowTuple(f.dst, f.src, f.dport, f.sport, f.proto)


def parse_tuple(text: str) -> FlowTuple:
    """``PROTO SRC[:PORT] DST[:PORT]`` or ``SRC:PORT-DST:PORT/PROTO``; IPv6 in brackets with ports."""
    m = re.fullmatch(r"\s*(\S+)\s+(\S+)\s+(\S+)\s*", text) or re.fullmatch(r"\s*(\S+)-(\S+)/(\S+)\s*", text)
    if not m:
        raise ValueError(f"bad tuple {text!r}: want 'udp 10.0.0.1:5000 10.0.0.2:53'")
    parts = m.groups() if text.strip().count(" ") else (m.group(3), m.group(1), m.group(2))
    names = {v: k for k, v in PROTO_NAMES.items()}
    proto = names.get(parts[0].lower()) if not parts[0].isdigit() else int(parts[0])
    if proto is None:
        raise ValueError(f"bad tuple {text!r}: unknown protocol {parts[0]!r}")

    def endpoint(s: str) -> tuple:
        m6 = re.fullmatch(r"\[(.+)\](?::(\d+))?", s)
        host, port = (
            (m6.group(1), m6.group(2)) if m6 else (s.rsplit(":", 1) if s.count(":") == 1 else (s, None))
        )
        try:
            return ipaddress.ip_address(host), int(port or 0)
        except ValueError:
            raise ValueError(f"bad tuple {text!r}: bad endpoint {s!r}") from None

    (src, sport), (dst, dport) = endpoint(parts[1]), endpoint(parts[2])
    if src.version != dst.version or not (0 <= sport < 65536 and 0 <= dport < 65536):
        raise ValueError(f"bad tuple {text!r}: mixed families or port out of range")
    return FlowTuple(src, dst, sport, dport, proto)


# --------------------------------------------------------------------------------------------
# Event parsing (hot path: plain struct and slices)
# --------------------------------------------------------------------------------------------


def _attrs(buf: bytes, off: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(type, start, end) of each attribute in buf[off:end]."""
    while off + 4 <= end:
        length, kind = struct.unpack_from("=HH", buf, off)
        if length < 4:
            return
        yield kind & NLA_TYPE_MASK, off + 4, off + length
        off += (length + 3) & ~3


def _tuple(buf: bytes, off: int, end: int) -> FlowTuple:
    src = dst = None
    proto = sport = dport = 0
    for kind, s, e in _attrs(buf, off, end):
        if kind == CTA_TUPLE_IP:
            for k, s2, e2 in _attrs(buf, s, e):
                if k in (1, 3):
                    src = ipaddress.ip_address(buf[s2:e2])
                elif k in (2, 4):
                    dst = ipaddress.ip_address(buf[s2:e2])
        elif kind == CTA_TUPLE_PROTO:
            for k, s2, e2 in _attrs(buf, s, e):
                if k == CTA_PROTO_NUM:
                    proto = buf[s2]
                elif k == CTA_PROTO_SRC_PORT:
                    sport = int.from_bytes(buf[s2:e2], "big")
                elif k == CTA_PROTO_DST_PORT:
                    dport = int.from_bytes(buf[s2:e2], "big")
                elif k in (CTA_PROTO_ICMP_ID, CTA_PROTO_ICMPV6_ID):
                    sport = dport = int.from_bytes(buf[s2:e2], "big")  # as conntrack -L shows id
    if src is None or dst is None:
        raise ValueError("conntrack tuple without addresses")
    return FlowTuple(src, dst, sport, dport, proto)


def parse_message(buf: bytes, off: int, end: int) -> HostConn:
    """One ctnetlink message body (after the 16-byte nlmsghdr) as a HostConn."""
    orig = reply = None
    status, timeout, state, mark = 0, None, None, 0
    for kind, s, e in _attrs(buf, off + 4, end):  # skip struct nfgenmsg
        if kind == CTA_TUPLE_ORIG:
            orig = _tuple(buf, s, e)
        elif kind == CTA_TUPLE_REPLY:
            reply = _tuple(buf, s, e)
        elif kind == CTA_STATUS:
            status = int.from_bytes(buf[s:e], "big")
        elif kind == CTA_TIMEOUT:
            timeout = int.from_bytes(buf[s:e], "big")
        elif kind == CTA_MARK:
            mark = int.from_bytes(buf[s:e], "big")
        elif kind == CTA_PROTOINFO:
            for k, s2, e2 in _attrs(buf, s, e):
                if k == CTA_PROTOINFO_TCP:
                    for k3, s3, _ in _attrs(buf, s2, e2):
                        if k3 == CTA_PROTOINFO_TCP_STATE and buf[s3] < len(TCP_STATES):
                            state = TCP_STATES[buf[s3]]
    if orig is None or reply is None:
        raise ValueError("conntrack message without both tuples")
    return HostConn(orig, reply, status, timeout, state, mark)


# --------------------------------------------------------------------------------------------
# NAT cache
# --------------------------------------------------------------------------------------------


@dataclass
class _Nat:
    translation: NatTranslation
    since: float  # added, or destroyed: the orphan clock starts here
    claimed: bool = False
    destroyed: bool = False


class NatCache:
    """LRU of translations keyed by the original tuple and by the translated forward tuple."""

    def __init__(
        self, size: int = 131072, orphan_timeout: float = 120.0, clock: Callable[[], float] = time.monotonic
    ):
        self.size, self.orphan_timeout, self.clock = size, orphan_timeout, clock
        self._by_orig: OrderedDict[FlowTuple, _Nat] = OrderedDict()
        self._by_reply: dict[FlowTuple, FlowTuple] = {}  # reversed reply tuple → original
        self._lock = threading.Lock()
        self.registers = self.evicts = self.orphans = self.gets = self.hits = 0

    def __len__(self) -> int:
        return len(self._by_orig)

    def add(self, conn: HostConn) -> bool:
        if not conn.natted:
            return False
        with self._lock:
            self._by_orig[conn.orig] = _Nat(NatTranslation(conn.orig, conn.reply), self.clock())
            self._by_orig.move_to_end(conn.orig)
            self._by_reply[reverse(conn.reply)] = conn.orig
            self.registers += 1
            while len(self._by_orig) > self.size:
                self._drop(next(iter(self._by_orig)))
                self.evicts += 1
        return True

    def destroyed(self, conn: HostConn) -> None:
        """The connection is gone: a claimed translation goes now, an unclaimed one may still be asked for."""
        with self._lock:
            nat = self._by_orig.get(conn.orig)
            if nat is None:
                return
            if nat.claimed:
                self._drop(conn.orig)
            else:
                nat.destroyed, nat.since = True, self.clock()

    def lookup(self, flow: FlowTuple) -> NatTranslation | None:
        with self._lock:
            self.gets += 1
            orig = flow if flow in self._by_orig else self._by_reply.get(flow)
            nat = self._by_orig.get(orig) if orig is not None else None
            if nat is None:
                return None
            nat.claimed = True
            self._by_orig.move_to_end(orig)
            self.hits += 1
            return nat.translation

    def expire(self) -> int:
        """Drop orphans: never asked for within orphan_timeout. Returns how many."""
        cutoff = self.clock() - self.orphan_timeout
        with self._lock:
            stale = [k for k, n in self._by_orig.items() if not n.claimed and n.since < cutoff]
            for k in stale:
                self._drop(k)
            self.orphans += len(stale)
        return len(stale)

    def _drop(self, orig: FlowTuple) -> None:
        nat = self._by_orig.pop(orig, None)
        if nat is not None:
            self._by_reply.pop(reverse(nat.translation.reply), None)


# --------------------------------------------------------------------------------------------
# Rate limit
# --------------------------------------------------------------------------------------------


class CircuitBreaker:
    """EWMA of events/s over ticks; ``tick`` says which sampling rate the socket should use."""

    def __init__(self, limit: float, clock: Callable[[], float] = time.monotonic):
        self.limit, self.clock = limit, clock
        self.ewma = 0.0
        self.rate = 1.0  # fraction of events the kernel lets through
        self.throttles = 0
        self._count, self._last = 0, clock()

    def add(self, n: int = 1) -> None:
        self._count += n

    def tick(self) -> float | None:
        """Fold the events since the last tick in; a new sampling rate when it must change."""
        now = self.clock()
        dt = now - self._last
        if dt <= 0:
            return None
        # Events that passed the sampler stand for 1/rate events on the host.
        observed = self._count / dt / self.rate
        self.ewma = 0.2 * observed + 0.8 * self.ewma if self.ewma else observed
        self._count, self._last = 0, now
        if self.ewma > self.limit:
            wanted = min(self.rate, self.limit / self.ewma * 0.95)
            if wanted < self.rate * 0.99:
                self.throttles += 1
                self.rate = wanted
                return wanted
        elif self.rate < 1.0 and self.ewma < self.limit * 0.5:
            self.rate = min(1.0, self.rate * 2)
            return self.rate
        return None


def sampler_filter(rate: float) -> bytes:
    """Classic BPF: keep a message when a kernel random u32 is at most rate × 2³²."""
    threshold = min(0xFFFFFFFF, max(0, int(rate * 0x100000000) - 1))
    insns = [(BPF_LD_W_ABS, 0, 0, SKF_AD_RANDOM), (BPF_JGT_K, 1, 0, threshold), (BPF_RET_K, 0, 0, 0xFFFFFFFF),
             (BPF_RET_K, 0, 0, 0)]  # fmt: skip
    return b"".join(struct.pack("=HBBI", *i) for i in insns)


# --------------------------------------------------------------------------------------------
# The host conntrack facade
# --------------------------------------------------------------------------------------------


@dataclass
class EventStats:
    received: int = 0  # events read (after sampling)
    new: int = 0
    destroy: int = 0
    enobufs: int = 0
    malformed: int = 0
    reopens: int = 0
    last_error: str = ""
    by_kind: dict = field(default_factory=dict)


class HostConntrack:
    """Netfilter conntrack of one network namespace (``netns`` None: ours)."""

    def __init__(
        self, config=None, netns: str | None = None, log=None, clock: Callable[[], float] = time.monotonic
    ):
        self.config = config or HostConfig()
        self.netns = netns
        self.log = log
        self.nat = NatCache(self.config.nat_cache_size, self.config.orphan_timeout, clock)
        self.breaker = CircuitBreaker(self.config.event_rate_limit, clock)
        self.stats = EventStats()
        self.observers: list[Callable[[str, HostConn], None]] = []
        self._sock: socket.socket | None = None
        self._filter_buf = None
        self._stop = threading.Event()

    # --- queries through pyroute2 --------------------------------------------------------------

    def _conntrack(self, family: int):
        from pyroute2 import Conntrack

        kw = {"nfgen_family": family}
        if self.netns:
            if not os.path.exists(f"/run/netns/{self.netns}"):
                raise FileNotFoundError(errno.ENOENT, f"network namespace {self.netns!r} not found")
            kw["netns"], kw["flags"] = self.netns, 0  # pyroute2 creates a missing one by default
        return Conntrack(**kw)

    @contextlib.contextmanager
    def _netlink(self, what: str):
        from pyroute2.netlink.exceptions import NetlinkError

        try:
            yield
        except NetlinkError as e:
            if e.code == errno.EPERM:
                raise _not_permitted(what) from None
            raise OSError(e.code, f"host conntrack: {what}: {os.strerror(e.code)}") from None
        except PermissionError:
            raise _not_permitted(what) from None

    def dump(self, families=(socket.AF_INET, socket.AF_INET6)) -> list[HostConn]:
        out = []
        with self._netlink("dump"):
            for family in families:
                with self._conntrack(family) as c:
                    out += [_from_pyroute2(e) for e in c.dump_entries()]
        return out

    def get(self, flow: FlowTuple) -> HostConn | None:
        from pyroute2.netlink.exceptions import NetlinkError
        from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

        family = socket.AF_INET if flow.src.version == 4 else socket.AF_INET6
        kw = {"saddr": str(flow.src), "daddr": str(flow.dst), "proto": flow.proto}
        if flow.proto in (1, 58):
            kw.update(icmp_id=flow.sport, icmp_type=8 if flow.proto == 1 else 128, icmp_code=0)
        else:
            kw.update(sport=flow.sport, dport=flow.dport)
        with self._netlink("get"), self._conntrack(family) as c:
            try:
                msg = c.entry("get", tuple_orig=NFCTAttrTuple(family=family, **kw))
            except NetlinkError as e:
                if e.code == errno.ENOENT:
                    return None
                raise
        return _from_pyroute2_msg(msg) if msg is not None else None

    def exists(self, flow: FlowTuple) -> bool:
        return self.get(flow) is not None

    # --- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Fill the NAT cache from a dump, then open the event subscription."""
        for conn in self.dump():
            self.nat.add(conn)
        if self.config.events:
            self.open_events(1.0)

    def stop(self) -> None:
        self._stop.set()
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    # --- events ----------------------------------------------------------------------------------

    def open_events(self, rate: float) -> None:
        """(Re)open the subscription, with a kernel-side sampler when rate < 1."""
        from sluice.netns import inside

        old = self._sock
        try:
            with inside(self.netns) if self.netns else contextlib.nullcontext():
                sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        except PermissionError:
            raise _not_permitted("event subscription") from None
        try:
            try:
                sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, self.config.rcvbuf)
            except PermissionError:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.config.rcvbuf)
            if rate < 1.0:
                prog = sampler_filter(rate)
                self._filter_buf = ct.create_string_buffer(prog, len(prog))
                fprog = struct.pack("=HxxxxxxQ", len(prog) // 8, ct.addressof(self._filter_buf))
                sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
            if self.config.all_netns:  # events of every namespace that has an id here, tagged with it
                sock.setsockopt(SOL_NETLINK, NETLINK_LISTEN_ALL_NSID, 1)
            sock.bind((0, 0))
            for group in (NFNLGRP_CONNTRACK_NEW, NFNLGRP_CONNTRACK_DESTROY):
                sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, group)
        except PermissionError:
            sock.close()
            raise _not_permitted("event subscription") from None
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self.breaker.rate = rate
        if old is not None:
            old.close()
            self.stats.reopens += 1

    def _handle(self, buf: bytes, nsid: int | None = None) -> None:
        off, size = 0, len(buf)
        while off + 16 <= size:
            length, kind, flags = struct.unpack_from("=IHH", buf, off)
            if length < 16 or off + length > size:
                self.stats.malformed += 1
                return
            msg = kind & 0xFF
            if (kind >> 8) == 1 and msg in (IPCTNL_MSG_CT_NEW, IPCTNL_MSG_CT_DELETE):
                try:
                    conn = parse_message(buf, off + 16, off + length)
                except (ValueError, IndexError):
                    self.stats.malformed += 1
                else:
                    self.stats.received += 1
                    self.breaker.add()
                    if nsid is not None:
                        conn = dataclasses.replace(conn, nsid=nsid)
                    # The NAT hook's flows carry no namespace: only our own translations answer it.
                    if msg == IPCTNL_MSG_CT_NEW:
                        self.stats.new += 1
                        if nsid is None:
                            self.nat.add(conn)
                        event = "new"
                    else:
                        self.stats.destroy += 1
                        if nsid is None:
                            self.nat.destroyed(conn)
                        event = "destroy"
                    for observe in self.observers:
                        observe(event, conn)
            off += (length + 3) & ~3

    def poll(self, timeout: float) -> int:
        """Read what is queued (waiting up to ``timeout`` for the first message); returns events read."""
        sock, before = self._sock, self.stats.received
        if sock is None:
            return 0
        ready, _, _ = select.select([sock], [], [], timeout)
        while ready:
            try:
                buf, ancillary, _, _ = sock.recvmsg(1 << 16, socket.CMSG_SPACE(4), socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno == errno.ENOBUFS:  # the kernel dropped events: count, carry on
                    self.stats.enobufs += 1
                    continue
                raise
            nsid = next(
                (struct.unpack("=i", data[:4])[0] for level, kind, data in ancillary
                 if level == SOL_NETLINK and kind == NETLINK_LISTEN_ALL_NSID and len(data) >= 4),
                None,
            )  # fmt: skip
            self._handle(buf, nsid)
        return self.stats.received - before

    def tick(self) -> None:
        """Once a second: the circuit breaker, and orphan expiry in the NAT cache."""
        wanted = self.breaker.tick()
        if wanted is not None:
            self.open_events(wanted)
            if self.log:
                self.log.warning(
                    "host conntrack events sampled", rate=round(wanted, 4), ewma=round(self.breaker.ewma)
                )
        self.nat.expire()

    def consume_forever(self, tick_s: float = 1.0) -> None:
        """The consumer loop (a thread): read, tick, until stop()."""
        next_tick = time.monotonic() + tick_s
        while not self._stop.is_set():
            try:
                self.poll(min(0.2, max(0.0, next_tick - time.monotonic())))
            except (OSError, ValueError) as e:  # ValueError: select() on a socket stop() closed
                if self._stop.is_set():
                    return
                self.stats.last_error = str(e)
                raise
            if time.monotonic() >= next_tick:
                self.tick()
                next_tick = time.monotonic() + tick_s

    def metrics(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        s, n = self.stats, self.nat
        yield _labelled(CounterMetricFamily, "netlink_events", "Host conntrack events read", "kind",
                        {"new": s.new, "destroy": s.destroy})  # fmt: skip
        yield CounterMetricFamily(
            "sluice_conntrack_netlink_throttles", "Sampler tightenings", value=self.breaker.throttles
        )
        yield GaugeMetricFamily(
            "sluice_conntrack_netlink_sampling_ratio", "Fraction of events kept", value=self.breaker.rate
        )
        yield GaugeMetricFamily(
            "sluice_conntrack_netlink_rate_ewma", "Host conntrack events/s (EWMA)", value=self.breaker.ewma
        )
        yield CounterMetricFamily(
            "sluice_conntrack_netlink_enobufs", "Receive buffer overruns", value=s.enobufs
        )
        yield GaugeMetricFamily("sluice_conntrack_nat_cache_entries", "NAT translations cached", value=len(n))
        yield CounterMetricFamily(
            "sluice_conntrack_nat_orphans", "NAT translations expired unclaimed", value=n.orphans
        )
        yield CounterMetricFamily(
            "sluice_conntrack_nat_evicts", "NAT translations evicted (LRU)", value=n.evicts
        )
        yield _labelled(CounterMetricFamily, "nat_lookups", "NAT lookups", "result",
                        {"hit": n.hits, "miss": n.gets - n.hits})  # fmt: skip


def named_netns() -> list[str]:
    """Every named network namespace (/run/netns)."""
    from pathlib import Path

    return sorted(p.name for p in Path("/run/netns").glob("*"))


def dump_namespaces(names, config=None) -> list[tuple[str | None, HostConn]]:
    """(namespace, entry) for each namespace named (None: ours); one that vanished is skipped."""
    out = []
    for ns in names:
        try:
            out += [(ns, c) for c in HostConntrack(config, netns=ns).dump()]
        except (OSError, ValueError):
            if ns is None or os.path.exists(f"/run/netns/{ns}"):
                raise  # a real failure, not a namespace deleted while we went through the list
    return out


def _labelled(family, name: str, doc: str, label: str, values: dict):
    m = family(f"sluice_conntrack_{name}", doc, labels=[label])
    for k, v in values.items():
        m.add_metric([k], v)
    return m


def _flow(t) -> FlowTuple:
    port = lambda v: int(v or 0)  # noqa: E731
    sport, dport = (t.icmp_id, t.icmp_id) if t.proto in (1, 58) else (t.sport, t.dport)
    return FlowTuple(
        ipaddress.ip_address(t.saddr), ipaddress.ip_address(t.daddr), port(sport), port(dport), t.proto
    )


def _from_pyroute2(e) -> HostConn:
    state = e.protoinfo.state_name() if e.protoinfo is not None else None
    return HostConn(_flow(e.tuple_orig), _flow(e.tuple_reply), e.status or 0, e.timeout, state, e.mark or 0)


def _from_pyroute2_msg(msg) -> HostConn:
    from pyroute2.conntrack import ConntrackEntry

    g = msg.get_attr
    e = ConntrackEntry(msg["nfgen_family"], g("CTA_TUPLE_ORIG"), g("CTA_TUPLE_REPLY"), g("CTA_STATUS"),
                       g("CTA_TIMEOUT"), g("CTA_PROTOINFO"), g("CTA_MARK"), g("CTA_ID"), g("CTA_USE"),
                       g("CTA_ZONE"))  # fmt: skip
    return _from_pyroute2(e)
