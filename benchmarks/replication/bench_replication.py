"""Session events replicated per second end to end, against a naive put-per-event baseline, and
the replication lag under a steady load. One real nats-server (JetStream, file storage) on
loopback, started for the run.

    python benchmarks/replication/bench_replication.py [--events N] [--baseline-events B]
                                                        [--trials T] [--rate R] [--seconds S]

Throughput: N session events, a mix of create (20%), update (70%) and delete (10%) over N/10
sessions, published through the broadcast hook (as owners do) as fast as the replicator takes them; the clock stops when the bucket holds
exactly the final state (every write acked). Two replicator settings: the default (500 ms
debounce: updates of a key coalesce) and debounce 0 (every change is written; only pipelining
helps). Baseline: the same kind of events, each written with one awaited ``kv.put``/``kv.delete``
(what a replicator without batching does), B events. Each path runs T times (median reported:
the machine is shared).

Lag: R events/s for S seconds, from the change to its JetStream ack; created/deleted (written at
once) and updated (debounced) measured separately.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import nats  # noqa: E402

from benchmarks.common import table  # noqa: E402
from sluice.manager import PluginManager  # noqa: E402
from sluice.plugins import replication  # noqa: E402
from sluice.plugins.replication.config import Config  # noqa: E402
from sluice.plugins.replication.embedded import NatsServer  # noqa: E402
from sluice.plugins.replication.records import encode_key, encode_value  # noqa: E402
from sluice.plugins.replication.replicator import Replicator  # noqa: E402
from sluice.sessions import Session, SessionEvent  # noqa: E402

VALUE = bytes(48)  # about the size of a tunnel-metadata session value


def workload(n: int, seed: int = 1) -> list[SessionEvent]:
    """n events: 20% create, 70% update, 10% delete, over about n/10 sessions."""
    rng = random.Random(seed)
    live: list[int] = []
    next_id = 0
    out = []
    for _ in range(n):
        roll = rng.random()
        if roll < 0.2 or not live:
            sid, kind = next_id, "created"
            next_id += 1
            live.append(sid)
        elif roll < 0.9:
            sid, kind = rng.choice(live), "updated"
        else:
            sid, kind = live.pop(rng.randrange(len(live))), "deleted"
        session = Session("bench", sid.to_bytes(8, "big"), VALUE, {"id": sid})
        out.append(SessionEvent(kind, session, time.time_ns()))
    return out


async def replicated(url: str, events: list[SessionEvent], bucket: str, debounce: float) -> dict:
    r = Replicator(Config(node_id="bench", bucket=bucket, debounce=debounce, sync_interval=0), servers=[url])
    await r.connect()
    await r.boot_load()
    writer = asyncio.ensure_future(r.run_writer())
    # Events go the owners' way: the broadcast hook into the plugin's real implementation.
    manager = PluginManager()
    manager.register(replication, "replication")
    replication._replicator = r
    publish = manager.pm.hook.sluice_session_event
    t0 = time.perf_counter()
    for i, ev in enumerate(events):
        publish(event=ev)
        if i % 500 == 499:
            await asyncio.sleep(0)  # the owner's loop yields now and then; the writer runs
    await r.flush()  # the last window's tail is written now, not waited out (as at a graceful stop)
    elapsed = time.perf_counter() - t0
    writer.cancel()
    replication._replicator = None
    manager.unregister("replication")
    writes = sum(r.stats.writes.values())
    await r.close()
    return {"elapsed": elapsed, "writes": writes, "batches": r.stats.batches}


async def baseline(url: str, events: list[SessionEvent], bucket: str) -> dict:
    nc = await nats.connect(url)
    js = nc.jetstream()
    kv = await js.create_key_value(bucket=bucket)
    t0 = time.perf_counter()
    for ev in events:
        key = encode_key(ev.owner, ev.session.key)
        if ev.kind == "deleted":
            await kv.delete(key)
        else:
            await kv.put(key, encode_value(ev.session, "bench", ev.time_ns))
    elapsed = time.perf_counter() - t0
    await nc.close()
    return {"elapsed": elapsed, "writes": len(events), "batches": len(events)}


async def lag(url: str, rate: int, seconds: float, kind: str, bucket: str) -> list[float]:
    """Change→ack seconds of every write at ``rate`` events/s of ``kind``."""
    r = Replicator(Config(node_id="bench", bucket=bucket, sync_interval=0), servers=[url])
    await r.connect()
    await r.boot_load()
    writer = asyncio.ensure_future(r.run_writer())
    sessions = [Session("bench", i.to_bytes(8, "big"), VALUE) for i in range(max(1, rate // 2))]
    if kind == "updated":
        for s in sessions:
            r.submit(SessionEvent("created", s, time.time_ns()))
        while not r.idle:
            await asyncio.sleep(0.01)
        r.lags.clear()
    tick, per_tick = 0.01, max(1, int(rate * 0.01))
    t_end = time.perf_counter() + seconds
    n = 0
    while time.perf_counter() < t_end:
        for _ in range(per_tick):
            s = sessions[n % len(sessions)]
            k = kind if kind == "updated" else ("created" if (n // len(sessions)) % 2 == 0 else "deleted")
            r.submit(SessionEvent(k, s, time.time_ns()))
            n += 1
        await asyncio.sleep(tick)
    while not r.idle:
        await asyncio.sleep(0.01)
    writer.cancel()
    samples = list(r.lags)
    r.lags.clear()
    await r.close()
    return samples


def median_run(runs: list[dict]) -> dict:
    return sorted(runs, key=lambda r: r["elapsed"])[len(runs) // 2]


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


async def main(args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        srv = NatsServer(Path(tmp) / "nats", die_with_parent=True)
        url = srv.start()
        try:
            events = workload(args.events)
            base_events = workload(args.baseline_events, seed=2)
            trials = range(args.trials)  # each in its own bucket; the median run is reported
            base = median_run([await baseline(url, base_events, f"base{t}") for t in trials])
            coalesced = median_run([await replicated(url, events, f"coalesced{t}", 0.5) for t in trials])
            pipelined = median_run([await replicated(url, events, f"pipelined{t}", 0.0) for t in trials])
            base_rate = args.baseline_events / base["elapsed"]
            rows = []
            for name, res, n in (
                ("naive put per event (baseline)", base, args.baseline_events),
                ("replicator, debounce 0 (pipelined)", pipelined, args.events),
                ("replicator, debounce 500 ms", coalesced, args.events),
            ):
                rate = n / res["elapsed"]
                rows.append([name, n, res["writes"], res["batches"], round(res["elapsed"], 3), round(rate),
                             round(rate / base_rate, 1)])  # fmt: skip
            print(f"Session events replicated end to end (nats-server {srv.url}, file storage)")
            print(table(["path", "events", "writes", "batches", "seconds", "events/s", "x baseline"], rows))
            print()
            lag_rows = []
            for kind in ("created/deleted", "updated"):
                samples = await lag(url, args.rate, args.seconds, kind.split("/")[0], f"lag-{kind[:3]}")
                lag_rows.append([kind, args.rate, len(samples), round(statistics.median(samples) * 1000, 1),
                                 round(pct(samples, 0.99) * 1000, 1)])  # fmt: skip
            print(f"Replication lag, change to JetStream ack, {args.rate} events/s for {args.seconds} s")
            print(table(["events", "rate/s", "samples", "p50 ms", "p99 ms"], lag_rows))
        finally:
            srv.stop()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--events", type=int, default=50_000)
    p.add_argument("--baseline-events", type=int, default=3_000)
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--rate", type=int, default=5_000)
    p.add_argument("--seconds", type=float, default=3.0)
    asyncio.run(main(p.parse_args()))
