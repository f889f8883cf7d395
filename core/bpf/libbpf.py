"""Thin ctypes bindings to the few libbpf.so.1 calls sluice needs.

Why libbpf and not BCC: BCC can only reach maps of modules it compiled. Opening a pinned map,
reading map info, batch operations done right and BPF_PROG_TEST_RUN need nothing but a file
descriptor, and libbpf (a dependency of BCC on Debian: the package libbpf1) wraps those syscalls.
Only the shared library is needed at run time; struct layouts below are copied from the libbpf
1.1 headers (bpf.h) and the kernel UAPI (linux/bpf.h).

Every libbpf 1.x call returns ``-errno`` on failure, so errors are raised from the return value as
``OSError(errno, "<call> <what>: <reason>")``; ``what`` names the map or program being worked on.
Python maps ``errno`` to subclasses: ENOENT gives ``FileNotFoundError``, EEXIST ``FileExistsError``.
Buffer arguments take a ctypes object (passed by reference), ``bytes`` (read-only inputs only)
or ``None``.
"""

from __future__ import annotations

import ctypes as ct
import enum
import errno
import os
from dataclasses import dataclass

_lib = ct.CDLL("libbpf.so.1", use_errno=True)

# The kernel's internal "operation not supported" (not in userspace errno.h): returned, for
# example, by batch operations on map types without batch support (LPM_TRIE, arrays for deletes).
ENOTSUPP = 524
UNSUPPORTED = frozenset({ENOTSUPP, errno.EOPNOTSUPP, errno.EINVAL})

# Element update flags.
BPF_ANY = 0
BPF_NOEXIST = 1
BPF_EXIST = 2
BPF_F_LOCK = 4
# Map creation flags.
BPF_F_NO_PREALLOC = 1  # required for LPM_TRIE
BPF_F_RDONLY = 1 << 3
BPF_F_WRONLY = 1 << 4

BPF_OBJ_NAME_LEN = 16
BPF_TAG_SIZE = 8
BPF_INSN_SIZE = 8  # sizeof(struct bpf_insn)
# Attach types (enum bpf_attach_type) used with prog_load.
BPF_TRACE_FENTRY = 24


class MapType(enum.IntEnum):
    """``enum bpf_map_type`` without the ``BPF_MAP_TYPE_`` prefix."""

    UNSPEC = 0
    HASH = 1
    ARRAY = 2
    PROG_ARRAY = 3
    PERF_EVENT_ARRAY = 4
    PERCPU_HASH = 5
    PERCPU_ARRAY = 6
    STACK_TRACE = 7
    CGROUP_ARRAY = 8
    LRU_HASH = 9
    LRU_PERCPU_HASH = 10
    LPM_TRIE = 11
    ARRAY_OF_MAPS = 12
    HASH_OF_MAPS = 13
    DEVMAP = 14
    SOCKMAP = 15
    CPUMAP = 16
    XSKMAP = 17
    SOCKHASH = 18
    CGROUP_STORAGE = 19
    REUSEPORT_SOCKARRAY = 20
    PERCPU_CGROUP_STORAGE = 21
    QUEUE = 22
    STACK = 23
    SK_STORAGE = 24
    DEVMAP_HASH = 25
    STRUCT_OPS = 26
    RINGBUF = 27
    INODE_STORAGE = 28
    TASK_STORAGE = 29
    BLOOM_FILTER = 30
    USER_RINGBUF = 31
    CGRP_STORAGE = 32
    ARENA = 33


PERCPU_TYPES = frozenset(
    {MapType.PERCPU_HASH, MapType.PERCPU_ARRAY, MapType.LRU_PERCPU_HASH, MapType.PERCPU_CGROUP_STORAGE}
)


class ProgType(enum.IntEnum):
    """``enum bpf_prog_type`` without the ``BPF_PROG_TYPE_`` prefix."""

    UNSPEC = 0
    SOCKET_FILTER = 1
    KPROBE = 2
    SCHED_CLS = 3
    SCHED_ACT = 4
    TRACEPOINT = 5
    XDP = 6
    PERF_EVENT = 7
    CGROUP_SKB = 8
    CGROUP_SOCK = 9
    LWT_IN = 10
    LWT_OUT = 11
    LWT_XMIT = 12
    SOCK_OPS = 13
    SK_SKB = 14
    CGROUP_DEVICE = 15
    SK_MSG = 16
    RAW_TRACEPOINT = 17
    CGROUP_SOCK_ADDR = 18
    LWT_SEG6LOCAL = 19
    LIRC_MODE2 = 20
    SK_REUSEPORT = 21
    FLOW_DISSECTOR = 22
    CGROUP_SYSCTL = 23
    RAW_TRACEPOINT_WRITABLE = 24
    CGROUP_SOCKOPT = 25
    TRACING = 26
    STRUCT_OPS = 27
    EXT = 28
    LSM = 29
    SK_LOOKUP = 30
    SYSCALL = 31
    NETFILTER = 32


def _enum(cls, value: int):
    """The enum member, or the plain int for values a newer kernel added."""
    try:
        return cls(value)
    except ValueError:
        return value


def type_name(value: int) -> str:
    """``"lru_hash"`` for a MapType/ProgType member, ``"type 42"`` for an unknown value."""
    return value.name.lower() if isinstance(value, enum.Enum) else f"type {value}"


# --- structs (layouts from libbpf 1.1 bpf.h and linux/bpf.h) ---------------------------------


class _MapCreateOpts(ct.Structure):
    _fields_ = [
        ("sz", ct.c_size_t),
        ("btf_fd", ct.c_uint32),
        ("btf_key_type_id", ct.c_uint32),
        ("btf_value_type_id", ct.c_uint32),
        ("btf_vmlinux_value_type_id", ct.c_uint32),
        ("inner_map_fd", ct.c_uint32),
        ("map_flags", ct.c_uint32),
        ("map_extra", ct.c_uint64),
        ("numa_node", ct.c_uint32),
        ("map_ifindex", ct.c_uint32),
    ]


class _ProgLoadOpts(ct.Structure):
    # A prefix of struct bpf_prog_load_opts: libbpf takes the size from ``sz``, so later fields
    # (fd_array, BTF func info, the verifier log) simply stay unset.
    _fields_ = [
        ("sz", ct.c_size_t),
        ("attempts", ct.c_int),
        ("expected_attach_type", ct.c_uint32),
        ("prog_btf_fd", ct.c_uint32),
        ("prog_flags", ct.c_uint32),
        ("prog_ifindex", ct.c_uint32),
        ("kern_version", ct.c_uint32),
        ("attach_btf_id", ct.c_uint32),
        ("attach_prog_fd", ct.c_uint32),
        ("attach_btf_obj_fd", ct.c_uint32),
    ]


class _BatchOpts(ct.Structure):
    _fields_ = [("sz", ct.c_size_t), ("elem_flags", ct.c_uint64), ("flags", ct.c_uint64)]


class TestRunOpts(ct.Structure):
    """``struct bpf_test_run_opts``; ``sz`` is set on construction."""

    __test__ = False  # not a pytest class
    _fields_ = [
        ("sz", ct.c_size_t),
        ("data_in", ct.c_void_p),
        ("data_out", ct.c_void_p),
        ("data_size_in", ct.c_uint32),
        ("data_size_out", ct.c_uint32),  # in: size of data_out; out: length of the output
        ("ctx_in", ct.c_void_p),
        ("ctx_out", ct.c_void_p),
        ("ctx_size_in", ct.c_uint32),
        ("ctx_size_out", ct.c_uint32),
        ("retval", ct.c_uint32),
        ("repeat", ct.c_int),
        ("duration", ct.c_uint32),  # out: average ns per repetition
        ("flags", ct.c_uint32),
        ("cpu", ct.c_uint32),
        ("batch_size", ct.c_uint32),
    ]

    def __init__(self, **kw):
        super().__init__(sz=ct.sizeof(TestRunOpts), **kw)


class _BpfMapInfo(ct.Structure):
    _fields_ = [
        ("type", ct.c_uint32),
        ("id", ct.c_uint32),
        ("key_size", ct.c_uint32),
        ("value_size", ct.c_uint32),
        ("max_entries", ct.c_uint32),
        ("map_flags", ct.c_uint32),
        ("name", ct.c_char * BPF_OBJ_NAME_LEN),
        ("ifindex", ct.c_uint32),
        ("btf_vmlinux_value_type_id", ct.c_uint32),
        ("netns_dev", ct.c_uint64),
        ("netns_ino", ct.c_uint64),
        ("btf_id", ct.c_uint32),
        ("btf_key_type_id", ct.c_uint32),
        ("btf_value_type_id", ct.c_uint32),
        ("_pad", ct.c_uint32),
        ("map_extra", ct.c_uint64),
    ]


class _BpfProgInfo(ct.Structure):
    # A prefix of struct bpf_prog_info: the kernel accepts a shorter info_len and fills only that.
    _fields_ = [
        ("type", ct.c_uint32),
        ("id", ct.c_uint32),
        ("tag", ct.c_uint8 * BPF_TAG_SIZE),
        ("jited_prog_len", ct.c_uint32),
        ("xlated_prog_len", ct.c_uint32),
        ("jited_prog_insns", ct.c_uint64),
        ("xlated_prog_insns", ct.c_uint64),
        ("load_time", ct.c_uint64),
        ("created_by_uid", ct.c_uint32),
        ("nr_map_ids", ct.c_uint32),
        ("map_ids", ct.c_uint64),
        ("name", ct.c_char * BPF_OBJ_NAME_LEN),
        ("ifindex", ct.c_uint32),
    ]


@dataclass(frozen=True)
class MapInfo:
    """What the kernel reports about a map (``bpf_obj_get_info_by_fd``)."""

    type: MapType | int
    id: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int
    name: str

    @property
    def type_name(self) -> str:
        return type_name(self.type)

    @property
    def percpu(self) -> bool:
        return self.type in PERCPU_TYPES


@dataclass(frozen=True)
class ProgInfo:
    """What the kernel reports about a program; ``tag`` is the hex digest ``bpftool`` shows."""

    type: ProgType | int
    id: int
    name: str
    tag: str

    @property
    def type_name(self) -> str:
        return type_name(self.type)


# --- function prototypes -----------------------------------------------------------------------

_c_int, _u32, _vp, _cp = ct.c_int, ct.c_uint32, ct.c_void_p, ct.c_char_p
_u32p = ct.POINTER(ct.c_uint32)


def _proto(name: str, *argtypes):
    fn = getattr(_lib, name)
    fn.restype = _c_int
    fn.argtypes = list(argtypes)
    return fn


_obj_get = _proto("bpf_obj_get", _cp)
_obj_pin = _proto("bpf_obj_pin", _c_int, _cp)
_obj_get_info_by_fd = _proto("bpf_obj_get_info_by_fd", _c_int, _vp, _u32p)
_map_create = _proto("bpf_map_create", _c_int, _cp, _u32, _u32, _u32, ct.POINTER(_MapCreateOpts))
_lookup_elem = _proto("bpf_map_lookup_elem", _c_int, _vp, _vp)
_update_elem = _proto("bpf_map_update_elem", _c_int, _vp, _vp, ct.c_uint64)
_delete_elem = _proto("bpf_map_delete_elem", _c_int, _vp)
_lookup_and_delete_elem = _proto("bpf_map_lookup_and_delete_elem", _c_int, _vp, _vp)
_get_next_key = _proto("bpf_map_get_next_key", _c_int, _vp, _vp)
_bopts = ct.POINTER(_BatchOpts)
_lookup_batch = _proto("bpf_map_lookup_batch", _c_int, _vp, _vp, _vp, _vp, _u32p, _bopts)
_lookup_and_delete_batch = _proto(
    "bpf_map_lookup_and_delete_batch", _c_int, _vp, _vp, _vp, _vp, _u32p, _bopts
)
_update_batch = _proto("bpf_map_update_batch", _c_int, _vp, _vp, _u32p, _bopts)
_delete_batch = _proto("bpf_map_delete_batch", _c_int, _vp, _u32p, _bopts)
_test_run_opts = _proto("bpf_prog_test_run_opts", _c_int, ct.POINTER(TestRunOpts))
_prog_load = _proto("bpf_prog_load", _c_int, _cp, _cp, _vp, ct.c_size_t, ct.POINTER(_ProgLoadOpts))
_raw_tracepoint_open = _proto("bpf_raw_tracepoint_open", _cp, _c_int)
_find_vmlinux_btf_id = _proto("libbpf_find_vmlinux_btf_id", _cp, _c_int)
_prog_get_fd_by_id = _proto("bpf_prog_get_fd_by_id", _u32)
_map_get_fd_by_id = _proto("bpf_map_get_fd_by_id", _u32)


_BY_REF = (ct._SimpleCData, ct.Structure, ct.Union, ct.Array)


def _ref(obj):
    """ctypes objects go by reference; bytes, ints (addresses), None and byref() results as they are."""
    if obj is None or type(obj) is bytes:  # per-key loops call this twice per syscall: keep it cheap
        return obj
    return ct.byref(obj) if isinstance(obj, _BY_REF) else obj


def error(err: int, call: str, what: str = "") -> OSError:
    reason = "operation not supported (ENOTSUPP)" if err == ENOTSUPP else os.strerror(err)
    return OSError(err, f"{call} {what}: {reason}" if what else f"{call}: {reason}")


def _check(ret: int, call: str, what: str) -> int:
    if ret < 0:
        raise error(-ret, call, what)
    return ret


# --- objects -----------------------------------------------------------------------------------


def obj_get(path: str | os.PathLike) -> int:
    """Open a pinned map, program or link; returns a new fd the caller closes."""
    return _check(_obj_get(os.fsencode(path)), "bpf_obj_get", os.fsdecode(path))


def obj_pin(fd: int, path: str | os.PathLike) -> None:
    _check(_obj_pin(fd, os.fsencode(path)), "bpf_obj_pin", os.fsdecode(path))


def map_info(fd: int) -> MapInfo:
    raw = _BpfMapInfo()
    size = ct.c_uint32(ct.sizeof(raw))
    _check(_obj_get_info_by_fd(fd, ct.byref(raw), ct.byref(size)), "bpf_obj_get_info_by_fd", f"map fd {fd}")
    return MapInfo(
        type=_enum(MapType, raw.type),
        id=raw.id,
        key_size=raw.key_size,
        value_size=raw.value_size,
        max_entries=raw.max_entries,
        flags=raw.map_flags,
        name=raw.name.decode(errors="replace"),
    )


def prog_info(fd: int) -> ProgInfo:
    raw = _BpfProgInfo()
    size = ct.c_uint32(ct.sizeof(raw))
    _check(_obj_get_info_by_fd(fd, ct.byref(raw), ct.byref(size)), "bpf_obj_get_info_by_fd", f"prog fd {fd}")
    return ProgInfo(
        type=_enum(ProgType, raw.type),
        id=raw.id,
        name=raw.name.decode(errors="replace"),
        tag=bytes(raw.tag).hex(),
    )


def prog_get_fd_by_id(prog_id: int) -> int:
    return _check(_prog_get_fd_by_id(prog_id), "bpf_prog_get_fd_by_id", f"prog id {prog_id}")


def map_get_fd_by_id(map_id: int) -> int:
    return _check(_map_get_fd_by_id(map_id), "bpf_map_get_fd_by_id", f"map id {map_id}")


def map_create(
    map_type: int,
    key_size: int,
    value_size: int,
    max_entries: int,
    *,
    name: str = "",
    flags: int = 0,
    map_extra: int = 0,
) -> int:
    """Create a map without BCC (tests, benchmarks); returns its fd. LPM_TRIE needs BPF_F_NO_PREALLOC."""
    opts = _MapCreateOpts(sz=ct.sizeof(_MapCreateOpts), map_flags=flags, map_extra=map_extra)
    ret = _map_create(int(map_type), name.encode() or None, key_size, value_size, max_entries, ct.byref(opts))
    return _check(ret, "bpf_map_create", f"{type_name(_enum(MapType, map_type))} map {name!r}")


# --- elements ----------------------------------------------------------------------------------


def map_lookup_elem(fd: int, key, value, what: str = "") -> None:
    _check(_lookup_elem(fd, _ref(key), _ref(value)), "bpf_map_lookup_elem", what)


def map_update_elem(fd: int, key, value, flags: int = BPF_ANY, what: str = "") -> None:
    _check(_update_elem(fd, _ref(key), _ref(value), flags), "bpf_map_update_elem", what)


def map_delete_elem(fd: int, key, what: str = "") -> None:
    _check(_delete_elem(fd, _ref(key)), "bpf_map_delete_elem", what)


def map_lookup_and_delete_elem(fd: int, key, value, what: str = "") -> None:
    _check(_lookup_and_delete_elem(fd, _ref(key), _ref(value)), "bpf_map_lookup_and_delete_elem", what)


def map_get_next_key(fd: int, key, next_key, what: str = "") -> None:
    """``key=None`` gives the first key; ENOENT (FileNotFoundError) after the last one."""
    _check(_get_next_key(fd, _ref(key), _ref(next_key)), "bpf_map_get_next_key", what)


# --- batches -----------------------------------------------------------------------------------
# ``count`` is a ct.c_uint32: in, the capacity of keys/values; out, how many were processed. libbpf
# writes it back even when the call fails, so after an error it still tells how far the kernel got
# (lookups end with ENOENT together with the last, possibly non-empty, chunk).


def _opts(elem_flags: int, flags: int):
    return ct.byref(_BatchOpts(sz=ct.sizeof(_BatchOpts), elem_flags=elem_flags, flags=flags))


def map_lookup_batch(
    fd: int, in_batch, out_batch, keys, values, count: ct.c_uint32, *, elem_flags=0, flags=0, what=""
) -> None:
    """``in_batch=None`` starts at the beginning; pass the previous ``out_batch`` to continue."""
    ret = _lookup_batch(
        fd,
        _ref(in_batch),
        _ref(out_batch),
        _ref(keys),
        _ref(values),
        ct.byref(count),
        _opts(elem_flags, flags),
    )
    _check(ret, "bpf_map_lookup_batch", what)


def map_lookup_and_delete_batch(
    fd: int, in_batch, out_batch, keys, values, count: ct.c_uint32, *, elem_flags=0, flags=0, what=""
) -> None:
    ret = _lookup_and_delete_batch(
        fd,
        _ref(in_batch),
        _ref(out_batch),
        _ref(keys),
        _ref(values),
        ct.byref(count),
        _opts(elem_flags, flags),
    )
    _check(ret, "bpf_map_lookup_and_delete_batch", what)


def map_update_batch(fd: int, keys, values, count: ct.c_uint32, *, elem_flags=0, flags=0, what="") -> None:
    ret = _update_batch(fd, _ref(keys), _ref(values), ct.byref(count), _opts(elem_flags, flags))
    _check(ret, "bpf_map_update_batch", what)


def map_delete_batch(fd: int, keys, count: ct.c_uint32, *, elem_flags=0, flags=0, what="") -> None:
    """Stops at the first key it cannot delete; ``count`` is then that key's index."""
    _check(
        _delete_batch(fd, _ref(keys), ct.byref(count), _opts(elem_flags, flags)), "bpf_map_delete_batch", what
    )


# --- programs ----------------------------------------------------------------------------------


def prog_load(
    prog_type: int,
    insns: bytes,
    *,
    name: str = "",
    license: str = "GPL",
    expected_attach_type: int = 0,
    attach_btf_id: int = 0,
) -> int:
    """Load raw instructions (``struct bpf_insn`` bytes) without BCC; returns the program's fd.

    Tracing programs (fentry, fexit) name their attach type and target: ``attach_btf_id`` from
    :func:`find_vmlinux_btf_id`.
    """
    opts = _ProgLoadOpts(
        sz=ct.sizeof(_ProgLoadOpts), expected_attach_type=expected_attach_type, attach_btf_id=attach_btf_id
    )
    buf = ct.create_string_buffer(insns, len(insns))
    ret = _prog_load(
        int(prog_type),
        name.encode() or None,
        license.encode(),
        buf,
        len(insns) // BPF_INSN_SIZE,
        ct.byref(opts),
    )
    return _check(ret, "bpf_prog_load", f"{type_name(_enum(ProgType, prog_type))} program {name!r}")


def find_vmlinux_btf_id(func: str, attach_type: int) -> int:
    """The BTF id of ``func`` in vmlinux BTF (/sys/kernel/btf/vmlinux), as ``attach_type`` names it."""
    return _check(_find_vmlinux_btf_id(func.encode(), attach_type), "libbpf_find_vmlinux_btf_id", func)


def raw_tracepoint_open(name: str | None, prog_fd: int) -> int:
    """Attach a raw tracepoint program to ``name``, or a tracing program (fentry…) to its BTF
    target with ``name=None``; returns the link fd, which detaches when closed."""
    ret = _raw_tracepoint_open(name.encode() if name else None, prog_fd)
    return _check(ret, "bpf_raw_tracepoint_open", name or f"prog fd {prog_fd}")


def prog_test_run_opts(prog_fd: int, opts: TestRunOpts, what: str = "") -> None:
    _check(_test_run_opts(prog_fd, ct.byref(opts)), "bpf_prog_test_run_opts", what or f"prog fd {prog_fd}")


def possible_cpus() -> int:
    """How many CPUs per-CPU map values hold a slot for: the count in /sys/.../cpu/possible ("0-3,5")."""
    with open("/sys/devices/system/cpu/possible") as f:
        spec = f.read().strip()
    n = 0
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        n += int(hi or lo) - int(lo) + 1
    return n


# --- links and multi-program attachment (TCX) ----------------------------------------------
# libbpf 1.1 (Debian 12) predates TCX: its bpf_link_create() cannot pass the relative program
# or link and the expected revision, and bpf_prog_query_opts() has no link ids. Those two go
# through the bpf(2) syscall with the kernel's own attribute layout (linux/bpf.h, 6.6+).

BPF_PROG_QUERY = 16
BPF_LINK_CREATE = 28
BPF_TCX_INGRESS = 46
BPF_TCX_EGRESS = 47
BPF_LINK_TYPE_TCX = 11
# mprog flags: where a new program goes relative to ``relative_fd`` (0: the whole chain's head or tail)
BPF_F_REPLACE = 1 << 2
BPF_F_BEFORE = 1 << 3
BPF_F_AFTER = 1 << 4
BPF_F_ID = 1 << 5
BPF_F_LINK = 1 << 13  # ``relative_fd`` names a link, not a program
_SYS_BPF = {"x86_64": 321, "aarch64": 280}.get(os.uname().machine, 321)
_libc = ct.CDLL(None, use_errno=True)
_libc.syscall.restype = ct.c_long


class _LinkCreateTcx(ct.Structure):
    _fields_ = [
        ("prog_fd", ct.c_uint32),
        ("target_ifindex", ct.c_uint32),
        ("attach_type", ct.c_uint32),
        ("flags", ct.c_uint32),
        ("relative_fd", ct.c_uint32),
        ("_pad", ct.c_uint32),
        ("expected_revision", ct.c_uint64),
        ("_tail", ct.c_uint8 * 64),  # the rest of union bpf_attr: must be zero
    ]


class _ProgQuery(ct.Structure):
    _fields_ = [
        ("target_ifindex", ct.c_uint32),
        ("attach_type", ct.c_uint32),
        ("query_flags", ct.c_uint32),
        ("attach_flags", ct.c_uint32),
        ("prog_ids", ct.c_uint64),
        ("count", ct.c_uint32),
        ("_pad", ct.c_uint32),
        ("prog_attach_flags", ct.c_uint64),
        ("link_ids", ct.c_uint64),
        ("link_attach_flags", ct.c_uint64),
        ("revision", ct.c_uint64),
    ]


class _BpfLinkInfo(ct.Structure):
    # struct bpf_link_info: type, id, prog_id, then a union aligned to 8 (tcx: ifindex, attach_type)
    _fields_ = [
        ("type", ct.c_uint32),
        ("id", ct.c_uint32),
        ("prog_id", ct.c_uint32),
        ("_pad", ct.c_uint32),
        ("ifindex", ct.c_uint32),
        ("attach_type", ct.c_uint32),
        ("_tail", ct.c_uint8 * 32),
    ]


@dataclass(frozen=True)
class LinkInfo:
    type: int
    id: int
    prog_id: int
    ifindex: int  # TCX links: 0 once the device is gone (the link is defunct)
    attach_type: int


def _sys_bpf(cmd: int, attr, what: str) -> int:
    ret = _libc.syscall(_SYS_BPF, cmd, ct.byref(attr), ct.sizeof(attr))
    if ret < 0:
        raise error(ct.get_errno(), "bpf", what)
    return ret


def link_create_tcx(
    prog_fd: int, ifindex: int, attach_type: int, flags: int = 0, relative_fd: int = 0
) -> int:
    """Attach ``prog_fd`` to the TCX hook of ``ifindex``; returns the link fd (detach: unpin and close)."""
    attr = _LinkCreateTcx(
        prog_fd=prog_fd, target_ifindex=ifindex, attach_type=attach_type, flags=flags, relative_fd=relative_fd
    )
    return _sys_bpf(BPF_LINK_CREATE, attr, f"link_create tcx ifindex {ifindex}")


def prog_query_tcx(ifindex: int, attach_type: int, capacity: int = 64) -> tuple[list[int], list[int]]:
    """(program ids, link ids) on one TCX hook in the order packets see them (link id 0: not a link)."""
    progs, links = (ct.c_uint32 * capacity)(), (ct.c_uint32 * capacity)()
    attr = _ProgQuery(
        target_ifindex=ifindex,
        attach_type=attach_type,
        prog_ids=ct.addressof(progs),
        link_ids=ct.addressof(links),
        count=capacity,
    )
    _sys_bpf(BPF_PROG_QUERY, attr, f"prog_query tcx ifindex {ifindex}")
    n = min(attr.count, capacity)
    return list(progs[:n]), list(links[:n])


_link_update = _proto("bpf_link_update", _c_int, _c_int, _vp)
_link_detach = _proto("bpf_link_detach", _c_int)


def link_update(link_fd: int, prog_fd: int) -> None:
    """Swap the link's program atomically: no packet sees the hook without a program."""
    _check(_link_update(link_fd, prog_fd, None), "bpf_link_update", f"link fd {link_fd}")


def link_detach(link_fd: int) -> None:
    _check(_link_detach(link_fd), "bpf_link_detach", f"link fd {link_fd}")


def link_info(fd: int) -> LinkInfo:
    raw = _BpfLinkInfo()
    size = ct.c_uint32(ct.sizeof(raw))
    _check(_obj_get_info_by_fd(fd, ct.byref(raw), ct.byref(size)), "bpf_obj_get_info_by_fd", f"link fd {fd}")
    return LinkInfo(raw.type, raw.id, raw.prog_id, raw.ifindex, raw.attach_type)


def prog_id(fd: int) -> int:
    return prog_info(fd).id
