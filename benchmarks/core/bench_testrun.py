"""The per-packet baseline: an empty TC program under BPF_PROG_TEST_RUN.

    python benchmarks/core/bench_testrun.py [--repeat N] [--trials T]

Runs ``return TC_ACT_UNSPEC`` (empty.bpf.c) ``repeat`` times per trial on a 64-byte UDP frame and
reports the kernel's mean ns per run. Plugin benchmarks divide their own figure by this one
(``benchmarks.common.empty_program_ns``) so their ratios say what the plugin adds per packet.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.common import empty_program, ns_per_run, table, udp_frame  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=1_000_000, help="runs per trial (one syscall)")
    ap.add_argument("--trials", type=int, default=5)
    args = ap.parse_args(argv)
    _, fd = empty_program()
    rows = []
    for size in (64, 1500):
        runs = ns_per_run(fd, udp_frame(size), args.repeat, args.trials)
        rows.append(
            (
                "empty (TC_ACT_UNSPEC)",
                size,
                args.repeat,
                args.trials,
                min(runs),
                statistics.median(runs),
                max(runs),
            )
        )
    print(
        table(
            ["program", "frame bytes", "repeat", "trials", "min ns/run", "median ns/run", "max ns/run"], rows
        )
    )
    print(f"baseline (empty_program_ns, 64-byte frame): {rows[0][5]} ns/run")


if __name__ == "__main__":
    main()
