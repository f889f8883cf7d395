"""Per-packet cost of the conntrack program, as a ratio to the empty TC program (same run).

    python benchmarks/conntrack/bench_packet.py [--repeat N] [--trials T]

BPF_PROG_TEST_RUN runs the real program (pinned tables in a private bpffs root, removed after)
on crafted frames. Cases: a packet of a known flow in its original direction (one lookup), in
the reply direction (a miss, then the reversed lookup), and a TCP packet of an unknown flow (two
misses, no entry: "midstream"). Target (issue 6): under 2x the empty program.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import statistics
import struct
import sys
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.common import empty_program_ns, ns_per_run, prepare_headers, table  # noqa: E402
from sluice.bpf.loader import compile_program, load_tc  # noqa: E402
from sluice.bpf.testrun import test_run  # noqa: E402
from sluice.plugins.conntrack import Config, configure_datapath, program  # noqa: E402

SYN, ACK = 0x02, 0x10


def frame(proto: int, src: str, dst: str, sport: int, dport: int, flags: int = 0) -> bytes:
    if proto == 6:
        l4 = struct.pack("!HHIIBBHHH", sport, dport, 1, 1, 5 << 4, flags, 1024, 0, 0) + bytes(6)
    else:
        l4 = struct.pack("!HHHH", sport, dport, 8 + 18, 0) + bytes(18)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 1, 0, 64, proto, 0,
                     socket.inet_aton(src), socket.inet_aton(dst))  # fmt: skip
    return bytes.fromhex("0200000000020200000000010800") + ip + l4


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=1_000_000)
    ap.add_argument("--trials", type=int, default=5)
    args = ap.parse_args()
    prepare_headers()
    root = Path("/sys/fs/bpf") / f"sluice-bench-{uuid.uuid4().hex[:8]}"
    root.mkdir()
    try:
        config = Config(interfaces=[], tcp_table_size=65536, any_table_size=65536, host={"enabled": False})
        bpf = compile_program("conntrack", program(config), bpffs=root)
        fd = load_tc(bpf, "conntrack", "ct_tc")
        configure_datapath(root / "sluice" / "conntrack", config)
        a, b = "10.0.0.1", "10.0.0.2"
        test_run(fd, frame(6, a, b, 40000, 80, SYN))  # handshake: the flow is established
        test_run(fd, frame(6, b, a, 80, 40000, SYN | ACK))
        test_run(fd, frame(17, a, b, 40001, 53))
        cases = {
            "tcp established, original": frame(6, a, b, 40000, 80, ACK),
            "tcp established, reply": frame(6, b, a, 80, 40000, ACK),
            "udp known flow, original": frame(17, a, b, 40001, 53),
            "tcp unknown flow (midstream)": frame(6, a, b, 40002, 80, ACK),
        }
        base = empty_program_ns(args.repeat, args.trials)
        rows = [["empty program (baseline)", f"{base:.1f}", "1.00x"]]
        for name, data in cases.items():
            ns = statistics.median(ns_per_run(fd, data, args.repeat, args.trials))
            rows.append([name, f"{ns:.1f}", f"{ns / base:.2f}x"])
        print(f"conntrack per packet, BPF_PROG_TEST_RUN, median of {args.trials} x {args.repeat} runs")
        print(table(["case", "ns/packet", "vs empty"], rows))
        bpf.cleanup()
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
