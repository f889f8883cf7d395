"""Control API routes, mounted at /v1/replication/."""

from __future__ import annotations

import nats.errors
from aiohttp import web

from sluice.api import error


def routes(current):
    """``current()`` returns the running Replicator (or None while stopped)."""

    def running():
        r = current()
        if r is None:
            raise web.HTTPServiceUnavailable(reason="replication is not running")
        return r

    def connected():
        r = running()
        if not r.connected:
            raise web.HTTPServiceUnavailable(reason=f"NATS {r.state}: {r.last_error or 'not connected'}")
        return r

    async def answer(work) -> web.Response:
        """JSON of ``await work``; NATS trouble on the way (timeouts, a lost connection) is a 503."""
        try:
            return web.json_response(await work)
        except (TimeoutError, ConnectionError, nats.errors.Error) as exc:
            return error(503, f"NATS: {type(exc).__name__}: {exc}")

    async def status(_request):
        return await answer(running().status())

    async def sync(_request):
        r = connected()

        async def work():
            await r.write_due(force=True)
            return await r.full_sync()

        return await answer(work())

    async def flush(_request):
        r = connected()
        before = r.queue_depth

        async def work():
            acked = await r.flush()
            return {"queued_before": before, "written": acked, "queued": r.queue_depth}

        return await answer(work())

    async def list_records(request):
        try:
            limit = int(request.query.get("limit", "100"))
        except ValueError:
            return error(400, f"limit: expected an integer, got {request.query.get('limit')!r}")
        if not 1 <= limit <= 100_000:
            return error(400, f"limit: expected 1..100000, got {limit}")
        owner = request.query.get("owner") or None
        return await answer(connected().list_bucket(limit=limit, owner=owner))

    return [
        web.get("/status", status),
        web.post("/sync", sync),
        web.post("/flush", flush),
        web.get("/list", list_records),
    ]
