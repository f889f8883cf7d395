"""The lab's overlay works only through the tunnel plugin: the client reaches 10.99.200.1 behind
the tunnel peer when the gateway's BPF program encapsulates, and not without it."""

import subprocess
import sys

import pytest

from sluice.lab import OVERLAY_PEER_ADDR
from sluice.testing import AgentProcess
from tests.netlab import lab as make_lab

pytestmark = [pytest.mark.lab, pytest.mark.slow]


def test_overlay_through_the_tunnel_plugin(bpffs, tmp_path, kernel_ready):
    state = tmp_path / "state"
    cfg = tmp_path / "agent.toml"
    cfg.write_text(
        f"""[agent]
plugins = ["tunnel"]
bpffs = "{bpffs}"
state_dir = "{state}"
metrics_address = ""
[plugins.tunnel]
interface = "underlay0"
underlay_address = "10.99.3.1"
routes = [{{ dst = "10.99.200.0/24", nexthops = [{{ peer = "peer", underlay = "10.99.3.2", vni = 100 }}] }}]
"""
    )
    with make_lab() as lab:
        ping = ["ping", "-c", "3", "-i", "0.2", "-W", "1", "-n", OVERLAY_PEER_ADDR]
        assert lab.exec("client", ping, check=False).returncode != 0  # no tunnel, no way back
        # -W lingers only two round trips for the last reply once one came: a loaded host makes
        # late replies look lost. -w waits (up to its deadline) for all three replies.
        ping = ["ping", "-c", "3", "-i", "0.2", "-w", "15", "-n", OVERLAY_PEER_ADDR]
        agent = AgentProcess(cfg, lab.ns("gw"), None, tmp_path / "agent.log", state / "sluice.sock")
        try:
            ready = agent.start()
            assert ready["plugins"]["tunnel"]["state"] == "running"
            out = lab.exec("client", ping, check=False)
            assert " 0% packet loss" in out.stdout, out.stdout + agent.log_tail()
        finally:
            agent.stop()
            done = subprocess.run(
                [sys.executable, "-m", "sluice", "--netns", lab.ns("gw"), "-c", str(cfg), "cleanup"],
                capture_output=True,
                text=True,
            )
        assert "tunnel: removed device sluice-vxlan" in done.stdout, done.stdout + done.stderr
        links = lab.exec("gw", ["ip", "-o", "link"]).stdout
        assert "sluice-vxlan" not in links  # sluice cleanup removed the plugin's device too
