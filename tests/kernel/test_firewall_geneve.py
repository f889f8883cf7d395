"""GENEVE appliance mode through BPF_PROG_TEST_RUN: real GENEVE frames in, the returned frames
checked byte for byte, flow metadata recorded, malformed option chains failing closed."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from sluice.bpf.testrun import test_run
from sluice.plugins.firewall import frames
from sluice.plugins.firewall.maps import SETTINGS, tunnel_dict
from sluice.plugins.firewall.policy import Policy, compile_policy
from sluice.plugins.firewall.testing import loaded

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(os.geteuid() != 0, reason="loading BPF programs needs root (CAP_BPF, CAP_NET_ADMIN)"),
]

NEXT, DROP, REDIRECT = -1, 2, 7
SRC = Path(__file__).resolve().parents[2] / "plugins" / "firewall" / "firewall.bpf.c"
CLIENT, SERVER, CLIENT6, SERVER6 = "10.1.0.5", "10.2.0.7", "fd00:1::5", "fd00:2::7"
POLICY = Policy.model_validate(
    {
        "networks": [
            {
                "name": "vpc",
                "sources": ["10.1.0.0/16", "fd00:1::/64"],
                "rules": [
                    {"proto": "tcp", "dst": "10.2.0.0/16", "ports": 443},
                    {"proto": "tcp", "dst": "fd00:2::/64", "ports": 443},
                ],
            }
        ]
    }
)


@pytest.fixture(scope="module")
def gw(kernel_ready):
    with loaded(["fw_geneve"]) as (maps, fds):
        maps.apply(compile_policy(POLICY), {})
        yield maps, fds["fw_geneve"]


@pytest.fixture(autouse=True)
def fresh(gw):
    maps, _ = gw
    maps.map("fw_sessions").clear()
    maps.map("fw_geneve_flows").clear()
    maps.init_settings({name: s.default for name, s in SETTINGS.items()})


def run(gw, frame: bytes):
    r = test_run(gw[1], frame)
    return r.retval, r.data_out


def inner(src, dst, sport, dport, flags="S") -> bytes:
    return frames.packet(src, dst, 6, sport, dport, flags)[14:]


@pytest.mark.parametrize(("client", "server"), [(CLIENT, SERVER), (CLIENT6, SERVER6)])
def test_allowed_flow_returned_byte_for_byte(gw, client, server):
    syn = frames.geneve(inner(client, server, 40000, 443))
    verdict, out = run(gw, syn)
    assert verdict == REDIRECT
    assert out == frames.geneve_returned(syn)  # options, VNI, ports and inner packet kept verbatim
    # the server's answer comes through the load balancer too: a reply of the session
    syn_ack = frames.geneve(inner(server, client, 443, 40000, "SA"), sport=55556)
    verdict, out = run(gw, syn_ack)
    assert verdict == REDIRECT and out == frames.geneve_returned(syn_ack)
    [(key, value)] = list(gw[0].sessions())
    assert list(value.packets) == [1, 1] and value.tcp_state == 2


def test_flow_metadata_recorded(gw):
    run(gw, frames.geneve(inner(CLIENT, SERVER, 40001, 443), vni=0xABCDE))
    [(_, tunnel)] = list(gw[0].map("fw_geneve_flows").items())
    meta = tunnel_dict(tunnel)
    assert meta["tunnel"] == "geneve" and meta["vni"] == 0xABCDE
    assert meta["flow_cookie"] == frames.AWS_OPTIONS[:8].hex()
    assert (meta["outer_src"], meta["outer_dst"]) == (frames.LB_IP, frames.APPLIANCE_IP)
    assert meta["outer_src_mac"] == frames.LB_MAC.hex(":") and (meta["outer_sport"], meta["outer_dport"]) == (
        55555,
        6081,
    )


def test_denied_and_unsolicited_inner_packets_dropped(gw):
    before = gw[0].counters()["redirected"]
    assert run(gw, frames.geneve(inner(CLIENT, SERVER, 40002, 80)))[0] == DROP  # no rule for port 80
    assert run(gw, frames.geneve(inner(SERVER, CLIENT, 443, 40003, "SA")))[0] == DROP  # toward a client
    assert gw[0].counters()["redirected"] == before


def test_not_geneve_is_left_alone(gw):
    assert run(gw, frames.packet(frames.LB_IP, frames.APPLIANCE_IP, 17, 5555, 53))[0] == NEXT


@pytest.mark.parametrize(
    "options,optlen",
    [
        (frames.AWS_OPTIONS, 8),  # declared shorter than the options
        (frames.AWS_OPTIONS, 10),  # declared longer: the inner header is read as an option
        (frames.AWS_OPTIONS[:-4], None),  # the last option's length runs past the option space
        (b"\x01\x08\x01\x1f", None),  # an option claiming 124 bytes of data
    ],
)
def test_broken_option_lengths_fail_closed(gw, options, optlen):
    frame = frames.geneve(inner(CLIENT, SERVER, 40004, 443), options=options, optlen=optlen)
    assert run(gw, frame)[0] == DROP


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    options=st.binary(max_size=64), optlen=st.one_of(st.none(), st.integers(0, 63)), cut=st.integers(0, 120)
)
def test_random_options_never_return_a_denied_packet(gw, options, optlen, cut):
    gw[0].set_setting("drop-unmatched-sources", 1)  # a mis-framed inner packet has some other source
    frame = frames.geneve(inner(CLIENT, SERVER, 40005, 80), options=options, optlen=optlen)
    frame = frame[: len(frame) - cut] if cut < len(frame) - 14 else frame
    try:
        verdict, _ = run(gw, frame)
    except OSError as exc:
        assume(exc.errno != errno.EINVAL)
        raise
    assert verdict in (DROP, NEXT)
