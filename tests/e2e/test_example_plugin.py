"""The extension path end to end: the example third-party plugin, installed with pip, discovered
through its entry point, runs its BPF program in the real agent, and its CLI command and metric
show the traffic the test sent."""

import subprocess
import sys

import pytest

from sluice.testing import AgentProcess
from tests.netlab import lab as make_lab

pytestmark = [pytest.mark.lab, pytest.mark.slow]


def test_hello_counts_real_traffic(bpffs, tmp_path, plugin_path):
    state = tmp_path / "state"
    cfg = tmp_path / "agent.toml"
    cfg.write_text(
        f"""[agent]
plugins = ["hello"]
bpffs = "{bpffs}"
state_dir = "{state}"
metrics_address = ""
[plugins.hello]
interface = "ingress0"
"""
    )
    with make_lab() as lab:
        agent = AgentProcess(cfg, lab.ns("gw"), plugin_path, tmp_path / "agent.log", state / "sluice.sock")
        try:
            ready = agent.start()
            assert ready["plugins"]["hello"]["state"] == "running"
            out = lab.exec("client", ["ping", "-c", "5", "-i", "0.05", "-n", lab.addr("server")])
            assert " 0% packet loss" in out.stdout

            cli = subprocess.run(
                [sys.executable, "-m", "sluice", "hello", "--bpffs", str(bpffs)],
                capture_output=True,
                text=True,
                env={"PYTHONPATH": str(plugin_path)},
            )
            assert cli.returncode == 0, cli.stderr
            counts = dict(line.split() for line in cli.stdout.splitlines())
            assert int(counts["icmp"]) == 5  # exactly the echo requests the client sent

            _, metrics = agent.get("/metrics")
            assert 'sluice_hello_packets_total{proto="icmp"} 5.0' in metrics
        finally:
            agent.stop()
            subprocess.run(
                [sys.executable, "-m", "sluice", "--netns", lab.ns("gw"), "-c", str(cfg), "cleanup"],
                env={"PYTHONPATH": str(plugin_path)},
                capture_output=True,
            )
