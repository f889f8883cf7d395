"""The control API: HTTP/JSON on a root-only unix socket, and /metrics on a TCP address.

Routes: ``/healthz`` (the process answers), ``/readyz`` (200 only when every enabled plugin runs
and says it is ready; the body says which are down), ``/v1/plugins``, ``/v1/hooks``, ``/metrics``,
and each plugin's routes under ``/v1/<plugin>/``.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from sluice import log as slog

log = slog.get()

if TYPE_CHECKING:
    from sluice.agent import Agent


def error(status: int, message: str) -> web.Response:
    """The one error shape every route answers: ``{"error": "<one line>"}``."""
    return web.json_response({"error": message.splitlines()[0] if message else "error"}, status=status)


@web.middleware
async def _errors_as_json(request: web.Request, handler):
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error(exc.status, exc.reason)
    except (ValueError, KeyError, TypeError, json.JSONDecodeError) as exc:
        return error(400, f"{type(exc).__name__}: {exc}")
    except Exception as exc:  # a plugin's handler bug: answer, log, keep serving
        log.exception("API handler failed", path=request.path)
        return error(500, f"internal error: {type(exc).__name__}: {exc}")


def build_app(agent: Agent) -> web.Application:
    app = web.Application(middlewares=[_errors_as_json], client_max_size=4 * 1024 * 1024)

    async def healthz(_):
        return web.json_response({"status": "ok"})

    async def readyz(_):
        ready, plugins = agent.readiness()
        return web.json_response({"ready": ready, "plugins": plugins}, status=200 if ready else 503)

    async def plugins(_):
        return web.json_response([r.as_dict() for r in agent.manager.records.values()])

    async def metrics(_):
        return web.Response(
            body=generate_latest(agent.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    app.add_routes(
        [
            web.get("/healthz", healthz),
            web.get("/readyz", readyz),
            web.get("/v1/plugins", plugins),
            web.get("/metrics", metrics),
        ]
    )
    for name, routes in agent.plugin_routes.items():
        sub = web.Application(middlewares=[_errors_as_json])
        sub.add_routes(routes)
        app.add_subapp(f"/v1/{name}/", sub)
    return app


async def serve_unix(app: web.Application, path) -> web.AppRunner:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        path.unlink()
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    old = os.umask(0o177)  # root-only from the moment the socket exists
    try:
        await web.UnixSite(runner, str(path)).start()
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    return runner


async def serve_metrics(agent: Agent, address: str) -> web.AppRunner:
    host, _, port = address.rpartition(":")
    app = web.Application()

    async def metrics(_):
        return web.Response(
            body=generate_latest(agent.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    app.add_routes([web.get("/metrics", metrics)])
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host.strip("[]") or "127.0.0.1", int(port)).start()
    return runner
