"""flowmon's agent runtime on a real datapath (flows made with BPF_PROG_TEST_RUN): early
eviction when the map nears full or overflows, JSON export, metrics, NAT enrichment through the
core's broadcast hook, export failures counted."""

from __future__ import annotations

import ipaddress
import json
import math
import os
import shutil
import types
import uuid
from pathlib import Path

import pytest
from test_flowmon_datapath import ipv4, udp  # tests/kernel is on sys.path under pytest

from sluice import hookimpl
from sluice.bpf.testrun import test_run
from sluice.config import AgentSettings
from sluice.manager import PluginContext, PluginManager
from sluice.plugins.flowmon.config import Config
from sluice.plugins.flowmon.monitor import compile_datapath
from sluice.plugins.flowmon.runtime import Metrics, Runtime
from sluice.sessions import FlowTuple, NatTranslation

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(os.geteuid() != 0, reason="loading BPF programs needs root (CAP_BPF, CAP_NET_ADMIN)"),
]
MAX_FLOWS = 32


def nat_plugin() -> types.ModuleType:
    """A plugin answering the NAT hook the way conntrack does: 10.0.0.1:4000 is SNATed to 192.0.2.1."""
    mod = types.ModuleType("nat_answer")

    @hookimpl
    def sluice_nat_lookup(flow: FlowTuple):
        if (str(flow.src), flow.sport) != ("10.0.0.1", 4000):
            return None
        reply = FlowTuple(flow.dst, ipaddress.ip_address("192.0.2.1"), flow.dport, 61000, flow.proto)
        return NatTranslation(flow, reply)

    mod.sluice_nat_lookup = sluice_nat_lookup
    return mod


@pytest.fixture(scope="module")
def runtime(kernel_ready, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("flowmon-runtime")
    root = Path("/sys/fs/bpf") / f"sluice-test-{uuid.uuid4().hex[:8]}"
    root.mkdir()
    config = Config(
        max_flows=MAX_FLOWS, json_path=str(tmp / "flows.jsonl"), ipfix=[{"address": "127.0.0.1:9"}]
    )
    try:
        manager = PluginManager()
        manager.register("sluice.plugins.flowmon", "flowmon")
        manager.register(nat_plugin(), "nat_answer")
        ctx = PluginContext("flowmon", manager, AgentSettings(bpffs=root, state_dir=tmp / "state"), config)
        ctx.bpf = {"flowmon": compile_datapath(root, config)}
        rt = Runtime(ctx)
        fd = ctx.bpf["flowmon"].load_func(b"flowmon_ingress", 3).fd  # BPF_PROG_TYPE_SCHED_CLS
        yield rt, fd, tmp
        rt.stop()
        ctx.bpf["flowmon"].cleanup()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def send(fd: int, n: int, sport0: int = 1000) -> None:
    for i in range(n):
        test_run(fd, ipv4(17, udp(sport=sport0 + i)), data_size_out=0)


def test_early_eviction_when_the_map_nears_full_or_overflows(runtime):
    rt, fd, _ = runtime
    rt.evict_and_export()
    assert rt.eviction_due() == ""
    send(fd, math.ceil(MAX_FLOWS * rt.config.early_evict_ratio))
    assert rt.eviction_due() == "fill"
    send(fd, MAX_FLOWS, sport0=5000)  # overflows: 6 of them find the map full
    assert rt.eviction_due() == "map-full"
    evicted = rt.evict_and_export()
    assert evicted == MAX_FLOWS and rt.monitor.fill() == 0
    assert rt.monitor.counter_values()["map_full_packets"] > 0  # counted, not silently lost


def test_export_json_nat_and_metrics(runtime):
    rt, fd, tmp = runtime
    rt.evict_and_export()
    test_run(fd, ipv4(17, udp(sport=4000, dport=53)), data_size_out=0)
    test_run(fd, ipv4(17, udp(sport=4001, dport=53)), data_size_out=0)
    before = len((tmp / "flows.jsonl").read_text().splitlines()) if (tmp / "flows.jsonl").exists() else 0
    assert rt.evict_and_export() == 2
    lines = [json.loads(x) for x in (tmp / "flows.jsonl").read_text().splitlines()[before:]]
    by_port = {f["sport"]: f for f in lines}
    assert by_port[4000]["nat"] == {
        "reply_src": "10.0.0.2",
        "reply_dst": "192.0.2.1",
        "reply_sport": 53,
        "reply_dport": 61000,
    }
    assert by_port[4001]["nat"] is None
    names = {m.name: m for m in Metrics(rt).collect()}
    assert names["sluice_flowmon_flows_evicted"].samples[0].value >= 2
    assert "sluice_flowmon_map_fill_ratio" in names and "sluice_flowmon_drops" in names
    recent = json.loads((tmp / "state" / "flowmon" / "flows.json").read_text())
    assert {f["sport"] for f in recent} >= {4000, 4001}


def test_a_failing_collector_is_counted_and_the_others_still_export(runtime):
    rt, fd, tmp = runtime
    rt.evict_and_export()
    (ipfix_sink,) = [s for s in rt.sinks if s.name.startswith("ipfix")]
    ipfix_sink.exporter.port = 0  # sendto port 0 fails: EINVAL/ECONNREFUSED-like errors
    ipfix_sink.exporter.close()
    test_run(fd, ipv4(17, udp(sport=4500)), data_size_out=0)
    size = (tmp / "flows.jsonl").stat().st_size
    assert rt.evict_and_export() == 1
    assert (
        rt.stats[f"export_errors:{ipfix_sink.name}"] >= 1 and rt.stats[f"export_lost:{ipfix_sink.name}"] >= 1
    )
    assert (tmp / "flows.jsonl").stat().st_size > size


def test_reload_applies_sampling_and_filters_at_once(runtime):
    rt, fd, _ = runtime
    old = rt.config
    try:
        rt.reload(Config.model_validate({**old.model_dump(), "filters": [{"protocol": "tcp"}]}))
        rt.evict_and_export()
        test_run(fd, ipv4(17, udp(sport=4700)), data_size_out=0)
        assert rt.monitor.evict() == []  # UDP no longer selected
    finally:
        rt.reload(old)
    test_run(fd, ipv4(17, udp(sport=4701)), data_size_out=0)
    assert [f.sport for f in rt.monitor.evict()] == [4701]
