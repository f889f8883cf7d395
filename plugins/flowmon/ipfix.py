"""IPFIX (RFC 7011) encoding and transport for flow records.

Two templates, one per address family, built from IANA information elements where one exists and
from enterprise elements (PEN 32473, the documentation number of RFC 5612, until sluice has its
own) for what IANA has no element for: RTT, DNS, drops, the sampling rate. A collector that does
not know the enterprise elements skips them by length, as RFC 7011 requires.

Every IANA element carries what IANA defines: octetDeltaCount is the IP packets' bytes (header
and payload, no L2), tcpControlBits the header's flag bits only (flowmon's SYN-ACK/FIN-ACK/RST-ACK
combination bits would read as NS and reserved bits), the DSCP goes in ipDiffServCodePoint (the
datapath keeps no ECN bits for ipClassOfService), and the counting interface is the ingress or
the egress interface by the direction it counted in.

UDP: templates go out first and again every ``template_refresh_s``; each message stays under the
path MTU. TCP: templates go out once per connection; a broken connection is reopened at the next
export (the failed records are counted as export errors, never retried into a stale stream).
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterable, Sequence
from typing import NamedTuple

from sluice.plugins.flowmon.records import (
    V4_PREFIX,
    Flow,
)

VERSION = 10
TEMPLATE_SET_ID = 2
PEN = 32473
HEADER = struct.Struct("!HHIII")  # version, length, export time, sequence, observation domain
SET_HEADER = struct.Struct("!HH")


class Element(NamedTuple):
    name: str
    id: int
    length: int
    enterprise: int = 0


def _common(src: Element, dst: Element, icmp: Element) -> list[Element]:
    return [
        src,
        dst,
        Element("sourceTransportPort", 7, 2),
        Element("destinationTransportPort", 11, 2),
        Element("protocolIdentifier", 4, 1),
        icmp,
        Element("octetDeltaCount", 1, 8),
        Element("packetDeltaCount", 2, 8),
        Element("flowStartMilliseconds", 152, 8),
        Element("flowEndMilliseconds", 153, 8),
        Element("tcpControlBits", 6, 2),
        Element("ipDiffServCodePoint", 195, 1),
        Element("sourceMacAddress", 56, 6),
        Element("destinationMacAddress", 80, 6),
        Element("ingressInterface", 10, 4),
        Element("egressInterface", 14, 4),
        Element("flowDirection", 61, 1),
        Element("flowmonSamplingRate", 1, 4, PEN),
        Element("flowmonRttNanoseconds", 2, 8, PEN),
        Element("flowmonDnsLatencyNanoseconds", 3, 8, PEN),
        Element("flowmonDnsId", 4, 2, PEN),
        Element("flowmonDnsFlags", 5, 2, PEN),
        Element("flowmonDropPackets", 6, 8, PEN),
        Element("flowmonDropBytes", 7, 8, PEN),
        Element("flowmonDropReason", 8, 4, PEN),
        Element("flowmonDnsQueryName", 9, 64, PEN),
    ]


V4_ELEMENTS = _common(
    Element("sourceIPv4Address", 8, 4),
    Element("destinationIPv4Address", 12, 4),
    Element("icmpTypeCodeIPv4", 32, 2),
)
V6_ELEMENTS = _common(
    Element("sourceIPv6Address", 27, 16),
    Element("destinationIPv6Address", 28, 16),
    Element("icmpTypeCodeIPv6", 139, 2),
)
_TYPES = {1: "B", 2: "H", 4: "I", 8: "Q"}


class Template:
    def __init__(self, template_id: int, elements: Sequence[Element], addr_len: int):
        self.id, self.elements = template_id, list(elements)
        # Addresses, MACs and names are octet strings; the rest are unsigned integers.
        codes = []
        for e in self.elements:
            octets = e.length in (6, 16, 64) or (e.length == 4 and e.id in (8, 12) and not e.enterprise)
            codes.append(f"{e.length}s" if octets else _TYPES[e.length])
        self.record = struct.Struct("!" + "".join(codes))
        self.addr_len = addr_len

    def encode_template(self) -> bytes:
        out = [struct.pack("!HH", self.id, len(self.elements))]
        for e in self.elements:
            if e.enterprise:
                out.append(struct.pack("!HHI", e.id | 0x8000, e.length, e.enterprise))
            else:
                out.append(struct.pack("!HH", e.id, e.length))
        return b"".join(out)


TEMPLATE_V4 = Template(256, V4_ELEMENTS, 4)
TEMPLATE_V6 = Template(257, V6_ELEMENTS, 16)
TEMPLATES = (TEMPLATE_V4, TEMPLATE_V6)


class Encoder:
    """Flows to IPFIX messages for one observation domain (keeps the sequence number)."""

    def __init__(self, domain: int = 1, max_message: int = 1400, reasons: dict[str, int] | None = None):
        self.domain = domain
        self.max_message = max_message
        self.sequence = 0  # data records sent so far (RFC 7011 3.1)
        self.reason_values = reasons or {}

    def _record(self, t: Template, f: Flow) -> bytes:
        # Straight from the raw key and value (FLOW's field order): this runs once per flow.
        saddr, daddr, sport, dport, proto = f.k
        (first, last, packets, nbytes, rtt, dns_latency, ifindex, _, _, _, _, sampling, flags, dns_id,
         dns_flags, direction, _, _, _, _, _, dscp, smac, dmac, qname) = f.v  # fmt: skip
        if t is TEMPLATE_V4:
            saddr, daddr = saddr[12:], daddr[12:]
        icmp = 0
        if proto == 1 or proto == 58:
            icmp, sport, dport = sport << 8 | dport, 0, 0
        off, egress = f.offset, direction & 1
        return t.record.pack(
            saddr, daddr, sport, dport, proto, icmp, nbytes, packets, (first + off) // 1_000_000,
            (last + off) // 1_000_000, flags & 0xFF, dscp & 0x3F, smac, dmac, 0 if egress else ifindex,
            ifindex if egress else 0, egress,
            sampling or 1, rtt, dns_latency, dns_id, dns_flags, f.drop_packets, f.drop_bytes,
            self.reason_values.get(f.drop_reason, 0) if f.drop_reason else 0,
            f.dns_qname.encode()[:64] if qname[0] else b"",
        )  # fmt: skip

    def _message(self, sets: list[bytes], records: int, now: int) -> bytes:
        body = b"".join(sets)
        msg = HEADER.pack(VERSION, HEADER.size + len(body), now, self.sequence, self.domain) + body
        self.sequence = (self.sequence + records) & 0xFFFFFFFF
        return msg

    def template_message(self, now: int | None = None) -> bytes:
        body = b"".join(t.encode_template() for t in TEMPLATES)
        s = SET_HEADER.pack(TEMPLATE_SET_ID, SET_HEADER.size + len(body)) + body
        return self._message([s], 0, int(now or time.time()))

    def data_messages(self, flows: Iterable[Flow], now: int | None = None) -> list[bytes]:
        """Data messages, each holding one set of one template, each at most ``max_message`` bytes."""
        now = int(now or time.time())
        by_template: dict[int, list[bytes]] = {256: [], 257: []}
        v4, v6, record = by_template[256], by_template[257], self._record
        for f in flows:
            if f.k[0][:12] == V4_PREFIX:
                v4.append(record(TEMPLATE_V4, f))
            else:
                v6.append(record(TEMPLATE_V6, f))
        out = []
        for t in TEMPLATES:
            recs = by_template[t.id]
            per_msg = max(1, (self.max_message - HEADER.size - SET_HEADER.size) // t.record.size)
            for i in range(0, len(recs), per_msg):
                part = recs[i : i + per_msg]
                body = b"".join(part)
                s = SET_HEADER.pack(t.id, SET_HEADER.size + len(body)) + body
                out.append(self._message([s], len(part), now))
        return out


def parse_address(address: str, default_port: int = 4739) -> tuple[str, int]:
    """``host:port``, ``[v6]:port`` or a bare host; raises ValueError with the reason."""
    host, port = address, default_port
    if address.startswith("["):
        host, _, rest = address[1:].partition("]")
        if rest:
            port = int(rest.lstrip(":"))
    elif address.count(":") == 1:
        host, p = address.split(":")
        port = int(p)
    if not host or not 0 < port < 65536:
        raise ValueError(f"bad collector address {address!r}: use host:port")
    return host, port


class Exporter:
    """One IPFIX collector over UDP or TCP."""

    def __init__(
        self,
        address: str,
        transport: str = "udp",
        *,
        domain: int = 1,
        template_refresh_s: float = 60.0,
        reasons: dict[str, int] | None = None,
    ):
        self.host, self.port = parse_address(address)
        self.transport = transport
        max_message = 1400 if transport == "udp" else 65000
        self.encoder = Encoder(domain, max_message, reasons)
        self.template_refresh_s = template_refresh_s
        self.sock: socket.socket | None = None
        self.templates_sent_at = 0.0

    def _connect(self) -> socket.socket:
        infos = socket.getaddrinfo(
            self.host, self.port, type=socket.SOCK_DGRAM if self.transport == "udp" else socket.SOCK_STREAM
        )
        family, kind, proto, _, addr = infos[0]
        sock = socket.socket(family, kind, proto)
        sock.settimeout(5)
        try:
            sock.connect(addr)
        except OSError:
            sock.close()
            raise
        self.templates_sent_at = 0.0
        return sock

    def export(self, flows: Sequence[Flow]) -> int:
        """Send ``flows``; returns the number of messages. Raises OSError (the caller counts it)."""
        if self.sock is None:
            self.sock = self._connect()
        messages = self.encoder.data_messages(flows)
        now = time.monotonic()
        if self.transport == "tcp":
            if not self.templates_sent_at:
                messages.insert(0, self.encoder.template_message())
                self.templates_sent_at = now
            try:
                self.sock.sendall(b"".join(messages))
            except OSError:
                self.close()  # reopened at the next export, with templates
                raise
            return len(messages)
        if not self.templates_sent_at or now - self.templates_sent_at >= self.template_refresh_s:
            messages.insert(0, self.encoder.template_message())
            self.templates_sent_at = now
        for m in messages:
            self.sock.send(m)
        return len(messages)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
