"""Per-tenant tables with real tunnel traffic: the tenant is the VXLAN VNI of each packet, so the
same inner tuple arriving on two VNIs lands in two tenants' tables."""

from __future__ import annotations

import socket

import pytest

from sluice.lab import netns_socket, run_ip
from sluice.plugins.conntrack import Config
from sluice.plugins.conntrack.table import Tables, read_stats
from tests.lab.test_conntrack_helpers import conntrack_on_pair

pytestmark = pytest.mark.lab
INNER = {"a": "10.200.0.1", "b": "10.200.0.2"}


def vxlan_between(pair) -> None:
    """A collect_md (external) VXLAN device on each side; a → b inner traffic is routed into it."""
    for side, mac in (("a", "02:00:00:00:01:01"), ("b", "02:00:00:00:01:02")):
        ns = pair.ns(side)
        try:
            run_ip("-n", ns, "link", "add", "vxlan0", "type", "vxlan", "external", "dstport", "4789")
        except Exception as e:  # noqa: BLE001 (the kernel's answer decides)
            pytest.skip(f"tunnel:vxlan: cannot create an external vxlan device: {e}")
        run_ip("-n", ns, "link", "set", "vxlan0", "address", mac, "up")
        run_ip("-n", ns, "addr", "add", f"{INNER[side]}/32", "dev", "vxlan0")
    run_ip(
        "-n",
        pair.a,
        "neigh",
        "add",
        INNER["b"],
        "lladdr",
        "02:00:00:00:01:02",
        "dev",
        "vxlan0",
        "nud",
        "permanent",
    )


def send_on_vni(pair, vni: int, sport: int, count: int) -> None:
    run_ip("-n", pair.a, "route", "replace", f"{INNER['b']}/32", "encap", "ip", "id", str(vni), "dst",
           pair.addr("b"), "dev", "vxlan0")  # fmt: skip
    rx = netns_socket(pair.b, 4, socket.SOCK_DGRAM)
    rx.bind((INNER["b"], 6000))
    rx.settimeout(2)
    tx = netns_socket(pair.a, 4, socket.SOCK_DGRAM)
    tx.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    tx.bind((INNER["a"], sport))
    with rx, tx:
        for _ in range(count):
            tx.sendto(b"tenant", (INNER["b"], 6000))
            assert rx.recv(10) == b"tenant"


def test_same_tuple_on_two_vnis_keeps_two_entries(kernel_ready, tmp_path):
    config = Config(
        interfaces=["vxlan0"],
        directions=["ingress"],
        tcp_table_size=1024,
        any_table_size=1024,
        tenants=[{"interface": "vxlan0", "from_vni": True}],
        tenant_tables=[42, 43],
        host={"enabled": False},
    )
    with conntrack_on_pair(tmp_path, config, side="b", prepare=vxlan_between) as (pair, pin, _):
        send_on_vni(pair, 42, 5000, 1)
        send_on_vni(pair, 43, 5000, 2)
        with Tables(pin) as t:
            mine = {c.tenant: c for c in t.conns() if c.key.sport == 5000 and c.key.dport == 6000}
            assert sorted(mine) == [42, 43]
            assert bytes(mine[42].key) == bytes(mine[43].key)  # the very same tuple
            assert mine[42].entry.packets[0] == 1 and mine[43].entry.packets[0] == 2

            # A VNI without tables is counted, not tracked; tables added at run time then track it.
            before = read_stats(pin)["no_table"]
            send_on_vni(pair, 44, 5000, 1)
            assert read_stats(pin)["no_table"] == before + 1
            t.add_tenant(44, config.sizes)
            send_on_vni(pair, 44, 5000, 1)
            assert [c.entry.packets[0] for c in t.conns(44)] == [1]
