"""Just enough of the DNS wire format for a forwarding proxy: strict parsing (every read bounded,
compression loops refused), error replies, and the addresses an answer gives for a name."""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass, field

A, CNAME, AAAA = 1, 5, 28
RCODES = {"noerror": 0, "servfail": 2, "nxdomain": 3, "refused": 5}
MAX_CNAME_HOPS = 10


class DnsError(ValueError):
    """A message that does not parse."""


@dataclass
class Record:
    name: str
    rtype: int
    ttl: int
    data: str  # address for A/AAAA, target for CNAME, "" otherwise
    ttl_offset: int = 0  # where the TTL sits in the message


@dataclass
class Message:
    id: int
    flags: int
    questions: list[tuple[str, int, int]]  # (name, qtype, qclass)
    answers: list[Record] = field(default_factory=list)
    question_end: int = 12  # offset just past the question section

    @property
    def is_response(self) -> bool:
        return bool(self.flags & 0x8000)

    @property
    def rcode(self) -> int:
        return self.flags & 0xF


def _name(msg: bytes, off: int) -> tuple[str, int]:
    labels, end, hops = [], None, 0
    while True:
        if off >= len(msg):
            raise DnsError("name runs past the message")
        n = msg[off]
        if n & 0xC0 == 0xC0:
            if off + 2 > len(msg):
                raise DnsError("truncated compression pointer")
            hops += 1
            if hops > 32:
                raise DnsError("compression loop")
            end = off + 2 if end is None else end
            off = struct.unpack_from("!H", msg, off)[0] & 0x3FFF
        elif n & 0xC0:
            raise DnsError("unknown label type")
        elif n == 0:
            name = ".".join(labels).lower()
            if len(name) > 253:
                raise DnsError("name too long")
            return name, (off + 1 if end is None else end)
        else:
            if off + 1 + n > len(msg):
                raise DnsError("label runs past the message")
            labels.append(msg[off + 1 : off + 1 + n].decode("ascii", errors="replace"))
            off += 1 + n


def parse(msg: bytes) -> Message:
    if len(msg) < 12:
        raise DnsError("shorter than a DNS header")
    qid, flags, qd, an, _ns, _ar = struct.unpack_from("!HHHHHH", msg)
    off, questions = 12, []
    for _ in range(qd):
        name, off = _name(msg, off)
        if off + 4 > len(msg):
            raise DnsError("truncated question")
        qtype, qclass = struct.unpack_from("!HH", msg, off)
        off += 4
        questions.append((name, qtype, qclass))
    m = Message(qid, flags, questions, question_end=off)
    for _ in range(an):
        name, off = _name(msg, off)
        if off + 10 > len(msg):
            raise DnsError("truncated record")
        rtype, _cls, ttl, rdlen = struct.unpack_from("!HHIH", msg, off)
        ttl_offset = off + 4
        off += 10
        if off + rdlen > len(msg):
            raise DnsError("record data runs past the message")
        data = ""
        if rtype == A and rdlen == 4:
            data = str(ipaddress.IPv4Address(msg[off : off + 4]))
        elif rtype == AAAA and rdlen == 16:
            data = str(ipaddress.IPv6Address(msg[off : off + 16]))
        elif rtype == CNAME:
            data = _name(msg, off)[0]
        elif rtype in (A, AAAA):
            raise DnsError(f"address record of {rdlen} bytes")
        m.answers.append(Record(name, rtype, ttl, data, ttl_offset))
        off += rdlen
    return m


def with_id(msg: bytes, qid: int) -> bytes:
    return struct.pack("!H", qid) + msg[2:]


def error_reply(query: bytes, q: Message, rcode: int) -> bytes:
    """An answer to ``query`` with ``rcode`` and no records: header and question only."""
    flags = 0x8000 | (q.flags & 0x7900) | 0x0080 | rcode  # QR, opcode+RD kept, RA, rcode
    return struct.pack("!HHHHHH", q.id, flags, len(q.questions), 0, 0, 0) + query[12 : q.question_end]


def resolve_chain(answer: Message, qname: str) -> tuple[dict[str, int], list[str]]:
    """Addresses the answer gives for ``qname`` following CNAMEs: ({address: ttl}, chain of names).

    The TTL of an address is the smallest along its chain (a CNAME expiring first ends it)."""
    chain, ttl_cap, name = [qname], None, qname
    for _ in range(MAX_CNAME_HOPS):
        cnames = [r for r in answer.answers if r.rtype == CNAME and r.name == name]
        if not cnames:
            break
        ttl_cap = cnames[0].ttl if ttl_cap is None else min(ttl_cap, cnames[0].ttl)
        name = cnames[0].data
        if name in chain:
            break  # a CNAME loop: stop where it closes
        chain.append(name)
    addrs: dict[str, int] = {}
    for r in answer.answers:
        if r.rtype in (A, AAAA) and r.name in chain:
            ttl = r.ttl if ttl_cap is None else min(r.ttl, ttl_cap)
            addrs[r.data] = max(addrs.get(r.data, 0), ttl)
    return addrs, chain


def cap_ttls(msg: bytes, answer: Message, cap: int) -> bytes:
    """``msg`` with every answer TTL above ``cap`` lowered to it: a client must not cache an
    address longer than the firewall keeps it allowed."""
    out = bytearray(msg)
    for r in answer.answers:
        if r.ttl > cap:
            struct.pack_into("!I", out, r.ttl_offset, cap)
    return bytes(out)
