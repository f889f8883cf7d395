"""flowmon: kernel-aggregated flow monitoring with drops, DNS latency, TCP RTT and IPFIX export.

TC programs (order 100, observers) aggregate flows in a pinned hash map; the agent evicts it
every ``active_timeout_s`` (earlier when it nears full) and hands the flows to the configured
sinks: IPFIX collectors (UDP/TCP), JSON lines, Prometheus aggregates, and the recent-flows file
behind ``sluice flows``. See docs/plugins/flowmon.md.
"""

from __future__ import annotations

import asyncio
import weakref

from sluice import hookimpl
from sluice.plugins.flowmon.config import Config

DROP_TRACEPOINT = "tracepoint:skb/kfree_skb"
_runtimes: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # PluginContext -> Runtime


def _drops_enabled(ctx) -> bool:
    return bool(ctx.config.drops and ctx.features is not None and ctx.features.has(DROP_TRACEPOINT))


@hookimpl
def sluice_config_schema():
    return Config


@hookimpl
def sluice_requirements():
    return ["tc"]  # drops need the kfree_skb tracepoint: probed in sluice_programs, optional


@hookimpl
def sluice_programs(ctx):
    from sluice.plugins.flowmon.monitor import program

    drops = _drops_enabled(ctx)
    if ctx.config.drops and not drops:
        ctx.log.warning("drops disabled: the kernel has no skb:kfree_skb tracepoint")
    # TC attach points are managed by the plugin itself: interfaces come and go.
    return [program(ctx.config, drops)]


@hookimpl
def sluice_start(ctx):
    from sluice.plugins.flowmon.runtime import Runtime

    async def start():
        rt = Runtime(ctx)
        _runtimes[ctx] = rt
        await asyncio.to_thread(rt.sync_interfaces)  # attach now, not at the first poll

    return start()


@hookimpl
def sluice_tasks(ctx):
    return [_runtimes[ctx].run()]


@hookimpl
def sluice_ready(ctx):
    rt = _runtimes.get(ctx)
    if rt is None:
        return "not started"
    if not rt.attacher.attached:
        return "no interface matches flowmon's interfaces / exclude_interfaces"
    return True


@hookimpl
def sluice_reload(ctx, old_config):
    rt = _runtimes.get(ctx)
    if rt is None:
        return
    if ctx.config.max_flows != old_config.max_flows:
        ctx.log.warning("max_flows changes at the next agent start (the map is sized at compile)")
    rt.reload(ctx.config)


@hookimpl
def sluice_stop(ctx):
    rt = _runtimes.pop(ctx, None)
    if rt is not None:
        return asyncio.to_thread(rt.stop)  # a final eviction and export, netlink if detaching


@hookimpl
def sluice_metrics(ctx):
    from sluice.plugins.flowmon.runtime import Metrics

    return [Metrics(_runtimes[ctx])]


@hookimpl
def sluice_api_routes(ctx):
    from aiohttp import web

    async def recent(request):
        from sluice.plugins.flowmon.runtime import ifnames

        rt = _runtimes.get(ctx)
        return web.json_response(rt.recent.as_dicts(ifnames()) if rt else [])

    return [web.get("/flows", recent)]


@hookimpl
def sluice_cli_commands():
    from sluice.plugins.flowmon.cli import flows

    return [flows]
