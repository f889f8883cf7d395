"""Per-packet cost of the firewall datapath at 10, 1K and 100K rules, as a ratio to the empty
TC program measured in the same run (BPF_PROG_TEST_RUN, mean ns per run, median of trials).

A reference row shows what the shared parser and verdict report alone cost (every sluice policy
program pays it). Two paths per size:
  decision     a new flow that matches no rule: source LPM, destination LPM, learned-DNS hash,
               network default (deny, audit rate 0 so no event is written): the policy's worst case
  established  a packet of a live session: one hash lookup and the counters

    python benchmarks/firewall/bench_rules.py [--sizes 10,1000,100000] [--repeat 200000]
"""

from __future__ import annotations

import argparse
import ipaddress
import shutil
import statistics
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.common import empty_program_ns, ns_per_run, table  # noqa: E402
from sluice import kernel  # noqa: E402
from sluice.bpf import loader  # noqa: E402
from sluice.plugins.firewall import frames  # noqa: E402
from sluice.plugins.firewall.maps import FirewallMaps  # noqa: E402
from sluice.plugins.firewall.policy import Policy, compile_policy  # noqa: E402
from sluice.programs import Program  # noqa: E402

SRC = Path(__file__).resolve().parents[2] / "plugins" / "firewall" / "firewall.bpf.c"
PARSE_ONLY = Path(__file__).resolve().parent / "parse_only.bpf.c"
CLIENT = "10.1.0.5"


def policy_with(n: int) -> Policy:
    """n rules, each allowing TCP 80 to its own /32 in 172.16.0.0/12 (all disjoint)."""
    base = int(ipaddress.IPv4Address("172.16.0.0"))
    rules = [{"proto": "tcp", "dst": str(ipaddress.IPv4Address(base + i)), "ports": 80} for i in range(n)]
    return Policy.model_validate(
        {"networks": [{"name": "clients", "sources": ["10.1.0.0/16"], "rules": rules}]}
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10,1000,100000")
    ap.add_argument("--repeat", type=int, default=200_000)
    ap.add_argument("--trials", type=int, default=5)
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]

    kernel.prepare_bcc(Path("/var/cache/sluice"))
    root = Path("/sys/fs/bpf") / f"sluice-bench-{uuid.uuid4().hex[:8]}"
    root.mkdir()
    bpf = None
    try:
        cflags = [f"-DFW_MAX_PREFIXES={max(sizes) + 1024}", "-DFW_MAX_SESSIONS=1024"]
        bpf = loader.compile_program("firewall", Program("firewall", SRC), bpffs=root, cflags=cflags)
        fd = loader.load_tc(bpf, "firewall", "fw_ingress")
        maps = FirewallMaps.from_pins(root / "sluice" / "firewall")
        maps.init_settings({"audit-rate": 0})
        baseline = empty_program_ns(args.repeat, args.trials)
        ref = loader.compile_program("fwbench", Program("parse_only", PARSE_ONLY), bpffs=root)
        parse_fd = loader.load_tc(ref, "fwbench", "parse_only")
        parse_ns = statistics.median(
            ns_per_run(parse_fd, frames.packet(CLIENT, "172.16.0.1"), args.repeat, args.trials)
        )
        rows = [["-", "parse only (reference)", parse_ns, round(parse_ns / baseline, 2), ""]]
        for n in sizes:
            t0 = time.monotonic()
            maps.apply(compile_policy(policy_with(n)), {})
            load_s = time.monotonic() - t0
            hit = str(ipaddress.IPv4Address(int(ipaddress.IPv4Address("172.16.0.0")) + n // 2))
            decision = frames.packet(CLIENT, hit, 6, 40000, 81)  # a rule's address, not its port
            established = frames.packet(CLIENT, hit, 6, 40001, 80)
            ns_per_run(fd, established, 1, 1)  # the SYN creates the session
            for name, frame in (("decision", decision), ("established", established)):
                ns = statistics.median(ns_per_run(fd, frame, args.repeat, args.trials))
                rows.append([n, name, ns, round(ns / baseline, 2), round(load_s, 2)])
            maps.map("fw_sessions").clear()
        print(f"empty TC program baseline: {baseline:.1f} ns/run")
        print(table(["rules", "path", "ns/packet", "x empty", "policy load s"], rows))
        maps.close()
        ref.cleanup()
    finally:
        if bpf is not None:
            bpf.cleanup()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
