"""Boot load: every session in the bucket read, decoded and restored into a real BPF hash map.

    python benchmarks/replication/bench_boot.py [--sizes 10000,100000] [--baseline-max 10000]

For each size N the bucket is filled with N records (48-byte values, small attrs), then a fresh
replicator runs its boot load (one ordered consumer, last revision per key) and hands the
sessions to a restore function that writes them into a BPF hash map with batch updates (needs
root; without it, into a dict). Baseline, same run: the naive way with nats-py's KV API
(``kv.keys()`` then one ``kv.get`` per key), on at most ``--baseline-max`` records; the ratio
compares records per second. Target: 100K sessions under 10 s.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import nats  # noqa: E402

from benchmarks.common import table  # noqa: E402
from sluice.plugins.replication.config import Config  # noqa: E402
from sluice.plugins.replication.embedded import NatsServer  # noqa: E402
from sluice.plugins.replication.records import decode  # noqa: E402
from sluice.plugins.replication.replicator import Replicator  # noqa: E402
from sluice.sessions import Session, SessionEvent  # noqa: E402

KEY, VALUE = 8, 48


def bpf_restore(capacity: int):
    """A restore function writing into a BPF hash map (batch), or a dict when not root."""
    if os.geteuid() != 0:
        store: dict = {}

        def to_dict(sessions):
            store.update((s.key, s.value) for s in sessions)
            return {"bench": len(sessions)}

        return to_dict, "dict (not root)"
    from sluice.bpf.maps import Map, MapType

    m = Map.create(MapType.HASH, KEY, VALUE, capacity, name="bench_sessions")

    def to_map(sessions):
        return {"bench": m.update_batch([(s.key, s.value) for s in sessions])}

    return to_map, "BPF hash map"


async def fill(url: str, bucket: str, n: int) -> None:
    r = Replicator(Config(node_id="bench", bucket=bucket, sync_interval=0), servers=[url])
    await r.connect()
    for i in range(n):
        s = Session("bench", i.to_bytes(KEY, "big"), bytes(VALUE), {"id": i, "vni": 7})
        r.submit(SessionEvent("created", s, time.time_ns()))
    await r.flush(timeout=300)
    await r.close()


async def boot(url: str, bucket: str, n: int) -> tuple[float, int, str]:
    restore, target = bpf_restore(max(n, 1))
    r = Replicator(Config(node_id="other", bucket=bucket), servers=[url], restore=restore)
    await r.connect()
    t0 = time.perf_counter()
    await r.boot_load()
    elapsed = time.perf_counter() - t0
    await r.close()
    return elapsed, r.boot["restored"].get("bench", 0), target


async def naive(url: str, bucket: str) -> tuple[float, int]:
    nc = await nats.connect(url)
    kv = await nc.jetstream().key_value(bucket)
    t0 = time.perf_counter()
    records = [decode(k, (await kv.get(k)).value) for k in await kv.keys()]
    elapsed = time.perf_counter() - t0
    await nc.close()
    return elapsed, len(records)


async def main(args) -> None:
    sizes = [int(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        srv = NatsServer(Path(tmp) / "nats", die_with_parent=True)
        url = srv.start()
        try:
            base_n = min(args.baseline_max, min(sizes))
            await fill(url, "base", base_n)
            base_s, base_count = await naive(url, "base")
            base_rate = base_count / base_s
            rows = [["naive kv.keys + kv.get (baseline)", base_count, round(base_s, 3), round(base_rate), 1.0, ""]]  # fmt: skip
            for n in sizes:
                bucket = f"boot{n}"
                await fill(url, bucket, n)
                seconds, restored, target = await boot(url, bucket, n)
                rows.append([f"boot load -> {target}", restored, round(seconds, 3), round(restored / seconds),
                             round(restored / seconds / base_rate, 1), round(seconds * 100_000 / n, 2)])  # fmt: skip
            print(f"Boot load (nats-server on loopback, file storage; {KEY}-byte keys, {VALUE}-byte values)")
            print(table(["path", "sessions", "seconds", "sessions/s", "x baseline", "s per 100K"], rows))
        finally:
            srv.stop()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="10000", help="comma-separated bucket sizes (e.g. 10000,100000)")
    p.add_argument("--baseline-max", type=int, default=10_000)
    asyncio.run(main(p.parse_args()))
