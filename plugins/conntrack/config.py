"""The ``[plugins.conntrack]`` section: every key with its default (docs/plugins/conntrack.md)."""

from __future__ import annotations

from typing import Annotated, Literal

import pydantic

from sluice.plugins.conntrack.gc import GcSettings


class _Strict(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")


class Lifetimes(_Strict):
    """Seconds an entry lives after its last packet, by state (Cilium's defaults)."""

    tcp_established: int = pydantic.Field(8000, ge=1, le=2**31)
    tcp_syn: int = pydantic.Field(60, ge=1, le=2**31)
    tcp_close: int = pydantic.Field(10, ge=1, le=2**31)
    non_tcp: int = pydantic.Field(60, ge=1, le=2**31)
    report_interval: int = pydantic.Field(5, ge=1, le=2**31)


class GcConfig(_Strict):
    initial_interval: float = pydantic.Field(300.0, gt=0)
    min_interval: float = pydantic.Field(10.0, gt=0)
    max_interval: float = pydantic.Field(43200.0, gt=0)
    pressure_ratio: float = pydantic.Field(0.9, gt=0, le=1)
    chunk: int = pydantic.Field(4096, ge=1, le=1 << 20)

    @pydantic.model_validator(mode="after")
    def _order(self):
        if not self.min_interval <= self.max_interval:
            raise ValueError("gc.min_interval must not exceed gc.max_interval")
        return self


class TenantIface(_Strict):
    interface: str
    tenant: int = pydantic.Field(0, ge=0, lt=2**32)
    from_vni: bool = False  # take the tenant from the tunnel key (collect_md tunnel devices)


class HostConfig(_Strict):
    enabled: bool = True
    events: bool = True  # consume NEW/DESTROY events (feeds the NAT cache)
    all_netns: bool = False  # also events of every namespace with an id here (not used for NAT)
    event_rate_limit: float = pydantic.Field(500.0, gt=0)  # events/s before sampling kicks in
    nat_cache_size: int = pydantic.Field(131072, ge=1)
    orphan_timeout: float = pydantic.Field(120.0, gt=0)
    rcvbuf: int = pydantic.Field(1 << 20, ge=4096)


class Config(_Strict):
    interfaces: list[str] = pydantic.Field(default_factory=lambda: ["ingress0"])
    directions: list[Literal["ingress", "egress"]] = pydantic.Field(
        default_factory=lambda: ["ingress", "egress"]
    )
    tcp_table_size: int = pydantic.Field(524288, ge=16, le=1 << 26)
    any_table_size: int = pydantic.Field(262144, ge=16, le=1 << 26)
    max_tenants: int = pydantic.Field(1024, ge=1, le=1 << 20)
    tenants: list[TenantIface] = pydantic.Field(default_factory=list)
    # Tenants whose tables exist from the start (VNIs, say); `sluice ct tenant add` adds more.
    tenant_tables: list[Annotated[int, pydantic.Field(ge=0, lt=2**32)]] = pydantic.Field(default_factory=list)
    lifetimes: Lifetimes = pydantic.Field(default_factory=Lifetimes)
    gc: GcConfig = pydantic.Field(default_factory=GcConfig)
    host: HostConfig = pydantic.Field(default_factory=HostConfig)

    @property
    def sizes(self) -> dict[str, int]:
        return {"tcp": self.tcp_table_size, "any": self.any_table_size}

    def gc_settings(self) -> GcSettings:
        g = self.gc
        return GcSettings(g.initial_interval, g.min_interval, g.max_interval, g.pressure_ratio, g.chunk)
