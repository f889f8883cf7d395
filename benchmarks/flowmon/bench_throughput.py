"""TCP throughput with flowmon capturing vs without: iperf3 across a veth pair, one run each.

    python benchmarks/flowmon/bench_throughput.py [--seconds 5]

Both runs use the same namespace pair; the second has flowmon on TC ingress and egress of the
sender's veth (every data segment and every ACK goes through it). Baseline: the run without.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.common import table  # noqa: E402
from benchmarks.flowmon.common import flowmon_datapath  # noqa: E402
from sluice.lab import in_netns  # noqa: E402
from sluice.plugins.flowmon.config import Config  # noqa: E402
from sluice.plugins.flowmon.monitor import Attacher  # noqa: E402
from tests.netlab import netns_pair  # noqa: E402


def iperf(pair, seconds: int) -> float:
    """Gbit/s received by the server for one iperf3 run from a to b."""
    out = subprocess.run(
        ["ip", "netns", "exec", pair.a, "iperf3", "-J", "-c", pair.addr("b"), "-t", str(seconds)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return json.loads(out)["end"]["sum_received"]["bits_per_second"] / 1e9


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=int, default=5)
    args = ap.parse_args(argv)
    if not shutil.which("iperf3"):
        sys.exit("iperf3 is not installed")
    with flowmon_datapath(Config()) as (bpf, mon, _root), netns_pair() as pair:
        server = subprocess.Popen(
            ["ip", "netns", "exec", pair.b, "iperf3", "-s"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            time.sleep(0.5)  # iperf3 -s has no readiness signal
            without = iperf(pair, args.seconds)
            with in_netns(pair.a):
                Attacher(bpf).sync([pair.ifname], [])
            with_capture = iperf(pair, args.seconds)
            flows = mon.evict()
            packets = sum(f.packets for f in flows if f.proto == 6)
        finally:
            server.terminate()
            server.wait()
    rows = [
        ("without capture (baseline)", round(without, 2), 1.0),
        ("flowmon on ingress+egress", round(with_capture, 2), round(with_capture / without, 3)),
    ]
    print(table(["run", "Gbit/s", "ratio"], rows))
    print(f"{args.seconds} s per run; flowmon counted {packets:,} TCP packets in {len(flows)} flow records; "
          f"throughput change {100 * (with_capture / without - 1):+.1f}%")  # fmt: skip


if __name__ == "__main__":
    main()
