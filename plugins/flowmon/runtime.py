"""flowmon inside the agent: the eviction loop, the interface watch, the sinks and the metrics."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections import Counter

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from sluice.plugins.flowmon import drops
from sluice.plugins.flowmon.export import Aggregates, Recent, build_sinks
from sluice.plugins.flowmon.monitor import Attacher, FlowMonitor
from sluice.plugins.flowmon.records import Flow
from sluice.sessions import FlowTuple

TICK_S = 0.2  # how often the map fill and the map-full counter are checked


def ifnames() -> dict[int, str]:
    return dict(socket.if_nameindex())


class Runtime:
    def __init__(self, ctx):
        self.ctx = ctx
        self.config = ctx.config
        self.reasons = drops.kernel_reasons()
        self.reason_values = {name: value for value, name in self.reasons.items()}
        self.monitor = FlowMonitor(ctx.pin_dir, self.reasons)
        self.monitor.configure(self.config)
        self.monitor.resync_fill()
        self.attacher = Attacher(ctx.bpf["flowmon"], ctx.log)
        self.aggregates = Aggregates(self.config.metric_interfaces)
        self.recent = Recent(self.config.recent_flows, ctx.state_dir / "flows.json")
        self.sinks = build_sinks(self.config, ifnames, self.reason_values)
        self.stats: Counter = Counter()  # evicted, evictions, early_evictions, export_errors:<sink>, ...
        self.lock = threading.Lock()  # one eviction at a time (the loop, stop, the API)
        self.last_evict = time.monotonic()
        self.last_poll = 0.0
        self.last_map_full = self.monitor.counter_values()["map_full_packets"]
        self._set_nat()

    def _set_nat(self) -> None:
        hook = self.ctx.hook.sluice_nat_lookup
        answering = [i for i in hook.get_hookimpls() if i.plugin_name != self.ctx.name]
        self.monitor.nat_lookup = self._nat if self.config.nat and answering else None

    def _nat(self, f: Flow) -> dict | None:
        import ipaddress

        t = self.ctx.hook.sluice_nat_lookup(
            flow=FlowTuple(
                ipaddress.ip_address(f.src), ipaddress.ip_address(f.dst), f.sport, f.dport, f.proto
            )
        )
        if t is None:
            return None
        r = t.reply
        return {
            "reply_src": str(r.src),
            "reply_dst": str(r.dst),
            "reply_sport": r.sport,
            "reply_dport": r.dport,
        }

    # ---- work done in threads (netlink and bpf syscalls) ---------------------------------------

    def sync_interfaces(self) -> list[str]:
        added = self.attacher.sync(self.config.interfaces, self.config.exclude_interfaces)
        if added:
            self.ctx.log.info("capturing", interfaces=added)
        return added

    def evict_and_export(self) -> int:
        """Drain the map and hand each chunk to every sink; returns the number of flows."""
        with self.lock:
            names, total = ifnames(), 0
            for flows in self.monitor.evict_chunks(with_drops=self.config.drops):
                total += len(flows)
                for sink in self.sinks:  # a failing sink is counted; the others still get the chunk
                    try:
                        sink.export(flows)
                        self.stats[f"exported:{sink.name}"] += len(flows)
                    except (OSError, ValueError) as exc:
                        self.stats[f"export_errors:{sink.name}"] += 1
                        self.stats[f"export_lost:{sink.name}"] += len(flows)
                        self.ctx.log.warning(
                            "export failed", sink=sink.name, error=str(exc), flows=len(flows)
                        )
                self.aggregates.add(flows, names)
                self.recent.add(flows)
            self.last_evict = time.monotonic()
            self.stats["evictions"] += 1
            self.stats["evicted"] += total
            if total:
                self.recent.save(names)
            return total

    def eviction_due(self) -> str:
        """Why an eviction is due now ("" when not): the timeout, the fill, or the map was full."""
        if time.monotonic() - self.last_evict >= self.config.active_timeout_s:
            return "timeout"
        full = self.monitor.counter_values()["map_full_packets"]
        if full != self.last_map_full:
            self.last_map_full = full
            return "map-full"
        if self.monitor.fill() >= self.config.early_evict_ratio * self.monitor.capacity:
            return "fill"
        return ""

    # ---- agent hooks ---------------------------------------------------------------------------

    async def run(self) -> None:
        while True:
            now = time.monotonic()
            if now - self.last_poll >= self.config.interface_poll_s:
                self.last_poll = now
                await asyncio.to_thread(self.sync_interfaces)
            why = self.eviction_due()
            if why:
                if why != "timeout":
                    self.stats["early_evictions"] += 1
                await asyncio.to_thread(self.evict_and_export)
            await asyncio.sleep(TICK_S)

    def reload(self, config) -> None:
        for sink in self.sinks:
            sink.close()
        self.config = config
        self.monitor.configure(config)
        self.sinks = build_sinks(config, ifnames, self.reason_values)
        self._set_nat()
        self.last_poll = 0.0  # re-select interfaces at the next tick

    def stop(self) -> None:
        self.evict_and_export()  # flush what the map holds now
        for sink in self.sinks:
            sink.close()
        if self.ctx.settings.detach_on_stop:
            self.attacher.detach_all()
        self.monitor.close()


class Metrics:
    """Prometheus view, read at scrape time. Label sets are bounded (see Aggregates)."""

    def __init__(self, runtime: Runtime):
        self.rt = runtime

    def collect(self):
        rt = self.rt
        c = rt.monitor.counter_values()
        fill = GaugeMetricFamily("sluice_flowmon_map_fill_ratio", "Flow map entries / capacity")
        fill.add_metric([], rt.monitor.fill() / rt.monitor.capacity)
        yield fill
        losses = CounterMetricFamily(
            "sluice_flowmon_lost_packets", "Packets not aggregated, by cause", labels=["cause"]
        )
        for cause in ("map_full_packets", "malformed", "drops_unattributed"):
            losses.add_metric([cause.removesuffix("_packets")], c[cause])
        yield losses
        lost_flows = CounterMetricFamily(
            "sluice_flowmon_lost_flows",
            "Flows not exported because the flow map was full (each once per eviction period)",
        )
        lost_flows.add_metric([], c["lost_flows"])
        yield lost_flows
        skipped = CounterMetricFamily(
            "sluice_flowmon_skipped_packets", "Packets skipped on purpose", labels=["cause"]
        )
        skipped.add_metric(["sampling"], c["sampled_out"])
        skipped.add_metric(["filter"], c["filtered"])
        yield skipped
        evicted = CounterMetricFamily("sluice_flowmon_flows_evicted", "Flow records evicted from the map")
        evicted.add_metric([], rt.stats["evicted"])
        yield evicted
        early = CounterMetricFamily("sluice_flowmon_early_evictions", "Evictions before the active timeout")
        early.add_metric([], rt.stats["early_evictions"])
        yield early
        errors = CounterMetricFamily("sluice_flowmon_export_errors", "Failed exports", labels=["sink"])
        lost = CounterMetricFamily(
            "sluice_flowmon_export_lost_flows", "Flows a sink failed to take", labels=["sink"]
        )
        for sink in rt.sinks:
            errors.add_metric([sink.name], rt.stats[f"export_errors:{sink.name}"])
            lost.add_metric([sink.name], rt.stats[f"export_lost:{sink.name}"])
        yield errors
        yield lost
        b, p, f = rt.aggregates.snapshot()
        for name, doc, data in (
            ("sluice_flowmon_bytes", "Bytes captured", b),
            ("sluice_flowmon_packets", "Packets captured", p),
            ("sluice_flowmon_flows", "Flow records", f),
        ):
            fam = CounterMetricFamily(name, doc, labels=["proto", "interface"])
            for (proto, iface), v in sorted(data.items()):
                fam.add_metric([proto, iface], v)
            yield fam
        drops_fam = CounterMetricFamily(
            "sluice_flowmon_drops", "Kernel packet drops by reason", labels=["reason"]
        )
        for reason, n in sorted(rt.monitor.reason_counts().items()):
            drops_fam.add_metric([reason], n)
        yield drops_fam
