"""flowmon's loss accounting in the real agent: with a tiny flow map and 2x, 5x and 20x its size
of one-packet flows, every offered flow is either exported or counted lost, exactly once.

The truth is the gateway's nftables counter of the flows it forwarded. The flows cross two
monitored interfaces (in on ingress0, out on egress0) while the agent evicts concurrently: the
accounting must not count a packet at both hooks, nor lose one without counting it."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.lab.test_flowmon_agent import free_port, wait_for
from tests.netlab import lab

pytestmark = [
    pytest.mark.lab,
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: namespaces and BPF"),
]
MAX_FLOWS = 64
SLUICE = [sys.executable, "-m", "sluice"]


@pytest.fixture(scope="module")
def agent(kernel_ready, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("flowmon-loss")
    root = Path("/sys/fs/bpf") / f"sluice-test-{uuid.uuid4().hex[:8]}"
    root.mkdir()
    port, jsonl, cfg = free_port(), tmp / "flows.jsonl", tmp / "sluice.toml"
    try:
        with lab() as lb:
            client, server = lb.addr("client"), lb.addr("server")
            cfg.write_text(
                f"""
[agent]
plugins = ["flowmon"]
bpffs = "{root}"
state_dir = "{tmp / "state"}"
metrics_address = "127.0.0.1:{port}"
detach_on_stop = true

[plugins.flowmon]
interfaces = ["ingress0", "egress0"]
max_flows = {MAX_FLOWS}
active_timeout_s = 0.5
json_path = "{jsonl}"
filters = [{{ cidr = "{client}/32", peer = "{server}/32", protocol = "udp" }}]
"""
            )
            # the server drops the probes silently: no ICMP errors, nothing but the offered flows
            lb.exec(
                "server",
                ["nft", "-f", "-"],
                input="table inet fm_sink {\n chain c {\n type filter hook input priority 0; policy accept;\n"
                " udp dport 20000-29999 drop\n }\n}\n",
            )
            log = open(tmp / "agent.log", "w")  # noqa: SIM115
            proc = subprocess.Popen(
                [*SLUICE, "--netns", lb.ns("gw"), "agent", "run", "-c", str(cfg)], stdout=log, stderr=log
            )
            env = {"lab": lb, "proc": proc, "jsonl": jsonl, "port": port, "log": tmp / "agent.log"}
            try:
                wait_for("the agent's metrics", lambda: lost_flows(env) is not None, timeout=60)
                yield env
            finally:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
                    try:
                        proc.wait(20)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()
                log.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def lost_flows(env) -> int | None:
    if env["proc"].poll() is not None:
        raise AssertionError(f"agent exited: {env['log'].read_text()[-2000:]}")
    code = f"import urllib.request;print(urllib.request.urlopen('http://127.0.0.1:{env['port']}/metrics').read().decode())"
    out = env["lab"].exec("gw", [sys.executable, "-c", code], check=False).stdout
    m = re.search(r"^sluice_flowmon_lost_flows_total ([0-9.e+]+)$", out, re.M)
    return int(float(m.group(1))) if m else None


def exported(env, ports: range) -> int:
    path: Path = env["jsonl"]
    lines = path.read_text().splitlines() if path.exists() else []
    return sum(1 for x in lines if (f := json.loads(x))["proto"] == 17 and f["dport"] in ports)


def forwarded(lb, table: str) -> int:
    out = json.loads(lb.exec("gw", ["nft", "-j", "list", "table", "inet", table]).stdout)
    for item in out["nftables"]:
        for expr in item.get("rule", {}).get("expr", []):
            if "counter" in expr:
                return expr["counter"]["packets"]
    raise AssertionError(f"no counter in {table}")


@pytest.mark.parametrize("times", [2, 5, 20])
def test_exported_plus_lost_equals_offered(agent, times):
    lb = agent["lab"]
    base = 20000 + {2: 0, 5: 1000, 20: 3000}[times]
    ports = range(base, base + times * MAX_FLOWS)
    table = f"fm_offered{times}"
    lb.exec(
        "gw",
        ["nft", "-f", "-"],
        input=f"table inet {table} {{\n chain c {{\n type filter hook forward priority 0; policy accept;\n"
        f" ip saddr {lb.addr('client')} udp dport {base}-{ports[-1]} counter\n }}\n}}\n",
    )
    try:
        lost_before = lost_flows(agent)
        with lb.socket("client", 4, socket.SOCK_DGRAM) as tx:
            for i, port in enumerate(ports):  # one packet per flow, in bursts around evictions
                tx.sendto(b"f", (lb.addr("server"), port))
                if i % 32 == 31:
                    time.sleep(0.005)

        def settled():
            """(offered, exported, lost) once neither moved across two evictions (1 s)."""
            first = (forwarded(lb, table), exported(agent, ports), lost_flows(agent) - lost_before)
            time.sleep(1.2)
            second = (forwarded(lb, table), exported(agent, ports), lost_flows(agent) - lost_before)
            return second if first == second and second[1] else None

        offered, n_exported, n_lost = wait_for("the counts to settle", settled, timeout=60, every=0)
    finally:
        lb.exec("gw", ["nft", "delete", "table", "inet", table], check=False)
    assert offered == len(ports)  # the gateway forwarded every probe
    assert n_lost > 0  # the map overflowed, as intended
    assert n_exported + n_lost == offered, (n_exported, n_lost, offered)
