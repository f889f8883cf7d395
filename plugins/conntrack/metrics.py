"""Prometheus metrics, read at scrape time from the pinned maps and the running GC and host consumer."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from sluice.plugins.conntrack.table import Tables, read_stats


def _gauge(name, doc, value, labels=None):
    g = GaugeMetricFamily(f"sluice_conntrack_{name}", doc, labels=list(labels or {}))
    g.add_metric(list((labels or {}).values()), value)
    return g


class ConntrackCollector:
    def __init__(self, pin_dir: Path, state: Callable):
        self.pin_dir = pin_dir
        self.state = state

    def collect(self):
        if (self.pin_dir / "ct_tcp").exists():
            entries = GaugeMetricFamily(
                "sluice_conntrack_entries", "Entries per table", labels=["tenant", "table"]
            )
            with Tables(self.pin_dir) as tables:
                for tenant, kind, m in tables.each():
                    entries.add_metric([str(tenant), kind], m.count())
            yield entries
            dp = CounterMetricFamily("sluice_conntrack_datapath", "Datapath counters", labels=["what"])
            for what, n in read_stats(self.pin_dir).items():
                dp.add_metric([what], n)
            yield dp
        s = self.state()
        gc = s.collector
        if gc is not None:
            yield CounterMetricFamily("sluice_conntrack_gc_runs", "GC runs", value=gc.runs)
            yield CounterMetricFamily(
                "sluice_conntrack_gc_pressure_wakeups", "Early GC runs", value=gc.wakeups
            )
            yield _gauge("gc_interval_seconds", "Current GC interval", gc.interval)
            if gc.last is not None:
                yield _gauge("gc_duration_seconds", "Last GC run's duration", gc.last.duration_s)
                yield _gauge("gc_deleted_last_run", "Entries deleted by the last GC run", gc.last.deleted)
                fill = (
                    max(gc.last.alive.values(), default=0) / gc.last.max_entries if gc.last.max_entries else 0
                )
                yield _gauge("table_pressure_ratio", "Fullest table's fill after the last GC", fill)
            yield CounterMetricFamily(
                "sluice_conntrack_gc_deleted", "Entries deleted by GC", value=gc.deleted_total
            )
        reports = CounterMetricFamily(
            "sluice_conntrack_reports",
            "Datapath reports read (aggregated: new, flags, interval)",
            labels=["reason"],
        )
        for reason, n in sorted(s.reports.items()):
            reports.add_metric([reason], n)
        yield reports
        host = s.host
        if host is not None:
            yield from host.metrics()
