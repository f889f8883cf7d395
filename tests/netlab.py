"""Test helpers around :mod:`sluice.lab`: unique labs, a two-namespace pair, undo stacks, probes.

Everything that creates kernel state here removes it on the way out, including when the test
body fails. Probes (``ping``, ``dns_query``) run in-process through sockets opened inside the
namespace, so they need neither ``ping`` nor ``dig`` on the host.
"""

from __future__ import annotations

import contextlib
import fnmatch
import secrets
import socket
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sluice import lab as sl
from sluice.lab import DnsReply, Lab, LabSpec


def unique_prefix() -> str:
    """A lab prefix like ``sl3f2a-`` that no namespace or state dir uses yet."""
    while True:
        prefix = f"sl{secrets.token_hex(2)}-"
        taken = any(p.name.startswith(prefix) for p in Path("/run/netns").glob("*"))
        if not taken and not (Path(sl.DEFAULT_STATE_ROOT) / prefix).exists():
            return prefix


@contextlib.contextmanager
def lab(spec: LabSpec | None = None, **spec_fields: Any) -> Iterator[Lab]:
    """A lab under a fresh prefix (unless ``spec`` names one), always torn down afterwards."""
    if spec is not None and spec_fields:
        raise TypeError("pass either a LabSpec or LabSpec fields, not both")
    spec = spec or LabSpec(prefix=unique_prefix(), **spec_fields)
    built = Lab.up(spec)
    try:
        yield built
    finally:
        built.down()


class Deferred:
    """One registered undo action; ``cancel()`` drops it, ``run()`` does it now (once)."""

    def __init__(self, owner: Defer, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]):
        self._owner, self._call = owner, (fn, args, kwargs)

    def cancel(self) -> None:
        with contextlib.suppress(ValueError):
            self._owner._stack.remove(self)

    def run(self) -> None:
        self.cancel()
        fn, args, kwargs = self._call
        fn(*args, **kwargs)


class Defer:
    """An undo stack in the spirit of the kernel selftests' ``defer``.

    Register the undo right after each step succeeds; on exit the undos run newest first, all
    of them even if some fail::

        with Defer() as defer:
            sl.netns_add(name)
            defer(sl.netns_delete, name)

    A failing undo does not mask the test's own failure: it is attached as a note to it.
    """

    def __init__(self) -> None:
        self._stack: list[Deferred] = []

    def __call__(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred:
        handle = Deferred(self, fn, args, kwargs)
        self._stack.append(handle)
        return handle

    def __len__(self) -> int:
        return len(self._stack)

    def run_all(self) -> list[BaseException]:
        """Run every pending undo, newest first; return the exceptions they raised."""
        errors = []
        while self._stack:
            try:
                self._stack[-1].run()
            except Exception as exc:
                errors.append(exc)
        return errors

    def __enter__(self) -> Defer:
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        errors = self.run_all()
        if not errors:
            return
        if exc is not None:
            for err in errors:
                exc.add_note(f"cleanup also failed: {err!r}")
            return
        if len(errors) == 1:
            raise errors[0]
        raise ExceptionGroup("several cleanups failed", errors)


@dataclass(frozen=True)
class NetnsPair:
    """Two namespaces ``a`` and ``b`` joined by one veth pair, ``veth0`` on both sides."""

    a: str
    b: str
    ifname: str = "veth0"

    ADDRS = {("a", 4): "10.99.0.1", ("b", 4): "10.99.0.2", ("a", 6): "fd00:99::1", ("b", 6): "fd00:99::2"}

    def addr(self, side: str, family: int = 4) -> str:
        return self.ADDRS[(side, family)]

    def ns(self, side: str) -> str:
        return {"a": self.a, "b": self.b}[side]


@contextlib.contextmanager
def netns_pair(prefix: str | None = None) -> Iterator[NetnsPair]:
    """Build a :class:`NetnsPair` (v4 /24 and v6 /64 on both ends, usable at once); always removed."""
    prefix = prefix or unique_prefix()
    pair = NetnsPair(a=f"{prefix}a", b=f"{prefix}b")
    with Defer() as defer:
        for side in ("a", "b"):
            sl.netns_add(pair.ns(side))
            defer(sl.netns_delete, pair.ns(side))
        # Distinct ifindexes on the two ends: see sluice.lab._ifindex for why IPv6 cares.
        sl.run_ip(
            "-n", pair.a, "link", "add", pair.ifname, "index", "10", "type", "veth",
            "peer", "name", pair.ifname, "index", "20", "netns", pair.b,
        )  # fmt: skip
        for side in ("a", "b"):
            ns = pair.ns(side)
            sl.run_ip("-n", ns, "addr", "add", f"{pair.addr(side, 4)}/24", "dev", pair.ifname)
            sl.run_ip("-n", ns, "addr", "add", f"{pair.addr(side, 6)}/64", "dev", pair.ifname, "nodad")
            sl.run_ip("-n", ns, "link", "set", pair.ifname, "up")
        sl.wait_links_ready([(pair.a, pair.ifname), (pair.b, pair.ifname)])
        yield pair


def cleanup_leftovers(prefix_glob: str = "sl*-") -> list[str]:
    """Remove labs and netns pairs that crashed test runs left behind; return what was removed."""
    removed = sl.lab_cleanup_all(prefix_glob)
    for path in Path("/run/netns").glob("*"):
        if path.name[-1:] in ("a", "b") and fnmatch.fnmatchcase(path.name[:-1], prefix_glob):
            sl.netns_delete(path.name)
            removed.append(path.name)
    return removed


def dns_query(
    lab: Lab, host_ns: str, server_ip: str, name: str, qtype: str = "A", timeout: float = 2.0
) -> DnsReply:
    """One UDP DNS query from lab host ``host_ns`` (e.g. "client") to ``server_ip``."""
    return sl.dns_query(lab.ns(host_ns), server_ip, name, qtype, timeout=timeout)


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def ping(netns: str, dst: str, timeout: float = 2.0) -> int:
    """Send one ICMP(v6) echo from ``netns`` to ``dst``; return the reply's TTL / hop limit.

    The TTL tells how many routers the reply crossed (64 minus hops). Raises TimeoutError
    when no reply comes. Raw sockets, because the host has no ping binary.
    """
    v6 = ":" in dst
    ident, payload = secrets.randbelow(0x10000), b"sluice-lab-ping"
    if v6:
        sock = sl.netns_socket(netns, 6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVHOPLIMIT, 1)
        request = struct.pack("!BBHHH", 128, 0, 0, ident, 1) + payload  # kernel fills the checksum
    else:
        sock = sl.netns_socket(netns, 4, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        header = struct.pack("!BBHHH", 8, 0, 0, ident, 1)
        request = struct.pack("!BBHHH", 8, 0, _checksum(header + payload), ident, 1) + payload
    deadline = time.monotonic() + timeout
    with sock:
        sock.sendto(request, (dst, 0))
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            try:
                data, ancillary, _flags, source = sock.recvmsg(2048, socket.CMSG_SPACE(4))
            except TimeoutError:
                break
            if v6:
                want = (socket.IPPROTO_IPV6, socket.IPV6_HOPLIMIT)
                hops = [int.from_bytes(d, "little") for lvl, typ, d in ancillary if (lvl, typ) == want]
                icmp, ttl = data, (hops[0] if hops else -1)
            else:
                icmp, ttl = data[(data[0] & 0xF) * 4 :], data[8]
            kind, _code, _sum, rid = struct.unpack_from("!BBHH", icmp)
            if kind == (129 if v6 else 0) and rid == ident and source[0] == dst:
                return ttl
    raise TimeoutError(f"no echo reply from {dst} to {netns} within {timeout}s")
