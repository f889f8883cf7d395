"""Helpers shared by the benchmarks: test frames, BCC loading, the empty-program baseline, tables.

Benchmarks run as scripts (``python benchmarks/<area>/bench_x.py``); to import this module they put
the repository root on ``sys.path`` and ``from benchmarks.common import ...``.

Per-packet figures of plugins are reported as a ratio to :func:`empty_program_ns`: the cost of
BPF_PROG_TEST_RUN running a TC program that does nothing, measured the same way on the same
machine, so the ratio says what a plugin adds rather than what the machine is.
"""

from __future__ import annotations

import functools
import os
import statistics
import struct
from collections.abc import Sequence
from pathlib import Path

from sluice import kernel
from sluice.bpf.testrun import test_run
from sluice.config import AgentSettings

ROOT = Path(__file__).resolve().parents[1]
EMPTY_SRC = ROOT / "benchmarks" / "core" / "empty.bpf.c"


def udp_frame(size: int = 64, dport: int = 9, sport: int = 40000) -> bytes:
    """An Ethernet/IPv4/UDP frame of ``size`` bytes (no FCS), 10.0.0.1 -> 10.0.0.2."""
    payload = size - 14 - 20 - 8
    if payload < 0:
        raise ValueError(f"a UDP frame needs at least 42 bytes, not {size}")
    eth = bytes.fromhex("0200000000020200000000010800")
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + 8 + payload, 1, 0, 64, 17, 0, b"\n\0\0\1", b"\n\0\0\2")
    udp = struct.pack("!HHHH", sport, dport, 8 + payload, 0)
    return eth + ip + udp + bytes(payload)


@functools.cache
def prepare_headers() -> None:
    """Point BCC at kernel headers the way the agent does (``BCC_KERNEL_SOURCE`` when needed)."""
    cache = Path(os.environ.get("SLUICE_CACHE_DIR", AgentSettings().cache_dir))
    check = kernel.prepare_bcc(cache)
    if not check.ok:
        raise SystemExit(f"kernel headers for BCC: {check.detail}; {check.fix}")


def load_tc(src: Path | str, fn: str, cflags: Sequence[str] = ()):
    """Compile ``src`` with BCC and load ``fn`` as a TC (SCHED_CLS) program: ``(bpf, prog_fd)``.

    Keep ``bpf`` referenced: the program is unloaded when BCC's object goes away.
    """
    from bcc import BPF

    prepare_headers()

    bpf = BPF(src_file=str(src).encode(), cflags=list(cflags))
    return bpf, bpf.load_func(fn.encode(), BPF.SCHED_CLS).fd


@functools.cache
def empty_program():
    """The compiled empty TC program, loaded once per process: ``(bpf, prog_fd)``."""
    return load_tc(EMPTY_SRC, "empty")


def ns_per_run(prog_fd: int, data: bytes, repeat: int = 1_000_000, trials: int = 5) -> list[int]:
    """The kernel's mean ns per run, one figure per trial of ``repeat`` runs."""
    return [test_run(prog_fd, data, repeat=repeat, data_size_out=0).duration_ns for _ in range(trials)]


def empty_program_ns(repeat: int = 1_000_000, trials: int = 5, frame_size: int = 64) -> float:
    """Median ns per run of the empty TC program on a ``frame_size``-byte UDP frame: the baseline."""
    _, fd = empty_program()
    return float(statistics.median(ns_per_run(fd, udp_frame(frame_size), repeat, trials)))


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain text table; numeric columns (blanks allowed) right-aligned, others left-aligned."""
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    numeric = [all(isinstance(r[i], int | float) or r[i] == "" for r in rows) for i in range(len(headers))]

    def line(r):
        return "  ".join(
            c.rjust(w) if num else c.ljust(w) for c, w, num in zip(r, widths, numeric, strict=True)
        )

    out = [line(cells[0]), "  ".join("-" * w for w in widths)]
    return "\n".join([*out, *(line(r) for r in cells[1:])])


def _fmt(c: object) -> str:
    if isinstance(c, float):
        return f"{c:.3f}" if abs(c) < 100 else f"{c:.1f}"
    if isinstance(c, int):
        return f"{c:,}"
    return str(c)
