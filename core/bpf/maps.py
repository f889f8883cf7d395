"""A typed view over a BPF map file descriptor, with batch operations done right.

Why not BCC's table objects: they exist only for maps of a module BCC compiled (a CLI inspecting a
pinned map would have to compile the C again), and BCC 0.26's batch helpers allocate max_entries
sized arrays and share one ctypes object for the count and the batch cursor, so reading a map in
chunks does not work. ``Map`` needs only an fd: from a BCC table, a bpffs pin, a map id, or a map
it creates itself.

Keys and values are encoded with ctypes types when given (scalars such as ``c_uint64`` come back as
Python ints, structures as instances) and are raw ``bytes`` of the kernel's sizes otherwise. Values
of per-CPU maps are lists with one value per possible CPU; the kernel lays them out in 8-byte
aligned slots.

Batch calls see each hash bucket atomically but not the map as a whole: entries changed while a
walk is in progress may be seen or missed, as with any iteration of a live map.

Typed or raw:

* The typed methods (:meth:`Map.items`, :meth:`Map.update_batch`, :meth:`Map.pop_all`, ...) turn
  every entry into a Python object and back. Use them for control-plane sized work (config,
  CLI, tests, a few thousand entries): at a million entries the per-entry encode/decode, not
  the syscalls, is most of the time.
* The raw methods (:meth:`Map.items_raw`, :meth:`Map.update_batch_raw`,
  :meth:`Map.delete_batch_raw`) move whole chunks as contiguous buffers of key_size / value_size
  records, with no per-entry Python work. Use them for bulk work over whole maps (flow eviction,
  GC, reconcile), decoding with ``memoryview.cast``, ``struct.iter_unpack``, numpy or
  ``ctypes.Array.from_buffer`` only what is needed. The typed methods are built on them.
"""

from __future__ import annotations

import ctypes as ct
import errno
import os
import struct
from array import array
from collections.abc import Iterable, Iterator, Mapping
from itertools import islice
from typing import Any

from sluice.bpf import libbpf as lb
from sluice.bpf.libbpf import MapInfo, MapType

__all__ = ["Map", "MapInfo", "MapType"]

_CTYPES = (ct._SimpleCData, ct.Structure, ct.Union, ct.Array)
_ARRAYS = frozenset({MapType.ARRAY, MapType.PERCPU_ARRAY})


def _address(buf) -> tuple[object, int]:
    """``(owner, address)`` of a contiguous buffer; keep ``owner`` referenced while the address is used.

    ``bytes`` and writable buffers (bytearray, ctypes arrays, mmap, writable memoryviews) are used
    in place; other read-only buffers are copied once.
    """
    if type(buf) is not bytes:
        n = memoryview(buf).nbytes
        try:
            arr = (ct.c_char * n).from_buffer(buf)
            return arr, ct.addressof(arr)
        except TypeError:  # read-only
            buf = bytes(buf)
    return buf, ct.cast(buf, ct.c_void_p).value or 0


def _records(buf, size: int, count: int | None, what: str) -> int:
    """How many ``size``-byte records ``buf`` holds (``count`` when given, checked against its length)."""
    nbytes = memoryview(buf).nbytes
    if count is None:
        if nbytes % size:
            raise ValueError(f"{what}: {nbytes} bytes is not a whole number of {size}-byte records")
        return nbytes // size
    if count < 0 or count * size > nbytes:
        raise ValueError(f"{what}: {count} records of {size} bytes need {count * size} bytes, got {nbytes}")
    return count


class _NoBatch(Exception):
    """The kernel has no batch variant of an operation for this map type."""


class _Codec:
    """bytes <-> one key or value: a ctypes type, or raw bytes when ``ctype`` is None."""

    def __init__(self, ctype: type | None, size: int, what: str):
        if ctype is not None and ct.sizeof(ctype) != size:
            raise ValueError(f"{what}: {ctype.__name__} is {ct.sizeof(ctype)} bytes, the map says {size}")
        self.ctype, self.size = ctype, size
        self.scalar = ctype is not None and issubclass(ctype, ct._SimpleCData)
        # Native scalar formats that memoryview.cast can decode a whole chunk of at once.
        code = getattr(ctype, "_type_", None) if self.scalar else None
        self.fmt = code if isinstance(code, str) and code in "bBhHiIlLqQfd?" else None
        self.pack = struct.Struct(self.fmt).pack if self.fmt in tuple("bBhHiIlLqQ") else None  # native

    def encode(self, obj: Any) -> bytes:
        t = type(obj)
        if t is self.ctype or t is bytes:  # the common cases first: this runs once per entry
            b = bytes(obj)
        elif t is int and self.pack:
            b = self.pack(obj)
        elif isinstance(obj, (bytes, bytearray, memoryview, *_CTYPES)):
            b = bytes(obj)
        elif self.ctype is None:
            raise TypeError(f"map opened without types takes bytes of {self.size}, not {t.__name__}")
        else:
            b = bytes(self.ctype(*obj) if isinstance(obj, tuple) else self.ctype(obj))
        if len(b) != self.size:
            raise ValueError(f"expected {self.size} bytes, got {len(b)}")
        return b

    def encode_many(self, objs: list) -> bytes:
        """``objs`` encoded back to back; whole-chunk fast paths for plain ints and ctypes instances."""
        t = self.ctype
        if self.pack and all(type(o) is int for o in objs):
            try:
                return struct.pack(f"{len(objs)}{self.fmt}", *objs)
            except struct.error:
                pass  # out of range: the per-entry encode below raises with the offending value
        elif t is not None and not self.scalar and all(type(o) is t for o in objs):
            return b"".join(map(bytes, objs))
        return b"".join([self.encode(o) for o in objs])

    def decode(self, buf: bytes, off: int = 0) -> Any:
        if self.ctype is None:
            return buf[off : off + self.size]
        v = self.ctype.from_buffer_copy(buf, off)
        return v.value if self.scalar else v

    def decode_many(self, buf: bytes, n: int, stride: int | None = None) -> list:
        stride = stride or self.size
        if self.fmt and stride == self.size:
            return memoryview(buf)[: n * stride].cast(self.fmt).tolist()
        return [self.decode(buf, i * stride) for i in range(n)]


class Map:
    """A BPF map behind an fd this object owns (closed by :meth:`close` or ``with``)."""

    def __init__(
        self, fd: int, key_type: type | None = None, value_type: type | None = None, *, label: str = ""
    ):
        self._fd = fd  # owned from here on, closed even if the checks below fail
        try:
            self.info: MapInfo = lb.map_info(fd)
            self.what = label or f"map {self.info.name!r} (id {self.info.id})"
            self._key = _Codec(key_type, self.info.key_size, f"{self.what} key")
            self._one = _Codec(value_type, self.info.value_size, f"{self.what} value")
        except BaseException:
            self.close()
            raise
        self.ncpus = lb.possible_cpus() if self.info.percpu else 1
        # Per-CPU values: one 8-byte aligned slot per possible CPU (kernel: round_up(value_size, 8)).
        self._slot = (self.info.value_size + 7) & ~7 if self.info.percpu else self.info.value_size
        self.value_size = self._slot * self.ncpus  # bytes of one value as user space reads/writes it
        self._no_batch: set[str] = set()

    # --- construction --------------------------------------------------------------------------

    @classmethod
    def from_bcc(cls, table) -> Map:
        """A view of a BCC table. The fd is duplicated: the view stays valid after BCC cleans up."""
        # BCC's per-CPU tables replace Leaf by an array over CPUs and keep the element type in sLeaf.
        value_type = getattr(table, "sLeaf", table.Leaf)
        name = getattr(table, "_name", None)
        label = f"map {name.decode() if isinstance(name, bytes) else name!r}" if name else ""
        return cls(os.dup(table.map_fd), table.Key, value_type, label=label)

    @classmethod
    def open_pinned(
        cls, path: str | os.PathLike, key_type: type | None = None, value_type: type | None = None
    ) -> Map:
        """Open a map pinned on bpffs; nothing is compiled. Without types keys and values are bytes."""
        return cls(lb.obj_get(path), key_type, value_type, label=f"map {os.fspath(path)}")

    @classmethod
    def from_id(cls, map_id: int, key_type: type | None = None, value_type: type | None = None) -> Map:
        return cls(lb.map_get_fd_by_id(map_id), key_type, value_type)

    @classmethod
    def create(
        cls,
        map_type: MapType,
        key: int | type,
        value: int | type,
        max_entries: int,
        *,
        name: str = "",
        flags: int = 0,
    ) -> Map:
        """Create a map without BCC (tests, benchmarks). ``key``/``value``: a size or a ctypes type."""
        ksize = key if isinstance(key, int) else ct.sizeof(key)
        vsize = value if isinstance(value, int) else ct.sizeof(value)
        fd = lb.map_create(map_type, ksize, vsize, max_entries, name=name, flags=flags)
        return cls(fd, None if isinstance(key, int) else key, None if isinstance(value, int) else value)

    @property
    def fd(self) -> int:
        if self._fd < 0:
            raise ValueError(f"{self.what} is closed")
        return self._fd

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Map:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        i = self.info
        return f"<Map {i.name!r} id={i.id} {i.type_name} key={i.key_size} value={i.value_size} max={i.max_entries}>"

    # --- encoding ------------------------------------------------------------------------------

    def _value_bytes(self, value: Any) -> bytes:
        """A per-CPU map takes a list (one value per CPU) or one value written to every CPU."""
        if not self.info.percpu:
            return self._one.encode(value)
        per_cpu = value if isinstance(value, list) else [value] * self.ncpus
        if len(per_cpu) != self.ncpus:
            raise ValueError(f"{self.what}: {len(per_cpu)} per-CPU values for {self.ncpus} possible CPUs")
        return b"".join(self._one.encode(v).ljust(self._slot, b"\0") for v in per_cpu)

    def _decode_values(self, buf: bytes, n: int) -> list:
        if not self.info.percpu:
            return self._one.decode_many(buf, n)
        flat = self._one.decode_many(buf, n * self.ncpus, self._slot)
        c = self.ncpus
        return [flat[i * c : (i + 1) * c] for i in range(n)]

    def _pairs(self, n: int, kb: bytes, vb: bytes) -> Iterator[tuple]:
        return zip(self._key.decode_many(kb, n), self._decode_values(vb, n), strict=True)

    # --- single elements -----------------------------------------------------------------------

    def get(self, key: Any, default: Any = None) -> Any:
        buf = ct.create_string_buffer(self.value_size)
        try:
            lb.map_lookup_elem(self.fd, self._key.encode(key), buf, self.what)
        except FileNotFoundError:
            return default
        return self._decode_values(buf.raw, 1)[0]

    def set(self, key: Any, value: Any, flags: int = lb.BPF_ANY) -> None:
        lb.map_update_elem(self.fd, self._key.encode(key), self._value_bytes(value), flags, self.what)

    def delete(self, key: Any) -> bool:
        """Delete one key; False when it was not there."""
        try:
            lb.map_delete_elem(self.fd, self._key.encode(key), self.what)
        except FileNotFoundError:
            return False
        return True

    # --- walks ---------------------------------------------------------------------------------

    def _chunks(self, delete: bool, chunk: int) -> Iterator[tuple[int, bytes, bytes]]:
        """Raw ``(n, keys, values)`` chunks from BPF_MAP_LOOKUP[_AND_DELETE]_BATCH.

        The cursor is opaque: a bucket index for hash maps, the last key for the generic
        implementation (arrays, LPM), so its buffers hold at least a key. ENOENT marks the last
        chunk, which may still carry entries. ENOSPC with nothing copied means the next hash bucket
        holds more entries than fit: retry the same cursor with a bigger chunk.
        """
        op = lb.map_lookup_and_delete_batch if delete else lb.map_lookup_batch
        ks, vs = self.info.key_size, self.value_size
        cursor_in, cursor_out = ct.create_string_buffer(max(ks, 4)), ct.create_string_buffer(max(ks, 4))
        keys, values = ct.create_string_buffer(chunk * ks), ct.create_string_buffer(chunk * vs)
        count = ct.c_uint32()
        started = last = False
        while not last:
            count.value = chunk
            try:
                op(self.fd, cursor_in if started else None, cursor_out, keys, values, count, what=self.what)
            except FileNotFoundError:
                last = True
            except OSError as e:
                if e.errno == errno.ENOSPC and count.value == 0:
                    chunk *= 2
                    keys, values = ct.create_string_buffer(chunk * ks), ct.create_string_buffer(chunk * vs)
                    continue
                if not started and e.errno in lb.UNSUPPORTED:
                    raise _NoBatch from e
                raise
            n = count.value
            if n:
                yield n, ct.string_at(keys, n * ks), ct.string_at(values, n * vs)
            ct.memmove(cursor_in, cursor_out, len(cursor_in))
            started = True

    def _keys_per_key(self) -> Iterator[bytes]:
        prev, cur = None, ct.create_string_buffer(self.info.key_size)
        while True:
            try:
                lb.map_get_next_key(self.fd, prev, cur, self.what)
            except FileNotFoundError:
                return
            prev = cur.raw
            yield prev

    def _chunks_per_key(self, delete: bool) -> Iterator[tuple[int, bytes, bytes]]:
        # Deleting while walking with get_next_key restarts hash walks at the first bucket each
        # time (quadratic), so a draining walk collects the keys first.
        keys = list(self._keys_per_key()) if delete else self._keys_per_key()
        buf = ct.create_string_buffer(self.value_size)
        for k in keys:
            try:
                lb.map_lookup_elem(self.fd, k, buf, self.what)
                if delete:
                    lb.map_delete_elem(self.fd, k, self.what)
            except FileNotFoundError:
                continue  # removed by someone else since we saw it
            yield 1, k, buf.raw

    def _scan(self, delete: bool, chunk: int, values: bool = True) -> Iterator[tuple[int, bytes, bytes]]:
        """Batch chunks, or per-key ones for map types whose kernel has no batch variant (found once).

        Without ``values`` the per-key fallback only walks keys: that also counts maps whose values
        user space cannot read (program arrays, for example).
        """
        kind = "lookup_and_delete" if delete else "lookup"
        if chunk < 1:
            raise ValueError("chunk must be at least 1")
        if kind not in self._no_batch:
            try:
                yield from self._chunks(delete, chunk)
                return
            except _NoBatch:  # raised before any chunk was yielded
                self._no_batch.add(kind)
        if values or delete:
            yield from self._chunks_per_key(delete)
        else:
            yield from ((1, k, b"") for k in self._keys_per_key())

    def items(self, chunk: int = 4096) -> Iterator[tuple[Any, Any]]:
        """All ``(key, value)`` pairs, read ``chunk`` entries per syscall."""
        for n, kb, vb in self._scan(False, chunk):
            yield from self._pairs(n, kb, vb)

    def items_raw(self, chunk: int = 4096, *, delete: bool = False) -> Iterator[tuple[int, bytes, bytes]]:
        """All entries as raw chunks ``(n, keys, values)``, one batch syscall per chunk, nothing decoded.

        ``keys`` holds ``n`` records of ``info.key_size`` bytes and ``values`` ``n`` records of
        :attr:`value_size` bytes (per-CPU maps: ``ncpus`` 8-byte aligned slots each), entry ``i``
        at ``i * size``. Both are fresh ``bytes`` the caller may keep. With ``delete`` every entry
        is removed as it is read (BPF_MAP_LOOKUP_AND_DELETE_BATCH): a consumer that stops early
        leaves the rest in the map. Map types without batch support yield one-entry chunks.
        """
        return self._scan(delete, chunk)

    def keys(self, chunk: int = 4096) -> Iterator[Any]:
        for n, kb, _ in self._scan(False, chunk, values=False):
            yield from self._key.decode_many(kb, n)

    def count(self, chunk: int = 4096) -> int:
        """Number of entries (a walk: the kernel keeps no count user space can read)."""
        return sum(n for n, _, _ in self._scan(False, chunk, values=False))

    def pop_all(self, chunk: int = 4096) -> list[tuple[Any, Any]]:
        """Read and delete every entry: BPF_MAP_LOOKUP_AND_DELETE_BATCH, else lookup+delete per key."""
        out: list[tuple[Any, Any]] = []
        for n, kb, vb in self._scan(True, chunk):
            out.extend(self._pairs(n, kb, vb))
        return out

    def clear(self, chunk: int = 4096) -> int:
        """Remove every entry; arrays cannot delete, so their values are zeroed. Returns the count."""
        if self.info.type in _ARRAYS:
            if chunk < 1:
                raise ValueError("chunk must be at least 1")
            total, zeros = self.info.max_entries, bytes(chunk * self.value_size)
            zaddr = _address(zeros)[1]
            for start in range(0, total, chunk):
                n = min(chunk, total - start)
                keys = array("I", range(start, start + n)).tobytes()  # u32 indices, host order
                self._update_span(_address(keys)[1], zaddr, n, lb.BPF_ANY, start)
            return total
        return sum(n for n, _, _ in self._scan(True, chunk))

    # --- batch writes --------------------------------------------------------------------------

    def update_batch(
        self, items: Mapping | Iterable[tuple[Any, Any]], chunk: int = 4096, flags: int = lb.BPF_ANY
    ) -> int:
        """Write ``(key, value)`` pairs ``chunk`` per syscall; returns how many were written."""
        if chunk < 1:
            raise ValueError("chunk must be at least 1")
        pairs = items.items() if isinstance(items, Mapping) else items
        it, total = iter(pairs), 0
        ek = self._key.encode_many
        ev = (
            self._one.encode_many
            if not self.info.percpu
            else (lambda vs: b"".join(map(self._value_bytes, vs)))
        )
        while part := list(islice(it, chunk)):
            keys, values = ek([k for k, _ in part]), ev([v for _, v in part])
            self._update_span(_address(keys)[1], _address(values)[1], len(part), flags, total)
            total += len(part)
        return total

    def update_batch_raw(
        self, keys, values, count: int | None = None, *, chunk: int = 4096, flags: int = lb.BPF_ANY
    ) -> int:
        """Write ``count`` entries from contiguous buffers, ``chunk`` per syscall; returns ``count``.

        ``keys``: ``count`` records of ``info.key_size`` bytes; ``values``: ``count`` records of
        :attr:`value_size` bytes (the layout :meth:`items_raw` yields). Any buffer works (bytes,
        bytearray, ctypes arrays, numpy arrays); bytes and writable buffers are not copied.
        ``count`` defaults to what ``keys`` holds. On failure the OSError says how many entries
        were written.
        """
        if chunk < 1:
            raise ValueError("chunk must be at least 1")
        ks, vs = self.info.key_size, self.value_size
        n = _records(keys, ks, count, f"{self.what} keys")
        _records(values, vs, n, f"{self.what} values")
        kown, kaddr = _address(keys)
        vown, vaddr = _address(values)
        for start in range(0, n, chunk):
            self._update_span(kaddr + start * ks, vaddr + start * vs, min(chunk, n - start), flags, start)
        return n

    def _update_span(self, kaddr: int, vaddr: int, n: int, flags: int, done: int) -> None:
        """Write ``n`` contiguous entries at these addresses: one batch syscall, else one per key.

        ``done``: entries written by earlier spans of the same call, for the error message.
        """
        if "update" not in self._no_batch:
            count = ct.c_uint32(n)
            try:
                lb.map_update_batch(self.fd, kaddr, vaddr, count, elem_flags=flags, what=self.what)
                return
            except OSError as e:
                # An unsupported op fails before touching count, so only the first span can tell.
                if not (done == 0 and e.errno in lb.UNSUPPORTED):
                    raise lb.error(
                        e.errno, "bpf_map_update_batch", f"{self.what} after {done + count.value} entries"
                    ) from None
                self._no_batch.add("update")  # per-key below raises if the entry itself is bad
        ks, vs = self.info.key_size, self.value_size
        for i in range(n):
            lb.map_update_elem(self.fd, kaddr + i * ks, vaddr + i * vs, flags, self.what)

    def delete_batch(self, keys: Iterable[Any], chunk: int = 4096) -> int:
        """Delete keys ``chunk`` per syscall; missing keys are skipped. Returns how many were deleted."""
        return self.delete_batch_raw(self._key.encode_many(list(keys)), chunk=chunk)

    def delete_batch_raw(self, keys, count: int | None = None, *, chunk: int = 4096) -> int:
        """Delete ``count`` keys from a contiguous buffer of ``info.key_size`` records, ``chunk`` per
        syscall; missing keys are skipped. Returns how many were deleted.

        The kernel stops a batch at the first key it cannot delete and reports that key's index in
        ``count``: everything before it is gone, so we step over it and batch the rest.
        """
        if chunk < 1:
            raise ValueError("chunk must be at least 1")
        ks = self.info.key_size
        n = _records(keys, ks, count, f"{self.what} keys")
        own, base = _address(keys)
        i = deleted = 0
        while i < n:
            part = min(chunk, n - i)
            if "delete" in self._no_batch:
                deleted += sum(self._delete_raw(base + j * ks) for j in range(i, i + part))
                i += part
                continue
            count_ = ct.c_uint32(part)
            try:
                lb.map_delete_batch(self.fd, base + i * ks, count_, what=self.what)
                deleted, i = deleted + part, i + part
            except FileNotFoundError:
                deleted, i = deleted + count_.value, i + count_.value + 1
            except OSError as e:
                if not (i == 0 and e.errno in lb.UNSUPPORTED):
                    raise
                self._no_batch.add("delete")
        return deleted

    def _delete_raw(self, key) -> bool:
        try:
            lb.map_delete_elem(self.fd, key, self.what)
        except FileNotFoundError:
            return False
        return True

    # --- per-key baselines (benchmarks compare the batch paths with these) ----------------------

    def items_per_key(self) -> Iterator[tuple[Any, Any]]:
        """All pairs with one get_next_key and one lookup syscall per entry."""
        dk = self._key.decode
        dv = self._one.decode if not self.info.percpu else (lambda b: self._decode_values(b, 1)[0])
        for _, kb, vb in self._chunks_per_key(False):
            yield dk(kb), dv(vb)

    def lookup_per_key_raw(self, keys, count: int | None = None) -> bytearray:
        """The values of ``count`` keys (a contiguous buffer), one lookup syscall per key, into one
        buffer of :attr:`value_size` records; a missing key leaves its record zeroed."""
        ks, vs = self.info.key_size, self.value_size
        n = _records(keys, ks, count, f"{self.what} keys")
        out = bytearray(n * vs)
        own, kaddr = _address(keys)
        oown, vaddr = _address(out)
        fd, what, lookup = self.fd, self.what, lb.map_lookup_elem
        for i in range(n):
            try:
                lookup(fd, kaddr + i * ks, vaddr + i * vs, what)
            except FileNotFoundError:
                pass
        del oown  # release the export so the bytearray can be resized by the caller
        return out

    def update_per_key_raw(self, keys, values, count: int | None = None, flags: int = lb.BPF_ANY) -> int:
        """:meth:`update_batch_raw` with one update syscall per entry, on the same buffers."""
        ks, vs = self.info.key_size, self.value_size
        n = _records(keys, ks, count, f"{self.what} keys")
        _records(values, vs, n, f"{self.what} values")
        kown, kaddr = _address(keys)
        vown, vaddr = _address(values)
        fd, what, update = self.fd, self.what, lb.map_update_elem
        for i in range(n):
            update(fd, kaddr + i * ks, vaddr + i * vs, flags, what)
        return n

    def update_per_key(self, items: Mapping | Iterable[tuple[Any, Any]], flags: int = lb.BPF_ANY) -> int:
        pairs = items.items() if isinstance(items, Mapping) else items
        n = 0
        for k, v in pairs:
            self.set(k, v, flags)
            n += 1
        return n
