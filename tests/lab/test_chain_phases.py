"""Named phases checked before anything attaches, and enforcing hooks that never fail open.

A third-party plugin (tests/plugins/sluice-chainprobe) claims the firewall's slot or fails to
load; traffic to a destination the policy denies is counted where it would arrive, on the server.
"""

import json
import signal
import socket
import time

import pytest

from sluice.lab import netns_socket
from sluice.testing import AgentProcess
from tests.lab.test_agent import gw_filters, run_cli, write_config
from tests.netlab import lab as make_lab

pytestmark = [pytest.mark.lab, pytest.mark.slow]

FIREWALL = """
[plugins.firewall]
interface = "ingress0"
map_preset = "test"

[plugins.firewall.dns]
enabled = false

[[plugins.firewall.networks]]
name = "clients"
sources = ["10.99.1.0/24"]
default = "allow"
rules = [{ action = "deny", proto = "udp", dst = "10.99.2.2", ports = 9 }]
"""


def probe(*points, seen_max=16):
    lines = ",\n".join(
        f'  {{ fn = "{fn}", iface = "ingress0", phase = "{phase}", order = {order} }}'
        for fn, phase, order in points
    )
    return f"\n[plugins.chainprobe]\nseen_max = {seen_max}\nattach = [\n{lines},\n]\n"


@pytest.fixture(scope="module")
def lab():
    with make_lab() as lb:
        yield lb


@pytest.fixture
def agent_for(lab, bpffs, tmp_path, plugin_path):
    made = []

    def make(plugins, sections):
        cfg = write_config(
            tmp_path / "agent.toml", bpffs, tmp_path / "state", plugins=plugins, sections=sections
        )
        proc = AgentProcess(
            cfg, lab.ns("gw"), plugin_path, tmp_path / "agent.log", tmp_path / "state" / "sluice.sock"
        )
        made.append(proc)
        return proc

    yield make
    for proc in made:
        proc.stop()
        done = run_cli(lab, plugin_path, proc.config, "cleanup")
        assert done.returncode == 0, done.stderr


def received_on_server(lab, port: int, sent: int = 5) -> int:
    """Send ``sent`` datagrams client → server:port; how many the server's socket got."""
    rx = netns_socket(lab.ns("server"), 4, socket.SOCK_DGRAM)
    tx = netns_socket(lab.ns("client"), 4, socket.SOCK_DGRAM)
    got = 0
    with rx, tx:
        rx.bind(("0.0.0.0", port))
        rx.settimeout(0.3)
        for _ in range(sent):
            tx.sendto(b"x", (lab.addr("server"), port))
        try:
            while got < sent:
                rx.recv(10)
                got += 1
        except TimeoutError:
            pass
    return got


def tc_ids(lab):
    """(iface, direction, prio) → program id as `tc filter show` prints it."""
    out = {}
    for direction in ("ingress", "egress"):
        text = lab.exec(
            "gw", ["tc", "filter", "show", "dev", "ingress0", direction], capture_output=True, text=True
        ).stdout
        for line in text.splitlines():
            if " id " in line and "pref" in line:
                words = line.split()
                out[("ingress0", direction, int(words[words.index("pref") + 1]))] = int(
                    words[words.index("id") + 1]
                )
    return out


def test_a_plugin_claiming_the_firewalls_slot_refuses_the_start(lab, agent_for, plugin_path):
    agent = agent_for(["chainprobe", "firewall"], probe(("probe_pass", "enforce", 0)) + FIREWALL)
    result = run_cli(lab, plugin_path, agent.config, "agent", "run")
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert (
        "fw_ingress claims ingress0 ingress enforce order 0, already claimed by chainprobe:probe_pass"
        in lines[0]
    )
    assert gw_filters(lab) == []
    assert (
        lab.exec(
            "gw", ["tc", "filter", "show", "dev", "ingress0", "ingress"], capture_output=True, text=True
        ).stdout.strip()
        == ""
    )


def test_a_clashing_reload_is_rejected_and_the_firewall_keeps_enforcing(lab, agent_for):
    agent = agent_for(["chainprobe", "firewall"], probe(("probe_count", "observe", 0)) + FIREWALL)
    agent.start()
    assert received_on_server(lab, 9) == 0 and received_on_server(lab, 10) == 5
    before = gw_filters(lab)
    agent.config.write_text(agent.config.read_text().replace('"observe"', '"enforce"'))
    agent.signal(signal.SIGHUP)
    deadline = time.monotonic() + 30
    while "reload rejected" not in agent.log_path.read_text() and time.monotonic() < deadline:
        time.sleep(0.2)
    rejected = [ln for ln in agent.log_path.read_text().splitlines() if "reload rejected" in ln]
    assert len(rejected) == 1 and "already claimed by chainprobe:probe_count" in rejected[0]
    assert gw_filters(lab) == before
    assert received_on_server(lab, 9) == 0 and received_on_server(lab, 10) == 5


def test_an_enforce_plugin_that_fails_to_load_fails_closed(lab, agent_for, plugin_path):
    # seen_max = 0: the program's map cannot be created, so nothing of the plugin ever loads
    agent = agent_for(["chainprobe"], probe(("probe_pass", "enforce", 0), seen_max=0))
    body = agent.start()
    assert body["plugins"]["chainprobe"]["state"] == "failed"
    assert received_on_server(lab, 10) == 0  # the deny program holds the enforce slot
    _, plugins = agent.get("/v1/plugins")  # the record says so too
    assert next(p for p in plugins if p["name"] == "chainprobe")["attach"] == [
        "tc/ingress0/ingress#300:sluice_deny"
    ]
    hooks = json.loads(run_cli(lab, plugin_path, agent.config, "hooks", "--json").stdout)
    ours = [(h["phase"], h["order"], h["owner"], h["name"]) for h in hooks if h["owner"] != "(not sluice)"]
    assert ours == [
        ("prologue", 0, "core", "sluice:core:sluice_prologue"),
        ("enforce", 0, "chainprobe", "sluice:chainprobe:sluice_deny"),
    ]
    # the ids sluice reports are the kernel's, as tc prints them
    assert {(h["iface"], h["direction"], h["prio"]): h["prog_id"] for h in hooks} == tc_ids(lab)
    assert all(h["prog_id"] > 0 for h in hooks)

    # fixed config, SIGHUP: the plugin starts and takes its slot back from the deny program
    agent.config.write_text(agent.config.read_text().replace("seen_max = 0", "seen_max = 16"))
    agent.signal(signal.SIGHUP)
    deadline = time.monotonic() + 30
    while received_on_server(lab, 10, sent=1) == 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert received_on_server(lab, 10) == 5
    assert [f[3] for f in gw_filters(lab)] == ["sluice:core:sluice_prologue", "sluice:chainprobe:probe_pass"]


def test_a_failed_reload_keeps_the_previous_program(lab, agent_for):
    agent = agent_for(
        ["chainprobe"], probe(("probe_drop", "enforce", 0)).replace("seen_max", "drop_udp_port = 9\nseen_max")
    )
    agent.start()
    assert received_on_server(lab, 9) == 0 and received_on_server(lab, 10) == 5
    before = gw_filters(lab)
    agent.config.write_text(agent.config.read_text().replace("seen_max = 16", "seen_max = 0"))
    agent.signal(signal.SIGHUP)
    deadline = time.monotonic() + 30
    while (
        agent.get("/readyz")[1]["plugins"]["chainprobe"]["state"] != "failed" and time.monotonic() < deadline
    ):
        time.sleep(0.2)
    assert agent.get("/readyz")[1]["plugins"]["chainprobe"]["state"] == "failed"
    assert gw_filters(lab) == before  # the old program, not the deny program
    assert received_on_server(lab, 9) == 0 and received_on_server(lab, 10) == 5
