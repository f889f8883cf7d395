"""The conntrack plugin inside the real agent on the lab's gateway: start, metrics, CLI, NAT hook."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.parse

import pytest

from sluice.testing import AgentProcess
from tests.netlab import lab as make_lab
from tests.netlab import ping

pytestmark = [pytest.mark.lab, pytest.mark.slow]

SECTION = """
[plugins.conntrack]
interfaces = ["ingress0"]
tcp_table_size = 4096
any_table_size = 4096
tenants = [{ interface = "egress0", tenant = 5 }]
gc = { initial_interval = 30, min_interval = 1 }
"""


@pytest.fixture(scope="module")
def lab():
    with make_lab() as lb:
        yield lb


def test_agent_runs_conntrack_on_the_gateway(lab, bpffs, tmp_path):
    state = tmp_path / "state"
    cfg = tmp_path / "agent.toml"
    cfg.write_text(
        f'[agent]\nplugins = ["conntrack"]\nbpffs = "{bpffs}"\nstate_dir = "{state}"\n'
        f'cache_dir = "/var/cache/sluice"\nmetrics_address = ""\nstop_timeout = 10\n{SECTION}'
    )
    # A DNAT on the gateway, so the host part has a translation to learn from netfilter's events.
    dnat = f"table ip sluicectdemo {{\n chain pre {{ type nat hook prerouting priority -100; udp dport 5353 dnat to {lab.addr('dns')}:53; }}\n}}\n"
    subprocess.run(["ip", "netns", "exec", lab.ns("gw"), "nft", "-f", "-"], input=dnat, text=True, check=True)
    agent = AgentProcess(cfg, lab.ns("gw"), None, tmp_path / "agent.log", state / "sluice.sock")
    try:
        ready = agent.start()
        assert ready["plugins"]["conntrack"] == {"state": "running", "ready": True}, ready
        ping(lab.ns("client"), lab.addr("server"))
        reply = lab.dns_query("client", "allowed.test")
        assert reply.values("A") == [lab.addr("server")]

        def cli(*argv):
            out = subprocess.run(
                [sys.executable, "-m", "sluice", "--netns", lab.ns("gw"), "-c", str(cfg), "ct", *argv],
                capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert out.returncode == 0, out.stderr
            return out.stdout

        rows = json.loads(cli("list", "--json"))
        icmp = [r for r in rows if r["proto"] == "icmp"]
        dns = [r for r in rows if r["proto"] == "udp" and r["dport"] == 53]
        assert (
            icmp
            and icmp[0]["src"] == lab.addr("client")
            and icmp[0]["packets"] == {"original": 1, "reply": 1}
        )
        assert dns and dns[0]["dst"] == lab.addr("dns") and dns[0]["packets"]["reply"] == 1
        assert "tenant=5" in cli("count")  # the configured tenant's tables exist

        code, rows = agent.get("/v1/conntrack/entries?proto=icmp")
        assert code == 200 and rows[0]["src"] == lab.addr("client")
        assert agent.get("/v1/conntrack/entries?proto=nope")[0] == 400
        code, stats = agent.get("/v1/conntrack/stats")
        assert code == 200 and stats["datapath"]["created_any"] >= 2 and stats["gc"]["runs"] >= 1
        assert agent.get("/v1/conntrack/nat?flow=garbage")[0] == 400

        # The host consumer runs inside the agent: a DNATed flow is answered by the NAT cache.
        with lab.socket("client", 4, socket.SOCK_DGRAM) as s:
            s.bind((lab.addr("client"), 40053))
            s.sendto(b"\0" * 12, (lab.addr("gw-ingress"), 5353))
        flow = urllib.parse.quote(f"udp {lab.addr('client')}:40053 {lab.addr('gw-ingress')}:5353")
        deadline = time.monotonic() + 15
        while (answer := agent.get(f"/v1/conntrack/nat?flow={flow}"))[
            0
        ] != 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert answer[0] == 200, answer
        assert answer[1]["reply"] == {"src": lab.addr("dns"), "dst": lab.addr("client"), "sport": 53,
                                      "dport": 40053, "proto": 17}  # fmt: skip

        code, body = agent.get("/metrics")
        text = body if isinstance(body, str) else json.dumps(body)
        assert code == 200 and "sluice_conntrack_entries" in text and "sluice_conntrack_gc_runs" in text
    finally:
        agent.stop()
        subprocess.run([sys.executable, "-m", "sluice", "--netns", lab.ns("gw"), "-c", str(cfg), "cleanup"],
                       capture_output=True)  # fmt: skip
