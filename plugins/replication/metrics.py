"""Prometheus metrics, read from the running replicator at scrape time."""

from __future__ import annotations

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

P = "sluice_replication_"
ERROR_KINDS = ("write", "sync", "connect", "nats", "event", "restore")  # always exported, zeros included
SKIP_REASONS = ("bad-key", "foreign", "version", "truncated", "bad-body")


class ReplicationCollector:
    def __init__(self, current):
        self.current = current  # () -> Replicator | None

    def describe(self):
        return []  # collected lazily: the replicator may not exist yet at registration

    def collect(self):
        r = self.current()
        if r is None:
            return
        s = r.stats

        def counter(name, doc, values, label=None):
            fam = CounterMetricFamily(P + name, doc, labels=[label] if label else None)
            if label:
                for k, v in sorted(values.items()):
                    fam.add_metric([k], v)
            else:
                fam.add_metric([], values)
            return fam

        def gauge(name, doc, value):
            return GaugeMetricFamily(P + name, doc, value=value)

        yield counter("writes", "Writes acked by JetStream", dict(s.writes), "op")
        yield counter("batches", "Pipelined write batches", s.batches)
        yield counter("coalesced_updates", "Updates merged into a pending write of the same key", s.coalesced)
        yield counter("errors", "Errors by kind", {k: s.errors[k] for k in ERROR_KINDS}, "kind")
        yield counter(
            "queue_overflow", "Changes dropped from a full queue (repaired by full sync)", s.overflow
        )
        yield counter(
            "records_skipped",
            "Corrupt or foreign bucket records skipped",
            {k: s.skipped[k] for k in SKIP_REASONS},
            "reason",
        )
        yield counter("full_syncs", "Full syncs completed", s.full_syncs)
        yield counter("sync_repaired", "Records the full sync wrote or deleted", dict(s.repaired), "op")
        yield counter("reconnects", "NATS reconnections", s.reconnects)
        yield gauge("queue_depth", "Changed keys waiting to be written", r.queue_depth)
        yield gauge("lag_seconds", "Age of the oldest change not yet in the bucket", r.lag_seconds())
        q = GaugeMetricFamily(
            P + "write_lag_seconds", "Change-to-ack time of recent writes", labels=["quantile"]
        )
        for name, value in r.lag_quantiles().items():
            if value is not None:
                q.add_metric(["0.5" if name == "p50" else "0.99"], value)
        yield q
        yield gauge("local_sessions", "Sessions held on this node", len(r.local))
        yield gauge("connected", "1 while connected to NATS", 1 if r.connected else 0)
        yield gauge("boot_load_seconds", "Duration of the boot load", r.boot.get("seconds", 0))
        yield gauge("boot_load_sessions", "Sessions read from the bucket at boot", r.boot.get("records", 0))
