"""Overlay TCP throughput through the tunnel program vs a plain kernel vxlan route, same lab.

    python benchmarks/tunnel/bench_throughput.py [--seconds S] [--runs N]

Host A sends with iperf3 to peer B over VXLAN (VNI 100, IPv4 underlay, veth). ``sluice tunnel``:
A's kernel route sends the overlay prefix out of the underlay interface, where the program sets
the tunnel key and redirects to the shared external-mode device. ``kernel vxlan``: the same
encapsulation done by a classic vxlan device with a static remote (the baseline). Both paths end
in the same peer; replies take the same way back. Runs alternate; the median is reported.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.common import table  # noqa: E402
from sluice import kernel  # noqa: E402
from sluice import lab as sl  # noqa: E402
from sluice.plugins.tunnel.model import tunnel_mac  # noqa: E402
from sluice.plugins.tunnel.testing import (  # noqa: E402
    A_OVERLAY,
    UNDERLAY,
    overlay_addr,
    overlay_lab,
    plugin_in_netns,
    tunnel_config,
)

PLAIN = "10.205.0.1"  # B's address behind the plain kernel vxlan pair (dstport 4790)


def plain_vxlan(a: str, b: str) -> None:
    b_mac = tunnel_mac(ipaddress.ip_address(UNDERLAY[("b", 4)]))
    for ns, dev, local, remote in ((a, "vxk", "a-b", "b"), (b, "vxp", "b", "a-b")):
        sl.run_ip("-n", ns, "link", "add", dev, "type", "vxlan", "id", "100", "local", UNDERLAY[(local, 4)],
                  "remote", UNDERLAY[(remote, 4)], "dstport", "4790", "nolearning")  # fmt: skip
    sl.run_ip("-n", b, "link", "set", "vxp", "address", b_mac, "up")
    sl.run_ip("-n", b, "addr", "add", f"{PLAIN}/24", "dev", "vxp")
    sl.run_ip("-n", a, "link", "set", "vxk", "mtu", "1450", "up")
    sl.run_ip("-n", a, "route", "add", "10.205.0.0/24", "dev", "vxk", "src", A_OVERLAY[4])
    sl.run_ip("-n", a, "neigh", "replace", PLAIN, "lladdr", b_mac, "dev", "vxk", "nud", "permanent")


def iperf(a: str, b: str, dst: str, seconds: float) -> float:
    """Gbit/s received by B from one iperf3 TCP stream A → ``dst``."""
    server = subprocess.Popen(["ip", "netns", "exec", b, "iperf3", "-s", "-1", "-B", dst],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        for _ in range(50):  # until the server listens (its output is buffered: poll instead)
            client = subprocess.run(["ip", "netns", "exec", a, "iperf3", "-c", dst, "-t", str(seconds), "-J"],
                                    capture_output=True, text=True, timeout=seconds + 30)  # fmt: skip
            with contextlib.suppress(ValueError):
                received = json.loads(client.stdout).get("end", {}).get("sum_received")
                if client.returncode == 0 and received:
                    return received["bits_per_second"] / 1e9
            time.sleep(0.1)
        raise RuntimeError(f"iperf3 to {dst} failed: {client.stdout[-300:]}")
    finally:
        server.kill()
        server.wait(timeout=10)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=4)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args(argv)
    kernel.mount_filesystems()
    kernel.prepare_bcc(Path("/var/cache/sluice"))
    prefix = f"slbt{int(time.time()) % 1000}-"
    with overlay_lab(prefix) as names, plugin_in_netns(names["a"], tunnel_config(), Path(tempfile.mkdtemp())):
        a, b = names["a"], names["b"]
        plain_vxlan(a, b)
        results = {"sluice tunnel (BPF set-key + redirect)": [], "kernel vxlan route (baseline)": []}
        for _ in range(args.runs):
            results["sluice tunnel (BPF set-key + redirect)"].append(
                iperf(a, b, overlay_addr("b"), args.seconds)
            )
            results["kernel vxlan route (baseline)"].append(iperf(a, b, PLAIN, args.seconds))
    base = statistics.median(results["kernel vxlan route (baseline)"])
    rows = [
        (name, statistics.median(v), min(v), max(v), statistics.median(v) / base)
        for name, v in results.items()
    ]
    print(f"one TCP stream, {args.seconds:g} s x {args.runs} runs, IPv4 underlay, VXLAN VNI 100, MTU 1450")
    print(table(["path", "Gbit/s median", "min", "max", "x baseline"], rows))


if __name__ == "__main__":
    main()
