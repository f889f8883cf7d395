"""Prometheus metrics, read from the pinned maps at scrape time."""

from __future__ import annotations

import ctypes as ct
from pathlib import Path

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from sluice.bpf.maps import Map
from sluice.plugins.tunnel.model import COUNTERS, NexthopStats


def read_counters(pin_dir: Path) -> dict[str, int]:
    with Map.open_pinned(pin_dir / "tunnel_counters", ct.c_uint32, ct.c_uint64) as m:
        return {COUNTERS[k]: sum(v) for k, v in m.items() if k < len(COUNTERS)}


def read_nexthop_stats(pin_dir: Path, slots: dict[str, int]) -> list[dict]:
    """Packets and bytes per nexthop; ``slots`` (nexthop ident → slot) is the engine's or status.json's."""
    with Map.open_pinned(pin_dir / "tunnel_nh_stats", ct.c_uint32, NexthopStats) as m:
        out = []
        for ident, slot in sorted(slots.items()):
            per_cpu = m.get(slot) or []
            underlay, vni, protocol = ident.split("|")
            out.append(
                {
                    "underlay": underlay,
                    "vni": int(vni),
                    "protocol": protocol,
                    "packets": sum(s.packets for s in per_cpu),
                    "bytes": sum(s.bytes for s in per_cpu),
                }
            )
        return out


class TunnelCollector:
    def __init__(self, pin_dir: Path, tunnel, transitions):
        self.pin_dir = pin_dir
        self.tunnel = tunnel  # callables: the plugin's state may be rebuilt
        self.transitions = transitions

    def collect(self):
        labels = ["underlay", "vni", "protocol"]
        packets = CounterMetricFamily(
            "sluice_tunnel_nexthop_packets", "Packets encapsulated per nexthop", labels=labels
        )
        nbytes = CounterMetricFamily(
            "sluice_tunnel_nexthop_bytes", "Bytes encapsulated per nexthop", labels=labels
        )
        events = CounterMetricFamily(
            "sluice_tunnel_packets", "Datapath outcomes (miss, no_healthy, ...)", labels=["outcome"]
        )
        tunnel = self.tunnel()
        if tunnel is not None and (self.pin_dir / "tunnel_nh_stats").exists():
            for s in read_nexthop_stats(self.pin_dir, dict(tunnel.stats_slots)):
                key = [s["underlay"], str(s["vni"]), s["protocol"]]
                packets.add_metric(key, s["packets"])
                nbytes.add_metric(key, s["bytes"])
        if (self.pin_dir / "tunnel_counters").exists():
            for name, value in read_counters(self.pin_dir).items():
                events.add_metric([name], value)
        flips = CounterMetricFamily(
            "sluice_tunnel_health_transitions", "Peer health transitions", labels=["peer", "state", "source"]
        )
        for (peer, state, source), n in sorted(self.transitions().items()):
            flips.add_metric([peer, state, source], n)
        up = GaugeMetricFamily(
            "sluice_tunnel_peer_up", "1 when the peer's nexthops are in use", labels=["peer"]
        )
        routes = GaugeMetricFamily("sluice_tunnel_routes", "Desired routes by state", labels=["state"])
        if tunnel is not None:
            for peer, healthy in tunnel.peer_health().items():
                up.add_metric([peer], 1 if healthy else 0)
            last = tunnel.last
            routes.add_metric(["in_kernel"], last.added + last.changed + last.unchanged)
            routes.add_metric(["with_unusable_nexthops"], len(last.unusable))
        yield from (packets, nbytes, events, flips, up, routes)
