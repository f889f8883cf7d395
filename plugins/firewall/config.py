"""The ``[plugins.firewall]`` section of the agent config."""

from __future__ import annotations

from typing import Literal

import pydantic

from .maps import SETTINGS
from .policy import Network, Policy, parse_cidr, parse_ports

# Map capacities per preset: production follows the anchor's defaults; test keeps a lab small.
PRESETS = {
    "production": {
        "sessions": 524288,
        "prefixes": 262144,
        "sources": 16384,
        "dns": 1048576,
        "audit_pages": 4096,
    },
    "test": {"sessions": 16384, "prefixes": 16384, "sources": 1024, "dns": 16384, "audit_pages": 64},
}


class MapSizes(pydantic.BaseModel):
    """Overrides of the preset's capacities; 0 keeps the preset's value."""

    model_config = pydantic.ConfigDict(extra="forbid")
    sessions: int = pydantic.Field(0, ge=0, le=1 << 24)
    prefixes: int = pydantic.Field(0, ge=0, le=1 << 24)  # destination prefixes per generation
    sources: int = pydantic.Field(0, ge=0, le=1 << 20)
    dns: int = pydantic.Field(0, ge=0, le=1 << 24)  # learned (network, address) pairs per generation
    audit_pages: int = pydantic.Field(0, ge=0, le=1 << 16)  # ring buffer pages (power of two)

    @pydantic.field_validator("audit_pages")
    @classmethod
    def _pow2(cls, v):
        if v and v & (v - 1):
            raise ValueError(f"audit_pages must be a power of two (got {v})")
        return v


class DnsConfig(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    enabled: bool = True
    listen: list[str] = pydantic.Field(default_factory=lambda: ["10.99.1.1", "fd00:99:1::1"])
    port: int = pydantic.Field(53, ge=1, le=65535)
    upstream: str = "10.99.2.53"
    upstream_port: int = pydantic.Field(53, ge=1, le=65535)
    min_ttl: int = pydantic.Field(5, ge=0, description="answers with a shorter TTL are kept this long")
    max_ttl: int = pydantic.Field(86400, ge=1)
    grace: int = pydantic.Field(5, ge=0, description="seconds an allow outlives its TTL")
    deny: Literal["nxdomain", "refused"] = "nxdomain"
    timeout: float = pydantic.Field(2.0, gt=0, le=30)

    @pydantic.field_validator("listen")
    @classmethod
    def _addrs(cls, v):
        for a in v:
            if parse_cidr(a).num_addresses != 1:
                raise ValueError(f"listen {a!r}: an address, not a network")
        return v

    @pydantic.field_validator("upstream")
    @classmethod
    def _upstream(cls, v):
        if parse_cidr(v).num_addresses != 1:
            raise ValueError(f"upstream {v!r}: an address, not a network")
        return v


class GeneveConfig(pydantic.BaseModel):
    """Gateway Load Balancer appliance mode: GENEVE (UDP 6081) in, policy on the inner packet,
    allowed packets returned to the load balancer with outer addresses swapped."""

    model_config = pydantic.ConfigDict(extra="forbid")
    enabled: bool = False
    interface: str = "underlay0"  # faces the load balancer


class IlbConfig(pydantic.BaseModel):
    """ILB mode: allowed IPv4 TCP/UDP flows leaving ``interface`` are SNATed to ``address``."""

    model_config = pydantic.ConfigDict(extra="forbid")
    enabled: bool = False
    interface: str = "egress0"  # where flows leave toward the servers
    address: str = "10.99.2.1"  # the egress address flows are translated to
    ports: str = "20000-32767"  # below Linux's ephemeral range: never a port the gateway itself uses

    @pydantic.field_validator("address")
    @classmethod
    def _v4(cls, v):
        if parse_cidr(v).version != 4 or parse_cidr(v).num_addresses != 1:
            raise ValueError(f"address {v!r}: one IPv4 address")
        return v

    @pydantic.field_validator("ports")
    @classmethod
    def _ports(cls, v):
        parse_ports(v)
        return v


class Config(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")

    interface: str = "ingress0"  # faces the clients: ingress = from clients, egress = toward them
    order: int = pydantic.Field(300, ge=1, le=49151)
    map_preset: Literal["production", "test"] = "production"
    map_sizes: MapSizes = pydantic.Field(default_factory=MapSizes)
    networks: list[Network] = pydantic.Field(default_factory=list)
    management: list[str] = pydantic.Field(default_factory=list)
    settings: dict[str, int] = pydantic.Field(default_factory=dict)
    dns: DnsConfig = pydantic.Field(default_factory=DnsConfig)
    geneve: GeneveConfig = pydantic.Field(default_factory=GeneveConfig)
    ilb: IlbConfig = pydantic.Field(default_factory=IlbConfig)
    gc_interval: float = pydantic.Field(1.0, gt=0, le=60)
    session_update_interval: float = pydantic.Field(
        5.0, ge=0, description="min seconds between updated events"
    )
    audit_log: bool = True  # log audit events through structlog

    @pydantic.field_validator("settings")
    @classmethod
    def _settings(cls, v):
        for name, value in v.items():
            if name not in SETTINGS:
                raise ValueError(f"unknown setting {name!r} (settings: {', '.join(SETTINGS)})")
            if not 0 <= value < 2**32:
                raise ValueError(f"setting {name}: {value} is not 0..4294967295")
        return v

    @pydantic.model_validator(mode="after")
    def _policy(self):
        self.policy()  # raises on duplicate names, overlapping sources
        return self

    def policy(self) -> Policy:
        return Policy(networks=self.networks, management=self.management)

    def sizes(self) -> dict[str, int]:
        preset = PRESETS[self.map_preset]
        return {k: getattr(self.map_sizes, k) or v for k, v in preset.items()}

    def cflags(self) -> list[str]:
        s = self.sizes()
        return [
            "-Werror=implicit-function-declaration",  # BCC would make it a call the verifier rejects
            f"-DFW_MAX_SESSIONS={s['sessions']}",
            f"-DFW_MAX_PREFIXES={s['prefixes']}",
            f"-DFW_MAX_SOURCES={s['sources']}",
            f"-DFW_MAX_DNS={s['dns']}",
            f"-DFW_AUDIT_PAGES={s['audit_pages']}",
        ]
