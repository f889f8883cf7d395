"""TCP throughput and new-connection rate through the lab gateway with 10K rules, one run each:
no filter (the baseline), nftables with a 10K-element set, nftables with 10K linear rules (what
iptables does; iptables itself is not installed here), and sluice's firewall.

    python benchmarks/firewall/bench_throughput.py [--rules 10000] [--seconds 3]
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.common import table  # noqa: E402
from benchmarks.firewall.labagent import lab_and_agent  # noqa: E402
from tests.lab.test_firewall_lab import SRV  # noqa: E402

IPERF_PORT, CONN_PORT = 5201, 8080


def blocked(n: int) -> list[str]:
    base = int(ipaddress.IPv4Address("172.16.0.0"))
    return [str(ipaddress.IPv4Address(base + i)) for i in range(n)]


def nft(lab_, script: str) -> None:
    subprocess.run(
        ["ip", "netns", "exec", lab_.ns("gw"), "nft", "-f", "-"], input=script, text=True, check=True
    )


def nft_set(lab_, n: int) -> None:
    elements = ", ".join(blocked(n))
    nft(
        lab_,
        f"""table inet bench {{
  set blocked {{ type ipv4_addr; elements = {{ {elements} }} }}
  chain forward {{ type filter hook forward priority 0; policy drop;
    ct state established,related accept
    ip daddr @blocked drop
    ip daddr {SRV[4]} tcp dport {{ {IPERF_PORT}, {CONN_PORT} }} accept
  }}
}}""",
    )


def nft_linear(lab_, n: int) -> None:
    rules = "\n".join(f"    ip daddr {a} drop" for a in blocked(n))
    nft(
        lab_,
        f"""table inet bench {{
  chain forward {{ type filter hook forward priority 0; policy drop;
{rules}
    ip daddr {SRV[4]} tcp dport {{ {IPERF_PORT}, {CONN_PORT} }} accept
    ct state established,related accept
  }}
}}""",
    )


def nft_flush(lab_) -> None:
    subprocess.run(
        ["ip", "netns", "exec", lab_.ns("gw"), "nft", "delete", "table", "inet", "bench"], capture_output=True
    )


def sluice_policy(agent, n: int) -> None:
    rules = [{"action": "deny", "dst": a} for a in blocked(n)]
    rules.append({"action": "allow", "proto": "tcp", "dst": SRV[4], "ports": f"{IPERF_PORT}-{IPERF_PORT}"})
    rules.append({"action": "allow", "proto": "tcp", "dst": SRV[4], "ports": CONN_PORT})
    policy = {
        "networks": [{"name": "clients", "sources": ["10.99.1.0/24"], "default": "deny", "rules": rules}]
    }
    status, body = agent.api("PUT", "/v1/firewall/policy", policy)
    assert status == 200, body


def throughput(lab_, seconds: float) -> float:
    out = lab_.exec(
        "client", ["iperf3", "-c", SRV[4], "-p", str(IPERF_PORT), "-t", str(seconds), "-J"]
    ).stdout
    return json.loads(out)["end"]["sum_received"]["bits_per_second"] / 1e9


def connection_rate(lab_, seconds: float) -> float:
    done, deadline = 0, time.monotonic() + seconds
    start = time.monotonic()
    while time.monotonic() < deadline:
        s = lab_.socket("client", 4, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")  # RST on close: no TIME_WAIT
        s.settimeout(2)
        try:
            s.connect((SRV[4], CONN_PORT))
            done += 1
        except OSError:
            pass
        finally:
            s.close()
    return done / (time.monotonic() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rules", type=int, default=10_000)
    ap.add_argument("--seconds", type=float, default=3)
    args = ap.parse_args()
    rows = []
    with lab_and_agent() as (lab_, agent, _):
        iperf = lab_.popen("server", ["iperf3", "-s", "-p", str(IPERF_PORT)], stdout=subprocess.DEVNULL)
        listener = lab_.socket("server", 4, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((SRV[4], CONN_PORT))
        listener.listen(4096)

        def accept():
            while True:
                try:
                    c, _ = listener.accept()
                    c.close()
                except OSError:
                    return

        threading.Thread(target=accept, daemon=True).start()
        try:
            time.sleep(0.5)
            throughput(lab_, 1)  # warm-up: the first transfer through fresh namespaces is slower
            modes = [
                ("no filter", lambda: None, lambda: None),
                (f"nftables set ({args.rules})", lambda: nft_set(lab_, args.rules), lambda: nft_flush(lab_)),
                (
                    f"nftables linear ({args.rules})",
                    lambda: nft_linear(lab_, args.rules),
                    lambda: nft_flush(lab_),
                ),
                (
                    f"sluice ({args.rules})",
                    lambda: (agent.start(), sluice_policy(agent, args.rules)),
                    agent.stop,
                ),
            ]
            for name, setup, teardown in modes:
                setup()
                try:
                    rows.append(
                        [
                            name,
                            round(throughput(lab_, args.seconds), 2),
                            round(connection_rate(lab_, args.seconds)),
                        ]
                    )
                finally:
                    teardown()
        finally:
            iperf.terminate()
            iperf.wait()
            listener.close()
    base_gbps, base_cps = rows[0][1], rows[0][2]
    print(
        table(
            ["filter", "TCP Gbit/s", "new conn/s", "throughput x none", "conn/s x none"],
            [[*r, round(r[1] / base_gbps, 3), round(r[2] / base_cps, 3)] for r in rows],
        )
    )


if __name__ == "__main__":
    main()
