"""tunnel, pure Python: the config model, key/value layout, hashing, damping, trace decoding."""

from __future__ import annotations

import ctypes as ct
import ipaddress

import pydantic
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sluice.plugins.tunnel import Config
from sluice.plugins.tunnel.cli import format_routes
from sluice.plugins.tunnel.devices import encap_mtu
from sluice.plugins.tunnel.engine import mix32, nexthop_seed, rendezvous
from sluice.plugins.tunnel.health import HealthConfig, PeerState
from sluice.plugins.tunnel.model import (
    LpmKey,
    Nexthop,
    Protocol,
    Route,
    RouteValue,
    decode_value,
    key_bytes,
    mapped,
    network_of,
    one_line,
    slot_bytes,
    trie_key,
    tunnel_mac,
    value_bytes,
)
from sluice.plugins.tunnel.trace import decode_detail

pytestmark = pytest.mark.unit

NH = {"peer": "b", "underlay": "10.99.3.2", "vni": 100}


def test_layout_matches_the_bpf_structs():
    assert ct.sizeof(LpmKey) == 20  # {u32 prefixlen; u8 addr[16]}
    assert ct.sizeof(RouteValue) == 16 + 4 + 4 + 4 * 28


@pytest.mark.parametrize(
    ("cidr", "prefixlen", "addr"),
    [
        ("10.1.0.0/16", 112, "::ffff:10.1.0.0"),
        ("0.0.0.0/0", 96, "::ffff:0.0.0.0"),
        ("fd00::/8", 8, "fd00::"),
        ("::/0", 0, "::"),
    ],
)
def test_trie_keys_are_v4_mapped(cidr, prefixlen, addr):
    key = trie_key(ipaddress.ip_network(cidr))
    assert key_bytes(ipaddress.ip_network(cidr)) == bytes(key)
    assert key.prefixlen == prefixlen and bytes(key.addr) == ipaddress.IPv6Address(addr).packed
    assert network_of(bytes(key.addr), key.prefixlen) == ipaddress.ip_network(cidr)


def test_tunnel_mac_uses_the_last_four_bytes():
    assert tunnel_mac(ipaddress.ip_address("10.99.3.2")) == "02:0a:63:03:02:ff"
    assert tunnel_mac(ipaddress.ip_address("fd00::a:b0c:d0e")) == "02:0b:0c:0d:0e:ff"


def test_route_value_round_trip():
    route = Route(dst="10.1.0.0/16", nexthops=[NH, {**NH, "peer": "c", "underlay": "fd00::2", "vni": 7}])
    v = value_bytes(route, [slot_bytes(route.nexthops[0], 5, True), slot_bytes(route.nexthops[1], 6, False)])
    assert decode_value(RouteValue.from_buffer_copy(v)) == {
        "dst": "10.1.0.0/16",
        "nexthops": [
            {"underlay": "10.99.3.2", "vni": 100, "ifindex": 5, "healthy": True, "protocol": "vxlan"},
            {"underlay": "fd00::2", "vni": 7, "ifindex": 6, "healthy": False, "protocol": "vxlan"},
        ],
    }


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"routes": [{"dst": "10.1.0.1/16", "nexthops": [NH]}]}, "host bits"),
        ({"routes": [{"dst": "10.1.0.0/16", "nexthops": []}]}, "at least 1"),
        ({"routes": [{"dst": "10.1.0.0/16", "nexthops": [NH] * 2}]}, "listed twice"),
        ({"routes": [{"dst": "10.1.0.0/16", "nexthops": [{**NH, "vni": 1 << 24}]}]}, "less than or equal"),
        (
            {"routes": [{"dst": "10.1.0.0/16", "nexthops": [{**NH, "protocol": "gre"}]}]},
            "unknown protocol 'gre'",
        ),
        ({"routes": [{"dst": "10.1.0.0/16", "nexthops": [{**NH, "protocol": "none"}]}]}, "set 'device'"),
        ({"routes": [{"dst": "10.1.0.0/16", "nexthops": [NH]}] * 2}, "given twice"),
        ({"health": {"probe": "tcp"}}, "needs health.port"),
        ({"health": {"damping_reuse": 5}}, "damping_reuse"),
        ({"bogus": 1}, "Extra inputs"),
    ],
)
def test_bad_config_is_one_clear_line(section, message):
    with pytest.raises(pydantic.ValidationError) as exc:
        Config.model_validate(section)
    line = one_line(exc.value)
    assert message in line and "\n" not in line


def test_protocols_and_defaults():
    nh = Nexthop(**NH)
    assert nh.protocol is Protocol.VXLAN and nh.device_name == "sluice-vxlan"
    assert Nexthop(**NH, protocol="WireGuard", device="wg0").device_name == "wg0"
    assert [p.value for p in Protocol] == [1, 2, 3, 4, 5]  # the anchor's numbering


def test_encap_mtu():
    assert encap_mtu(1500, "vxlan", {4}) == 1450
    assert encap_mtu(1500, "vxlan", {4, 6}) == 1430
    assert encap_mtu(1500, "ipip", {4}) == 1480


@given(st.integers(0, 2**32 - 1), st.lists(st.integers(0, 2**32 - 1), min_size=2, max_size=4, unique=True))
def test_rendezvous_moves_only_the_removed_winners_flows(flow_hash, seeds):
    winner = seeds[rendezvous(flow_hash, seeds)]
    for gone in seeds:
        rest = [s for s in seeds if s != gone]
        if gone != winner:
            assert rest[rendezvous(flow_hash, rest)] == winner  # a flow only moves when its nexthop goes


def test_seed_depends_on_address_and_vni():
    a = mapped(ipaddress.ip_address("10.0.0.1"))
    assert nexthop_seed(a, 1) != nexthop_seed(a, 2)
    assert mix32(0) == 0 and mix32(1) != 1


def test_damping_rise_fall_and_flap_suppression():
    cfg = HealthConfig(rise=2, fall=2, damping_halflife=10, damping_suppress=2.5, damping_reuse=1.0)
    p = PeerState(cfg, stamp=0.0)
    assert p.feed(False, 1) is None and p.feed(False, 2) is False  # fall after 2
    assert p.feed(True, 3) is None and p.feed(True, 4) is True  # rise after 2
    assert p.feed(False, 5) is None and p.feed(False, 6) is False  # third flap: penalty > 2.5
    assert p.suppressed
    assert p.feed(True, 7) is None and p.feed(True, 8) is None  # held down while flapping
    assert p.feed(True, 30) is True  # the penalty decayed below reuse: restored
    assert not p.suppressed


def test_trace_detail_decoding():
    prefix = ipaddress.IPv6Address("::ffff:10.1.2.0").packed
    d0, d1 = int.from_bytes(prefix[:8], "little"), int.from_bytes(prefix[8:], "little")
    d2 = 120 | 2 << 8 | 0b10 << 12 | 1 << 16 | 2 << 20 | 2 << 24 | 100 << 32
    d = decode_detail([d0, d1, d2, 0 | 7 << 32], "encap")
    assert d == {
        "route": "10.1.2.0/24",
        "candidates": 2,
        "healthy_mask": 2,
        "chosen": 1,
        "why": "rendezvous hash over healthy",
        "protocol": "vxlan",
        "vni": 100,
        "set_key": 0,
        "redirect": 7,
    }
    assert decode_detail([0, 0, 0, 0], "miss") == {}


def test_routes_text_is_ip_route_style():
    nh = {
        "underlay": "10.0.0.2",
        "vni": 5,
        "protocol": "vxlan",
        "healthy": True,
        "peer": "b",
        "dev": "sluice-vxlan",
    }
    rows = [
        {"dst": "10.1.0.0/16", "nexthops": [nh], "unusable": {}},
        {"dst": "10.2.0.0/16", "nexthops": [nh, {**nh, "peer": "c", "healthy": False}], "unusable": {}},
        {
            "dst": "10.3.0.0/16",
            "nexthops": [],
            "unusable": {"via 10.0.0.9 peer g geneve": "tunnel:geneve: no"},
        },
    ]
    assert format_routes(rows) == (
        "10.1.0.0/16 via 10.0.0.2 peer b vxlan vni 5 dev sluice-vxlan\n"
        "10.2.0.0/16\n"
        "\tnexthop via 10.0.0.2 peer b vxlan vni 5 dev sluice-vxlan\n"
        "\tnexthop via 10.0.0.2 peer c vxlan vni 5 dev sluice-vxlan withdrawn\n"
        "10.3.0.0/16 unusable\n"
        "\tnexthop via 10.0.0.9 peer g geneve unusable: tunnel:geneve: no"
    )
