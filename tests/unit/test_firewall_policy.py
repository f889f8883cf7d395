"""The firewall's pure-Python parts: policy model, compilation, DNS wire parsing, config."""

from __future__ import annotations

import struct

import pydantic
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sluice.plugins.firewall import dnswire
from sluice.plugins.firewall.config import Config
from sluice.plugins.firewall.policy import (
    Policy,
    Rule,
    compile_policy,
    host_matches,
    mapped,
    parse_cidr,
    parse_ports,
)

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("pattern", "name", "ok"),
    [
        ("api.example.com", "api.example.com", True),
        ("api.example.com", "API.Example.com.", True),
        ("*.example.com", "a.example.com", True),
        ("*.example.com", "example.com", False),
        ("*.example.com", "a.b.example.com", False),
        ("api-*.example.com", "api-eu.example.com", True),
        ("api-*.example.com", "web.example.com", False),
    ],
)
def test_host_patterns(pattern, name, ok):
    assert host_matches(pattern, name) is ok


@pytest.mark.parametrize(
    ("value", "expected"), [(None, (0, 65535)), (443, (443, 443)), ("8000-8080", (8000, 8080))]
)
def test_ports(value, expected):
    assert parse_ports(value) == expected


@pytest.mark.parametrize("value", [0, 70000, "80-70", "http", "1-2-3", True])
def test_bad_ports(value):
    with pytest.raises(ValueError):
        parse_ports(value)


@pytest.mark.parametrize(
    "rule",
    [
        {"dst": "10.0.0.0/8", "host": "a.test"},
        {"proto": "icmp", "ports": 80},
        {"dst": "10.0.0.300"},
        {"host": "bad..name"},
        {"action": "reject"},
        {"proto": "sctp"},
        {"unknown": 1},
    ],
)
def test_bad_rules_rejected(rule):
    with pytest.raises(pydantic.ValidationError):
        Rule.model_validate(rule)


def test_overlapping_sources_rejected():
    with pytest.raises(pydantic.ValidationError, match="in networks a and b"):
        Policy.model_validate(
            {"networks": [{"name": "a", "sources": ["10.0.0.0/8"]}, {"name": "b", "sources": ["10.0.0.0/8"]}]}
        )


def test_mapped_keys():
    assert mapped(parse_cidr("10.1.0.0/16")) == (112, bytes(10) + b"\xff\xff" + bytes([10, 1, 0, 0]))
    assert mapped(parse_cidr("fd00::/8"))[0] == 8


def test_compile_inherits_covering_rules_in_order():
    policy = Policy.model_validate(
        {
            "networks": [
                {
                    "name": "n",
                    "sources": ["10.0.0.0/8"],
                    "rules": [
                        {"action": "deny", "dst": "10.2.0.0/16"},
                        {"proto": "tcp", "dst": "10.2.3.4", "ports": 80},
                        {"proto": "udp"},  # any destination, both families
                        {"host": "a.test"},
                    ],
                }
            ]
        }
    )
    c = compile_policy(policy, [Rule(proto="udp", dst="10.0.0.1", ports=53)])
    host = c.dst[(1, *mapped(parse_cidr("10.2.3.4/32")))]
    assert [s.order for s in host] == [1, 2, 3]  # own rule, its /16 parent, and the any rule
    assert [s.order for s in c.dst[(1, *mapped(parse_cidr("10.0.0.1/32")))]] == [0, 3]  # implicit first
    assert [s.order for s in c.dst[(1, *mapped(parse_cidr("::/0")))]] == [3]
    assert [s.order for s in c.dst[(1, *mapped(parse_cidr("0.0.0.0/0")))]] == [3]
    assert 4 not in {s.order for slots in c.dst.values() for s in slots}  # hostname rules: DNS only


def test_ipv6_any_rule_never_reaches_ipv4():
    policy = Policy.model_validate(
        {"networks": [{"name": "n", "sources": ["::/0"], "rules": [{"dst": "::/0"}]}]}
    )
    c = compile_policy(policy)
    assert c.dst[(1, *mapped(parse_cidr("0.0.0.0/0")))] == []  # v4 packets stop here, no slots


def test_too_many_overlapping_rules_is_an_error():
    rules = [{"proto": "tcp", "dst": "10.0.0.0/8", "ports": p} for p in range(1, 20)]
    policy = Policy.model_validate({"networks": [{"name": "n", "sources": ["10.0.0.0/8"], "rules": rules}]})
    with pytest.raises(ValueError, match="19 rules apply to 10.0.0.0/8"):
        compile_policy(policy)


def test_network_of_longest_prefix():
    policy = Policy.model_validate(
        {
            "networks": [
                {"name": "wide", "sources": ["10.0.0.0/8"]},
                {"name": "narrow", "sources": ["10.1.0.0/16"]},
            ]
        }
    )
    assert policy.network_of("10.1.2.3")[1].name == "narrow"
    assert policy.network_of("10.2.2.3")[1].name == "wide"
    assert policy.network_of("::ffff:10.1.2.3")[1].name == "narrow"
    assert policy.network_of("192.0.2.1") is None


# ---- config ----


def test_config_defaults_and_presets():
    cfg = Config()
    assert cfg.interface == "ingress0" and cfg.sizes()["sessions"] == 524288
    small = Config(map_preset="test", map_sizes={"sessions": 100})
    assert small.sizes()["sessions"] == 100 and "-DFW_MAX_SESSIONS=100" in small.cflags()


@pytest.mark.parametrize(
    "section",
    [
        {"settings": {"nosuch": 1}},
        {"settings": {"audit-mode": -1}},
        {"map_sizes": {"audit_pages": 3}},
        {"dns": {"listen": ["10.0.0.0/24"]}},
        {"dns": {"deny": "drop"}},
        {"networks": [{"name": "a", "sources": []}]},
        {"surprise": True},
    ],
)
def test_bad_config_rejected(section):
    with pytest.raises(pydantic.ValidationError):
        Config.model_validate(section)


# ---- DNS wire format ----


def _name(n: str) -> bytes:
    return b"".join(bytes([len(p)]) + p.encode() for p in n.split(".")) + b"\0"


def _rr(name_ptr: bytes, rtype: int, ttl: int, rdata: bytes) -> bytes:
    return name_ptr + struct.pack("!HHIH", rtype, 1, ttl, len(rdata)) + rdata


def test_cname_chain_and_ttl():
    q = _name("www.test") + struct.pack("!HH", 1, 1)
    answers = [
        _rr(b"\xc0\x0c", 5, 30, _name("edge.test")),
        _rr(_name("edge.test"), 5, 10, _name("host.test")),
        _rr(_name("host.test"), 1, 60, bytes([192, 0, 2, 1])),
        _rr(_name("elsewhere.test"), 1, 60, bytes([192, 0, 2, 9])),  # not on the chain: ignored
    ]
    msg = struct.pack("!HHHHHH", 7, 0x8180, 1, len(answers), 0, 0) + q + b"".join(answers)
    m = dnswire.parse(msg)
    addrs, chain = dnswire.resolve_chain(m, "www.test")
    assert chain == ["www.test", "edge.test", "host.test"]
    assert addrs == {"192.0.2.1": 10}  # the shortest TTL along the chain


def test_error_reply_keeps_id_and_question():
    query = struct.pack("!HHHHHH", 0xBEEF, 0x0100, 1, 0, 0, 0) + _name("x.test") + struct.pack("!HH", 1, 1)
    reply = dnswire.parse(dnswire.error_reply(query, dnswire.parse(query), 5))
    assert (
        reply.id == 0xBEEF
        and reply.is_response
        and reply.rcode == 5
        and reply.questions == [("x.test", 1, 1)]
    )


def test_compression_loop_rejected():
    msg = struct.pack("!HHHHHH", 1, 0, 1, 0, 0, 0) + b"\xc0\x0c" + struct.pack("!HH", 1, 1)
    with pytest.raises(dnswire.DnsError):
        dnswire.parse(msg)


@given(st.binary(max_size=300))
def test_parse_never_raises_anything_but_dns_error(data):
    try:
        dnswire.parse(data)
    except dnswire.DnsError:
        pass


def test_management_is_folded_into_the_tries():
    from sluice.plugins.firewall.policy import ACTION_BYPASS, BYPASS_NET

    policy = Policy.model_validate(
        {"management": ["10.9.0.0/16"], "networks": [{"name": "n", "sources": ["10.0.0.0/8", "10.9.1.0/24"]}]}
    )
    c = compile_policy(policy)
    assert c.sources[mapped(parse_cidr("10.9.0.0/16"))] == BYPASS_NET
    assert c.sources[mapped(parse_cidr("10.9.1.0/24"))] == BYPASS_NET  # a network source inside management
    assert c.sources[mapped(parse_cidr("10.0.0.0/8"))] == 1
    for net_id in (0, 1):  # sources in no network, and the network
        [slot] = c.dst[(net_id, *mapped(parse_cidr("10.9.0.0/16")))]
        assert (slot.order, slot.action, slot.port_lo, slot.port_hi) == (0, ACTION_BYPASS, 0, 65535)


def test_ttls_capped_for_the_client():
    q = _name("www.test") + struct.pack("!HH", 1, 1)
    answers = [
        _rr(b"\xc0\x0c", 5, 30, _name("host.test")),
        _rr(_name("host.test"), 1, 90000, bytes([192, 0, 2, 1])),
    ]
    msg = struct.pack("!HHHHHH", 7, 0x8180, 1, len(answers), 0, 0) + q + b"".join(answers)
    capped = dnswire.parse(dnswire.cap_ttls(msg, dnswire.parse(msg), 60))
    assert [r.ttl for r in capped.answers] == [30, 60]


# ---- IPv4-mapped IPv6 ranges: the datapath keys IPv4 that way, so they are refused ----


@pytest.mark.parametrize(
    "where",
    [
        {"rules": [{"action": "deny", "proto": "tcp", "dst": "::ffff:10.82.16.0/116"}]},
        {"rules": [{"action": "allow", "dst": "::ffff:0:0/96"}]},
        {"rules": [{"action": "allow", "dst": "::ffff:10.1.2.3"}]},
        {"sources": ["::ffff:10.82.0.0/112"]},
    ],
)
def test_v4_mapped_cidrs_refused_naming_the_rule(where):
    network = {"name": "clients", "sources": ["10.82.0.0/16"], **where}
    with pytest.raises(pydantic.ValidationError, match="IPv4-mapped IPv6 range") as err:
        Policy.model_validate({"networks": [network]})
    assert "write it as IPv4" in str(err.value)
    if "rules" in where:
        assert "network clients, rule 1" in str(err.value)


def test_v4_mapped_management_refused():
    with pytest.raises(pydantic.ValidationError, match="management entry 1"):
        Policy.model_validate({"management": ["::ffff:10.9.0.0/120"]})


@pytest.mark.parametrize("cidr", ["::/0", "::/8", "::ffff:0:0/95", "64:ff9b::/96", "::1.2.3.4"])
def test_ipv6_ranges_around_v4_mapped_space_accepted(cidr):
    Policy.model_validate({"networks": [{"name": "c", "sources": ["10.0.0.0/8"], "rules": [{"dst": cidr}]}]})
