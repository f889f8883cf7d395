"""tunnel: LPM-routed overlay encapsulation with ECMP, peer health withdrawal and per-packet trace.

A TC egress program (order 400) on the underlay-facing interface looks each packet's destination
up in one LPM trie (IPv4 v4-mapped), picks a nexthop (rendezvous hashing over healthy ones), sets
the tunnel key and redirects to a shared external-mode device. Routes are desired state from the
config and the API; :mod:`.engine` makes the trie exactly that. See docs/plugins/tunnel.md.
"""

from __future__ import annotations

import asyncio
import ipaddress
from pathlib import Path

import pydantic
from aiohttp import web

from sluice import hookimpl
from sluice.bpf.maps import Map
from sluice.plugins.tunnel import devices
from sluice.plugins.tunnel.engine import Tunnel, lookup, trie_dump
from sluice.plugins.tunnel.health import HealthChecker, HealthConfig
from sluice.plugins.tunnel.metrics import TunnelCollector
from sluice.plugins.tunnel.model import Address, Route, decode_value, one_line
from sluice.programs import TC, Program

SOURCE = Path(__file__).parent / "tunnel.bpf.c"
ROUTES_MAP = "tunnel_routes"


class Config(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")

    interface: str = pydantic.Field("underlay0", description="where overlay packets leave: TC egress")
    order: int = pydantic.Field(400, ge=1, le=49151)
    underlay_address: Address | None = pydantic.Field(
        None, description="this host's underlay address: the tunnel devices take its tunnel MAC"
    )
    vxlan_port: int = pydantic.Field(4789, ge=1, le=65535)
    max_routes: int = pydantic.Field(16384, ge=1, le=1 << 24)
    routes: list[Route] = []
    health: HealthConfig = pydantic.Field(default_factory=HealthConfig)

    @pydantic.field_validator("routes")
    @classmethod
    def _distinct(cls, routes: list[Route]) -> list[Route]:
        seen = set()
        for r in routes:
            if r.dst in seen:
                raise ValueError(f"route {r.dst} is given twice")
            seen.add(r.dst)
        return routes


@hookimpl
def sluice_config_schema():
    return Config


@hookimpl
def sluice_requirements():
    return ["tc", "lpm-trie"]


@hookimpl
def sluice_programs(ctx):
    c = ctx.config
    return [
        Program(
            "tunnel",
            SOURCE,
            [TC(c.interface, "egress", "tunnel_egress", "rewrite", c.order - 400)],  # order: TC priority
            cflags=[f"-DTUNNEL_MAX_ROUTES={c.max_routes}"],
        )
    ]


def build_tunnel(ctx) -> Tunnel:
    c = ctx.config
    manager = devices.DeviceManager(ctx.features.has, c.interface, c.underlay_address, c.vxlan_port)
    trie = Map.open_pinned(ctx.pin_dir / ROUTES_MAP)
    transitions = ctx.tunnel_transitions = {}

    def on_transition(peer: str, up: bool, source: str) -> None:
        key = (peer, "up" if up else "down", source)
        transitions[key] = transitions.get(key, 0) + 1
        ctx.log.warning("peer health set", peer=peer, up=up, source=source)

    stats = Map.open_pinned(ctx.pin_dir / "tunnel_nh_stats")
    tunnel = Tunnel(trie, manager.resolve, ctx.state_dir / "routes.json", on_transition, stats)
    tunnel.devices = manager
    return tunnel


def apply_config(ctx) -> dict:
    """Reconcile with the config's routes; log what cannot be used and size the devices."""
    tunnel: Tunnel = ctx.tunnel
    result = tunnel.set_config_routes(ctx.config.routes)
    families: dict[str, set[int]] = {}
    for route, _ in tunnel.routes().values():
        for nh in route.nexthops:
            if nh.protocol.collect_md:
                families.setdefault(nh.protocol.label, set()).add(nh.underlay.version)
    tunnel.devices.set_mtus(families)
    tunnel.devices.prune(set(families))
    for dst, reasons in result.unusable.items():
        for nh, why in reasons.items():
            ctx.log.error("nexthop unusable", route=dst, nexthop=nh, reason=why)
    ctx.log.info("routes reconciled", **{k: v for k, v in result.as_dict().items() if k != "unusable"})
    return result.as_dict()


@hookimpl
def sluice_start(ctx):
    async def start():
        ctx.tunnel = build_tunnel(ctx)
        await asyncio.to_thread(apply_config, ctx)

    return start()


@hookimpl
def sluice_reload(ctx, old_config):
    return asyncio.to_thread(apply_config, ctx)


@hookimpl
def sluice_tasks(ctx):
    if not ctx.config.health.enabled:
        return []
    checker = HealthChecker(ctx.config.health, ctx.tunnel, ctx.log)
    return [checker.run()]


@hookimpl
def sluice_stop(ctx):
    # The datapath outlives the agent: devices stay while the program may redirect to them.
    if ctx.settings.detach_on_stop:
        devices.remove_all()
    tunnel = getattr(ctx, "tunnel", None)
    if tunnel is not None:
        tunnel.trie.close()
        tunnel.stats.close()


@hookimpl
def sluice_metrics(ctx):
    return [TunnelCollector(ctx.pin_dir, lambda: ctx.tunnel, lambda: ctx.tunnel_transitions)]


# ---- control API (mounted at /v1/tunnel/) ------------------------------------------------------


def _route_rows(tunnel: Tunnel) -> list[dict]:
    status = tunnel.status()
    return [decode_value(v) for v in trie_dump(tunnel.trie)] + [
        {"dst": dst, "unusable": reasons} for dst, reasons in status["unusable"].items()
    ]


@hookimpl
def sluice_api_routes(ctx):
    tunnel: Tunnel = ctx.tunnel

    async def get_routes(_):
        return web.json_response({"routes": await asyncio.to_thread(_route_rows, tunnel), **tunnel.status()})

    async def put_route(request):
        route = Route.model_validate(await request.json())  # ValidationError → 400 below
        result = await asyncio.to_thread(tunnel.put_route, route)
        return web.json_response(result.as_dict())

    async def delete_route(request):
        dst = ipaddress.ip_network(request.query.get("dst", ""))
        result = await asyncio.to_thread(tunnel.delete_route, dst)
        return web.json_response(result.as_dict())

    async def get_lookup(request):
        value = await asyncio.to_thread(lookup, tunnel.trie, request.query.get("addr", ""))
        return web.json_response({"route": decode_value(value) if value else None})

    async def get_health(_):
        return web.json_response({"peers": tunnel.peer_health()})

    async def set_health(request):
        body = await request.json()
        if not isinstance(body, dict):
            raise ValueError('expected a JSON object: {"peer": ..., "state": "up" | "down"}')
        state = body.get("state")
        if state not in ("up", "down"):
            raise ValueError("state must be 'up' or 'down'")
        changed = await asyncio.to_thread(tunnel.set_health, str(body.get("peer", "")), state == "up")
        return web.json_response({"changed": changed, "peers": tunnel.peer_health()})

    async def get_devices(_):
        return web.json_response({"devices": await asyncio.to_thread(devices.describe)})

    return [
        web.get("/routes", _api_errors(get_routes)),
        web.put("/routes", _api_errors(put_route)),
        web.delete("/routes", _api_errors(delete_route)),
        web.get("/lookup", _api_errors(get_lookup)),
        web.get("/health", _api_errors(get_health)),
        web.post("/health", _api_errors(set_health)),
        web.get("/devices", _api_errors(get_devices)),
    ]


def _api_errors(handler):
    """pydantic's errors as the API's one-line 400 (the core middleware knows ValueError/KeyError)."""

    async def wrapped(request):
        try:
            return await handler(request)
        except pydantic.ValidationError as exc:
            return web.json_response({"error": one_line(exc)}, status=400)
        except KeyError as exc:
            return web.json_response({"error": str(exc.args[0]) if exc.args else "not found"}, status=400)

    return wrapped


@hookimpl
def sluice_cleanup(settings):
    return [f"removed device {name}" for name in devices.remove_all()]


@hookimpl
def sluice_cli_commands():
    from sluice.plugins.tunnel.cli import tunnel_group

    return [tunnel_group]
