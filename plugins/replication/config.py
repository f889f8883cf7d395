"""The ``[plugins.replication]`` section."""

from __future__ import annotations

import socket
from typing import Literal

import pydantic


class Config(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")

    # ---- where: empty servers = run an embedded nats-server under <state_dir>/replication/nats
    servers: list[str] = pydantic.Field(default_factory=list, description="NATS URLs; empty: embedded")
    embedded_port: int = pydantic.Field(0, ge=0, le=65535, description="embedded server port; 0: any free")
    node_id: str = pydantic.Field("", pattern=r"^[A-Za-z0-9_.-]{0,64}$", description="default: hostname")

    # ---- the bucket (created when missing; an existing bucket's settings are kept and compared)
    bucket: str = pydantic.Field("sluice-sessions", pattern=r"^[A-Za-z0-9_-]{1,64}$")
    replicas: int = pydantic.Field(1, ge=1, le=5)
    history: int = pydantic.Field(1, ge=1, le=64)
    ttl: float = pydantic.Field(0, ge=0, description="seconds a record lives without a write; 0: forever")
    storage: Literal["file", "memory"] = "file"

    # ---- credentials and TLS
    user: str | None = None
    password: str | None = None
    token: str | None = None
    nkey_seed_file: pydantic.FilePath | None = None
    credentials_file: pydantic.FilePath | None = None
    tls_ca_file: pydantic.FilePath | None = None
    tls_cert_file: pydantic.FilePath | None = None
    tls_key_file: pydantic.FilePath | None = None
    tls_hostname: str | None = None

    # ---- behaviour
    debounce: float = pydantic.Field(0.5, ge=0, le=60, description="update coalescing window, seconds")
    batch_size: int = pydantic.Field(2000, ge=1, le=4000, description="writes in flight per batch")
    write_timeout: float = pydantic.Field(5.0, gt=0, description="seconds to wait for a batch's acks")
    sync_interval: float = pydantic.Field(60.0, ge=0, description="full sync period, seconds; 0: off")
    max_queue: int = pydantic.Field(100_000, ge=1, description="changed keys held while NATS is down")
    boot_timeout: float = pydantic.Field(10.0, gt=0, description="bounded wait for the boot load")
    require_boot_load: bool = pydantic.Field(False, description="stay not-ready until the boot load ran")
    connect_timeout: float = pydantic.Field(2.0, gt=0)
    reconnect_wait: float = pydantic.Field(1.0, gt=0)

    @pydantic.model_validator(mode="after")
    def _consistent(self) -> Config:
        if (self.user is None) != (self.password is None):
            raise ValueError("user and password go together")
        if self.token is not None and self.user is not None:
            raise ValueError("use either token or user/password, not both")
        if self.nkey_seed_file is not None and self.credentials_file is not None:
            raise ValueError("use either nkey_seed_file or credentials_file, not both")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together")
        if self.ttl and self.sync_interval and self.ttl <= self.sync_interval:
            raise ValueError(f"ttl ({self.ttl}) must exceed sync_interval ({self.sync_interval})")
        for url in self.servers:
            if "://" not in url:
                raise ValueError(f"server {url!r}: expected a URL like nats://host:4222")
        return self

    @property
    def node(self) -> str:
        return self.node_id or socket.gethostname()[:64]

    @property
    def embedded(self) -> bool:
        return not self.servers
