"""tunnel: reconcile makes the real LPM trie exactly the desired set, checked against a model."""

from __future__ import annotations

import ctypes as ct
import ipaddress
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sluice.plugins.tunnel.engine import Tunnel, diff_and_write, lookup, read_entries
from sluice.plugins.tunnel.model import (
    MAX_NEXTHOPS,
    Nexthop,
    Protocol,
    Route,
    RouteValue,
    decode_value,
    mapped,
    trie_key,
)
from sluice.plugins.tunnel.testing import compiled_tunnel

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(os.geteuid() != 0, reason="loading BPF programs needs root (CAP_BPF)"),
]

IFINDEX = {Protocol.VXLAN: 7, Protocol.NONE: 9}  # what the resolver hands out per protocol


def resolve(nh: Nexthop) -> int | str:
    return IFINDEX.get(nh.protocol, f"tunnel:{nh.protocol.label}: kernel has no {nh.protocol.label} device")


class CountingTrie:
    """The real map, counting the keys each write call touches (to prove unchanged ones are not)."""

    def __init__(self, trie):
        self.trie, self.written, self.deleted = trie, [], []

    def items(self):
        return self.trie.items()

    def update_batch(self, pairs):
        pairs = list(pairs)
        self.written += [k for k, _ in pairs]
        return self.trie.update_batch(pairs)

    def delete_batch(self, keys):
        keys = list(keys)
        self.deleted += keys
        return self.trie.delete_batch(keys)

    def get(self, key, default=None):
        return self.trie.get(key, default)


@pytest.fixture(scope="module")
def compiled(kernel_ready):
    yield from compiled_tunnel()


@pytest.fixture
def trie(compiled):
    m = compiled.raw("tunnel_routes")
    m.clear()
    yield m
    m.clear()
    m.close()


# ---- strategies: small pools so successive states overlap (unchanged, changed, stale) ----------

DSTS = [ipaddress.ip_network(n) for n in (
    "10.1.0.0/16", "10.1.2.0/24", "10.1.2.128/25", "10.2.0.0/16", "0.0.0.0/0", "192.168.7.7/32",
    "fd00:1::/64", "fd00:1::/48", "fd00:2::1/128", "::/0",
)]  # fmt: skip
NEXTHOPS = [
    Nexthop(peer="a", underlay="10.99.3.2", vni=100),
    Nexthop(peer="b", underlay="10.99.3.3", vni=100),
    Nexthop(peer="b", underlay="10.99.3.3", vni=200),
    Nexthop(peer="c", underlay="fd00:99:3::4", vni=300),
    Nexthop(peer="d", underlay="10.99.3.5", vni=1, protocol="geneve"),  # unusable here
    Nexthop(peer="e", underlay="10.99.3.6", protocol="none", device="veth9"),
]
routes_st = st.dictionaries(
    st.sampled_from(DSTS),
    st.lists(st.sampled_from(NEXTHOPS), min_size=1, max_size=MAX_NEXTHOPS, unique=True),
    max_size=len(DSTS),
).map(lambda d: [Route(dst=k, nexthops=tuple(v)) for k, v in d.items()])
health_st = st.dictionaries(st.sampled_from("abcde"), st.booleans(), max_size=3)


def model(routes: list[Route], health: dict[str, bool]) -> dict[bytes, dict]:
    """What the trie must hold, derived independently of the engine's rendering."""
    out = {}
    for r in routes:
        usable = [nh for nh in r.nexthops if nh.protocol in IFINDEX]
        if not usable:
            continue
        out[bytes(trie_key(r.dst))] = {
            "dst": str(r.dst),
            "nexthops": [
                {
                    "underlay": str(nh.underlay),
                    "vni": nh.vni,
                    "ifindex": IFINDEX[nh.protocol],
                    "healthy": health.get(nh.peer, True),
                    "protocol": nh.protocol.label,
                }
                for nh in usable
            ],
        }
    return out


def kernel_state(trie) -> dict[bytes, dict]:
    return {k: decode_value(RouteValue.from_buffer_copy(v)) for k, v in read_entries(trie).items()}


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(routes_st, health_st), min_size=1, max_size=6))
def test_reconcile_matches_model(trie, sequence):
    trie.clear()
    counting = CountingTrie(trie)
    tunnel = Tunnel(counting, resolve)
    for routes, health in sequence:
        before = kernel_state(trie)
        tunnel.health = dict(health)
        counting.written.clear()
        counting.deleted.clear()
        result = tunnel.replace_api_routes(routes)
        want = model(routes, health)
        assert kernel_state(trie) == want
        # stale removed, new added, changed rewritten, unchanged untouched
        assert set(counting.deleted) == set(before) - set(want)
        assert set(counting.written) == {k for k in want if before.get(k) != want[k]}
        assert result.removed == len(set(before) - set(want))
        assert result.added == len(set(want) - set(before))
        assert result.unchanged == sum(1 for k in want if before.get(k) == want[k])
        unusable_dsts = {str(r.dst) for r in routes if any(nh.protocol not in IFINDEX for nh in r.nexthops)}
        assert set(result.unusable) == unusable_dsts


def test_unusable_reason_names_the_feature(trie):
    tunnel = Tunnel(trie, resolve)
    result = tunnel.replace_api_routes([Route(dst="10.5.0.0/16", nexthops=[NEXTHOPS[4]])])
    assert result.unusable == {
        "10.5.0.0/16": {NEXTHOPS[4].describe(): "tunnel:geneve: kernel has no geneve device"}
    }
    assert read_entries(trie) == {}  # not written, but reported (never silently dropped)
    assert tunnel.status()["unusable"] == result.unusable


def test_lookup_is_longest_prefix_and_names_the_route(trie):
    tunnel = Tunnel(trie, resolve)
    tunnel.replace_api_routes(
        [
            Route(dst="10.1.0.0/16", nexthops=[NEXTHOPS[0]]),
            Route(dst="10.1.2.0/24", nexthops=[NEXTHOPS[1]]),
            Route(dst="fd00:1::/48", nexthops=[NEXTHOPS[3]]),
        ]
    )
    assert decode_value(lookup(trie, "10.1.2.9"))["dst"] == "10.1.2.0/24"
    assert decode_value(lookup(trie, "10.1.9.9"))["dst"] == "10.1.0.0/16"
    assert decode_value(lookup(trie, "fd00:1::5"))["dst"] == "fd00:1::/48"
    assert lookup(trie, "10.2.0.1") is None
    assert lookup(trie, "::ffff:10.1.2.9") is not None  # the v4-mapped form is the same address
    assert mapped(ipaddress.ip_address("10.1.2.9"))[:12] == bytes(10) + b"\xff\xff"


def test_health_withdraws_only_that_peers_nexthops(trie):
    tunnel = Tunnel(trie, resolve)
    tunnel.replace_api_routes(
        [
            Route(dst="10.1.0.0/16", nexthops=[NEXTHOPS[0], NEXTHOPS[1]]),
            Route(dst="10.2.0.0/16", nexthops=[NEXTHOPS[0]]),
            Route(dst="10.3.0.0/16", nexthops=[NEXTHOPS[3]]),
        ]
    )
    assert tunnel.set_health("a", False) == 2
    state = {v["dst"]: v for v in kernel_state(trie).values()}
    assert [nh["healthy"] for nh in state["10.1.0.0/16"]["nexthops"]] == [False, True]
    assert state["10.2.0.0/16"]["nexthops"][0]["healthy"] is False
    assert state["10.3.0.0/16"]["nexthops"][0]["healthy"] is True
    assert tunnel.set_health("a", False) == 0  # idempotent
    with pytest.raises(KeyError, match="no nexthop uses peer 'zz'"):
        tunnel.set_health("zz", False)


def test_restart_writes_nothing_when_the_trie_is_right(trie, tmp_path):
    routes = [Route(dst=d, nexthops=[NEXTHOPS[0]]) for d in DSTS[:4]]
    first = Tunnel(trie, resolve, tmp_path / "routes.json")
    first.replace_api_routes(routes)
    first.set_health("a", False)
    counting = CountingTrie(trie)
    second = Tunnel(counting, resolve, tmp_path / "routes.json")  # a new agent, same pins and state
    result = second.apply()
    assert counting.written == [] and counting.deleted == []
    assert result.unchanged == 4 and second.peer_health() == {"a": False}
    assert second.stats_slots == first.stats_slots == {"10.99.3.2|100|vxlan": 0}  # counters stay put


def test_stats_slots_follow_nexthops(trie):
    tunnel = Tunnel(trie, resolve)
    tunnel.replace_api_routes([Route(dst="10.1.0.0/16", nexthops=[NEXTHOPS[0], NEXTHOPS[1]])])
    assert sorted(tunnel.stats_slots.values()) == [0, 1]
    kept = tunnel.stats_slots["10.99.3.3|100|vxlan"]
    tunnel.replace_api_routes([Route(dst="10.1.0.0/16", nexthops=[NEXTHOPS[1], NEXTHOPS[2]])])
    assert tunnel.stats_slots["10.99.3.3|100|vxlan"] == kept  # unchanged nexthop, same counters
    assert "10.99.3.2|100|vxlan" not in tunnel.stats_slots  # gone: its slot is free again
    assert len(set(tunnel.stats_slots.values())) == 2


def test_an_edit_the_trie_cannot_hold_changes_nothing(trie, tmp_path):
    """The compiled trie holds 1024 routes: an edit beyond that is refused whole, and not kept
    (or saved) as desired state that every later apply, probe or restart would fail on."""
    tunnel = Tunnel(trie, resolve, tmp_path / "routes.json")
    fits = [Route(dst=f"10.{i >> 8}.{i & 255}.0/24", nexthops=[NEXTHOPS[0]]) for i in range(1024)]
    tunnel.replace_api_routes(fits)
    before = kernel_state(trie)
    extra = Route(dst="10.200.0.0/16", nexthops=[NEXTHOPS[0]])
    with pytest.raises(ValueError, match="nothing changed"):
        tunnel.put_route(extra)
    with pytest.raises(ValueError, match="nothing changed"):
        tunnel.set_config_routes([extra])
    with pytest.raises(ValueError, match="nothing changed"):
        tunnel.replace_api_routes([*fits, extra])
    assert kernel_state(trie) == before and extra.dst not in tunnel.routes()
    assert tunnel.set_health("a", False) == 1024  # later applies still work ...
    restarted = Tunnel(trie, resolve, tmp_path / "routes.json")
    assert restarted.apply().unchanged == 1024  # ... and so does a restart


def test_batch_and_per_key_paths_agree(trie, compiled):
    desired = {
        bytes(trie_key(ipaddress.ip_network(f"10.{i >> 8}.{i & 255}.0/24"))): bytes(ct.sizeof(RouteValue))
        for i in range(300)
    }
    diff_and_write(trie, desired, batch=False)
    assert read_entries(trie) == desired
    trie.clear()
    diff_and_write(trie, desired, batch=True)
    assert read_entries(trie) == desired
