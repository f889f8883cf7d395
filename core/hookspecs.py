"""Every hook a sluice plugin can implement. Nothing else lives here.

Two kinds of hooks:

* **Per-plugin hooks** (config schema, requirements, programs, lifecycle, tasks, routes, metrics,
  session restore): the core calls each enabled plugin's implementation on its own, with a
  :class:`~sluice.manager.PluginContext` that belongs to that plugin, and records what it returns
  as owned by that plugin.
* **Broadcast hooks** (session events, NAT lookup): any plugin may call them through
  ``ctx.hook`` and every enabled plugin that implements them sees the call. Plugins talk to each
  other only through these; no plugin imports another.

Hooks run in the agent's event loop thread. Where a hook may return an awaitable, the core awaits
it; a hook must never block for long (push blocking work to a thread with ``asyncio.to_thread``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any

import pluggy

from sluice import PROJECT

if TYPE_CHECKING:
    import click
    import pydantic
    from aiohttp import web
    from prometheus_client.registry import Collector

    from sluice.manager import PluginContext
    from sluice.programs import Program
    from sluice.sessions import FlowTuple, NatTranslation, Session, SessionEvent

hookspec = pluggy.HookspecMarker(PROJECT)


# --------------------------------------------------------------------------------------------
# Configuration and requirements
# --------------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def sluice_config_schema() -> type[pydantic.BaseModel] | None:
    """Declare the schema of this plugin's ``[plugins.<name>]`` section of the agent config.

    Called per plugin when the config is loaded (at start and at every reload), before anything
    else of the plugin runs. Return a pydantic model class; the core validates the section
    against it (unknown keys are errors) and hands the instance to every later hook as
    ``ctx.config``. Return ``None`` (or do not implement) for a plugin without settings.
    """


@hookspec
def sluice_requirements() -> Sequence[str]:
    """Declare the kernel features this plugin needs, by the names ``sluice doctor`` prints.

    Called per plugin before its programs are compiled. Each name is a feature probed by
    :mod:`sluice.kernel` (``tc``, ``ringbuf``, ``tracepoint:skb/kfree_skb``, ``lpm-trie``,
    ``tunnel:vxlan`` ...). If any is missing, the plugin is disabled with one log line naming
    the feature and the others keep running. Optional features are probed by the plugin itself
    through ``ctx.features``; they must not be listed here.
    """


# --------------------------------------------------------------------------------------------
# Programs
# --------------------------------------------------------------------------------------------


@hookspec
def sluice_programs(ctx: PluginContext) -> Sequence[Program]:
    """Declare the BPF programs this plugin loads and where they attach.

    Called per plugin after its config is validated and its requirements are met. Each
    :class:`~sluice.programs.Program` names a ``.c`` file, extra cflags and its attach points
    (:class:`~sluice.programs.TC` with interface, direction and order; or
    :class:`~sluice.programs.Tracepoint`). The core compiles it with BCC (shared include dir,
    ``SLUICE_PIN_DIR`` set to ``<bpffs>/sluice/<plugin>``), checks reused pins, and attaches.
    The compiled BCC objects are then in ``ctx.bpf`` (keyed by the program's ``name``).
    Return an empty sequence for a plugin without BPF.
    """


# --------------------------------------------------------------------------------------------
# Lifecycle (per plugin, in the order: start → tasks → ready … stop; reload in between)
# --------------------------------------------------------------------------------------------


@hookspec
def sluice_start(ctx: PluginContext) -> Awaitable[None] | None:
    """Start the plugin: its programs are compiled, pinned and attached.

    Called per plugin, in the order plugins are enabled in the config. Populate maps, open
    connections, load state. May return an awaitable (awaited before the next plugin starts).
    An exception marks this plugin ``failed`` with the error; the others keep going.
    """


@hookspec
def sluice_tasks(ctx: PluginContext) -> Sequence[Coroutine[Any, Any, None]]:
    """Return the background coroutines this plugin runs while the agent runs.

    Called per plugin right after its ``sluice_start``. Each coroutine becomes an asyncio task
    named after the plugin; it is cancelled at stop. A task that raises marks the plugin
    ``degraded`` with the error (the others keep running).
    """


@hookspec(firstresult=True)
def sluice_ready(ctx: PluginContext) -> bool | str | None:
    """Say whether this plugin is ready to serve (``/readyz``).

    Called per plugin on every readiness probe. Return ``True`` (or ``None``, not implemented)
    when ready, ``False`` or a reason string when not (replication returns its boot-load state,
    for example). Must be cheap: no I/O.
    """


@hookspec
def sluice_reload(ctx: PluginContext, old_config: pydantic.BaseModel | None) -> Awaitable[None] | None:
    """Apply a new config after SIGHUP. ``ctx.config`` already holds the new, validated one.

    Called per plugin whose section changed, after the whole new config validated (an invalid
    config never reaches this hook: the old one stays). May return an awaitable.
    """


@hookspec
def sluice_stop(ctx: PluginContext) -> Awaitable[None] | None:
    """Stop the plugin gracefully: flush what must be flushed, close connections.

    Called per plugin in the reverse of start order, after its tasks are cancelled, within the
    agent's graceful stop timeout. Programs stay attached (the datapath outlives the agent)
    unless the config says ``detach_on_stop``. An exception is logged; the other plugins'
    teardown still runs.
    """


@hookspec
def sluice_cleanup(settings) -> Sequence[str] | None:
    """Remove what this plugin made outside its pins and TC filters (tunnel devices, say).

    Called per installed plugin by ``sluice cleanup``, after the core detached every filter and
    before it removes the pins, in the network namespace cleanup runs in; the agent is not
    running. ``settings`` is the ``[agent]`` table. Return short descriptions of what was removed.
    Must not fail when there is nothing to remove.
    """


# --------------------------------------------------------------------------------------------
# Surfaces: CLI, control API, metrics
# --------------------------------------------------------------------------------------------


@hookspec
def sluice_cli_commands() -> Sequence[click.Command]:
    """Return click commands or groups to mount on the ``sluice`` root group.

    Called once per installed plugin (enabled or not: the CLI works with the agent down, reading
    pinned maps) when the CLI is built. A command whose name is taken by the core or another
    plugin is skipped with a warning naming both owners.
    """


@hookspec
def sluice_api_routes(ctx: PluginContext) -> Sequence[web.RouteDef]:
    """Return aiohttp routes for the control API, mounted under ``/v1/<plugin>/``.

    Called per plugin after start. Handlers answer JSON; invalid input answers 400 with
    ``{"error": "<one line>"}`` and must leave running state untouched.
    """


@hookspec
def sluice_metrics(ctx: PluginContext) -> Sequence[Collector]:
    """Return Prometheus collectors registered on the agent's registry.

    Called per plugin after start. Name metrics ``sluice_<plugin>_<name>_<unit>``. Map-backed
    collectors read the maps at scrape time (``collect()``), never on a timer.
    """


# --------------------------------------------------------------------------------------------
# Sessions (broadcast): owners publish, replication consumes and restores
# --------------------------------------------------------------------------------------------


@hookspec
def sluice_session_event(event: SessionEvent) -> None:
    """A session was created, updated or deleted by the plugin named in ``event.owner``.

    Broadcast: the owning plugin calls ``ctx.hook.sluice_session_event(event=...)``; every
    enabled plugin implementing it (replication) receives it. Must not block: queue and return.
    """


@hookspec
def sluice_session_restore(ctx: PluginContext, sessions: Sequence[Session]) -> int | None:
    """Write recovered sessions back into this plugin's maps (HA failover).

    Called per owner plugin by the core's session relay (replication calls
    ``ctx.restore_sessions(sessions)``, which groups by owner). Return how many were applied;
    skip (and count) any that are invalid, never raise for one bad record.
    """


@hookspec
def sluice_session_forget(ctx: PluginContext, sessions: Sequence[Session]) -> int | None:
    """Remove restored sessions that left the replicated store (their holder deleted them, or
    they expired). Called per owner plugin like ``sluice_session_restore``; only ``key`` and
    ``owner`` are meaningful. Remove only sessions this plugin wrote through restore and that
    carried no traffic here since (those are this node's now). Return how many were removed.
    """


@hookspec(firstresult=True)
def sluice_nat_lookup(flow: FlowTuple) -> NatTranslation | None:
    """Translate a flow through NAT: return the translation or ``None`` when unknown.

    Broadcast, first result wins (conntrack answers from the host's netfilter table; flowmon
    asks while enriching records). Must be cheap: answer from a cache.
    """
