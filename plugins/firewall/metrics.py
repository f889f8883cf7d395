"""Prometheus collectors: read at scrape time from the maps and the runtime's own state."""

from __future__ import annotations

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

VERDICTS = {
    "allowed_new": "allowed",
    "allowed_established": "established",
    "replies": "reply",
    "blocked_policy": "blocked",
    "blocked_unsolicited": "blocked_unsolicited",
    "blocked_malformed": "blocked_malformed",
    "blocked_no_syn": "blocked_no_syn",
    "blocked_unmatched": "blocked_unmatched_source",
    "session_full": "blocked_session_full",
    "audit_would_block": "audit_passed",
    "bypass": "bypass",
    "fragment_followed": "fragment",
    "blocked_fragment": "blocked_fragment",
}


class FirewallCollector:
    def __init__(self, fw):
        self.fw = fw

    def collect(self):
        counters = self.fw.maps.counters()
        packets = CounterMetricFamily(
            "sluice_firewall_packets", "Packets by firewall verdict", labels=["verdict"]
        )
        for name, verdict in VERDICTS.items():
            packets.add_metric([verdict], counters[name])
        yield packets
        audit = CounterMetricFamily(
            "sluice_firewall_audit_events", "Audit events by outcome", labels=["outcome"]
        )
        audit.add_metric(["written"], counters["audit_events"])
        audit.add_metric(["lost"], counters["audit_lost"])
        audit.add_metric(["rate_limited"], counters["audit_rate_limited"])
        yield audit
        yield GaugeMetricFamily(
            "sluice_firewall_sessions", "Sessions at the last GC walk", value=len(self.fw.known)
        )
        learned = self.fw.learned_view()
        yield GaugeMetricFamily(
            "sluice_firewall_dns_learned_names",
            "Names with live learned addresses",
            value=len({(r["network"], r["name"]) for r in learned}),
        )
        yield GaugeMetricFamily(
            "sluice_firewall_dns_learned_addresses",
            "Learned (network, address) allows",
            value=len({(r["network"], r["addr"]) for r in learned}),
        )
        if self.fw.proxy is not None:
            dns = CounterMetricFamily(
                "sluice_firewall_dns_queries", "DNS proxy queries by result", labels=["result"]
            )
            for result, n in self.fw.proxy.stats.__dict__.items():
                dns.add_metric([result], n)
            yield dns
        yield GaugeMetricFamily(
            "sluice_firewall_policy_generation", "Active policy generation (0 or 1)", value=self.fw.generation
        )
