"""The replication plugin: sessions published by owner plugins → a NATS JetStream KV bucket, and
back to their owners at boot (before ``/readyz`` says ready) and, as peers write them, at once
(hot standby: a watch on the bucket). See docs/plugins/replication.md.

One agent per process: the broadcast hook ``sluice_session_event`` carries no context, so the
running replicator is kept in this module.
"""

from __future__ import annotations

import asyncio
import time

from sluice import hookimpl
from sluice.manager import State
from sluice.plugins.replication.config import Config
from sluice.plugins.replication.embedded import NatsServer
from sluice.plugins.replication.replicator import Replicator

__all__ = ["Config", "Replicator", "NatsServer"]

_replicator: Replicator | None = None
_embedded: NatsServer | None = None


def current() -> Replicator | None:
    return _replicator


@hookimpl
def sluice_config_schema():
    return Config


@hookimpl
def sluice_start(ctx):
    global _replicator, _embedded
    cfg: Config = ctx.config or Config()

    async def restore(sessions):
        await _wait_for_owners(ctx, cfg.boot_timeout)
        return ctx.restore_sessions(sessions)

    replicator = Replicator(cfg, restore=restore, forget=lambda s: _forget(ctx, s), log=ctx.log)
    replicator.connect_options()  # bad TLS files or a missing auth helper fail here, in one line
    if cfg.embedded:
        _embedded = NatsServer(ctx.state_dir / "nats", port=cfg.embedded_port, name=f"sluice-{cfg.node}")
        replicator.servers = [_embedded.start()]
        ctx.log.info("embedded nats-server running", url=replicator.servers[0], data=str(_embedded.data_dir))
    _replicator = replicator


async def _wait_for_owners(ctx, timeout: float) -> None:
    """Owners may start after this plugin: restore once every enabled plugin finished starting."""
    deadline = time.monotonic() + timeout
    starting = (State.INSTALLED, State.ENABLED)
    while time.monotonic() < deadline:
        records = [ctx.manager.records.get(n) for n in ctx.settings.plugins]
        if not any(r is not None and r.state in starting for r in records):
            return
        await asyncio.sleep(0.05)


def _forget(ctx, sessions) -> dict[str, int]:
    """Hand sessions gone from the bucket to their running owners' sluice_session_forget."""
    manager, by_owner, removed = ctx.manager, {}, {}
    for s in sessions:
        by_owner.setdefault(s.owner, []).append(s)
    for owner, items in by_owner.items():
        record, owner_ctx = manager.records.get(owner), manager.contexts.get(owner)
        if owner_ctx is None or record is None or record.state not in (State.RUNNING, State.DEGRADED):
            continue
        removed[owner] = manager.call(owner, "sluice_session_forget", ctx=owner_ctx, sessions=items) or 0
    return removed


@hookimpl
def sluice_tasks(ctx):
    r = _replicator
    return [r.start(), r.run_writer(), r.run_sync(), r.run_watch()] if r else []


@hookimpl
def sluice_ready(ctx):
    return _replicator.ready() if _replicator else "not started"


@hookimpl
def sluice_session_event(event):
    if _replicator is None:
        return
    try:
        _replicator.submit(event)
    except Exception as exc:  # the owner's datapath bookkeeping must never fail because of us
        _replicator.stats.errors["event"] += 1
        _replicator.log.error("session event dropped", error=f"{type(exc).__name__}: {exc}")


@hookimpl
async def sluice_stop(ctx):
    global _replicator, _embedded
    r, _replicator = _replicator, None
    if r is not None:
        await r.close()
    if _embedded is not None:
        await asyncio.to_thread(_embedded.stop, 3.0)  # SIGTERM; SIGKILL after 3 s, within stop_timeout
        _embedded = None


@hookimpl
async def sluice_reload(ctx, old_config):
    """SIGHUP: the new settings at once (Replicator.reconfigure), held and queued sessions kept.
    The embedded server is built at start: switching to or from it, or its port, waits for a
    restart (the running connection stays)."""
    r = _replicator
    if r is None:
        return
    cfg: Config = ctx.config or Config()
    old: Config = old_config or Config()
    servers = None if cfg.embedded else cfg.servers
    if cfg.embedded != old.embedded or cfg.embedded_port != old.embedded_port:
        ctx.log.warning("embedded nats-server settings apply when the agent restarts")
        servers = None
        cfg = cfg.model_copy(update={"servers": old.servers, "embedded_port": old.embedded_port})
    try:
        reconnects = await r.reconfigure(cfg, servers=servers)
    except Exception as exc:  # bad TLS files: the running settings stay
        ctx.log.error("replication reload rejected, keeping the running settings", error=f"{exc}")
        return
    ctx.log.info("replication settings applied", reconnecting=reconnects, servers=r.servers)


@hookimpl
def sluice_api_routes(ctx):
    from sluice.plugins.replication.api import routes

    return routes(current)


@hookimpl
def sluice_metrics(ctx):
    from sluice.plugins.replication.metrics import ReplicationCollector

    return [ReplicationCollector(current)]


@hookimpl
def sluice_cli_commands():
    from sluice.plugins.replication.cli import repl

    return [repl]
