"""conntrack's control API, mounted at ``/v1/conntrack/`` on the agent socket.

GET ``entries`` (query: ``ip``, ``proto``, ``port``, ``state``, ``tenant``, ``limit``), GET ``stats`` (GC, datapath,
host consumer), POST ``gc`` (``{"dry_run": bool}``), GET ``nat?flow=udp 10.0.0.1:5000 10.0.0.2:53``
(the cache the NAT hook answers from). Bad input answers 400 with one line and changes nothing.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from sluice.plugins.conntrack.gc import GcFilter
from sluice.plugins.conntrack.host import flow_dict, parse_tuple
from sluice.plugins.conntrack.table import Tables, addr_bytes, monotonic_s, read_stats


def bad(message: str) -> web.Response:
    return web.json_response({"error": message}, status=400)


def _int(query, name: str, default=None):
    value = query.get(name)
    if value is None:
        return default
    if not value.isdigit():
        raise ValueError(f"{name} {value!r} is not a number")
    return int(value)


def routes(pin_dir, state):
    def list_entries(query) -> list[dict]:
        ips = {addr_bytes(query["ip"])} if query.get("ip") else set()
        tenant, port, limit = _int(query, "tenant"), _int(query, "port"), _int(query, "limit", 1000)
        now = monotonic_s()
        with Tables(pin_dir) as tables:
            rows = tables.select(tenant, query.get("proto"), ips, port, query.get("state"), limit)
        return [c.as_dict(now) for c in rows]

    async def entries(request):
        try:
            return web.json_response(await asyncio.to_thread(list_entries, request.query))
        except ValueError as e:
            return bad(str(e).splitlines()[0])

    async def stats(_request):
        gc, host = state.collector, state.host
        body = {"datapath": await asyncio.to_thread(read_stats, pin_dir), "reports": dict(state.reports)}
        if gc is not None and gc.last is not None:
            body["gc"] = {"runs": gc.runs, "interval_s": gc.interval, "deleted_total": gc.deleted_total,
                          "last": {"scanned": gc.last.scanned, "deleted": gc.last.deleted,
                                   "refreshed": gc.last.refreshed, "duration_s": gc.last.duration_s,
                                   "alive": gc.last.alive}}  # fmt: skip
        if host is not None:
            s = host.stats
            body["host"] = {"new": s.new, "destroy": s.destroy, "enobufs": s.enobufs, "reopens": s.reopens,
                            "sampling": host.breaker.rate, "ewma": host.breaker.ewma, "nat_cache": len(host.nat),
                            "nat_orphans": host.nat.orphans}  # fmt: skip
        return web.json_response(body)

    async def run_gc(request):
        try:
            body = await request.json() if request.can_read_body else {}
        except ValueError:
            return bad("body is not JSON")
        if not isinstance(body, dict) or not isinstance(body.get("dry_run", False), bool):
            return bad('want {"dry_run": true|false}')
        if state.collector is None:
            return bad("conntrack is not running")
        result = await asyncio.to_thread(state.collector.run, GcFilter(), body.get("dry_run", False))
        return web.json_response({"scanned": result.scanned, "deleted": result.deleted, "refreshed": result.refreshed,
                                  "dry_run": result.dry_run, "interval_s": result.interval_s})  # fmt: skip

    async def nat(request):
        try:
            flow = parse_tuple(request.query.get("flow", ""))
        except ValueError as e:
            return bad(str(e))
        t = state.host.nat.lookup(flow) if state.host is not None else None
        if t is None:
            return web.json_response({"error": "no translation"}, status=404)
        return web.json_response({"original": flow_dict(t.original), "reply": flow_dict(t.reply)})

    return [
        web.get("/entries", entries),
        web.get("/stats", stats),
        web.post("/gc", run_gc),
        web.get("/nat", nat),
    ]
