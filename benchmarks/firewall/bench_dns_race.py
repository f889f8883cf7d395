"""DNS answer to usable allow: resolve a hostname-ruled name through the firewall's DNS proxy, then
connect at once; a SYN that raced the allow would be dropped and retransmitted (1 s later) or fail.

Each trial first removes the learned allow from the datapath maps, so every connection depends on
the allow written by the answer just received. Baseline in the same run: the same resolve then
connect to a port allowed by a CIDR rule (no dependence on learning).

    python benchmarks/firewall/bench_dns_race.py [--trials 1000]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.common import table  # noqa: E402
from benchmarks.firewall.labagent import lab_and_agent  # noqa: E402
from sluice.plugins.firewall.maps import FirewallMaps  # noqa: E402
from tests.lab.test_firewall_lab import SRV, Servers, tcp_connect  # noqa: E402


def trial(lab_, maps: FirewallMaps | None, port: int) -> tuple[bool, float]:
    """(connected without a retransmitted SYN, seconds from query to established)."""
    if maps is not None:
        for gen in (0, 1):
            maps.gen_map("fw_dns", gen).clear()
    t0 = time.monotonic()
    reply = lab_.dns_query("client", "allowed.test", "A", server="10.99.1.1")
    conn = tcp_connect(lab_, SRV[4], port, timeout=0.9)  # under the 1 s SYN retransmission
    elapsed = time.monotonic() - t0
    if conn is None:
        return False, elapsed
    conn.close()
    return reply.rcode == 0, elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=1000)
    args = ap.parse_args()
    with lab_and_agent() as (lab_, agent, bpffs):
        servers = Servers(lab_)
        try:
            agent.start()
            maps = FirewallMaps.from_pins(bpffs / "sluice" / "firewall")
            rows = []
            for name, m, port in (
                ("CIDR rule (baseline)", None, 8080),
                ("hostname rule, allow cleared", maps, 8081),
            ):
                results = [trial(lab_, m, port) for _ in range(args.trials)]
                ok = [t for good, t in results if good]
                ms = sorted(t * 1000 for t in ok) or [0.0]
                p99 = ms[max(0, int(len(ms) * 0.99) - 1)]
                rows.append(
                    [
                        name,
                        args.trials,
                        len(ok),
                        args.trials - len(ok),
                        round(statistics.median(ms), 2),
                        round(p99, 2),
                    ]
                )
            # control: with the allow cleared and no query, the same connect must fail
            for gen in (0, 1):
                maps.gen_map("fw_dns", gen).clear()
            blocked = sum(tcp_connect(lab_, SRV[4], 8081, timeout=0.5) is None for _ in range(3))
            maps.close()
        finally:
            servers.close()
    print(table(["path", "trials", "connected", "SYN lost/failed", "p50 ms", "p99 ms"], rows))
    print(f"p50 ratio hostname/baseline: {rows[1][4] / rows[0][4]:.2f}")
    print(f"control: {blocked}/3 connects blocked with the allow cleared and no query (expected 3/3)")


if __name__ == "__main__":
    main()
