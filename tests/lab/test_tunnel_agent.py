"""tunnel through the real agent and CLI: config routes, unusable kinds reported, API/CLI edits,
`health set`, trace, metrics, restart without rewriting, devices outliving the agent."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from sluice import lab as sl
from sluice.client import AgentClient
from sluice.plugins.tunnel.testing import UNDERLAY, VNI_V4, overlay_addr, overlay_lab, tunnel_config
from tests.netlab import ping, unique_prefix

pytestmark = [
    pytest.mark.lab,
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="namespaces and BPF need root"),
]

SLUICE = [sys.executable, "-m", "sluice"]
GENEVE_ROUTE = {
    "dst": "10.77.0.0/16",
    "nexthops": [{"peer": "g", "underlay": "10.98.1.7", "vni": 7, "protocol": "geneve"}],
}


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return str(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return "{" + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + "}"


def error_of(r: subprocess.CompletedProcess) -> str:
    """The one error line of a failed command (other plugins' start-up warnings may precede it)."""
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.returncode == 1 and len(errors) == 1, r.stderr
    assert "Traceback" not in r.stderr
    return errors[0]


class Agent:
    def __init__(self, ns: str, tmp: Path):
        self.ns = ns
        self.bpffs = Path("/sys/fs/bpf") / f"sluice-test-{uuid.uuid4().hex[:8]}"
        self.bpffs.mkdir()
        self.state = tmp / "state"
        self.log = tmp / "agent.log"
        with socket.socket() as s:  # a free port for /metrics on the namespace's loopback
            s.bind(("127.0.0.1", 0))
            self.metrics_port = s.getsockname()[1]
        section = tunnel_config({"routes": [*tunnel_config()["routes"], GENEVE_ROUTE]})
        self.config = tmp / "sluice.toml"
        self.config.write_text(
            '[agent]\nplugins = ["tunnel"]\n'
            f"bpffs = {toml_value(str(self.bpffs))}\nstate_dir = {toml_value(str(self.state))}\n"
            f'metrics_address = "127.0.0.1:{self.metrics_port}"\n\n[plugins.tunnel]\n'
            + "".join(f"{k} = {toml_value(v)}\n" for k, v in section.items())
        )
        self.proc = None

    def start(self) -> None:
        sock = self.state / "sluice.sock"
        sock.unlink(missing_ok=True)  # a stopped agent's socket must not pass for a live one
        starts = self.reconciles()
        self.proc = subprocess.Popen(
            [*SLUICE, "--netns", self.ns, "-c", str(self.config), "agent", "run"],
            stdout=self.log.open("a"),
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while self.reconciles() == starts or not self.answers(sock):
            assert self.proc.poll() is None, f"agent exited: {self.log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, "agent did not come up"
            time.sleep(0.1)

    @staticmethod
    def answers(sock: Path) -> bool:
        """The API serves (the routes are reconciled before it starts listening)."""
        try:
            return AgentClient(sock).request("GET", "/healthz")[0] == 200
        except OSError:
            return False

    def reconciles(self) -> int:
        return self.log.read_text().count("routes reconciled") if self.log.exists() else 0

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=30)

    def cli(self, *args: str, ok: bool = True) -> subprocess.CompletedProcess:
        r = subprocess.run(
            [*SLUICE, "--netns", self.ns, "-c", str(self.config), "tunnel", *args],
            capture_output=True,
            text=True,
        )
        if ok:
            assert r.returncode == 0, r.stderr
        return r

    def metrics(self) -> str:
        out = {}

        def fetch():
            with sl.in_netns(self.ns):
                out["text"] = urllib.request.urlopen(
                    f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5
                ).read()

        t = threading.Thread(target=fetch)
        t.start()
        t.join()
        return out["text"].decode()


@pytest.fixture(scope="module")
def agent(kernel_ready, tmp_path_factory):
    with overlay_lab(unique_prefix()) as names:
        a = Agent(names["a"], tmp_path_factory.mktemp("tunnel-agent"))
        try:
            a.start()
            yield a, names
        finally:
            a.stop()
            subprocess.run(
                [*SLUICE, "--netns", names["a"], "-c", str(a.config), "tunnel", "cleanup"],
                capture_output=True,
            )
            shutil.rmtree(a.bpffs, ignore_errors=True)


def test_routes_listing_shows_ecmp_and_unusable(agent):
    a, _ = agent
    out = a.cli("routes").stdout
    assert (
        f"{overlay_addr('b').rsplit('.', 1)[0]}.0/24 via {UNDERLAY[('b', 4)]} peer b vxlan vni {VNI_V4} dev sluice-vxlan"
        in out
    )
    assert f"10.204.0.0/24\n\tnexthop via {UNDERLAY[('b', 4)]} peer b vxlan vni 100 dev sluice-vxlan\n" in out
    assert (
        "10.77.0.0/16 unusable\n\tnexthop via 10.98.1.7 peer g geneve vni 7 dev sluice-geneve unusable: tunnel:geneve"
        in out
    )
    assert "fd00:202::/64" not in a.cli("routes", "-4").stdout
    assert all(":" in r["dst"] for r in json.loads(a.cli("routes", "-6", "--json").stdout))
    assert "nexthop unusable" in a.log.read_text() and "tunnel:geneve" in a.log.read_text()


def test_lookup(agent):
    a, _ = agent
    assert a.cli("lookup", "10.204.0.77").stdout.startswith("10.204.0.0/24\n")
    r = a.cli("lookup", "192.0.2.1", ok=False)
    assert error_of(r) == "error: no route for 192.0.2.1: the kernel routes it"


def test_health_set_through_the_cli_and_metrics(agent):
    a, names = agent
    assert "c down: 1 routes changed" in a.cli("health", "set", "c", "down").stdout
    assert "c                    down" in a.cli("health").stdout
    assert "withdrawn" in a.cli("lookup", overlay_addr("ecmp")).stdout
    a.cli("health", "set", "c", "up")
    r = a.cli("health", "set", "nobody", "down", ok=False)
    assert error_of(r) == "error: no nexthop uses peer 'nobody'"
    ping(names["a"], overlay_addr("b"), timeout=5)
    text = a.metrics()
    assert (
        f'sluice_tunnel_nexthop_packets_total{{protocol="vxlan",underlay="{UNDERLAY[("b", 4)]}",vni="100"}}'
        in text
    )
    assert 'sluice_tunnel_health_transitions_total{peer="c",source="manual",state="down"} 1.0' in text
    assert 'sluice_tunnel_packets_total{outcome="miss"}' in text


def test_routes_add_and_del_through_the_api(agent):
    a, _ = agent
    out = a.cli("routes", "add", "10.88.0.0/16", f"peer=b,underlay={UNDERLAY[('b', 4)]},vni=88").stdout
    assert out.startswith("added 1 changed 0 removed 0")
    assert "10.88.0.0/16 via 10.98.1.2 peer b vxlan vni 88" in a.cli("routes").stdout
    bad = a.cli("routes", "add", "10.88.0.1/16", "peer=b,underlay=10.98.1.2", ok=False)
    assert "host bits" in error_of(bad)
    bad = a.cli("routes", "add", "10.89.0.0/16", "peer=b,underlay=nope", ok=False)
    assert "not an IP address" in error_of(bad)
    cfg = a.cli("routes", "del", "10.204.0.0/24", ok=False)
    assert "the config" in error_of(cfg)
    assert "removed 1" in a.cli("routes", "del", "10.88.0.0/16").stdout
    assert "10.88.0.0/16" not in a.cli("routes").stdout


def test_trace_shows_the_matched_route_and_choice(agent):
    a, names = agent
    tracer = subprocess.Popen(
        [*SLUICE, "--netns", a.ns, "-c", str(a.config), "tunnel", "trace", "--filter", f"host {overlay_addr('b')}",
         "--count", "1", "--timeout", "60", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60  # the tracer starts slowly on a loaded host
        while time.monotonic() < deadline:  # until it has switched tracing on and sees our ping
            if tracer.poll() is not None:
                break
            ping(names["a"], overlay_addr("b"), timeout=5)
            time.sleep(0.1)
        out, err = tracer.communicate(timeout=30)
    finally:
        if tracer.poll() is None:
            tracer.kill()
    ev = json.loads(out.splitlines()[0])
    assert ev["reason"] == "encap" and ev["verdict"] == "redirect"
    assert ev["tunnel"]["route"] == "10.202.0.0/24" and ev["tunnel"]["vni"] == VNI_V4
    assert ev["tunnel"]["set_key"] == 0 and ev["tunnel"]["chosen"] == 0


def test_restart_rewrites_nothing_and_the_datapath_outlives_the_agent(agent):
    a, names = agent
    a.stop()
    ping(names["a"], overlay_addr("b"), timeout=5)  # no agent: the pinned program and device still tunnel
    assert "sluice-vxlan" in a.cli("devices").stdout
    a.start()
    last = json.loads([ln for ln in a.log.read_text().splitlines() if "routes reconciled" in ln][-1])
    assert (last["added"], last["changed"], last["removed"], last["unchanged"]) == (0, 0, 0, 5)
    ping(names["a"], overlay_addr("b"), timeout=5)


def api(a: Agent, method: str, path: str, body: bytes | None = None) -> tuple[int, dict]:
    return AgentClient(a.state / "sluice.sock").request(method, f"/v1/tunnel{path}", body)


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("PUT", "/routes", b"{not json"),
        ("PUT", "/routes", b'{"dst": 5, "nexthops": []}'),
        (
            "PUT",
            "/routes",
            b'{"dst": "10.9.0.0/16", "nexthops": [{"peer": "x", "underlay": "1.2.3.4", "vni": -1}]}',
        ),
        ("DELETE", "/routes?dst=nonsense", None),
        ("POST", "/health", b'{"peer": "b", "state": "sideways"}'),
        ("POST", "/health", b'["b", "down"]'),
        ("GET", "/lookup?addr=10.1", None),
    ],
)
def test_bad_api_calls_answer_400_and_change_nothing(agent, method, path, body):
    a, _ = agent
    before = api(a, "GET", "/routes")[1]
    status, answer = api(a, method, path, body)
    assert status == 400 and "\n" not in answer["error"] and answer["error"]
    assert api(a, "GET", "/routes")[1] == before
