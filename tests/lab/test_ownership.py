"""Per-plugin ownership: a plugin removed from the config, or cleaned up alone, takes its filters
and pins with it and nothing else (other plugins' pins, other tools' filters stay)."""

import json
import signal
import time

import pytest

from sluice.bpf import tc
from sluice.lab import in_netns
from sluice.testing import AgentProcess
from tests.lab.test_agent import gw_filters, run_cli, write_config
from tests.netlab import lab as make_lab

pytestmark = [pytest.mark.lab, pytest.mark.slow]

SECTIONS = """
[plugins.chainprobe]
attach = [{ fn = "probe_count", iface = "ingress0", phase = "observe" }]

[plugins.hello]
interface = "ingress0"
"""


@pytest.fixture(scope="module")
def lab():
    with make_lab() as lb:
        yield lb


@pytest.fixture
def agent(lab, bpffs, tmp_path, plugin_path):
    state = tmp_path / "state"
    cfg = write_config(
        tmp_path / "agent.toml", bpffs, state, plugins=["chainprobe", "hello"], sections=SECTIONS
    )
    proc = AgentProcess(cfg, lab.ns("gw"), plugin_path, tmp_path / "agent.log", state / "sluice.sock")
    yield proc
    proc.stop()
    run_cli(lab, plugin_path, cfg, "cleanup")


@pytest.fixture
def foreign(lab):
    """Another tool's bpf filter on the same hook."""
    from bcc import BPF
    from pyroute2 import IPRoute

    other = BPF(text=b"int other(struct __sk_buff *skb) { return -1; }")
    fd = other.load_func(b"other", BPF.SCHED_CLS).fd
    with in_netns(lab.ns("gw")), IPRoute() as ipr:
        tc.attach(ipr, "ingress0", "ingress", 49000, fd, "someone-else")
    yield
    with in_netns(lab.ns("gw")), IPRoute() as ipr:
        tc.detach(ipr, tc.ifindex(ipr, "ingress0"), "ingress", 49000)
    other.cleanup()


def all_filters(lab):
    from pyroute2 import IPRoute

    with in_netns(lab.ns("gw")), IPRoute() as ipr:
        return [(f.prio, f.name) for f in tc.list_filters(ipr, "ingress0")]


def plugins_list(lab, plugin_path, cfg):
    out = run_cli(lab, plugin_path, cfg, "plugins", "list", "--json")
    assert out.returncode == 0, out.stderr
    return {p["name"]: p for p in json.loads(out.stdout)}


def test_cleanup_of_one_plugin_leaves_the_others_and_foreign_filters(agent, lab, bpffs, plugin_path, foreign):
    agent.start()
    agent.stop()
    assert (bpffs / "sluice" / "chainprobe").is_dir() and (bpffs / "sluice" / "hello").is_dir()
    listed = plugins_list(lab, plugin_path, agent.config)  # agent down: the record says what is attached
    assert listed["chainprobe"]["attach"] == ["tc/ingress0/ingress#100:probe_count"]

    done = run_cli(lab, plugin_path, agent.config, "cleanup", "--plugin", "chainprobe", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["filters"] == 1
    assert all_filters(lab) == [
        (1, "sluice:core:sluice_prologue"),
        (150, "sluice:hello:hello_ingress"),
        (49000, "someone-else"),
    ]
    assert not (bpffs / "sluice" / "chainprobe").exists()
    assert (bpffs / "sluice" / "hello" / "hello_packets").exists() and (bpffs / "sluice" / "core").is_dir()
    listed = plugins_list(lab, plugin_path, agent.config)
    assert listed["chainprobe"]["attach"] == [] and listed["chainprobe"]["maps"] == []
    assert listed["hello"]["attach"] == ["tc/ingress0/ingress#150:hello_ingress"]

    unknown = run_cli(lab, plugin_path, agent.config, "cleanup", "--plugin", "nosuch")
    assert unknown.returncode != 0 and len(unknown.stderr.strip().splitlines()) == 1

    # the last plugin cleaned up: its hook loses the prologue too, the other tool's filter stays
    assert run_cli(lab, plugin_path, agent.config, "cleanup", "--plugin", "hello").returncode == 0
    assert all_filters(lab) == [(49000, "someone-else")]


def assert_record_is_the_kernel(agent, lab):
    """What the agent reports attached (every plugin) is exactly the plugin filters on the hooks."""
    _, plugins = agent.get("/v1/plugins")
    reported = sorted(a for p in plugins for a in p["attach"] if a.startswith("tc/"))
    kernel = sorted(
        f"tc/{i}/{d}#{prio}:{name.split(':')[2]}"
        for i, d, prio, name in gw_filters(lab)
        if not name.startswith("sluice:core:")
    )
    assert reported == kernel


def removed_by_reload(agent, lab, bpffs):
    agent.start()
    assert_record_is_the_kernel(agent, lab)
    assert (bpffs / "sluice" / "chainprobe" / "probe_seen").exists()
    text = agent.config.read_text()
    agent.config.write_text(
        text.replace("plugins = ['chainprobe', 'hello']", "plugins = ['hello']").replace(
            '[plugins.chainprobe]\nattach = [{ fn = "probe_count", iface = "ingress0", phase = "observe" }]\n',
            "",
        )
    )
    agent.signal(signal.SIGHUP)
    deadline = time.monotonic() + 30
    while any("chainprobe" in f[3] for f in gw_filters(lab)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert [f[3] for f in gw_filters(lab)] == ["sluice:core:sluice_prologue", "sluice:hello:hello_ingress"]
    _, plugins = agent.get("/v1/plugins")
    probe = next(p for p in plugins if p["name"] == "chainprobe")
    assert probe["attach"] == [] and probe["programs"] == [] and probe["state"] == "installed"
    assert_record_is_the_kernel(agent, lab)


def test_a_plugin_removed_by_reload_takes_its_filters_and_pins(agent, lab, bpffs):
    removed_by_reload(agent, lab, bpffs)
    assert not (bpffs / "sluice" / "chainprobe").exists()
    assert (bpffs / "sluice" / "hello" / "hello_packets").exists()


def test_keep_removed_state_keeps_the_pins(agent, lab, bpffs):
    agent.config.write_text(
        agent.config.read_text().replace("stop_timeout", "keep_removed_state = true\nstop_timeout")
    )
    removed_by_reload(agent, lab, bpffs)
    assert (bpffs / "sluice" / "chainprobe" / "probe_seen").exists()
