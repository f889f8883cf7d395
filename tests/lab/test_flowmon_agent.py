"""flowmon inside the real agent on the lab gateway: hooks, an interface that appears later,
JSON lines, metrics, `sluice flows` commands, a clean stop; and bad config refused in one line."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from sluice.lab import run_ip
from tests.netlab import lab, ping

pytestmark = [
    pytest.mark.lab,
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: namespaces and BPF"),
]
SLUICE = [sys.executable, "-m", "sluice"]
NATS_ADDR = "10.99.9.2"  # the lab's nats-server, behind the gateway's mgmt0
SUBSCRIBER = """
import asyncio, sys, nats
async def main():
    nc = await nats.connect(sys.argv[2])
    out = open(sys.argv[1], "a", buffering=1)
    async def got(msg):
        out.write(msg.data.decode() + "\\n")
    await nc.subscribe("fmtest.flows", cb=got)
    await nc.flush()
    print("ready", flush=True)
    await asyncio.sleep(3600)
asyncio.run(main())
"""


def wait_for(what: str, check, timeout: float = 20.0, every: float = 0.2):
    """Poll ``check`` until it returns something truthy; fail naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def agent(kernel_ready, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("flowmon-agent")
    root = Path("/sys/fs/bpf") / f"sluice-test-{uuid.uuid4().hex[:8]}"
    root.mkdir()
    port = free_port()
    jsonl = tmp / "flows.jsonl"
    cfg = tmp / "sluice.toml"
    cfg.write_text(
        f"""
[agent]
plugins = ["flowmon"]
bpffs = "{root}"
state_dir = "{tmp / "state"}"
metrics_address = "127.0.0.1:{port}"
detach_on_stop = true

[plugins.flowmon]
interfaces = ["ingress0", "egress0", "late*"]
active_timeout_s = 0.5
interface_poll_s = 0.3
json_path = "{jsonl}"
nats = {{ url = "nats://{NATS_ADDR}:4222", subject = "fmtest.flows", batch = 50 }}
"""
    )
    try:
        with lab() as lb:
            sub = lb.popen(
                "nats",
                [sys.executable, "-c", SUBSCRIBER, str(tmp / "nats.jsonl"), f"nats://{NATS_ADDR}:4222"],
                stdout=subprocess.PIPE,
                text=True,
            )
            assert sub.stdout.readline().strip() == "ready"
            log = open(tmp / "agent.log", "w")  # noqa: SIM115
            proc = subprocess.Popen(
                [*SLUICE, "--netns", lb.ns("gw"), "agent", "run", "-c", str(cfg)], stdout=log, stderr=log
            )
            try:
                yield {
                    "lab": lb,
                    "proc": proc,
                    "cfg": cfg,
                    "jsonl": jsonl,
                    "nats": tmp / "nats.jsonl",
                    "port": port,
                    "log": tmp / "agent.log",
                }
            finally:
                sub.kill()
                sub.wait()
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


def metrics(env) -> str:
    lb = env["lab"]
    # The metrics listener lives in the gw namespace: fetch from inside it.
    code = f"import urllib.request;print(urllib.request.urlopen('http://127.0.0.1:{env['port']}/metrics').read().decode())"
    return lb.exec("gw", [sys.executable, "-c", code]).stdout


def json_flows(env) -> list[dict]:
    path: Path = env["jsonl"]
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def sluice(env, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*SLUICE, "--netns", env["lab"].ns("gw"), "-c", str(env["cfg"]), *args],
        capture_output=True,
        text=True,
    )


def test_agent_exports_json_and_serves_metrics(agent):
    lb = agent["lab"]

    def up():
        if agent["proc"].poll() is not None:
            raise AssertionError(f"agent exited: {agent['log'].read_text()[-2000:]}")
        try:
            return "sluice_flowmon_map_fill_ratio" in metrics(agent)
        except subprocess.CalledProcessError:
            return False

    wait_for("the agent's metrics", up, timeout=60)
    for _ in range(4):
        ping(lb.ns("client"), lb.addr("server"), timeout=5)
    src, dst = lb.addr("client"), lb.addr("server")

    def echo_flows():
        return [f for f in json_flows(agent) if (f["src"], f["dst"], f["proto"]) == (src, dst, 1)]

    flows = wait_for("the ping flow in the JSON lines", lambda: sum(f["packets"] for f in echo_flows()) >= 4)
    assert flows
    got = echo_flows()
    assert sum(f["packets"] for f in got) == 4
    assert {f["interface"] for f in got} == {"ingress0"} and all(f["icmp_type"] == 8 for f in got)

    def on_nats():
        path = agent["nats"]
        lines = path.read_text().splitlines() if path.exists() else []
        return [json.loads(x) for x in lines if x]

    def published():
        return [f for f in on_nats() if (f["src"], f["proto"]) == (src, 1)]

    # the pings may be split over two evictions (every 0.5 s): wait for all of them
    wait_for("the ping flow on NATS", lambda: sum(f["packets"] for f in published()) >= 4)
    assert sum(f["packets"] for f in published()) == 4
    # Aggregates are updated after the sinks took the batch: wait for them too.
    series = 'sluice_flowmon_packets_total{interface="ingress0",proto="icmp"}'

    def scraped():
        text = metrics(agent)
        return text if series in text else ""

    text = wait_for("the icmp series in /metrics", scraped)
    assert "sluice_flowmon_flows_evicted_total" in text
    assert 'sluice_flowmon_export_errors_total{sink="nats:fmtest.flows"} 0.0' in text


def test_interface_that_appears_later_is_captured(agent):
    lb = agent["lab"]
    gw = lb.ns("gw")
    run_ip("-n", gw, "link", "add", "late0", "type", "veth", "peer", "name", "late1")
    try:
        run_ip("-n", gw, "link", "set", "late0", "up")
        run_ip("-n", gw, "link", "set", "late1", "up")

        def attached():
            out = subprocess.run(
                ["ip", "netns", "exec", gw, "tc", "filter", "show", "dev", "late0", "ingress"],
                capture_output=True,
                text=True,
            ).stdout
            return "sluice:flowmon:flowmon_ingress" in out

        wait_for("flowmon on late0", attached)
        mgmt = subprocess.run(
            ["ip", "netns", "exec", gw, "tc", "filter", "show", "dev", "mgmt0", "ingress"],
            capture_output=True,
            text=True,
        ).stdout
        assert "flowmon" not in mgmt  # not selected by interfaces = [...]
    finally:
        run_ip("-n", gw, "link", "del", "late0", check=False)


def test_cli_lists_flows_dns_and_drops(agent):
    lb = agent["lab"]
    lb.dns_query("client", "allowed.test", timeout=5)
    src = lb.addr("client")

    def dns_listed():
        out = sluice(agent, "flows", "dns", "--json")
        assert out.returncode == 0, out.stderr
        return any(d["qname"] == "allowed.test" and d["rcode"] == "NOERROR" for d in json.loads(out.stdout))

    wait_for("allowed.test in `sluice flows dns`", dns_listed)
    out = sluice(agent, "flows", "list", "--host", src, "--json")
    assert out.returncode == 0, out.stderr
    listed = json.loads(out.stdout)
    assert listed and all(src in (f["src"], f["dst"]) for f in listed)
    out = sluice(agent, "flows", "list", "--proto", "udp")
    assert out.returncode == 0 and out.stdout.startswith("PROTO"), out.stderr
    out = sluice(agent, "flows", "drops", "--json")
    assert out.returncode == 0 and "reasons" in json.loads(out.stdout)
    out = sluice(agent, "flows", "top", "--count", "1", "--interval", "0.2")
    assert out.returncode == 0 and "flowmon top" in out.stdout
    out = sluice(agent, "flows", "list", "--src", "not-an-address")
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_api_serves_recent_flows(agent):
    sock = agent["cfg"].parent / "state" / "sluice.sock"

    class Conn(http.client.HTTPConnection):
        def connect(self):
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(5)
            self.sock.connect(str(sock))

    conn = Conn("localhost")
    conn.request("GET", "/v1/flowmon/flows")
    resp = conn.getresponse()
    assert resp.status == 200
    flows = json.loads(resp.read())
    assert any(f["proto"] == 1 and f["icmp_type"] == 8 for f in flows)


def test_agent_stops_cleanly_and_detaches(agent):
    proc = agent["proc"]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    out = subprocess.run(
        ["ip", "netns", "exec", agent["lab"].ns("gw"), "tc", "filter", "show", "dev", "ingress0", "ingress"],
        capture_output=True,
        text=True,
    ).stdout
    assert "flowmon" not in out
