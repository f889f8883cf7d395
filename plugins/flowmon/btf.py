"""Member offsets of kernel structs from the running kernel's BTF (/sys/kernel/btf/vmlinux).

The drop tracepoint reads ``struct sk_buff`` fields with probe reads. BCC compiles against the
header tree it was given, which need not match the running kernel (Debian's 6.1 headers on a 6.18
kernel here), so the offsets come from BTF and reach the C as -D flags: never from headers.
"""

from __future__ import annotations

import functools
import struct
from pathlib import Path

VMLINUX = Path("/sys/kernel/btf/vmlinux")
STRUCT, UNION = 4, 5
_MODIFIERS = {8, 9, 10, 11, 18}  # typedef, volatile, const, restrict, type_tag
# Bytes after the common 12-byte type header, per kind: fixed, and per vlen entry.
_EXTRA = {1: (4, 0), 3: (12, 0), 4: (0, 12), 5: (0, 12), 6: (0, 8), 13: (0, 8), 14: (4, 0), 15: (0, 12),
          17: (4, 0), 19: (0, 12)}  # fmt: skip


class BtfError(Exception):
    pass


def _parse(data: bytes) -> tuple[list[tuple], bytes]:
    magic, _ver, _flags, hdr_len, type_off, type_len, str_off, str_len = struct.unpack_from("<HBBIIIII", data)
    if magic != 0xEB9F:
        raise BtfError("not BTF (bad magic)")
    types_start = hdr_len + type_off
    strings = data[hdr_len + str_off : hdr_len + str_off + str_len]
    types: list[tuple] = [(0, 0, 0, 0, ())]  # id 0 is void
    off, end = types_start, types_start + type_len
    while off < end:
        name_off, info, size_type = struct.unpack_from("<III", data, off)
        kind, vlen, kflag = (info >> 24) & 0x1F, info & 0xFFFF, info >> 31
        off += 12
        fixed, per = _EXTRA.get(kind, (0, 0))
        members = ()
        if kind in (STRUCT, UNION):
            members = tuple(struct.iter_unpack("<III", data[off : off + 12 * vlen]))
        off += fixed + per * vlen
        types.append((kind, name_off, size_type, kflag, members))
    return types, strings


def _name(strings: bytes, off: int) -> str:
    return strings[off : strings.index(b"\0", off)].decode()


@functools.cache
def _vmlinux() -> tuple[list[tuple], bytes]:
    try:
        return _parse(VMLINUX.read_bytes())
    except OSError as exc:
        raise BtfError(f"cannot read {VMLINUX}: {exc.strerror}") from None


def member_offsets(struct_name: str, members: list[str]) -> dict[str, int]:
    """Byte offsets of ``members`` of ``struct struct_name``, looking through anonymous unions."""
    types, strings = _vmlinux()
    root = next(
        (i for i, t in enumerate(types) if t[0] == STRUCT and t[1] and _name(strings, t[1]) == struct_name),
        None,
    )
    if root is None:
        raise BtfError(f"struct {struct_name} not in vmlinux BTF")
    found: dict[str, int] = {}

    def resolve(tid: int) -> int:
        while types[tid][0] in _MODIFIERS:
            tid = types[tid][2]
        return tid

    def walk(tid: int, base_bits: int) -> None:
        _, _, _, kflag, ms = types[tid]
        for name_off, mtype, moff in ms:
            bits = base_bits + (moff & 0xFFFFFF if kflag else moff)
            if name_off == 0:
                inner = resolve(mtype)
                if types[inner][0] in (STRUCT, UNION):
                    walk(inner, bits)
                continue
            name = _name(strings, name_off)
            if name in members and name not in found:
                found[name] = bits // 8

    walk(root, 0)
    missing = [m for m in members if m not in found]
    if missing:
        raise BtfError(f"struct {struct_name} has no member {missing[0]} in vmlinux BTF")
    return found
