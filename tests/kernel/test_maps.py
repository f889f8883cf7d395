"""sluice.bpf.maps against real kernel maps: batch walks, fallbacks, pins and BCC tables."""

from __future__ import annotations

import ctypes as ct
import errno
import os
import secrets
import struct
from pathlib import Path

import pytest

from sluice.bpf import libbpf as lb
from sluice.bpf.maps import Map, MapType

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(os.geteuid() != 0, reason="creating BPF maps needs root (CAP_BPF)"),
]

DATA = Path(__file__).parent / "data"
CHUNK = 64
SIZES = [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 10_000]


class LpmKey(ct.Structure):
    _fields_ = [("prefixlen", ct.c_uint32), ("addr", ct.c_uint8 * 4)]


class Stats(ct.Structure):
    _fields_ = [("packets", ct.c_uint64), ("bytes", ct.c_uint64)]


def lpm_key(i: int) -> bytes:
    return bytes(LpmKey(32, (ct.c_uint8 * 4)(10, (i >> 16) & 255, (i >> 8) & 255, i & 255)))


# kind -> (make a map for n entries, the i-th (key, value) to write, the same pair as items() returns)
KINDS = {
    "hash": (
        lambda n: Map.create(MapType.HASH, ct.c_uint64, ct.c_uint64, max(n, 1), name="t_hash"),
        lambda i: (i, i * 3),
        lambda i: (i, i * 3),
    ),
    "lru_hash": (
        # LRU maps may evict before they are full (per-CPU free lists): leave plenty of room.
        lambda n: Map.create(MapType.LRU_HASH, ct.c_uint64, ct.c_uint64, 2 * n + 1024, name="t_lru"),
        lambda i: (i, i * 3),
        lambda i: (i, i * 3),
    ),
    "lpm_trie": (
        lambda n: Map.create(MapType.LPM_TRIE, 8, 4, max(n, 1), name="t_lpm", flags=lb.BPF_F_NO_PREALLOC),
        lambda i: (lpm_key(i), i.to_bytes(4, "little")),
        lambda i: (lpm_key(i), i.to_bytes(4, "little")),
    ),
    "percpu_hash": (
        # A 4-byte value occupies an 8-byte slot per CPU: exercises the slot stride.
        lambda n: Map.create(MapType.PERCPU_HASH, ct.c_uint32, ct.c_uint32, max(n, 1), name="t_pcpu"),
        lambda i: (i, [i + c for c in range(lb.possible_cpus())]),
        lambda i: (i, [i + c for c in range(lb.possible_cpus())]),
    ),
}


def as_dict(pairs) -> dict:
    """items() pairs made hashable (per-CPU values are lists)."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in pairs}


@pytest.fixture
def bpffs_dir():
    d = Path("/sys/fs/bpf") / f"sluice-test-{secrets.token_hex(4)}"
    d.mkdir()
    try:
        yield d
    finally:
        for p in d.iterdir():
            p.unlink()
        d.rmdir()


def compile_bcc(name: str):
    bcc = pytest.importorskip("bcc", reason="BCC's Python bindings (python3-bpfcc) are not installed")
    try:
        return bcc.BPF(src_file=str(DATA / name).encode())
    except Exception as e:
        pytest.fail(
            f"BCC could not compile {name}: {e}; without matching kernel headers set BCC_KERNEL_SOURCE"
        )


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("kind", list(KINDS))
def test_chunked_walk_returns_exactly_what_was_written(kind, size):
    make, entry, expect = KINDS[kind]
    with make(size) as m:
        assert m.update_batch((entry(i) for i in range(size)), chunk=CHUNK) == size
        want = as_dict(expect(i) for i in range(size))
        got = list(m.items(chunk=CHUNK))
        assert len(got) == size  # no duplicates across chunks
        assert as_dict(got) == want
        assert m.count(chunk=CHUNK) == size
        assert set(m.keys(chunk=CHUNK)) == set(want)
        assert as_dict(m.items_per_key()) == want


@pytest.mark.parametrize("size", [1, CHUNK - 1, CHUNK, CHUNK + 1, 10_000])
def test_array_walk(size):
    with Map.create(MapType.ARRAY, ct.c_uint32, Stats, size, name="t_array") as m:
        m.update_batch(((i, Stats(i, 2 * i)) for i in range(size)), chunk=CHUNK)
        got = [(k, v.packets, v.bytes) for k, v in m.items(chunk=CHUNK)]
        assert got == [(i, i, 2 * i) for i in range(size)]
        assert m.clear(chunk=CHUNK) == size
        assert all(v.packets == 0 and v.bytes == 0 for _, v in m.items())


def test_bucket_larger_than_chunk_grows_the_chunk():
    # 16 entries in a 16-bucket hash: some bucket holds two or more (all distinct: p ~ 1e-6), and a
    # 1-entry chunk cannot take it, which the kernel reports as ENOSPC.
    with Map.create(MapType.HASH, ct.c_uint64, ct.c_uint64, 16) as m:
        m.update_batch((i, i) for i in range(16))
        assert sorted(m.items(chunk=1)) == [(i, i) for i in range(16)]
        assert sorted(m.pop_all(chunk=1)) == [(i, i) for i in range(16)]
        assert m.count() == 0


@pytest.mark.parametrize("kind", list(KINDS))
def test_pop_all_empties_the_map(kind):
    make, entry, expect = KINDS[kind]
    n = 3 * CHUNK + 5
    with make(n) as m:
        m.update_batch(entry(i) for i in range(n))
        assert as_dict(m.pop_all(chunk=CHUNK)) == as_dict(expect(i) for i in range(n))
        assert m.count() == 0
        assert list(m.items_per_key()) == []


def test_pop_all_falls_back_per_key_where_the_kernel_has_no_batch():
    make, entry, expect = KINDS["lpm_trie"]
    with make(10) as m:
        m.update_batch(entry(i) for i in range(10))
        assert as_dict(m.pop_all()) == as_dict(expect(i) for i in range(10))
        assert "lookup_and_delete" in m._no_batch  # LPM tries have no LOOKUP_AND_DELETE_BATCH
        assert m.count() == 0


@pytest.mark.parametrize("missing", [[50], [0], [CHUNK - 1, CHUNK], [99], [0, 1, 2, 50, 98, 99]])
def test_delete_batch_skips_missing_keys(missing):
    with Map.create(MapType.HASH, ct.c_uint64, ct.c_uint64, 128) as m:
        m.update_batch((i, i) for i in range(100) if i not in missing)
        assert m.delete_batch(range(100), chunk=CHUNK) == 100 - len(missing)
        assert m.count() == 0


def test_delete_batch_leaves_other_keys():
    with Map.create(MapType.HASH, ct.c_uint64, ct.c_uint64, 128) as m:
        m.update_batch((i, i) for i in range(100))
        assert m.delete_batch([1, 500, 2, 3, 501], chunk=2) == 3
        assert sorted(m.keys()) == [0, *range(4, 100)]


def test_batch_lookup_unsupported_is_detected_once(monkeypatch):
    calls = []

    def no_batch(*args, **kw):
        calls.append(1)
        raise lb.error(lb.ENOTSUPP, "bpf_map_lookup_batch", "test")

    with Map.create(MapType.HASH, ct.c_uint64, ct.c_uint64, 256) as m:
        m.update_batch((i, i) for i in range(200))
        monkeypatch.setattr(lb, "map_lookup_batch", no_batch)
        assert sorted(m.items()) == [(i, i) for i in range(200)]
        assert m.count() == 200
        assert len(calls) == 1


def test_update_batch_reports_how_far_it_got():
    with Map.create(MapType.HASH, ct.c_uint64, ct.c_uint64, 10, name="t_full") as m:
        with pytest.raises(OSError) as e:
            m.update_batch((i, i) for i in range(20))
        assert e.value.errno == errno.E2BIG
        assert "t_full" in str(e.value) and "after 10 entries" in str(e.value)


def test_single_elements_and_errors_name_the_map():
    with Map.create(MapType.HASH, ct.c_uint64, Stats, 8, name="t_single") as m:
        m.set(1, Stats(2, 3))
        m.set(4, (5, 6))
        assert (m.get(1).packets, m.get(1).bytes) == (2, 3)
        assert m.get(4).bytes == 6
        assert m.get(99) is None and m.get(99, "x") == "x"
        with pytest.raises(FileExistsError, match="t_single"):
            m.set(1, Stats(), flags=lb.BPF_NOEXIST)
        assert m.delete(1) and not m.delete(1)
        with pytest.raises(ValueError):
            m.set(b"short", Stats())


def test_percpu_values_one_per_cpu():
    ncpus = lb.possible_cpus()
    with Map.create(MapType.PERCPU_HASH, ct.c_uint64, ct.c_uint64, 8) as m:
        m.set(1, 7)  # one value goes to every CPU
        m.set(2, list(range(ncpus)))
        assert m.get(1) == [7] * ncpus
        assert m.get(2) == list(range(ncpus))
        with pytest.raises(ValueError):
            m.set(3, [1] * (ncpus + 1))


def test_open_pinned_gives_bytes_and_info(bpffs_dir):
    with Map.create(MapType.HASH, ct.c_uint64, Stats, 4096, name="t_pinned") as m:
        m.update_batch((i, Stats(i, i * 100)) for i in range(1000))
        lb.obj_pin(m.fd, bpffs_dir / "t_pinned")
        created = m.info
    # The creating fd is closed: the pin alone keeps the map.
    with Map.open_pinned(bpffs_dir / "t_pinned") as p:
        i = p.info
        assert (i.type, i.type_name, i.key_size, i.value_size, i.max_entries, i.flags, i.name, i.id) == (
            MapType.HASH,
            "hash",
            8,
            16,
            4096,
            0,
            "t_pinned",
            created.id,
        )
        got = dict(p.items(chunk=100))
        assert len(got) == 1000
        assert got[(7).to_bytes(8, "little")] == bytes(Stats(7, 700))
        p.set((5000).to_bytes(8, "little"), bytes(16))
        with pytest.raises(TypeError):
            p.set(5001, bytes(16))  # no key type: bytes only
    with Map.open_pinned(bpffs_dir / "t_pinned", ct.c_uint64, Stats) as typed:
        assert typed.get(7).bytes == 700 and typed.get(5000).packets == 0
    with pytest.raises(ValueError):
        Map.open_pinned(bpffs_dir / "t_pinned", ct.c_uint32)
    with pytest.raises(FileNotFoundError, match="nope"):
        Map.open_pinned(bpffs_dir / "nope")


def test_from_bcc_table(kernel_ready):  # kernel_ready (tests/conftest.py): headers for BCC
    b = compile_bcc("tables.bpf.c")
    flows, drops = b[b"flows"], b[b"drops"]
    key = flows.Key(saddr=0x0A000001, daddr=0x0A000002, sport=1234, dport=53, proto=17)
    flows[key] = flows.Leaf(10, 1500)
    m = Map.from_bcc(flows)
    assert m.info.type == MapType.HASH and m.info.name == "flows"
    assert [(bytes(k), v.packets, v.bytes) for k, v in m.items()] == [(bytes(key), 10, 1500)]
    other = flows.Key(saddr=1, daddr=2, sport=3, dport=4, proto=6)
    m.set(other, flows.Leaf(1, 64))
    assert flows[other].bytes == 64

    d = Map.from_bcc(drops)  # per-CPU u32 array: BCC widens each CPU's value to 8 bytes
    d.set(2, list(range(1, d.ncpus + 1)))
    assert list(drops[drops.Key(2)]) == list(range(1, d.ncpus + 1))
    assert d.get(2) == list(range(1, d.ncpus + 1))

    b.cleanup()  # BCC closes its fds; ours are duplicates and keep the maps alive
    assert m.count() == 2
    m.close()
    d.close()
    with pytest.raises(ValueError, match="closed"):
        m.count()


def test_count_walks_keys_where_values_cannot_be_read():
    # Program arrays have no batch lookup and hold fds user space cannot read back.
    with Map.create(MapType.PROG_ARRAY, 4, 4, 8) as m:
        assert m.count() == 8  # an array always has all its indices
        assert sorted(m.keys()) == [i.to_bytes(4, "little") for i in range(8)]


def test_from_id_and_map_info():
    with Map.create(MapType.LRU_HASH, 4, 4, 32, name="t_byid") as m:
        m.set(b"abcd", b"efgh")
        with Map.from_id(m.info.id) as again:
            assert again.info == m.info
            assert again.get(b"abcd") == b"efgh"


# --- raw paths: contiguous key/value buffers, nothing decoded ---------------------------------


def raw_records(m: Map, chunks) -> dict[bytes, bytes]:
    """``items_raw`` chunks split into {key bytes: value bytes}, checking each chunk's lengths."""
    ks, vs, out = m.info.key_size, m.value_size, {}
    for n, kb, vb in chunks:
        assert n >= 1 and len(kb) == n * ks and len(vb) == n * vs
        for i in range(n):
            out[kb[i * ks : (i + 1) * ks]] = vb[i * vs : (i + 1) * vs]
    return out


@pytest.mark.parametrize("size", [0, 1, CHUNK, CHUNK + 1, 5_000])
@pytest.mark.parametrize("kind", list(KINDS))
def test_items_raw_round_trips_through_update_batch_raw(kind, size):
    make, entry, expect = KINDS[kind]
    with make(size) as m, make(size) as copy:
        m.update_batch((entry(i) for i in range(size)), chunk=CHUNK)
        raw = raw_records(m, m.items_raw(chunk=CHUNK))
        assert len(raw) == size
        keys, values = b"".join(raw), b"".join(raw.values())
        assert copy.update_batch_raw(keys, values, chunk=CHUNK) == size
        assert as_dict(copy.items()) == as_dict(expect(i) for i in range(size))
        assert raw_records(copy, copy.items_raw()) == raw


def test_raw_layout_is_the_kernels():
    ncpus = lb.possible_cpus()
    with Map.create(MapType.HASH, ct.c_uint64, Stats, 64) as m:
        m.update_batch((i, Stats(i, 10 * i)) for i in range(5))
        assert raw_records(m, m.items_raw()) == {
            struct.pack("=Q", i): struct.pack("=QQ", i, 10 * i) for i in range(5)
        }
    # Per-CPU: one 8-byte slot per possible CPU, a 4-byte value at the start of each.
    with Map.create(MapType.PERCPU_HASH, ct.c_uint32, ct.c_uint32, 8) as m:
        value = b"".join(struct.pack("=I4x", 100 + c) for c in range(ncpus))
        assert m.value_size == 8 * ncpus
        m.update_batch_raw(struct.pack("=I", 7), value)
        assert m.get(7) == [100 + c for c in range(ncpus)]
        assert raw_records(m, m.items_raw()) == {struct.pack("=I", 7): value}


@pytest.mark.parametrize(
    "wrap",
    [bytes, bytearray, lambda b: memoryview(b), lambda b: (ct.c_char * len(b)).from_buffer_copy(b)],
    ids=["bytes", "bytearray", "readonly-memoryview", "ctypes-array"],
)
def test_update_batch_raw_takes_any_buffer(wrap):
    n = 3 * CHUNK + 7
    keys = struct.pack(f"={n}Q", *range(n))
    values = struct.pack(f"={2 * n}Q", *(x for i in range(n) for x in (i, 2 * i)))
    with Map.create(MapType.HASH, ct.c_uint64, Stats, n) as m:
        assert m.update_batch_raw(wrap(keys), wrap(values), chunk=CHUNK) == n
        assert sorted((k, v.packets, v.bytes) for k, v in m.items()) == [(i, i, 2 * i) for i in range(n)]


def test_update_batch_raw_count_and_length_checks():
    with Map.create(MapType.HASH, ct.c_uint64, ct.c_uint64, 64) as m:
        keys, values = struct.pack("=4Q", 1, 2, 3, 4), struct.pack("=4Q", 10, 20, 30, 40)
        assert m.update_batch_raw(keys, values, 2) == 2  # only the first two records
        assert sorted(m.items()) == [(1, 10), (2, 20)]
        with pytest.raises(ValueError, match="whole number"):
            m.update_batch_raw(keys[:-1], values)
        with pytest.raises(ValueError, match="values"):
            m.update_batch_raw(keys, values[:16])
        with pytest.raises(ValueError, match="keys"):
            m.update_batch_raw(keys, values, 5)
        with pytest.raises(ValueError, match="chunk"):
            m.update_batch_raw(keys, values, chunk=0)
        assert m.update_batch_raw(b"", b"") == 0


def test_update_batch_raw_reports_how_far_it_got():
    with Map.create(MapType.HASH, ct.c_uint64, ct.c_uint64, 10, name="t_rawfull") as m:
        with pytest.raises(OSError) as e:
            m.update_batch_raw(struct.pack("=20Q", *range(20)), bytes(8 * 20), chunk=4)
        assert e.value.errno == errno.E2BIG
        assert "t_rawfull" in str(e.value) and "after 10 entries" in str(e.value)


def test_raw_writes_fall_back_per_key_where_the_kernel_has_no_batch(monkeypatch):
    def no_batch(*args, **kw):
        raise lb.error(lb.ENOTSUPP, "bpf_map_update_batch", "test")

    monkeypatch.setattr(lb, "map_update_batch", no_batch)
    n = 2 * CHUNK + 1
    with Map.create(MapType.HASH, ct.c_uint64, ct.c_uint64, n) as m:
        assert (
            m.update_batch_raw(
                struct.pack(f"={n}Q", *range(n)), struct.pack(f"={n}Q", *range(n)), chunk=CHUNK
            )
            == n
        )
        assert "update" in m._no_batch
        assert sorted(m.items()) == [(i, i) for i in range(n)]


def test_items_raw_delete_drains_and_delete_batch_raw_skips_missing():
    with Map.create(MapType.HASH, ct.c_uint64, ct.c_uint64, 256) as m:
        m.update_batch((i, i) for i in range(200))
        missing = {5, 64, 199}
        keys = struct.pack("=200Q", *range(200))
        assert m.delete_batch_raw(struct.pack(f"={len(missing)}Q", *missing)) == len(missing)
        assert m.delete_batch_raw(keys, 10, chunk=3) == 9  # 5 is gone already
        assert m.count() == 200 - len(missing) - 9
        drained = raw_records(m, m.items_raw(chunk=CHUNK, delete=True))
        assert sorted(struct.unpack("=Q", k)[0] for k in drained) == sorted(set(range(10, 200)) - missing)
        assert m.count() == 0


def test_per_key_raw_baselines_match_batch():
    n = 1000
    keys = struct.pack(f"={n}Q", *range(n))
    values = struct.pack(f"={n}Q", *(3 * i for i in range(n)))
    with Map.create(MapType.HASH, ct.c_uint64, ct.c_uint64, n + 1) as m:
        assert m.update_per_key_raw(keys, values) == n
        assert m.lookup_per_key_raw(keys) == bytearray(values)
        assert m.lookup_per_key_raw(struct.pack("=2Q", 5, n)) == struct.pack("=2Q", 15, 0)  # missing: zeros
