"""flowmon's pure-Python parts: config validation, drop-reason parsing, records, IPFIX layout."""

from __future__ import annotations

import json
import struct

import pydantic
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sluice.plugins.flowmon import ipfix
from sluice.plugins.flowmon.config import Config, FilterRule
from sluice.plugins.flowmon.drops import parse_reasons
from sluice.plugins.flowmon.export import Aggregates, JsonLines
from sluice.plugins.flowmon.monitor import _net16, interface_wanted, rule_struct
from sluice.plugins.flowmon.records import Flow, addr_bytes, addr_of, flag_names, qname_of

pytestmark = pytest.mark.unit


def test_defaults_validate():
    c = Config()
    assert c.interfaces == ["*"] and c.exclude_interfaces == ["lo"] and c.active_timeout_s == 5.0


@pytest.mark.parametrize(
    "section, fragment",
    [
        ({"sampling": 0}, "sampling"),
        ({"sampling": 1 << 32}, "sampling"),  # a u32 in the map: it must not wrap to 0 (capture nothing)
        ({"filters": [{"sampling": 1 << 32}]}, "sampling"),
        ({"max_flows": 3}, "max_flows"),
        ({"bogus": 1}, "bogus"),
        ({"filters": [{"cidr": "10.0.0.0/33"}]}, "not a CIDR"),
        ({"filters": [{"protocol": "tcpx"}]}, "unknown protocol"),
        ({"filters": [{"port": 70000}]}, "port"),
        ({"ipfix": [{"address": "host:0"}]}, "collector address"),
        ({"ipfix": [{"address": "h:1", "transport": "sctp"}]}, "transport"),
        ({"filters": [{}] * 9}, "filters"),
        ({"nats": {"url": "http://x:4222"}}, "url"),
        ({"nats": {"url": "nats://x:4222", "subject": "a b"}}, "subject"),
    ],
)
def test_bad_config_is_refused_with_the_reason(section, fragment):
    with pytest.raises(pydantic.ValidationError) as exc:
        Config(**section)
    assert fragment in str(exc.value)


def test_protocol_names_become_numbers():
    assert FilterRule(protocol="udp").protocol == 17 and FilterRule(protocol="58").protocol == 58


def test_drop_reasons_come_from_the_print_fmt():
    fmt = (
        "name: kfree_skb\nformat:\n\tfield:void * skbaddr;\toffset:8;\n\n"
        'print fmt: "reason: %s", __print_symbolic(REC->reason, { 2, "NOT_SPECIFIED" }, '
        '{ 3, "NO_SOCKET" }, { 12, "NETFILTER_DROP" })\n'
    )
    assert parse_reasons(fmt) == {2: "NOT_SPECIFIED", 3: "NO_SOCKET", 12: "NETFILTER_DROP"}
    assert parse_reasons("no print fmt here") == {}


def test_addresses_are_v4_mapped():
    assert addr_bytes("10.1.2.3") == bytes(10) + b"\xff\xff" + bytes([10, 1, 2, 3])
    assert str(addr_of(addr_bytes("10.1.2.3"))) == "10.1.2.3"
    assert str(addr_of(addr_bytes("fd00::1"))) == "fd00::1"


def test_qname_decoding_tolerates_truncation():
    assert qname_of(b"\x07allowed\x04test\x00\x00\x01") == "allowed.test"
    assert qname_of(b"\x07allowed\x04te") == "allowed"  # the cut label is dropped
    assert qname_of(b"\xc0\x0c") == ""  # a pointer: not a question name


def test_flag_names_include_ack_combinations():
    assert flag_names(0x12 | 0x100) == ["SYN", "ACK", "SYN-ACK"]


def test_cidr_masks_in_the_mapped_space():
    addr, mask = _net16("10.0.0.0/8")
    assert mask == b"\xff" * 12 + b"\xff" + bytes(3)
    assert addr == bytes(10) + b"\xff\xff\x0a" + bytes(3)
    assert _net16("::/0") == (bytes(16), bytes(16))
    r = rule_struct(FilterRule(cidr="fd00::/64", direction="egress", action="reject"))
    assert (r.direction, r.accept) == (2, 0) and bytes(r.mask) == b"\xff" * 8 + bytes(8)


def test_interface_globs():
    assert interface_wanted("eth0", ["*"], ["lo"]) and not interface_wanted("lo", ["*"], ["lo"])
    assert not interface_wanted("mgmt0", ["ingress0", "egress0"], [])


def flow(**kw) -> Flow:
    base = dict(src="10.0.0.1", dst="10.0.0.2", sport=1, dport=2, proto=17, packets=3, bytes=300)
    return Flow.make(**{**base, **kw})


def test_ipfix_template_and_data_records_parse_back():
    enc = ipfix.Encoder(domain=7)
    tmpl = enc.template_message(now=1000)
    version, length, export_time, seq, domain = ipfix.HEADER.unpack_from(tmpl)
    assert (version, length, export_time, seq, domain) == (10, len(tmpl), 1000, 0, 7)
    set_id, set_len = ipfix.SET_HEADER.unpack_from(tmpl, 16)
    assert set_id == 2 and set_len == len(tmpl) - 16
    tid, count = struct.unpack_from("!HH", tmpl, 20)
    assert (tid, count) == (256, len(ipfix.V4_ELEMENTS))
    msgs = enc.data_messages([flow(), flow(src="fd00::1", dst="fd00::2")], now=1000)
    assert len(msgs) == 2 and enc.sequence == 2
    rec = ipfix.TEMPLATE_V4.record.unpack_from(msgs[0], 20)
    names = [e.name for e in ipfix.V4_ELEMENTS]
    assert rec[names.index("sourceIPv4Address")] == bytes([10, 0, 0, 1])
    assert rec[names.index("packetDeltaCount")] == 3 and rec[names.index("octetDeltaCount")] == 300


def test_ipfix_elements_carry_what_iana_defines():
    enc = ipfix.Encoder()
    names = [e.name for e in ipfix.V4_ELEMENTS]
    assert "layer2OctetDeltaCount" not in names and "ipClassOfService" not in names
    # SYN|ACK plus flowmon's SYN-ACK combination bit (0x100), which IANA's 16 bits read as NS
    fwd = flow(proto=6, tcp_flags=0x112, dscp=46, ifindex=7, direction=0)
    out = flow(proto=6, tcp_flags=0x11, ifindex=9, direction=1)
    (msg,) = enc.data_messages([fwd, out], now=1)
    a = ipfix.TEMPLATE_V4.record.unpack_from(msg, 20)
    b = ipfix.TEMPLATE_V4.record.unpack_from(msg, 20 + ipfix.TEMPLATE_V4.record.size)
    col = names.index
    assert (a[col("tcpControlBits")], a[col("ipDiffServCodePoint")]) == (0x12, 46)
    assert (a[col("ingressInterface")], a[col("egressInterface")], a[col("flowDirection")]) == (7, 0, 0)
    assert (b[col("ingressInterface")], b[col("egressInterface")], b[col("flowDirection")]) == (0, 9, 1)
    assert [(e.id, e.length) for e in ipfix.V4_ELEMENTS if not e.enterprise][6:8] == [(1, 8), (2, 8)]


@given(st.integers(min_value=1, max_value=600))
def test_udp_messages_stay_under_the_mtu(n):
    msgs = ipfix.Encoder(max_message=1400).data_messages([flow(sport=i % 65536) for i in range(n)])
    assert all(len(m) <= 1400 for m in msgs)
    total = sum((len(m) - 20) // ipfix.TEMPLATE_V4.record.size for m in msgs)
    assert total == n


@pytest.mark.parametrize("bad", ["", "host:", "[fd00::1]:99999", "h:x"])
def test_bad_collector_addresses(bad):
    with pytest.raises(ValueError):
        ipfix.parse_address(bad)


def test_aggregate_labels_are_bounded():
    agg = Aggregates(max_interfaces=2)
    flows = [flow(ifindex=i, proto=p) for i in range(1, 6) for p in (6, 17, 99)]
    agg.add(flows, {i: f"if{i}" for i in range(1, 6)})
    b, _, f = agg.snapshot()
    assert {iface for _, iface in b} == {"if1", "if2", "other"}
    assert {proto for proto, _ in b} == {"tcp", "udp", "other"}
    assert sum(f.values()) == len(flows)


def test_flow_fields_round_trip():
    f = flow(src_mac="02:00:00:00:00:01", dns_qname="allowed.test", tcp_flags=0x12, ifindex=4, direction=1)
    d = f.as_dict({4: "eth0"})
    assert (d["src"], d["family"], d["src_mac"], d["dns_qname"]) == (
        "10.0.0.1",
        4,
        "02:00:00:00:00:01",
        "allowed.test",
    )
    assert (d["interface"], d["direction"], d["tcp_flags_names"]) == ("eth0", "egress", ["SYN", "ACK"])
    with pytest.raises(TypeError):
        Flow.make("10.0.0.1", "10.0.0.2", 1, 2, 17, colour="red")


def test_json_lines(tmp_path):
    out = tmp_path / "f.jsonl"
    sink = JsonLines(str(out), lambda: {1: "lo"})
    sink.export([flow(ifindex=1), flow(proto=1, sport=8)])
    sink.close()
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert lines[0]["interface"] == "lo" and lines[1]["icmp_type"] == 8


def test_flows_drops_has_one_row_per_flow_and_reason():
    from sluice.plugins.flowmon.cli import _drop_rows

    def rec(dport, reason, n):
        return dict(flow(dport=dport).as_dict(), drop_packets=n, drop_bytes=10 * n, drop_reason=reason)

    recent = [
        rec(1, "NO_SOCKET", 1),
        rec(2, "NETFILTER_DROP", 2),
        rec(1, "NO_SOCKET", 3),
        rec(1, "TCP_CSUM", 1),
    ]
    recent.append(flow(dport=3).as_dict())  # no drops: no row
    rows = [(r["dport"], r["drop_reason"], r["drop_packets"], r["drop_bytes"]) for r in _drop_rows(recent)]
    assert rows == [(2, "NETFILTER_DROP", 2, 20), (1, "NO_SOCKET", 4, 40), (1, "TCP_CSUM", 1, 10)]
