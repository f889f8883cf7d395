"""Reconcile N routes into the LPM trie: batch calls vs one syscall per key, in one run.

    python benchmarks/tunnel/bench_reconcile.py [--sizes 1000,16000] [--big]

For each size, on a fresh LPM trie of the plugin's shape: ``fill`` (empty → N routes, all new),
``noop`` (the same N again: a restart that finds the trie right, nothing written), ``churn``
(10% of routes changed, 10% removed, 10% added). ``engine`` is the whole apply (render the
desired routes + read the trie + diff + write); ``batch`` and ``per-key`` time the kernel part
(read, diff, write) with BPF_MAP_*_BATCH and with single-element calls. ``--big`` adds 100K.
"""

from __future__ import annotations

import argparse
import ctypes as ct
import ipaddress
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.common import table  # noqa: E402
from sluice.bpf import libbpf as lb  # noqa: E402
from sluice.bpf.maps import Map, MapType  # noqa: E402
from sluice.plugins.tunnel.engine import Tunnel, diff_and_write  # noqa: E402
from sluice.plugins.tunnel.model import LpmKey, Nexthop, Route, RouteValue  # noqa: E402

PEERS = [Nexthop(peer=f"p{i}", underlay=f"10.99.{i}.2", vni=100 + i) for i in range(4)]


def routes(n: int, salt: int = 0) -> list[Route]:
    """n distinct /24s (v4) and /64s (v6, every 4th), 1-4 nexthops each."""
    out = []
    for i in range(n):
        if i % 4 == 3:
            dst = ipaddress.IPv6Network((0xFD00 << 112 | i << 64, 64))
        else:
            dst = ipaddress.IPv4Network((0x0A000000 | i << 8, 24))
        k = 1 + (i + salt) % 4
        out.append(Route(dst=dst, nexthops=PEERS[:k]))
    return out


def churned(base: list[Route], n: int) -> list[Route]:
    """10% changed (other nexthops), 10% removed, 10% new."""
    tenth = max(1, n // 10)
    changed = [Route(dst=r.dst, nexthops=PEERS[::-1][: len(r.nexthops)]) for r in base[:tenth]]
    new = routes(n + tenth)[n:]
    return changed + base[tenth : n - tenth] + new


def new_trie(n: int) -> Map:
    """Raw bytes, as the plugin opens its pin."""
    size = n + n // 5 + 16
    return Map.create(
        MapType.LPM_TRIE, ct.sizeof(LpmKey), ct.sizeof(RouteValue), size, flags=lb.BPF_F_NO_PREALLOC
    )


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def phases(apply_base, apply_churn) -> dict[str, float]:
    return {"fill": timed(apply_base), "noop": timed(apply_base), "churn": timed(apply_churn)}


def best_of(run, n: int, reps: int = 3) -> dict[str, float]:
    """Each phase's best time over ``reps`` runs, each on a fresh trie (the machine is shared)."""
    results = []
    for _ in range(reps):
        with new_trie(n) as trie:
            results.append(run(trie))
    return {phase: min(r[phase] for r in results) for phase in results[0]}


def measure(n: int) -> list[tuple]:
    rows = []
    base, churn = routes(n), churned(routes(n), n)
    # the kernel part, batch vs per key, on entries rendered once
    renders = {}
    for name, rs in (("base", base), ("churn", churn)):
        t = Tunnel(new_trie(1), lambda nh: 7)
        t.api_routes = {r.dst: r for r in rs}
        renders[name] = t.render()[0]
    kernel = {mode: best_of(lambda trie, b=mode == "batch": phases(
        lambda: diff_and_write(trie, renders["base"], b), lambda: diff_and_write(trie, renders["churn"], b)
    ), n) for mode in ("batch", "per-key")}  # fmt: skip

    def engine_phases(trie):
        engine = Tunnel(trie, lambda nh: 7)
        return phases(lambda: engine.replace_api_routes(base), lambda: engine.replace_api_routes(churn))

    whole = best_of(engine_phases, n)
    for phase in ("fill", "noop", "churn"):
        b, p = kernel["batch"][phase], kernel["per-key"][phase]
        rows.append((n, phase, whole[phase] * 1000, b * 1000, p * 1000, p / b))
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000,16000", help="comma-separated route counts")
    ap.add_argument("--big", action="store_true", help="also 100000 routes")
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")] + ([100_000] if args.big else [])
    rows = [r for n in sizes for r in measure(n)]
    print(table(["routes", "phase", "engine ms", "batch ms", "per-key ms", "per-key/batch"], rows))


if __name__ == "__main__":
    main()
