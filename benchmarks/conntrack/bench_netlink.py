"""Host conntrack events: consumed per second vs generated, below the rate limit (no sampling).

    python benchmarks/conntrack/bench_netlink.py [--flows N] [--rcvbuf BYTES]

Two lab namespaces; b has an nftables ct rule so netfilter tracks what a sends it. a sends N
one-datagram UDP flows (distinct source ports) through a raw socket as fast as Python can; every
one makes a NEW event in b. The plugin's consumer (HostConntrack, rate limit set above the
offered load so nothing is sampled) reads them on a thread. Reported: events generated/s (the
sender's rate), consumed/s (events read over the time from first send to last read), losses
(ENOBUFS overruns). Target (issue 6): at least 20K events/s without loss below the limit.
"""

from __future__ import annotations

import argparse
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.common import table  # noqa: E402
from sluice.lab import netns_socket  # noqa: E402
from sluice.plugins.conntrack import HostConfig  # noqa: E402
from sluice.plugins.conntrack.host import HostConntrack  # noqa: E402
from tests.netlab import netns_pair  # noqa: E402

RULES = (
    "table inet sluicebench {\n chain input { type filter hook input priority 0; ct state new accept; }\n}\n"
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--flows", type=int, default=50_000)
    ap.add_argument("--rcvbuf", type=int, default=8 << 20)
    args = ap.parse_args()
    rows = []
    with netns_pair() as pair:
        subprocess.run(["ip", "netns", "exec", pair.b, "nft", "-f", "-"], input=RULES, text=True, check=True)
        config = HostConfig(event_rate_limit=10_000_000, rcvbuf=args.rcvbuf)
        host = HostConntrack(config, netns=pair.b)
        host.open_events(1.0)
        consumer = threading.Thread(target=host.consume_forever, daemon=True)
        consumer.start()
        raw = netns_socket(pair.a, 4, socket.SOCK_RAW, socket.IPPROTO_UDP)
        dst = (pair.addr("b"), 0)
        headers = [struct.pack("!HHHH", 1024 + i % 64000, 9, 8, 0) for i in range(args.flows)]
        start = time.perf_counter()
        for h in headers:
            raw.sendto(h, dst)
        sent_s = time.perf_counter() - start
        deadline = time.monotonic() + 30
        last, last_t = -1, time.perf_counter()
        while time.monotonic() < deadline:  # until nothing new arrives for half a second
            n = host.stats.new
            if n != last:
                last, last_t = n, time.perf_counter()
            elif time.perf_counter() - last_t > 0.5:
                break
            time.sleep(0.01)
        consumed_s = last_t - start
        host.stop()
        consumer.join(timeout=3)
        raw.close()
        rows.append([args.flows, f"{args.flows / sent_s:,.0f}", host.stats.new, f"{host.stats.new / consumed_s:,.0f}",
                     host.stats.enobufs, f"{args.rcvbuf >> 20} MiB"])  # fmt: skip
    print(f"host conntrack NEW events, {args.flows} UDP flows, no sampling")
    print(table(["flows", "generated/s", "consumed", "consumed/s", "ENOBUFS", "rcvbuf"], rows))


if __name__ == "__main__":
    main()
