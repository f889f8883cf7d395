"""conntrack: BPF connection tracking with adaptive GC, and the host's netfilter conntrack.

* A TC observer (order 200) keeps per-tenant TCP and non-TCP tables (see conntrack.bpf.c).
* GC in user space removes expired entries on an adaptive interval (gc.py).
* The host's netfilter conntrack is read over netlink; its NAT translations answer the core's
  ``sluice_nat_lookup`` hook from a cache fed by the event stream (host.py).
* ``sluice ct`` reads the pinned tables with the agent up or down (cli.py).
"""

from __future__ import annotations

import asyncio
import ctypes as ct
import socket
from pathlib import Path

from sluice import hookimpl
from sluice.plugins.conntrack import metrics
from sluice.plugins.conntrack.config import Config, HostConfig
from sluice.plugins.conntrack.gc import Collector
from sluice.plugins.conntrack.table import CtSettings, Tables, read_stats, set_ifaces, set_settings
from sluice.programs import TC, Program

HERE = Path(__file__).parent
__all__ = ["Config", "HostConfig", "collector", "configure_datapath", "program"]


def program(config: Config) -> Program:
    return Program(
        "conntrack",
        HERE / "conntrack.bpf.c",
        [TC(iface, d, "ct_tc", "classify") for iface in config.interfaces for d in config.directions],
        cflags=[
            f"-DCT_TCP_MAX={config.tcp_table_size}",
            f"-DCT_ANY_MAX={config.any_table_size}",
            f"-DCT_MAX_TENANTS={config.max_tenants}",
        ],
    )


def configure_datapath(pin_dir: Path, config: Config) -> None:
    """Lifetimes, interface tenants and the tenants' tables (tenant 0's: the pinned templates).

    Interface names are resolved first, so a config naming a missing one changes nothing.
    """
    wanted = {}
    for t in config.tenants:
        try:
            wanted[socket.if_nametoindex(t.interface)] = (t.tenant, t.from_vni)
        except OSError:
            raise ValueError(f"tenants: no interface {t.interface!r}") from None
    lt = config.lifetimes
    set_settings(
        pin_dir, CtSettings(lt.tcp_established, lt.tcp_syn, lt.tcp_close, lt.non_tcp, lt.report_interval, 0)
    )
    with Tables(pin_dir) as tables:
        tables.add_tenant(0, config.sizes)
        others = {*config.tenant_tables, *(t.tenant for t in config.tenants if not t.from_vni)} - {0}
        for tenant in sorted(others):
            tables.add_tenant(tenant, config.sizes)
    set_ifaces(pin_dir, wanted)


def collector(pin_dir: Path, config: Config, **kw) -> Collector:
    def created() -> int:
        s = read_stats(pin_dir)
        return s.get("created_tcp", 0) + s.get("created_any", 0)

    return Collector(lambda: Tables(pin_dir), config.gc_settings(), created_counter=created, **kw)


class _State:
    """What the running plugin holds between hooks."""

    def __init__(self) -> None:
        self.collector: Collector | None = None
        self.host = None  # host.HostConntrack when enabled
        self.reports: dict[str, int] = {}  # datapath reports read, by reason


async def read_reports(bpf) -> None:
    """Drain the datapath's aggregated reports (new flows, new TCP flags, interval updates)."""
    from sluice.plugins.conntrack.table import REPORT_REASONS, CtReport

    def count(_ctx, data, size):
        reason = REPORT_REASONS.get(CtReport.from_buffer_copy(ct.string_at(data, size)).reason, "other")
        STATE.reports[reason] = STATE.reports.get(reason, 0) + 1

    bpf[b"ct_reports"].open_ring_buffer(count)
    while True:
        await asyncio.to_thread(bpf.ring_buffer_poll, 500)


STATE = _State()


@hookimpl
def sluice_config_schema():
    return Config


@hookimpl
def sluice_requirements():
    return ["tc"]


@hookimpl
def sluice_programs(ctx):
    return [program(ctx.config)]


@hookimpl
def sluice_start(ctx):
    configure_datapath(ctx.pin_dir, ctx.config)
    STATE.collector = collector(ctx.pin_dir, ctx.config)
    if ctx.config.host.enabled:
        return _start_host(ctx)
    return None


async def _start_host(ctx) -> None:
    from sluice.plugins.conntrack.host import HostConntrack

    host = HostConntrack(ctx.config.host, log=ctx.log)
    try:
        await asyncio.to_thread(host.start)  # pyroute2's sync API must not run in the agent's loop
    except PermissionError as e:
        ctx.log.warning("host conntrack disabled", error=str(e))
        return
    STATE.host = host


@hookimpl
def sluice_tasks(ctx):
    tasks = [STATE.collector.loop(), read_reports(ctx.bpf["conntrack"])]
    if STATE.host is not None and ctx.config.host.events:
        tasks.append(asyncio.to_thread(STATE.host.consume_forever))
    return tasks


@hookimpl
def sluice_reload(ctx, old_config):
    configure_datapath(ctx.pin_dir, ctx.config)
    if STATE.collector is not None:
        STATE.collector.settings = ctx.config.gc_settings()


@hookimpl
def sluice_stop(ctx):
    if STATE.host is not None:
        STATE.host.stop()
        STATE.host = None


@hookimpl
def sluice_nat_lookup(flow):
    return STATE.host.nat.lookup(flow) if STATE.host is not None else None


@hookimpl
def sluice_api_routes(ctx):
    from sluice.plugins.conntrack.api import routes

    return routes(ctx.pin_dir, STATE)


@hookimpl
def sluice_metrics(ctx):
    return [metrics.ConntrackCollector(ctx.pin_dir, lambda: STATE)]


@hookimpl
def sluice_cli_commands():
    from sluice.plugins.conntrack.cli import ct

    return [ct]
