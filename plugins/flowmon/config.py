"""The ``[plugins.flowmon]`` section."""

from __future__ import annotations

import ipaddress
from typing import Literal

import pydantic

from sluice.plugins.flowmon.records import PROTOCOL_NUMBERS

MAX_RULES = 8  # FLOWMON_MAX_RULES in flowmon.bpf.c


class FilterRule(pydantic.BaseModel):
    """Which packets to capture. Rules are tried in order; the first match decides. With rules
    configured, packets no rule matches are not captured."""

    model_config = pydantic.ConfigDict(extra="forbid")
    cidr: str = "::/0"  # one end of the flow is in it (IPv4 or IPv6)
    peer: str = "::/0"  # ... and the other end in this one
    protocol: str | int = 0  # name (tcp, udp, icmp, icmp6) or number; 0: any
    port: int = pydantic.Field(0, ge=0, le=65535)  # either side
    sport: int = pydantic.Field(0, ge=0, le=65535)
    dport: int = pydantic.Field(0, ge=0, le=65535)
    direction: Literal["any", "ingress", "egress"] = "any"
    action: Literal["accept", "reject"] = "accept"
    sampling: int = pydantic.Field(0, ge=0, le=0xFFFFFFFF)  # 0: the global rate (a u32 in the map)

    @pydantic.field_validator("cidr", "peer")
    @classmethod
    def _network(cls, v: str) -> str:
        try:
            ipaddress.ip_network(v, strict=False)
        except ValueError as exc:
            raise ValueError(f"not a CIDR: {v!r}") from exc
        return v

    @pydantic.field_validator("protocol")
    @classmethod
    def _protocol(cls, v: str | int) -> int:
        if isinstance(v, int) or (isinstance(v, str) and v.isdigit()):
            n = int(v)
            if not 0 <= n <= 255:
                raise ValueError(f"protocol number {n} outside 0..255")
            return n
        if v not in PROTOCOL_NUMBERS:
            raise ValueError(f"unknown protocol {v!r}: use {', '.join(PROTOCOL_NUMBERS)} or a number")
        return PROTOCOL_NUMBERS[v]


class IpfixCollector(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    address: str  # host:port or [v6]:port
    transport: Literal["udp", "tcp"] = "udp"
    template_refresh_s: float = pydantic.Field(60.0, gt=0)
    observation_domain: int = pydantic.Field(1, ge=0, le=0xFFFFFFFF)

    @pydantic.field_validator("address")
    @classmethod
    def _address(cls, v: str) -> str:
        from sluice.plugins.flowmon.ipfix import parse_address

        parse_address(v)
        return v


class NatsTarget(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    url: str = pydantic.Field(pattern=r"^(nats|tls)://")  # nats://host:4222
    subject: str = pydantic.Field("sluice.flows", pattern=r"^[A-Za-z0-9_.\-]+$")
    batch: int = pydantic.Field(500, ge=1, le=10_000)  # flows per message (JSON lines)


class Config(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    interfaces: list[str] = ["*"]  # shell globs of interface names to capture on
    exclude_interfaces: list[str] = ["lo"]
    interface_poll_s: float = pydantic.Field(2.0, gt=0)  # how often new interfaces are looked for
    max_flows: int = pydantic.Field(5000, ge=16, le=10_000_000)  # the kernel flow map's capacity
    active_timeout_s: float = pydantic.Field(5.0, gt=0)  # evict every this often
    early_evict_ratio: float = pydantic.Field(0.8, gt=0, le=1)  # ... or once the map is this full
    sampling: int = pydantic.Field(1, ge=1, le=0xFFFFFFFF)  # capture 1 packet in N (a u32 in the map)
    filters: list[FilterRule] = pydantic.Field(default_factory=list, max_length=MAX_RULES)
    rtt: bool = True
    dns: bool = True
    dns_port: int = pydantic.Field(53, ge=1, le=65535)
    drops: bool = True
    nat: bool = True  # ask sluice_nat_lookup (conntrack) for each exported flow's translation
    ipfix: list[IpfixCollector] = pydantic.Field(default_factory=list)
    json_path: str = ""  # JSON lines: a file path, "-" for stdout, "" for none
    nats: NatsTarget | None = None  # JSON lines published on a NATS subject
    recent_flows: int = pydantic.Field(10_000, ge=0)  # kept for `sluice flows list/dns/drops`
    metric_interfaces: int = pydantic.Field(32, ge=1)  # label cardinality bound: others are "other"
