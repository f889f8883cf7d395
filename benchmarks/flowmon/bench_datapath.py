"""Per-packet cost of flowmon's TC program, as a ratio to the empty-program baseline.

    python benchmarks/flowmon/bench_datapath.py [--repeat N] [--trials T]

BPF_PROG_TEST_RUN runs flowmon_ingress ``repeat`` times on one frame: after the first run the
flow exists, so this is the steady-state cost of a packet of a known flow (the common case).
The shared parser's own cost is shown as a floor. Cases: UDP 64 and 1500 bytes, a TCP ACK, a DNS query (DNS tracking path), and with 1/4 sampling.
"""

from __future__ import annotations

import argparse
import statistics
import struct
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.common import empty_program_ns, ns_per_run, table, udp_frame  # noqa: E402
from benchmarks.flowmon.common import flowmon_datapath  # noqa: E402
from sluice.bpf import loader  # noqa: E402
from sluice.plugins.flowmon.config import Config  # noqa: E402
from sluice.programs import Program  # noqa: E402

FLOOR_SRC = Path(__file__).with_name("parse_floor.bpf.c")


def tcp_frame() -> bytes:
    eth = bytes.fromhex("0200000000020200000000010800")
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40, 1, 0, 64, 6, 0, b"\n\0\0\1", b"\n\0\0\2")
    return eth + ip + struct.pack("!HHIIBBHHH", 40000, 80, 1, 1, 5 << 4, 0x10, 65535, 0, 0)


def dns_frame() -> bytes:
    q = struct.pack("!HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0) + b"\x07allowed\x04test\x00\x00\x01\x00\x01"
    f = bytearray(udp_frame(14 + 20 + 8 + len(q), dport=53))
    f[42:] = q
    return bytes(f)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=1_000_000)
    ap.add_argument("--trials", type=int, default=5)
    args = ap.parse_args(argv)
    with flowmon_datapath(Config()) as (bpf, mon, root):
        fd = bpf.load_func(b"flowmon_ingress", bpf.SCHED_CLS).fd
        base = empty_program_ns(args.repeat, args.trials)
        floor_bpf = loader.compile_program("flowmon-floor", Program("floor", FLOOR_SRC), bpffs=root)
        floor_fd = loader.load_tc(floor_bpf, "flowmon-floor", "parse_floor")
        floor = statistics.median(ns_per_run(floor_fd, udp_frame(64), args.repeat, args.trials))
        cases = [
            ("UDP 64 B", udp_frame(64), Config()),
            ("UDP 1500 B", udp_frame(1500), Config()),
            ("TCP ACK", tcp_frame(), Config()),
            ("DNS query (dns on)", dns_frame(), Config()),
            ("UDP 64 B, rtt+dns off", udp_frame(64), Config(rtt=False, dns=False)),
            ("UDP 64 B, sampling 1/4", udp_frame(64), Config(sampling=4)),
        ]
        rows = [
            ("empty program (baseline)", base, 1.0),
            ("sluice_parse + verdict only (floor)", float(floor), floor / base),
        ]
        for name, frame, cfg in cases:
            mon.configure(cfg)
            ns = statistics.median(ns_per_run(fd, frame, args.repeat, args.trials))
            rows.append((name, float(ns), ns / base))
            mon.evict()
        floor_bpf.cleanup()
    print(table(["case", "median ns/packet", "ratio to empty"], rows))


if __name__ == "__main__":
    main()
