"""Per-key syscalls vs batch operations on a large hash map (sluice.bpf.maps).

    python benchmarks/core/bench_maps.py [--entries N] [--chunk C]

One run writes, reads and deletes N entries (u64 key, 16-byte value) first one syscall per entry,
then in batches of C, each phase starting from the state the previous one left, and prints how
much faster the batch path is. The inputs are built before timing; both paths take the same
Python objects and return the same decoded pairs, so the ratio is what batching saves end to end.
"""

from __future__ import annotations

import argparse
import ctypes as ct
import gc
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.common import table  # noqa: E402
from sluice.bpf.maps import Map, MapType  # noqa: E402


class Value(ct.Structure):
    _fields_ = [("packets", ct.c_uint64), ("bytes", ct.c_uint64)]


def timed(fn):
    """Wall time of ``fn()``, with the cyclic GC off as timeit does: a million live ctypes objects
    make its full collections dominate (and randomise) whichever phase happens to trigger them."""
    gc.collect()
    gc.disable()
    try:
        t = time.perf_counter()
        result = fn()
        return time.perf_counter() - t, result
    finally:
        gc.enable()


def run(entries: int, chunk: int) -> list[tuple]:
    items = [(i, Value(i, i * 64)) for i in range(entries)]
    keys = [k for k, _ in items]
    seconds: dict[tuple[str, str], float] = {}
    with Map.create(MapType.HASH, ct.c_uint64, Value, entries + entries // 4 + 1, name="bench_maps") as m:
        for method, write, read, delete in [
            ("per-key", m.update_per_key, m.items_per_key, lambda ks: sum(m.delete(k) for k in ks)),
            (
                "batch",
                lambda it: m.update_batch(it, chunk),
                lambda: m.items(chunk),
                lambda ks: m.delete_batch(ks, chunk),
            ),
        ]:
            seconds["write", method], n = timed(lambda w=write: w(items))
            assert n == entries, n
            seconds["read", method], got = timed(lambda r=read: list(r()))
            assert len(got) == entries and got[-1][1].bytes == got[-1][0] * 64, len(got)
            del got  # a million pairs: free them before the next phase allocates
            seconds["delete", method], n = timed(lambda d=delete: d(keys))
            assert n == entries and m.count() == 0, n
    rows = []
    for op in ("write", "read", "delete"):
        base = seconds[op, "per-key"]
        for method in ("per-key", "batch"):
            s = seconds[op, method]
            rows.append((op, method, entries, s, s / entries * 1e6, base / s if method == "batch" else ""))
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--entries", type=int, default=1_000_000)
    ap.add_argument("--chunk", type=int, default=4096, help="entries per batch syscall")
    args = ap.parse_args(argv)
    rows = run(args.entries, args.chunk)
    print(f"hash map, u64 key, 16-byte value, chunk {args.chunk}")
    print(table(["op", "method", "entries", "seconds", "µs/entry", "ratio (per-key ÷ batch)"], rows))


if __name__ == "__main__":
    main()
