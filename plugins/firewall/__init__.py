"""The firewall plugin: a DNS-aware, stateful egress firewall for the clients behind one interface.

Policy (networks of source CIDRs, ordered allow/deny rules by destination CIDR or hostname,
protocol and ports, a default per network, management bypass) is compiled into LPM tries and
swapped in atomically (two generations, one switch). TC programs on the client-facing interface
keep sessions (both directions, per-direction counters, TCP state) so replies pass and unsolicited
inbound does not. Hostname rules work through the plugin's own DNS proxy, which writes the
allow before the client receives the answer. See docs/plugins/firewall.md.
"""

from __future__ import annotations

from pathlib import Path

from sluice import hookimpl
from sluice.programs import TC, Program

from .config import Config

HERE = Path(__file__).parent
_RUNTIME: dict[str, object] = {}  # plugin name -> Firewall, while the agent runs


@hookimpl
def sluice_config_schema():
    return Config


@hookimpl
def sluice_requirements():
    return ["tc", "lpm-trie", "ringbuf"]


@hookimpl
def sluice_programs(ctx):
    cfg = ctx.config
    slot = cfg.order - 300  # the config's order is the TC priority: the enforce phase starts at 300
    attach = [
        TC(cfg.interface, "ingress", "fw_ingress", "enforce", slot),
        TC(cfg.interface, "egress", "fw_egress", "enforce", slot),
    ]
    if cfg.geneve.enabled:
        attach.append(TC(cfg.geneve.interface, "ingress", "fw_geneve", "enforce", slot))
    if cfg.ilb.enabled:
        attach.append(TC(cfg.ilb.interface, "egress", "fw_ilb_out", "enforce", slot))
        attach.append(TC(cfg.ilb.interface, "ingress", "fw_ilb_in", "enforce", slot + 1))
    return [Program("firewall", HERE / "firewall.bpf.c", attach, cflags=cfg.cflags())]


@hookimpl
async def sluice_start(ctx):
    from .runtime import Firewall

    fw = Firewall(ctx)
    fw.start()
    _RUNTIME[ctx.name] = fw
    await fw.start_dns()


@hookimpl
def sluice_ready(ctx):
    fw = _RUNTIME.get(ctx.name)
    return fw.dns_error or True if fw is not None else "not started"


@hookimpl
def sluice_tasks(ctx):
    fw = _RUNTIME[ctx.name]
    return [fw.gc_task(), fw.audit_task(), fw.session_event_task()]


@hookimpl
async def sluice_reload(ctx, old_config):
    """Policy, management, settings and the DNS proxy follow the new config at once; interfaces,
    map sizes and the GENEVE/ILB attachments take effect at the next agent start."""
    fw = _RUNTIME.get(ctx.name)
    if fw is None:
        return
    fw.reload(ctx.config)
    if old_config is None or old_config.dns != ctx.config.dns:
        await fw.start_dns()


@hookimpl
def sluice_stop(ctx):
    fw = _RUNTIME.pop(ctx.name, None)
    if fw is not None:
        fw.stop()


@hookimpl
def sluice_api_routes(ctx):
    from .api import routes

    return routes(_RUNTIME[ctx.name])


@hookimpl
def sluice_metrics(ctx):
    from .metrics import FirewallCollector

    return [FirewallCollector(_RUNTIME[ctx.name])]


@hookimpl
def sluice_session_restore(ctx, sessions):
    fw = _RUNTIME.get(ctx.name)
    return fw.restore(sessions) if fw is not None else 0


@hookimpl
def sluice_session_forget(ctx, sessions):
    fw = _RUNTIME.get(ctx.name)
    return fw.forget(sessions) if fw is not None else 0


@hookimpl
def sluice_cli_commands():
    from .cli import commands

    return commands()
