"""The firewall's control API, mounted at ``/v1/firewall/`` on the agent's unix socket.

Every runtime change goes through here (the CLI's ``rules add|delete|apply`` and ``settings
set`` call it): invalid input answers 400 with one line and changes nothing; a valid policy
change is compiled first, then swapped in atomically and saved so it survives restarts.
"""

from __future__ import annotations

import asyncio
import ipaddress

import pydantic
from aiohttp import web

from .maps import PROTO_NAMES
from .policy import Policy, Rule


def one_line(exc: Exception) -> str:
    """A pydantic error as ``loc: message``; anything else as its first line."""
    if isinstance(exc, pydantic.ValidationError):
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        return f"{loc}: {err['msg']}" if loc else err["msg"]
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def bad(message: str) -> web.Response:
    return web.json_response({"error": message}, status=400)


async def _json(request: web.Request):
    try:
        return await request.json()
    except ValueError:
        raise web.HTTPBadRequest(reason="body is not JSON") from None


def session_filter(query) -> callable:
    """A predicate over session dicts from ``src``, ``dst``, ``port``, ``proto`` query values."""
    checks = []
    for side in ("src", "dst"):
        if query.get(side):
            try:
                net = ipaddress.ip_network(query[side], strict=False)
            except ValueError:
                raise ValueError(f"{side} {query[side]!r} is not an address or CIDR") from None
            checks.append(lambda s, side=side, net=net: ipaddress.ip_address(s[side]) in net)
    if query.get("port"):
        if not str(query["port"]).isdigit():
            raise ValueError(f"port {query['port']!r} is not a number")
        port = int(query["port"])
        checks.append(lambda s: port in (s["sport"], s["dport"]))
    if query.get("proto"):
        proto = query["proto"]
        if proto not in PROTO_NAMES.values():
            raise ValueError(f"proto {proto!r}: one of {', '.join(PROTO_NAMES.values())}")
        checks.append(lambda s: s["proto"] == proto)
    return lambda s: all(c(s) for c in checks)


def routes(fw) -> list[web.RouteDef]:
    async def get_policy(_):
        return web.json_response({"generation": fw.generation, "policy": fw.policy.model_dump()})

    async def put_policy(request):
        try:
            policy = Policy.model_validate(await _json(request))
            generation = fw.apply(policy)
        except (pydantic.ValidationError, ValueError) as exc:
            return bad(one_line(exc))
        return web.json_response({"generation": generation, "networks": len(policy.networks)})

    async def add_rule(request):
        body = await _json(request)
        try:
            if not isinstance(body, dict) or "network" not in body or "rule" not in body:
                raise ValueError('expected {"network": NAME, "rule": {...}, "position": N (optional)}')
            network = fw.policy.network(body["network"])
            rule = Rule.model_validate(body["rule"])
            rules = list(network.rules)
            position = body.get("position")
            if position is None:
                position = len(rules) + 1
            if (
                not isinstance(position, int)
                or isinstance(position, bool)
                or not 1 <= position <= len(rules) + 1
            ):
                raise ValueError(f"position {position!r}: 1..{len(rules) + 1}")
            rules.insert(position - 1, rule)
            generation = fw.apply(_with_rules(fw.policy, network.name, rules))
        except (pydantic.ValidationError, ValueError, KeyError) as exc:
            return bad(one_line(exc).strip("'\""))
        return web.json_response({"generation": generation, "network": network.name, "position": position})

    async def delete_rule(request):
        try:
            network = fw.policy.network(request.match_info["network"])
            index = request.match_info["index"]
            if not index.isdigit() or not 1 <= int(index) <= len(network.rules):
                raise ValueError(f"rule {index}: network {network.name} has rules 1..{len(network.rules)}")
            rules = [r for i, r in enumerate(network.rules, 1) if i != int(index)]
            generation = fw.apply(_with_rules(fw.policy, network.name, rules))
        except (ValueError, KeyError) as exc:
            return bad(one_line(exc).strip("'\""))
        return web.json_response({"generation": generation, "deleted": int(index)})

    async def get_settings(_):
        return web.json_response(fw.maps.settings())

    async def put_setting(request):
        body = await _json(request)
        try:
            value = body.get("value") if isinstance(body, dict) else None
            fw.maps.set_setting(request.match_info["name"], value)
        except (ValueError, KeyError) as exc:
            return bad(one_line(exc).strip("'\""))
        return web.json_response({request.match_info["name"]: value})

    async def counters(_):
        return web.json_response(fw.maps.counters())

    async def sessions(request):
        try:
            keep = session_filter(request.query)
        except ValueError as exc:
            return bad(str(exc))
        rows = await asyncio.to_thread(fw.maps.session_rows)
        return web.json_response([s for s in rows if keep(s)])

    async def dns(_):
        stats = fw.proxy.stats.__dict__ if fw.proxy else {}
        return web.json_response({"learned": fw.learned_view(), "stats": stats})

    async def audit(request):
        after = request.query.get("after", "0")
        if not after.lstrip("-").isdigit():
            return bad(f"after {after!r} is not a number")
        events = fw.audit_after(int(after))
        if not events and request.query.get("wait"):
            try:
                await asyncio.wait_for(fw.audit_signal.wait(), 2.0)
            except TimeoutError:
                pass
            events = fw.audit_after(int(after))
        return web.json_response({"last": fw.audit_seq, "events": events})

    return [
        web.get("/policy", get_policy),
        web.put("/policy", put_policy),
        web.post("/rules", add_rule),
        web.delete("/rules/{network}/{index}", delete_rule),
        web.get("/settings", get_settings),
        web.put("/settings/{name}", put_setting),
        web.get("/counters", counters),
        web.get("/sessions", sessions),
        web.get("/dns", dns),
        web.get("/audit", audit),
    ]


def _with_rules(policy: Policy, name: str, rules: list[Rule]) -> Policy:
    networks = [n.model_copy(update={"rules": rules}) if n.name == name else n for n in policy.networks]
    return Policy.model_validate(
        {"networks": [n.model_dump() for n in networks], "management": policy.management}
    )
