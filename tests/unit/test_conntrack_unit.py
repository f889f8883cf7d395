"""conntrack's pure-Python parts: GC interval rule, circuit breaker, NAT cache, tuple and netlink
message parsing, config validation."""

from __future__ import annotations

import ipaddress
import struct

import pydantic
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sluice.plugins.conntrack import Config
from sluice.plugins.conntrack.gc import GcSettings, next_interval
from sluice.plugins.conntrack.host import (
    CircuitBreaker,
    HostConn,
    NatCache,
    parse_message,
    parse_tuple,
    sampler_filter,
)
from sluice.sessions import FlowTuple

pytestmark = pytest.mark.unit
S = GcSettings(initial_interval=300, min_interval=10, max_interval=43200)


def ft(src, dst, sport, dport, proto=17):
    return FlowTuple(ipaddress.ip_address(src), ipaddress.ip_address(dst), sport, dport, proto)


@pytest.mark.parametrize(
    ("current", "deleted", "expected"),
    [
        (300, 0, 450),  # under 5 %: x1.5
        (300, 49, 450),
        (300, 100, 300),  # 5..25 %: unchanged
        (300, 600, 120),  # 60 %: x(1 - 0.6)
        (12, 900, 10),  # floor
        (40000, 0, 43200),  # cap
    ],
)
def test_gc_interval_rule(current, deleted, expected):
    assert next_interval(current, deleted, 1000, S) == pytest.approx(expected)


def test_circuit_breaker_trips_above_the_limit_and_recovers():
    now = [0.0]
    b = CircuitBreaker(500, clock=lambda: now[0])
    now[0] = 1.0
    b.add(400)
    assert b.tick() is None and b.ewma == 400
    now[0] = 2.0
    b.add(5000)  # EWMA 0.2*5000 + 0.8*400 = 1320 > 500
    rate = b.tick()
    assert b.ewma == pytest.approx(1320) and rate == pytest.approx(500 / 1320 * 0.95)
    assert b.throttles == 1
    # Sampled counts stand for 1/rate events: the same host rate keeps the EWMA where it is.
    now[0] = 3.0
    b.add(int(1320 * rate))
    assert b.tick() is None or b.rate <= rate
    for i in range(4, 30):  # the storm ends: the rate doubles back to 1
        now[0] = float(i)
        b.tick()
    assert b.rate == 1.0


def test_sampler_filter_is_four_classic_bpf_instructions():
    prog = sampler_filter(0.25)
    insns = [struct.unpack_from("=HBBI", prog, i * 8) for i in range(len(prog) // 8)]
    assert insns[0] == (0x20, 0, 0, 0xFFFFF000 + 56)  # ld random
    assert insns[1] == (0x25, 1, 0, 0x40000000 - 1)  # jgt threshold -> drop
    assert insns[2][3] == 0xFFFFFFFF and insns[3][3] == 0


def test_nat_cache_lookup_claims_and_orphans_expire():
    now = [0.0]
    cache = NatCache(size=2, orphan_timeout=120, clock=lambda: now[0])
    orig = ft("10.0.0.1", "10.0.0.9", 4000, 80)
    dnat = HostConn(orig, ft("10.0.0.5", "10.0.0.1", 8080, 4000))
    plain = HostConn(ft("10.0.0.1", "10.0.0.2", 1, 2), ft("10.0.0.2", "10.0.0.1", 2, 1))
    assert cache.add(dnat) and not cache.add(plain)
    assert cache.lookup(ft("10.0.0.1", "10.0.0.5", 4000, 8080)).reply.sport == 8080  # post-NAT tuple
    other = HostConn(ft("10.0.0.3", "10.0.0.9", 1, 80), ft("10.0.0.5", "10.0.0.3", 8080, 1))
    cache.add(other)
    now[0] = 121
    assert cache.expire() == 1  # `other` was never asked for
    assert cache.lookup(orig) is not None and cache.orphans == 1
    cache.destroyed(dnat)  # claimed: goes at once
    assert cache.lookup(orig) is None
    for i in range(3):  # LRU bound
        cache.add(HostConn(ft("10.1.0.1", "10.0.0.9", i, 80), ft("10.0.0.5", "10.1.0.1", 8080, i)))
    assert len(cache) == 2 and cache.evicts == 1


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("udp 10.0.0.1:5000 10.0.0.2:53", ft("10.0.0.1", "10.0.0.2", 5000, 53)),
        ("tcp [fd00::1]:40000 [fd00::2]:80", ft("fd00::1", "fd00::2", 40000, 80, 6)),
        ("10.0.0.1:5000-10.0.0.2:53/udp", ft("10.0.0.1", "10.0.0.2", 5000, 53)),
    ],
)
def test_parse_tuple(text, want):
    assert parse_tuple(text) == want


@pytest.mark.parametrize("text", ["", "udp 10.0.0.1", "bogus 1.2.3.4:1 5.6.7.8:2", "udp 1.2.3.4:99999 5.6.7.8:1",
                                  "udp 1.2.3.4:1 fd00::1", "udp x:1 y:2"])  # fmt: skip
def test_parse_tuple_rejects_with_one_line(text):
    with pytest.raises(ValueError) as e:
        parse_tuple(text)
    assert "\n" not in str(e.value)


def nla(kind: int, payload: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(payload), kind) + payload
    return raw + b"\0" * (-len(raw) % 4)


def tuple_attr(kind, src, dst, sport, dport, proto):
    ip = nla(1, nla(1, bytes(map(int, src.split(".")))) + nla(2, bytes(map(int, dst.split(".")))))
    pr = nla(2, nla(1, bytes([proto])) + nla(2, struct.pack("!H", sport)) + nla(3, struct.pack("!H", dport)))
    return nla(kind | 0x8000, ip + pr)


def test_parse_message_reads_both_tuples_and_status():
    body = b"\x02\x00\x00\x00" + tuple_attr(1, "10.0.0.1", "10.0.0.9", 4000, 80, 6)
    body += tuple_attr(2, "10.0.0.5", "10.0.0.1", 8080, 4000, 6) + nla(3, struct.pack("!I", 0x6))
    conn = parse_message(body, 0, len(body))
    assert conn.orig == ft("10.0.0.1", "10.0.0.9", 4000, 80, 6) and conn.natted and conn.status == 6
    assert "[UNREPLIED]" not in conn.line() and "[ASSURED]" in conn.line()


@given(st.binary(max_size=200))
def test_parse_message_never_crashes_on_garbage(data):
    try:
        parse_message(data, 0, len(data))
    except (ValueError, IndexError):
        pass


@pytest.mark.parametrize(
    "section",
    [
        {"lifetimes": {"tcp_syn": 0}},
        {"gc": {"min_interval": 100, "max_interval": 10}},
        {"tcp_table_size": 1},
        {"tenant_tables": [-1]},
        {"directions": ["sideways"]},
        {"unknown": 1},
    ],
)
def test_bad_config_is_rejected(section):
    with pytest.raises(pydantic.ValidationError):
        Config(**section)
