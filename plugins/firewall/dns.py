"""The DNS forwarding proxy that turns hostname rules into address allows.

Clients query the gateway (the ``dns.listen`` addresses, UDP and TCP). For each query the proxy
asks the policy whether the client's network may resolve the name: if not, the client gets
NXDOMAIN or REFUSED at once. If so, the query goes to the upstream resolver from a fresh socket
connected to the upstream (so the kernel drops datagrams from anyone else) with a fresh random
transaction id; only a response with that id and the same question is accepted. The addresses of
the answer (A and AAAA, following CNAME chains) are written into the datapath's maps *before* the
answer is sent to the client, so the client's first SYN can never race the allow.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass

from . import dnswire


@dataclass
class DnsStats:
    queries: int = 0
    forwarded: int = 0
    denied: int = 0
    failed: int = 0  # upstream silent or broken
    ignored: int = 0  # malformed queries, responses sent to the proxy, foreign answers


@dataclass(frozen=True)
class Verdict:
    """What the policy says about one query: forward it (learning or not) or answer ``rcode``."""

    forward: bool
    learn: bool = False


Decide = Callable[[str, str], Verdict]  # (client address, query name) -> verdict
Learn = Callable[[str, str, dict[str, int]], None]  # (client address, query name, {addr: ttl})


class DnsProxy:
    def __init__(
        self,
        listen: list[str],
        port: int,
        upstream: tuple[str, int],
        decide: Decide,
        learn: Learn,
        deny_rcode: int,
        timeout: float,
        log,
        max_ttl: int = 86400,
    ):
        self.listen, self.port, self.upstream = listen, port, upstream
        self.decide, self.learn, self.deny_rcode, self.timeout = decide, learn, deny_rcode, timeout
        self.log = log
        self.max_ttl = max_ttl  # answers are capped to it: the allow never ends before the cache
        self.stats = DnsStats()
        self._closers: list[Callable[[], object]] = []

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for addr in self.listen:
            family = socket.AF_INET6 if ":" in addr else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_DGRAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((addr, self.port))
            transport, _ = await loop.create_datagram_endpoint(lambda: _UdpServer(self), sock=sock)
            self._closers.append(transport.close)
            server = await asyncio.start_server(self._tcp_client, addr, self.port, reuse_address=True)
            self._closers.append(server.close)

    def close(self) -> None:
        for close in self._closers:
            close()
        self._closers.clear()

    # ---- one query, whatever the transport ----

    async def answer(self, query: bytes, client: str, tcp: bool) -> bytes | None:
        """The bytes to send back to ``client``, or None to stay silent."""
        try:
            q = dnswire.parse(query)
        except dnswire.DnsError:
            self.stats.ignored += 1
            return None
        if q.is_response or len(q.questions) != 1:
            self.stats.ignored += 1  # an answer sent to us is never a reason to open anything
            return None
        self.stats.queries += 1
        qname, qtype, _ = q.questions[0]
        verdict = self.decide(client, qname)
        if not verdict.forward:
            self.stats.denied += 1
            self.log.info("dns denied", client=client, name=qname)
            return dnswire.error_reply(query, q, self.deny_rcode)
        raw = await (self._forward_tcp(query) if tcp else self._forward_udp(query, q))
        if raw is None:
            self.stats.failed += 1
            return dnswire.error_reply(query, q, dnswire.RCODES["servfail"])
        try:
            answer = dnswire.parse(raw)
        except dnswire.DnsError:
            self.stats.failed += 1
            return dnswire.error_reply(query, q, dnswire.RCODES["servfail"])
        if verdict.learn and qtype in (dnswire.A, dnswire.AAAA, 255):
            addrs, _chain = dnswire.resolve_chain(answer, qname)
            if addrs:
                self.learn(client, qname, addrs)  # into the maps before the client hears of it
            raw = dnswire.cap_ttls(raw, answer, self.max_ttl)
        self.stats.forwarded += 1
        return dnswire.with_id(raw, q.id)

    def _matches(self, raw: bytes, qid: int, q: dnswire.Message) -> bool:
        try:
            r = dnswire.parse(raw)
        except dnswire.DnsError:
            return False
        return r.is_response and r.id == qid and r.questions == q.questions

    async def _forward_udp(self, query: bytes, q: dnswire.Message) -> bytes | None:
        loop = asyncio.get_running_loop()
        qid = secrets.randbelow(0x10000)
        got: asyncio.Future[bytes] = loop.create_future()

        proxy = self

        class Upstream(asyncio.DatagramProtocol):
            def datagram_received(self, data, addr):
                if proxy._matches(data, qid, q) and not got.done():
                    got.set_result(data)
                else:
                    proxy.stats.ignored += 1

            def error_received(self, exc):
                if not got.done():
                    got.set_exception(exc)

        # connect(): the kernel delivers only datagrams from the upstream's address and port.
        transport, _ = await loop.create_datagram_endpoint(Upstream, remote_addr=self.upstream)
        try:
            transport.sendto(dnswire.with_id(query, qid))
            return await asyncio.wait_for(got, self.timeout)
        except (TimeoutError, OSError):
            return None
        finally:
            transport.close()

    async def _forward_tcp(self, query: bytes) -> bytes | None:
        qid = secrets.randbelow(0x10000)
        q = dnswire.parse(query)
        writer = None
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(*self.upstream), self.timeout)
            msg = dnswire.with_id(query, qid)
            writer.write(struct.pack("!H", len(msg)) + msg)
            await writer.drain()
            size = struct.unpack("!H", await asyncio.wait_for(reader.readexactly(2), self.timeout))[0]
            raw = await asyncio.wait_for(reader.readexactly(size), self.timeout)
            return raw if self._matches(raw, qid, q) else None
        except (TimeoutError, OSError, asyncio.IncompleteReadError):
            return None
        finally:
            if writer is not None:
                writer.close()

    async def _tcp_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        client = writer.get_extra_info("peername")[0]
        try:
            while True:
                size = struct.unpack("!H", await asyncio.wait_for(reader.readexactly(2), 10))[0]
                query = await asyncio.wait_for(reader.readexactly(size), 10)
                reply = await self.answer(query, client, tcp=True)
                if reply is None:
                    break
                writer.write(struct.pack("!H", len(reply)) + reply)
                await writer.drain()
        except (TimeoutError, OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


class _UdpServer(asyncio.DatagramProtocol):
    def __init__(self, proxy: DnsProxy):
        self.proxy = proxy
        self.transport = None
        self.tasks: set[asyncio.Task] = set()

    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        task = asyncio.get_running_loop().create_task(self._serve(data, addr))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _serve(self, data, addr):
        try:
            reply = await self.proxy.answer(data, addr[0], tcp=False)
        except Exception as exc:  # one bad query never stops the proxy
            self.proxy.log.warning("dns query failed", client=addr[0], error=f"{type(exc).__name__}: {exc}")
            return
        if reply is not None:
            with contextlib.suppress(OSError):
                self.transport.sendto(reply, addr)
