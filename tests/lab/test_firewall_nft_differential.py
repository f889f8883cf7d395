"""The firewall's policy decisions against nftables on random policies (IPv4 and IPv6 mixed).

Each seeded random policy is compiled for the datapath and translated into an equivalent nft
ruleset. Every probe (a TCP SYN, a UDP datagram or an ICMP echo from a client) is decided twice:
by fw_ingress through BPF_PROG_TEST_RUN, and by nftables on the prerouting hook of a real
namespace, where the frame arrives over a veth pair and a counter after the policy chain tells
whether it passed. The two must agree on every probe. IPv6 rules over IPv4-mapped space cannot
be written at all (the policy refuses them with one line), which is what kept the families apart.
"""

from __future__ import annotations

import ipaddress
import json
import os
import random
import socket
import struct
import subprocess
import time

import pytest

from sluice import lab as sl
from sluice.bpf.testrun import test_run
from sluice.plugins.firewall import frames
from sluice.plugins.firewall.policy import Policy, compile_policy
from sluice.plugins.firewall.testing import loaded
from tests.netlab import netns_pair

pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: namespaces, nftables and BPF"),
]

NEXT = -1
SOURCES = ["10.82.0.0/16", "fd00:82::/64"]
CLIENTS = {4: "10.82.1.10", 6: "fd00:82::10"}
TARGETS = {
    4: ["10.82.28.137", "10.82.16.5", "10.83.0.1", "192.0.2.10"],
    6: ["fd00:83::1", "fd00:83:0:1::7", "2001:db8::5", "::102:304"],
}
PREFIXES = {4: [0, 8, 16, 20, 24, 32], 6: [0, 8, 16, 32, 48, 64, 96, 120, 128]}
PORTS = [22, 53, 80, 443, 8080, 9022]
POLICIES, PROBES = 10, 60


def random_policy(rng: random.Random) -> Policy:
    rules = []
    for _ in range(rng.randint(1, 8)):
        rule = {"action": rng.choice(["allow", "deny"]), "proto": rng.choice(["any", "tcp", "udp", "icmp"])}
        if rng.random() < 0.8:
            family = rng.choice([4, 6])
            addr = ipaddress.ip_address(rng.choice(TARGETS[family]))
            rule["dst"] = str(ipaddress.ip_network((addr, rng.choice(PREFIXES[family])), strict=False))
        if rule["proto"] in ("tcp", "udp") and rng.random() < 0.6:
            lo = rng.choice(PORTS)
            rule["ports"] = lo if rng.random() < 0.5 else f"{lo}-{lo + rng.choice([0, 1, 100])}"
        rules.append(rule)
    network = {
        "name": "clients",
        "sources": SOURCES,
        "default": rng.choice(["allow", "deny"]),
        "rules": rules,
    }
    return Policy.model_validate({"networks": [network]})


def nft_ruleset(policy: Policy) -> str:
    """The policy as nftables says it: the first matching rule decides, then the default."""
    net = policy.networks[0]
    lines = []
    for r in net.rules:
        m = []
        if r.dst:
            d = ipaddress.ip_network(r.dst)
            m.append(f"{'ip' if d.version == 4 else 'ip6'} daddr {d}")
        if r.proto == "icmp":
            m.append("meta l4proto { icmp, ipv6-icmp }")
        elif r.proto != "any":
            m.append(f"meta l4proto {r.proto}")
        if r.ports is not None:
            lo, hi = r.port_range()
            m.append(f"th dport {lo}-{hi}" if lo != hi else f"th dport {lo}")
        lines.append(" ".join(m + ["accept" if r.action == "allow" else "drop"]))
    lines.append("accept" if net.default == "allow" else "drop")
    body = "\n    ".join(lines)
    return f"""
table inet diff {{
  counter seen {{}}
  counter passed {{}}
  chain pre {{
    type filter hook prerouting priority -10; policy accept;
    ip saddr {SOURCES[0]} counter name seen jump clients
    ip6 saddr {SOURCES[1]} counter name seen jump clients
  }}
  chain clients {{
    {body}
  }}
  chain after {{
    type filter hook prerouting priority 10; policy accept;
    ip saddr {SOURCES[0]} counter name passed
    ip6 saddr {SOURCES[1]} counter name passed
  }}
}}
"""


def ip_checksummed(frame: bytes) -> bytes:
    """frames.packet leaves the IPv4 header checksum 0; a real receiver drops that before netfilter."""
    if frame[12:14] != b"\x08\x00":
        return frame
    hdr = bytearray(frame[14:34])
    hdr[10:12] = b"\0\0"
    words = sum(struct.unpack("!10H", bytes(hdr)))
    words = (words >> 16) + (words & 0xFFFF)
    hdr[10:12] = struct.pack("!H", ~(words + (words >> 16)) & 0xFFFF)
    return frame[:14] + bytes(hdr) + frame[34:]


class Nft:
    """nftables in namespace ``b`` of a veth pair; frames are sent from ``a`` to b's MAC."""

    def __init__(self, pair):
        self.pair = pair
        link = json.loads(sl.run_ip("-n", pair.b, "-j", "link", "show", pair.ifname).stdout)[0]
        self.mac = bytes.fromhex(link["address"].replace(":", ""))
        self.sock = sl.netns_socket(pair.a, socket.AF_PACKET, socket.SOCK_RAW, 0)
        self.sock.bind((pair.ifname, 0))

    def nft(self, *args: str, stdin: str | None = None) -> str:
        proc = subprocess.run(
            ["ip", "netns", "exec", self.pair.b, "nft", *args], input=stdin, capture_output=True, text=True
        )
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    def load(self, ruleset: str) -> None:
        self.nft("flush", "ruleset")
        self.nft("-f", "-", stdin=ruleset)

    def counters(self) -> tuple[int, int]:
        out = json.loads(self.nft("-j", "list", "counters", "table", "inet", "diff"))
        c = {o["counter"]["name"]: o["counter"]["packets"] for o in out["nftables"] if "counter" in o}
        return c["seen"], c["passed"]

    def passes(self, frame: bytes) -> bool:
        seen, passed = self.counters()
        self.sock.send(self.mac + ip_checksummed(frame)[6:])
        deadline = time.monotonic() + 2
        while (now := self.counters())[0] == seen:
            assert time.monotonic() < deadline, "the probe never reached nftables"
            time.sleep(0.005)
        return now[1] > passed  # both counters see probes only: the link's own ND/MLD do not count


def probe(rng: random.Random, sport: int) -> tuple[str, bytes]:
    family = rng.choice([4, 6])
    dst = rng.choice(TARGETS[family])
    kind = rng.choice(["tcp", "udp", "icmp"])
    if kind == "icmp":
        frame = frames.echo(CLIENTS[family], dst, ident=sport)
    else:
        dport = rng.choice(PORTS) + rng.choice([0, 0, 1])
        frame = frames.packet(CLIENTS[family], dst, 6 if kind == "tcp" else 17, sport, dport)
    return f"{kind} {CLIENTS[family]} -> {dst} ({frame.hex()[:0]}{len(frame)} B)", frame


def test_policy_decisions_agree_with_nftables(kernel_ready):
    disagreements = []
    with loaded(["fw_ingress"]) as (maps, fds), netns_pair() as pair:
        nft = Nft(pair)
        sport = 20000
        for seed in range(POLICIES):
            rng = random.Random(seed)
            policy = random_policy(rng)
            maps.apply(compile_policy(policy), {})
            maps.map("fw_sessions").clear()
            nft.load(nft_ruleset(policy))
            for _ in range(PROBES):
                sport += 1  # a fresh flow each time: no probe rides on another's session
                what, frame = probe(rng, sport)
                sluice = test_run(fds["fw_ingress"], frame, data_size_out=0).retval == NEXT
                if sluice != nft.passes(frame):
                    disagreements.append(f"seed {seed}: {what}: sluice {'passes' if sluice else 'drops'}")
        nft.nft("flush", "ruleset")
    assert not disagreements, f"{len(disagreements)} of {POLICIES * PROBES} disagree:\n" + "\n".join(
        disagreements[:20]
    )
