"""How a session is stored in the bucket: key and value encoding, version 1.

Key: ``<owner>.<hex of the owner's session key>`` (owner: ``[A-Za-z0-9_-]+``; the hex is lower
case), which is a valid NATS KV key and keeps one owner's records under one subject prefix
(``$KV.<bucket>.<owner>.>``).

Value (all integers big-endian)::

    offset  size  field
    0       4     magic  b"SLRS"
    4       1     version (1)
    5       1     N: length of the node id
    6       8     written_ns: wall-clock unix time of the write, ns
    14      8     event_ns: the owner's SessionEvent.time_ns (as the owner gave it)
    22      4     V: length of the owner's value
    26      N     node id, UTF-8
    26+N    V     the owner's value bytes (opaque)
    26+N+V  rest  attrs: a JSON object, UTF-8 (may be empty: {})

A decoder accepts exactly version 1; anything else is a *foreign* record: skipped and counted,
never rewritten or deleted (a newer agent may share the bucket).
"""

from __future__ import annotations

import json
import re
import struct
import time
from dataclasses import dataclass

from sluice.sessions import Session

MAGIC = b"SLRS"
VERSION = 1
HEADER = struct.Struct("!4sBBQQI")
OWNER_RE = re.compile(r"^[A-Za-z0-9_-]+$")
HEX_RE = re.compile(r"^(?:[0-9a-f]{2})+$")


class RecordError(ValueError):
    """A key or value that is not a version-1 sluice record; ``reason`` is a short metric label."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass(frozen=True)
class Record:
    session: Session
    node_id: str
    written_ns: int
    event_ns: int


def encode_key(owner: str, key: bytes) -> str:
    if not OWNER_RE.match(owner):
        raise RecordError("bad-owner", f"owner {owner!r} is not [A-Za-z0-9_-]+")
    if not key:
        raise RecordError("bad-key", "empty session key")
    return f"{owner}.{key.hex()}"


def decode_key(kv_key: str) -> tuple[str, bytes]:
    owner, dot, hexkey = kv_key.partition(".")
    if not dot or not OWNER_RE.match(owner) or not HEX_RE.match(hexkey):
        raise RecordError("bad-key", f"{kv_key!r} is not <owner>.<hex>")
    return owner, bytes.fromhex(hexkey)


def encode_value(session: Session, node_id: str, event_ns: int, written_ns: int | None = None) -> bytes:
    node = node_id.encode()
    attrs = json.dumps(session.attrs, separators=(",", ":"), default=str).encode() if session.attrs else b""
    header = HEADER.pack(
        MAGIC,
        VERSION,
        len(node),
        written_ns if written_ns is not None else time.time_ns(),
        event_ns,
        len(session.value),
    )
    return b"".join((header, node, session.value, attrs))


def decode(kv_key: str, data: bytes) -> Record:
    owner, key = decode_key(kv_key)
    if len(data) < HEADER.size:
        raise RecordError("truncated", f"{kv_key}: {len(data)} bytes, header needs {HEADER.size}")
    magic, version, node_len, written_ns, event_ns, value_len = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise RecordError("foreign", f"{kv_key}: magic {magic!r}")
    if version != VERSION:
        raise RecordError("version", f"{kv_key}: version {version}, this agent reads {VERSION}")
    end_node = HEADER.size + node_len
    end_value = end_node + value_len
    if len(data) < end_value:
        raise RecordError("truncated", f"{kv_key}: {len(data)} bytes, lengths need {end_value}")
    try:
        node_id = data[HEADER.size : end_node].decode()
        attrs = json.loads(data[end_value:]) if len(data) > end_value else {}
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RecordError("bad-body", f"{kv_key}: {exc}") from None
    if not isinstance(attrs, dict):
        raise RecordError("bad-body", f"{kv_key}: attrs is {type(attrs).__name__}, not an object")
    session = Session(owner=owner, key=key, value=bytes(data[end_node:end_value]), attrs=attrs)
    return Record(session=session, node_id=node_id, written_ns=written_ns, event_ns=event_ns)
