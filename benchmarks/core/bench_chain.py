"""Per-packet cost of the default chain (prologue, flowmon, conntrack, firewall) under
BPF_PROG_TEST_RUN, program after program on one packet with skb->cb carried over, as a ratio to the
empty TC program measured in the same run.

    python benchmarks/core/bench_chain.py [--repeat N] [--trials T] [--flows F]

A real hook runs every program of the chain on one skb; PROG_TEST_RUN runs one program per call, and
each call pays the test harness's own per-run cost (the whole of the empty program's figure). So
the chain's cost is the empty program once plus what each program adds over it:

    chain = empty + sum(program_i - empty)            ratio = chain / empty

Two modes per case: "shared" carries the prologue's skb->cb stamp into every later program (they
reuse its parse, docs/architecture.md "Parse once"); "each parses" clears the stamp, so every
program parses for itself (what the chain cost before the prologue). Cases:

  established   a packet of a TCP flow every program already knows (repeat N in one call)
  new flow      a SYN of a flow nobody has seen: F distinct flows, one run each, medians
"""

from __future__ import annotations

import argparse
import ctypes as ct
import os
import shutil
import statistics
import sys
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.common import empty_program, prepare_headers, table  # noqa: E402
from sluice.bpf import loader  # noqa: E402
from sluice.bpf.testrun import SkBuff, skb_ctx, test_run  # noqa: E402
from sluice.plugins.conntrack import Config as CtConfig  # noqa: E402
from sluice.plugins.conntrack import configure_datapath  # noqa: E402
from sluice.plugins.conntrack import program as ct_program  # noqa: E402
from sluice.plugins.firewall import frames  # noqa: E402
from sluice.plugins.firewall.maps import FirewallMaps  # noqa: E402
from sluice.plugins.firewall.policy import Policy, compile_policy  # noqa: E402
from sluice.plugins.flowmon.config import Config as FlowConfig  # noqa: E402
from sluice.plugins.flowmon.monitor import FlowMonitor  # noqa: E402
from sluice.plugins.flowmon.monitor import program as flowmon_program  # noqa: E402
from sluice.programs import Program  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
PROLOGUE = Program("core", ROOT / "core" / "bpf" / "prologue.bpf.c")
FIREWALL = Program("firewall", ROOT / "plugins" / "firewall" / "firewall.bpf.c")
CLIENT, SERVER = "10.1.0.5", "172.16.0.1"
STAMP = 4  # SLUICE_CB_STAMP


def cb_of(ctx_out: bytes | None) -> list[int]:
    return list(SkBuff.from_buffer_copy((ctx_out or b"").ljust(ct.sizeof(SkBuff), b"\0")).cb)


class Chain:
    """The default chain's programs compiled under a private bpffs root, in chain order."""

    def __init__(self, root: Path):
        self.bpfs = []
        prologue = loader.compile_program("core", PROLOGUE, bpffs=root)
        self.bpfs.append(prologue)
        self.prologue = loader.load_tc(prologue, "core", "sluice_prologue")

        flow_cfg = FlowConfig()
        flowmon = loader.compile_program("flowmon", flowmon_program(flow_cfg, False), bpffs=root)
        self.bpfs.append(flowmon)
        self.flowmon = FlowMonitor(root / "sluice" / "flowmon")
        self.flowmon.configure(flow_cfg)

        ct_cfg = CtConfig(interfaces=[], host={"enabled": False})
        conntrack = loader.compile_program("conntrack", ct_program(ct_cfg), bpffs=root)
        self.bpfs.append(conntrack)
        configure_datapath(root / "sluice" / "conntrack", ct_cfg)

        firewall = loader.compile_program("firewall", FIREWALL, bpffs=root)
        self.bpfs.append(firewall)
        self.fw = FirewallMaps.from_pins(root / "sluice" / "firewall")
        self.fw.init_settings({"audit-rate": 0})
        policy = {"networks": [{"name": "clients", "sources": ["10.1.0.0/16"],
                                "rules": [{"proto": "tcp", "dst": "172.16.0.0/16", "ports": 80}]}]}  # fmt: skip
        self.fw.apply(compile_policy(Policy.model_validate(policy)), {})

        self.programs = {
            "flowmon": loader.load_tc(flowmon, "flowmon", "flowmon_ingress"),
            "conntrack": loader.load_tc(conntrack, "conntrack", "ct_tc"),
            "firewall": loader.load_tc(firewall, "firewall", "fw_ingress"),
        }

    def run(self, frame: bytes, repeat: int, shared: bool, skip: tuple[str, ...] = ()) -> dict[str, int]:
        """ns per run of the prologue and each program on ``frame``, cb carried along."""
        r = test_run(self.prologue, frame, repeat=repeat, ctx=skb_ctx(), data_size_out=0)
        out = {"prologue": r.duration_ns}
        cb = cb_of(r.ctx_out) if shared else [0] * 5
        for name, fd in self.programs.items():
            if name in skip:
                continue
            r = test_run(fd, frame, repeat=repeat, ctx=skb_ctx(cb=cb), data_size_out=0)
            if r.retval not in (-1, 0):  # TC_ACT_UNSPEC / TC_ACT_OK: the flow must pass every program
                raise SystemExit(f"{name} returned {r.retval} for the benchmark flow")
            out[name] = r.duration_ns
        return out

    def close(self) -> None:
        self.fw.close()
        self.flowmon.close()
        for bpf in self.bpfs:
            bpf.cleanup()


def chain_ratio(per_program: dict[str, float], empty: float, prologue: bool) -> tuple[float, float]:
    parts = [v for k, v in per_program.items() if prologue or k != "prologue"]
    chain = empty + sum(v - empty for v in parts)
    return chain, chain / empty


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=200_000)
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--flows", type=int, default=3000)
    args = ap.parse_args()
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # the per-CPU parse slot is this CPU's
    prepare_headers()
    root = Path("/sys/fs/bpf") / f"sluice-bench-{uuid.uuid4().hex[:8]}"
    root.mkdir()
    chain = None
    try:
        chain = Chain(root)
        _, empty_fd = empty_program()
        names = ["prologue", *chain.programs]

        # established: handshake once, then repeat one ACK of the flow
        syn = frames.packet(CLIENT, SERVER, 6, 40000, 80, "S")
        chain.run(syn, 1, True)
        # the reply comes back on the other hook (fw_egress): here only the observers see it
        chain.run(frames.packet(SERVER, CLIENT, 6, 80, 40000, "SA"), 1, True, skip=("firewall",))
        ack = frames.packet(CLIENT, SERVER, 6, 40000, 80, "A")
        cases: dict[tuple[str, str], dict[str, float]] = {}
        empty_est = statistics.median(
            test_run(empty_fd, ack, repeat=args.repeat, data_size_out=0).duration_ns
            for _ in range(args.trials)
        )
        for shared in (True, False):
            trials = [chain.run(ack, args.repeat, shared) for _ in range(args.trials)]
            cases[("established", "shared" if shared else "each parses")] = {
                n: statistics.median(t[n] for t in trials) for n in names
            }

        # new flow: a fresh 5-tuple per run, one run each (the kernel's timing of a single run)
        empty_new = statistics.median(
            test_run(
                empty_fd, frames.packet(CLIENT, SERVER, 6, 1024 + i, 80, "S"), data_size_out=0
            ).duration_ns
            for i in range(args.flows)
        )
        for shared, base in ((True, 10000), (False, 30000)):
            runs = [
                chain.run(frames.packet(CLIENT, SERVER, 6, base + i, 80, "S"), 1, shared)
                for i in range(args.flows)
            ]
            cases[("new flow", "shared" if shared else "each parses")] = {
                n: statistics.median(r[n] for r in runs) for n in names
            }

        rows = []
        for (case, mode), per in cases.items():
            empty = empty_est if case == "established" else empty_new
            with_prologue = chain_ratio(per, empty, mode == "shared")
            rows.append(
                [case, mode, empty, *(per[n] for n in names), with_prologue[0], round(with_prologue[1], 2)]
            )
        print(
            f"default chain per packet, BPF_PROG_TEST_RUN: established median of {args.trials} x {args.repeat} runs, "
            f"new flow median of {args.flows} single runs; ns/run per program (each includes the harness's "
            "per-run cost, counted once in the chain)"
        )
        print(table(["case", "parse", "empty ns", *(f"{n} ns" for n in names), "chain ns", "x empty"], rows))
        print("'each parses' runs no prologue (stamp cleared): every program parses for itself")
    finally:
        if chain is not None:
            chain.close()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
