"""Evict-to-export rate: flows drained from the kernel map and encoded as IPFIX, records per second.

    python benchmarks/flowmon/bench_export.py [--flows 100000] [--big]   (--big: 1,000,000)

The flow map is filled from user space (batch update) with distinct flows, then drained the way
the agent does it: chunked lookup-and-delete, each chunk decoded and IPFIX-encoded before the
next. Reported per stage, with the unaccounted count (flows inserted minus records encoded, which
must be zero). Baseline in the same run: draining the same map with Map.pop_all, no decoding.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.common import table  # noqa: E402
from benchmarks.flowmon.common import flowmon_datapath  # noqa: E402
from sluice.plugins.flowmon.config import Config  # noqa: E402
from sluice.plugins.flowmon.ipfix import Encoder  # noqa: E402
from sluice.plugins.flowmon.monitor import FlowMonitor  # noqa: E402
from sluice.plugins.flowmon.records import FLOW, KEY, V4_PREFIX  # noqa: E402


def fill(mon: FlowMonitor, n: int) -> None:
    now = time.monotonic_ns()
    value = FLOW.pack(now, now, 10, 15000, 0, 0, 2, 0, 0, 0, 0, 1, 0x1B, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                      b"\x02" * 6, b"\x04" * 6, b"")  # fmt: skip
    pairs = []
    for i in range(n):
        src = V4_PREFIX + bytes([10, (i >> 16) & 255, (i >> 8) & 255, i & 255])
        dst = V4_PREFIX + bytes([10, 255, 0, 1]) if i % 2 else bytes(15) + b"\x01"  # mixed families
        pairs.append((KEY.pack(src, dst, 1024 + i % 60000, 443, 6), value))
    mon.flows.update_batch(pairs)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--flows", type=int, default=100_000)
    ap.add_argument("--big", action="store_true", help="1,000,000 flows")
    args = ap.parse_args(argv)
    n = 1_000_000 if args.big else args.flows
    with flowmon_datapath(Config(max_flows=n)) as (_, mon, _root):
        fill(mon, n)
        t0 = time.perf_counter()
        drained = len(mon.flows.pop_all())
        t_drain = time.perf_counter() - t0
        fill(mon, n)
        t0 = time.perf_counter()
        decoded = sum(len(chunk) for chunk in mon.evict_chunks(with_drops=False))
        t_decode = time.perf_counter() - t0
        fill(mon, n)
        enc, messages, size = Encoder(max_message=1400), 0, 0
        t0 = time.perf_counter()
        for chunk in mon.evict_chunks(with_drops=False):  # what the agent does, minus the sendto
            out = enc.data_messages(chunk)
            messages, size = messages + len(out), size + sum(map(len, out))
        t_export = time.perf_counter() - t0
    encoded = enc.sequence
    rows = [
        ("drain only, Map.pop_all (baseline)", drained, round(t_drain, 3), round(drained / t_drain)),
        ("drain + decode (evict_chunks)", decoded, round(t_decode, 3), round(decoded / t_decode)),
        ("evict-to-export: drain + decode + IPFIX", encoded, round(t_export, 3), round(encoded / t_export)),
    ]
    print(table(["stage", "records", "seconds", "records/s"], rows))
    print(f"flows inserted {n:,}; records encoded {encoded:,}; unaccounted {n - encoded}; "
          f"{messages:,} messages, {size / 1e6:.1f} MB IPFIX; "
          f"evict-to-export / drain-only rate: {(encoded / t_export) / (drained / t_drain):.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
