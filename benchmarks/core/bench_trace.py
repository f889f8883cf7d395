"""What per-packet verdict reporting costs: with nobody tracing it must be a flag check.

Every row runs under BPF_PROG_TEST_RUN on a 64-byte UDP frame; the ratio column is to the empty
program measured in the same run. Compare "nobody tracing" with "every flow field used": the
compiler drops parsing work whose result is unused, and a traced program uses every field.
"""

from __future__ import annotations

import shutil
import statistics
import sys
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.common import empty_program_ns, ns_per_run, prepare_headers, table, udp_frame  # noqa: E402
from sluice.bpf import loader  # noqa: E402
from sluice.programs import Program  # noqa: E402
from sluice.trace import TraceSession  # noqa: E402

SRC = Path(__file__).with_name("trace_cost.bpf.c")


def main() -> None:
    prepare_headers()
    bpffs = Path("/sys/fs/bpf") / f"sluice-bench-{uuid.uuid4().hex[:8]}"
    try:
        bpf = loader.compile_program("bench", Program("bench", SRC), bpffs=bpffs)
        parse = loader.load_tc(bpf, "bench", "parse_only")
        verdict = loader.load_tc(bpf, "bench", "parse_and_verdict")
        frame = udp_frame(64)
        base = empty_program_ns()
        rows = []

        def row(name, fd):
            ns = statistics.median(ns_per_run(fd, frame))
            rows.append([name, ns, ns / base])

        rows.append(["empty program (baseline)", base, 1.0])
        row("parse, one field used", parse)
        row("parse, every flow field used", loader.load_tc(bpf, "bench", "parse_full"))
        row("parse + sluice_verdict, nobody tracing", verdict)
        with TraceSession(bpffs, port=1):  # tracing on, this packet filtered out
            row("parse + sluice_verdict, tracing, filtered out", verdict)
        with TraceSession(bpffs):  # every packet reported (ring buffer full after the first 1.6K)
            row("parse + sluice_verdict, tracing everything", verdict)
        print(table(["program", "ns/run (median of 5 × 1M)", "ratio to empty"], rows))
        bpf.cleanup()
    finally:
        shutil.rmtree(bpffs, ignore_errors=True)


if __name__ == "__main__":
    main()
