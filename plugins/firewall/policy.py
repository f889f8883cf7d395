"""The firewall's policy model (config and runtime) and its compilation into map entries.

A policy is a list of networks. A network owns source CIDRs (IPv4 and IPv6) and an ordered list
of rules; the first rule that matches a new flow decides, else the network's default action.
A rule matches on destination (a CIDR, a hostname pattern, or anything), protocol and port or
port range. Hostname rules are enforced through the DNS proxy: the addresses of the answers the
clients receive become allows of that rule (see dns.py).

Compilation turns the rules of each network into longest-prefix-match entries: for every
destination prefix P named by a rule, the entry for P carries every rule whose CIDR contains P,
sorted by rule order. Whatever address a packet has, the longest prefix containing it then holds
exactly the CIDR rules that match it, so the datapath does one LPM lookup whatever the number of
rules.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Literal

import pydantic

Action = Literal["allow", "deny"]
Proto = Literal["any", "tcp", "udp", "icmp"]
PROTO_NUMBERS = {"any": 0, "tcp": 6, "udp": 17, "icmp": 1}
ACTIONS = {"allow": 0, "deny": 1}
ACTION_BYPASS = 2  # a management destination: passes without policy or session
BYPASS_NET = 0xFFFFFFFF  # the source "network" of management sources
RULE_SLOTS = 16  # fw_rules.slots in firewall.bpf.c
DNS_SLOTS = 4  # fw_dns_allow.slots
MAX_NETS = 1024  # fw_nets_* entries (id 0 means "no network")

_LABEL = r"(\*|[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?|\*?[a-z0-9_-]+\*?)"
_HOST_RE = re.compile(rf"^{_LABEL}(\.{_LABEL})*$")

Net = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_cidr(text: str) -> Net:
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise ValueError(f"{text!r} is not an IP address or CIDR") from None


V4_MAPPED = ipaddress.ip_network("::ffff:0:0/96")


def v4_mapped_error(text: str) -> str | None:
    """Why ``text`` cannot be a policy CIDR, when it is an IPv4-mapped IPv6 range (inside
    ::ffff:0:0/96). The datapath keys IPv4 as ::ffff:a.b.c.d in its 128-bit tries, so such a
    "IPv6" rule would apply to IPv4 traffic; nftables never matches IPv4 by an ip6 rule. Refused
    rather than translated: the rule's author meant one family, and we cannot tell which."""
    net = parse_cidr(text)
    if net.version == 6 and net.subnet_of(V4_MAPPED):
        v4 = ipaddress.ip_network((int(net.network_address) & 0xFFFFFFFF, max(net.prefixlen - 96, 0)))
        return f"{text} is an IPv4-mapped IPv6 range (inside ::ffff:0:0/96): write it as IPv4 ({v4})"
    return None


def mapped(net: Net) -> tuple[int, bytes]:
    """(prefixlen over 128 bits, 16-byte address): IPv4 as ::ffff:a.b.c.d, prefix + 96."""
    if net.version == 4:
        return net.prefixlen + 96, b"\0" * 10 + b"\xff\xff" + net.network_address.packed
    return net.prefixlen, net.network_address.packed


def addr16(addr: str | ipaddress.IPv4Address | ipaddress.IPv6Address) -> bytes:
    a = ipaddress.ip_address(addr) if isinstance(addr, str) else addr
    return mapped(ipaddress.ip_network(a))[1]


def parse_ports(value: int | str | None) -> tuple[int, int]:
    """``None`` → any; ``443``; ``"8000-8080"``."""
    if value is None or value == "" or value == "any":
        return 0, 65535
    if isinstance(value, int) and not isinstance(value, bool):
        lo = hi = value
    elif isinstance(value, str) and re.fullmatch(r"\d{1,5}(-\d{1,5})?", value.strip()):
        lo_s, _, hi_s = value.strip().partition("-")
        lo, hi = int(lo_s), int(hi_s or lo_s)
    else:
        raise ValueError(f"ports {value!r}: expected a port (443) or a range (8000-8080)")
    if not (1 <= lo <= hi <= 65535):
        raise ValueError(f"ports {value!r}: ports are 1..65535, low <= high")
    return lo, hi


def host_matches(pattern: str, name: str) -> bool:
    """``*`` stands for the characters of one label (``*.example.com`` matches ``a.example.com``
    but neither ``example.com`` nor ``a.b.example.com``); matching ignores case and a final dot."""
    p_labels = pattern.lower().rstrip(".").split(".")
    n_labels = name.lower().rstrip(".").split(".")
    if len(p_labels) != len(n_labels):
        return False
    for p, n in zip(p_labels, n_labels, strict=True):
        if "*" not in p:
            if p != n:
                return False
        elif not re.fullmatch(re.escape(p).replace(r"\*", "[^.]*"), n):
            return False
    return True


class Rule(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

    action: Action = "allow"
    dst: str | None = None  # CIDR or IP; with host unset and dst unset: any destination
    host: str | None = None  # hostname pattern: "api.example.com", "*.example.com"
    proto: Proto = "any"
    ports: int | str | None = None  # 443 or "8000-8080"; only with tcp or udp

    @pydantic.field_validator("dst")
    @classmethod
    def _dst(cls, v):
        if v is not None:
            parse_cidr(v)
        return v

    @pydantic.field_validator("host")
    @classmethod
    def _host(cls, v):
        if v is not None:
            v = v.strip().lower().rstrip(".")
            if not v or len(v) > 253 or not _HOST_RE.match(v):
                raise ValueError(f"host {v!r}: expected a DNS name, '*' standing for one label's characters")
        return v

    @pydantic.field_validator("ports")
    @classmethod
    def _ports(cls, v):
        parse_ports(v)
        return v

    @pydantic.model_validator(mode="after")
    def _combination(self):
        if self.dst is not None and self.host is not None:
            raise ValueError("a rule has dst or host, not both")
        if self.ports is not None and self.proto not in ("tcp", "udp"):
            raise ValueError(f"ports need proto tcp or udp (proto is {self.proto})")
        return self

    def port_range(self) -> tuple[int, int]:
        return parse_ports(self.ports)

    def describe(self) -> str:
        what = self.host or self.dst or "any"
        ports = f" port {self.ports}" if self.ports is not None else ""
        return f"{self.action} {self.proto} {what}{ports}"


def _refuse_v4_mapped(texts: list[str], what: str) -> None:
    for i, text in enumerate(texts, 1):
        why = v4_mapped_error(text)
        if why:
            raise ValueError(f"{what.format(i=i)}: {why}")


class Network(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

    name: str = pydantic.Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    sources: list[str] = pydantic.Field(min_length=1)
    default: Action = "deny"
    rules: list[Rule] = pydantic.Field(default_factory=list)

    @pydantic.field_validator("sources")
    @classmethod
    def _sources(cls, v):
        for s in v:
            parse_cidr(s)
        _refuse_v4_mapped(v, "source {i}")
        return v

    @pydantic.model_validator(mode="after")
    def _families_apart(self):
        for i, rule in enumerate(self.rules, 1):
            if rule.dst is not None and (why := v4_mapped_error(rule.dst)):
                raise ValueError(f"network {self.name}, rule {i} ({rule.describe()}): {why}")
        return self


class Policy(pydantic.BaseModel):
    """The whole policy: what the config's ``networks`` and ``management`` keys hold."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

    networks: list[Network] = pydantic.Field(default_factory=list)
    management: list[str] = pydantic.Field(default_factory=list)  # always bypasses the policy

    @pydantic.field_validator("management")
    @classmethod
    def _mgmt(cls, v):
        for s in v:
            parse_cidr(s)
        _refuse_v4_mapped(v, "management entry {i}")
        return v

    @pydantic.model_validator(mode="after")
    def _unique(self):
        names = [n.name for n in self.networks]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"network names must be unique: {', '.join(sorted(dup))}")
        if len(self.networks) >= MAX_NETS:
            raise ValueError(f"at most {MAX_NETS - 1} networks")
        seen: dict[Net, str] = {}
        for n in self.networks:
            for s in n.sources:
                net = parse_cidr(s)
                if net in seen and seen[net] != n.name:
                    raise ValueError(f"source {net} is in networks {seen[net]} and {n.name}")
                seen[net] = n.name
        return self

    def network(self, name: str) -> Network:
        for n in self.networks:
            if n.name == name:
                return n
        raise KeyError(
            f"no network {name!r} (networks: {', '.join(n.name for n in self.networks) or 'none'})"
        )

    def network_of(self, addr: str) -> tuple[int, Network] | None:
        """(id, network) whose sources contain ``addr`` by longest prefix, like the datapath."""
        a = ipaddress.ip_address(addr)
        if a.version == 6 and a.ipv4_mapped:
            a = a.ipv4_mapped
        best = None
        for i, n in enumerate(self.networks, 1):
            for s in n.sources:
                net = parse_cidr(s)
                if a.version == net.version and a in net and (best is None or net.prefixlen > best[0]):
                    best = (net.prefixlen, i, n)
        return (best[1], best[2]) if best else None


# ---- compilation ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Slot:
    """One rule as the datapath sees it (struct fw_slot)."""

    order: int  # 1-based position in the network; lower wins
    port_lo: int
    port_hi: int
    proto: int
    action: int


def rule_slot(order: int, rule: Rule) -> Slot:
    lo, hi = rule.port_range()
    return Slot(order, lo, hi, PROTO_NUMBERS[rule.proto], ACTIONS[rule.action])


@dataclass
class Compiled:
    """Map entries of one policy generation, as plain Python values."""

    sources: dict[tuple[int, bytes], int]  # (prefixlen/128, addr16) -> net id
    bypass: list[tuple[int, bytes]]
    nets: dict[int, int]  # net id -> default action
    dst: dict[tuple[int, int, bytes], list[Slot]]  # (net id, prefixlen/128, addr16) -> slots
    host_rules: dict[int, list[tuple[int, Rule]]]  # net id -> [(order, rule)] with a host pattern


def _any_destination() -> list[Net]:
    return [ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0")]


def compile_policy(policy: Policy, implicit: list[Rule] = ()) -> Compiled:
    """Map entries for ``policy``. ``implicit`` rules (the DNS proxy's own address) come first in
    every network, all with order 0. Raises ValueError when more rules overlap one prefix than a
    slot list holds."""
    out = Compiled(sources={}, bypass=[], nets={}, dst={}, host_rules={})
    management = [parse_cidr(c) for c in policy.management]
    out.bypass = [mapped(m) for m in management]
    # Management destinations are folded into every network's destination trie (and that of
    # network 0, sources in no network) as an order-0 slot, so the datapath needs no lookup of
    # its own for them; management sources map to BYPASS_NET in the source trie.
    bypass_rules = [(m, Slot(0, 0, 65535, 0, ACTION_BYPASS)) for m in management]
    for m in management:
        out.sources[mapped(m)] = BYPASS_NET
    _compile_prefixes(0, list(bypass_rules), out.dst, "(no network)")
    for net_id, network in enumerate(policy.networks, 1):
        out.nets[net_id] = ACTIONS[network.default]
        for s in network.sources:
            src = parse_cidr(s)
            inside_mgmt = any(src.version == m.version and src.subnet_of(m) for m in management)
            out.sources[mapped(src)] = BYPASS_NET if inside_mgmt else net_id
        numbered = [(0, r) for r in implicit] + list(enumerate(network.rules, 1))
        cidr_rules: list[tuple[Net, Slot]] = list(bypass_rules)
        for order, rule in numbered:
            if rule.host is not None:
                out.host_rules.setdefault(net_id, []).append((order, rule))
                continue
            targets = [parse_cidr(rule.dst)] if rule.dst else _any_destination()
            cidr_rules.extend((t, rule_slot(order, rule)) for t in targets)
        _compile_prefixes(net_id, cidr_rules, out.dst, network.name)
    return out


def _compile_prefixes(net_id: int, cidr_rules: list[tuple[Net, Slot]], dst: dict, where: str) -> None:
    # 0.0.0.0/0 is always present (maybe with no slots) so that an IPv4 packet never falls
    # through to an IPv6 prefix such as ::/0 that contains ::ffff:0:0/96 in the 128-bit trie.
    by_prefix: dict[tuple[int, int, int], list[Slot]] = {(4, 0, 0): []}
    for net, slot in cidr_rules:
        key = (net.version, int(net.network_address), net.prefixlen)
        by_prefix.setdefault(key, []).append(slot)
    # The covering rules of a prefix are found by walking up its supernets on integers (at most
    # 128 dictionary probes) instead of comparing all pairs: 100K disjoint rules compile in
    # linear time.
    for (version, addr, plen), own in by_prefix.items():
        bits = 32 if version == 4 else 128
        slots = list(own)
        for parent_len in range(plen - 1, -1, -1):
            mask = ((1 << parent_len) - 1) << (bits - parent_len)
            slots.extend(by_prefix.get((version, addr & mask, parent_len), ()))
        slots.sort(key=lambda s: s.order)
        net = ipaddress.ip_network((addr, plen)) if version == 4 else ipaddress.IPv6Network((addr, plen))
        if len(slots) > RULE_SLOTS:
            raise ValueError(
                f"network {where}: {len(slots)} rules apply to {net}; at most {RULE_SLOTS} may overlap one prefix"
            )
        mplen, maddr = mapped(net)
        dst[(net_id, mplen, maddr)] = slots


def host_slots(network: Network, qname: str) -> list[Slot]:
    """Slots of the network's hostname rules that match ``qname``, by order."""
    return [rule_slot(i, r) for i, r in enumerate(network.rules, 1) if r.host and host_matches(r.host, qname)]
