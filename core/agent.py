"""The agent's lifecycle: load → attach → start → tasks → ready → run (reload on SIGHUP) → stop.

First SIGTERM/SIGINT stops gracefully within ``stop_timeout``; a second one forces the exit.
Plugins start in config order and stop in reverse; one plugin's failure is recorded and logged
and never stops the others. Programs stay attached after the agent exits unless the config says
``detach_on_stop``: the datapath does not depend on this process.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import inspect
import os
import signal
import time
from pathlib import Path

from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.core import GaugeMetricFamily

from sluice import __version__, api, config, kernel
from sluice import log as slog
from sluice.bpf.loader import CompileError
from sluice.bpf.tc import AttachError
from sluice.config import AgentSettings
from sluice.datapath import CORE, Datapath, remove_pins
from sluice.manager import PluginContext, PluginManager, State
from sluice.programs import TC, Tracepoint

log = slog.get()


class StartupError(Exception):
    """The agent cannot start at all (bad config, unknown plugin); one line per problem."""


def resolve(cfg: config.AgentConfig, manager: PluginManager) -> dict[str, object]:
    """Validate the enabled plugins' sections; returns name → validated config. Raises ConfigError."""
    problems, sections = [], {}
    available = manager.available()
    for name in cfg.agent.plugins:
        if name not in manager.records:
            problems.append(
                f"{cfg.source}: agent.plugins: unknown plugin {name!r} (available: {', '.join(available)})"
            )
            continue
        if manager.records[name].module is None:
            continue  # failed to import: reported by its record, the others still start
        try:
            schema = manager.call(name, "sluice_config_schema")
            sections[name] = config.validate_plugin_section(cfg, name, schema)
        except config.ConfigError as exc:
            problems.extend(exc.problems)
    for name in cfg.plugins:
        if name not in cfg.agent.plugins:
            problems.append(
                f"{cfg.source}: plugins.{name}: section for a plugin not enabled in agent.plugins"
            )
    if problems:
        raise config.ConfigError(problems)
    return sections


def resolve_chain(cfg: config.AgentConfig, manager: PluginManager) -> dict[str, object]:
    """resolve() and the TC chain of the whole config: what the agent checks before it attaches
    anything (start and reload). The CLI's other commands only resolve(): a config whose chain
    clashes can still be cleaned up."""
    sections = resolve(cfg, manager)
    problems = chain_problems(cfg, manager, sections)
    if problems:
        raise config.ConfigError(problems)
    return sections


def chain_problems(cfg: config.AgentConfig, manager: PluginManager, sections: dict) -> list[str]:
    """Place every TC program the enabled plugins declare, before anything is attached: a slot
    (interface, direction, phase, order) claimed twice, or a program that cannot be placed,
    is a problem of the config. One line per pair of clashing plugins."""
    problems, owners, pairs = [], {}, set()
    for name in cfg.agent.plugins:
        record = manager.records.get(name)
        if record is None or record.module is None:
            continue
        try:
            ctx = PluginContext(name, manager, cfg.agent, sections.get(name))
            programs = list(manager.call(name, "sluice_programs", ctx=ctx) or [])
        except Exception:
            continue  # the same call fails again at start and marks the plugin failed there
        for point in (a for p in programs for a in p.attach if isinstance(a, TC)):
            problem = point.problem()
            if problem:
                problems.append(f"{cfg.source}: plugins.{name}: {point.fn}: {problem}")
                continue
            slot = (point.iface, point.direction, point.rank)
            other = owners.setdefault(slot, (name, point.fn))
            if other != (name, point.fn) and (other[0], name) not in pairs:
                pairs.add((other[0], name))
                problems.append(
                    f"{cfg.source}: plugins.{name}: {point.fn} claims {point.iface} {point.direction}"
                    f" {point.phase} order {point.order}, already claimed by {other[0]}:{other[1]}"
                )
    return problems


class Agent:
    def __init__(
        self, cfg: config.AgentConfig, manager: PluginManager | None = None, config_path: Path | None = None
    ):
        self.cfg = cfg
        self.config_path = config_path
        self.manager = manager or PluginManager()
        if manager is None:
            self.manager.discover()
        self.registry = CollectorRegistry()
        self.plugin_routes: dict[str, list] = {}
        self.collectors: dict[str, list] = {}
        self.tasks: dict[str, list[asyncio.Task]] = {}
        self.features: kernel.Features | None = None
        self.datapath: Datapath | None = None
        self.started: list[str] = []
        self._stop = asyncio.Event()
        self._busy = asyncio.Lock()  # start, reload and stop never interleave
        self._signals = 0
        self._runners = []
        self.sections = resolve_chain(cfg, self.manager)
        self.registry.register(_PluginStates(self))
        Gauge("sluice_core_build_info", "sluice version", ["version"], registry=self.registry).labels(
            __version__
        ).set(1)

    @property
    def settings(self) -> config.AgentSettings:
        return self.cfg.agent

    # ---- start ----------------------------------------------------------------------------

    async def start(self) -> None:
        t0 = time.monotonic()
        s = self.settings
        for check in kernel.mount_filesystems():
            if check.ok:
                log.info("mounted", check=check.name, detail=check.detail)
            else:
                log.error("mount failed", check=check.name, detail=check.detail, fix=check.fix)
        headers = kernel.prepare_bcc(s.cache_dir)
        if not headers.ok:
            log.warning(
                "no kernel header tree for BCC: compiling will fail", detail=headers.detail, fix=headers.fix
            )
        self.features = kernel.Features(s.cache_dir)
        self.datapath = await asyncio.to_thread(Datapath, s.bpffs, s.state_dir, list(s.cflags))
        enabled = set(s.plugins)
        # pyroute2 runs its own event loop: netlink work goes to a thread
        removed = await asyncio.to_thread(
            self.datapath.detach, lambda a: a.plugin in enabled
        )  # plugins removed from the config
        for name in sorted({a.plugin for a in removed} - {CORE}):
            self._forget_state(name)
        for name in s.plugins:
            if self._stop.is_set():  # a stop during the cold start: do not compile the rest
                log.info("stop requested during start: not starting the remaining plugins", next=name)
                break
            await self._start_plugin(name)
        await asyncio.to_thread(self._detach_undeclared)
        self._sync_records()
        _release_compiler_memory()
        log.info("started", seconds=round(time.monotonic() - t0, 2), plugins=self.states())

    async def _start_plugin(self, name: str) -> None:
        """Start one plugin. Whatever it raises marks it failed; it never reaches the other plugins."""
        record = self.manager.records[name]
        record.enabled = True
        if record.module is None:
            log.error("plugin failed", plugin=name, error=record.error)
            return
        ctx = PluginContext(name, self.manager, self.settings, self.sections.get(name))
        ctx.features = self.features
        self.manager.contexts[name] = ctx
        try:
            missing = self.features.missing(self.manager.call(name, "sluice_requirements") or [])
            if missing:
                record.fail(State.DISABLED, f"needs {missing[0].name}: {missing[0].detail}")
                log.error(
                    "plugin disabled: kernel feature missing",
                    plugin=name,
                    feature=missing[0].name,
                    detail=missing[0].detail,
                    fix=missing[0].fix,
                )
                return
            record.programs = list(self.manager.call(name, "sluice_programs", ctx=ctx) or [])
            ctx.bpf = await asyncio.to_thread(self.datapath.load, name, record.programs)
            record.maps = sorted(p.name for p in ctx.pin_dir.iterdir()) if ctx.pin_dir.is_dir() else []
            await _maybe_await(self.manager.call(name, "sluice_start", ctx=ctx))
            tasks = list(self.manager.call(name, "sluice_tasks", ctx=ctx) or [])
            routes = list(self.manager.call(name, "sluice_api_routes", ctx=ctx) or [])
            collectors = list(self.manager.call(name, "sluice_metrics", ctx=ctx) or [])
            for registered, collector in enumerate(collectors):
                try:
                    self.registry.register(collector)
                except Exception:
                    for c in collectors[:registered]:
                        self.registry.unregister(c)
                    raise
        except (CompileError, AttachError) as exc:
            self._failed(name, str(exc))
            return
        except Exception as exc:
            self._failed(name, f"start failed: {type(exc).__name__}: {exc}", trace=True)
            return
        record.state, record.error = State.RUNNING, ""
        self.started.append(name)
        self.plugin_routes[name] = routes
        self.collectors[name] = collectors
        self.tasks[name] = []
        for coro in tasks:
            try:
                self.tasks[name].append(self._spawn(name, coro))
            except TypeError as exc:  # not a coroutine: the plugin runs, without that task
                record.fail(State.DEGRADED, f"sluice_tasks returned a non-coroutine: {exc}")
        log.info("plugin running", plugin=name, programs=[p.name for p in record.programs])

    def _failed(self, name: str, error: str, trace: bool = False) -> None:
        """Mark ``name`` failed and release what it compiled. Its TC filters stay: the datapath
        keeps enforcing with the programs it had (a failed upgrade does not open the gates)."""
        self.manager.records[name].fail(State.FAILED, error)
        (log.exception if trace else log.error)(
            "plugin failed", plugin=name, error=self.manager.records[name].error
        )
        ctx = self.manager.contexts.get(name)
        for b in ctx.bpf.values() if ctx else ():
            with contextlib.suppress(Exception):
                b.cleanup()

    def _spawn(self, name: str, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(
            coro, name=f"{name}:{getattr(coro, '__name__', 'task')}"
        )

        def done(t: asyncio.Task) -> None:
            if t.cancelled() or t.exception() is None:
                return
            record = self.manager.records[name]
            record.fail(State.DEGRADED, f"task {t.get_name()} failed: {t.exception()!r}")
            log.error("plugin task failed", plugin=name, task=t.get_name(), error=repr(t.exception()))

        task.add_done_callback(done)
        return task

    def _detach_undeclared(self) -> None:
        """Remove attachments a running plugin no longer declares (a failed plugin keeps its old ones)."""
        running = {n for n in self.started}
        declared = {
            (n, a.iface, a.direction, a.rank)
            for n in running
            for a in self.manager.records[n].attach
            if isinstance(a, TC)
        }
        self.datapath.detach(
            keep=lambda a: a.plugin not in running or (a.plugin, a.iface, a.direction, a.prio) in declared
        )

    def _forget_state(self, name: str) -> None:
        """A plugin left the config: its pins go too, unless ``agent.keep_removed_state``."""
        if self.settings.keep_removed_state:
            log.info(
                "plugin removed, state kept", plugin=name, pins=str(self.settings.bpffs / "sluice" / name)
            )
            return
        pins = remove_pins(self.settings.bpffs, name)
        log.info("plugin removed with its state", plugin=name, pins=pins)

    def _sync_records(self) -> None:
        """Each plugin record shows what is attached now (after start, reload, failure, stop)."""
        for name, record in self.manager.records.items():
            record.attached = self.attached(name)

    def attached(self, name: str) -> list[str]:
        """What ``name`` has attached now: its filters as the datapath recorded them (checked
        against the kernel at start), and its tracepoints while it runs."""
        out = [
            f"tc/{a.iface}/{a.direction}#{a.prio}:{a.fn}"
            for a in (self.datapath.attached if self.datapath else [])
            if a.plugin == name
        ]
        record = self.manager.records.get(name)
        if record is not None and record.state in (State.RUNNING, State.DEGRADED):
            out += [f"tracepoint/{a.tracepoint}:{a.fn}" for a in record.attach if isinstance(a, Tracepoint)]
        return out

    # ---- state ----------------------------------------------------------------------------

    def states(self) -> dict[str, str]:
        return {
            n: str(self.manager.records[n].state) for n in self.settings.plugins if n in self.manager.records
        }

    def readiness(self) -> tuple[bool, dict[str, dict]]:
        out, ready = {}, True
        for name in self.settings.plugins:
            record = self.manager.records.get(name)
            if record is None:
                continue
            entry = {"state": str(record.state), "ready": False}
            if record.state in (State.RUNNING, State.DEGRADED):
                verdict = self.manager.call(name, "sluice_ready", ctx=self.manager.contexts[name])
                entry["ready"] = verdict is None or verdict is True
                if not entry["ready"]:
                    entry["reason"] = verdict if isinstance(verdict, str) else "not ready"
            else:
                entry["reason"] = record.error or str(record.state)
            ready &= entry["ready"]
            out[name] = entry
        return ready, out

    # ---- run, reload, stop ----------------------------------------------------------------

    def _lock(self) -> None:
        """One agent per state dir: a second one would fight the first over the same filters."""
        self.settings.state_dir.mkdir(parents=True, exist_ok=True)
        path = self.settings.state_dir / "agent.lock"
        self._lock_file = open(path, "a+")  # noqa: SIM115 (held for the agent's lifetime)
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.seek(0)
            pid = self._lock_file.read().strip() or "?"
            raise StartupError(
                f"another agent (pid {pid}) is running with state_dir {self.settings.state_dir}"
            ) from None
        self._lock_file.truncate(0)
        self._lock_file.write(str(os.getpid()))
        self._lock_file.flush()

    async def run(self) -> int:
        self._lock()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_stop_signal, sig)
        loop.add_signal_handler(signal.SIGHUP, self._on_reload_signal)
        try:
            async with self._busy:
                await self.start()
                await self._serve()
            log.info(
                "ready" if self.readiness()[0] else "serving, not ready",
                socket=str(self.settings.socket_path),
                metrics=self.settings.metrics_address,
            )
            await self._stop.wait()
            return await self._bounded_stop()
        except asyncio.CancelledError:
            log.warning("forced stop")
            return 1
        except Exception as exc:  # e.g. the API could not be served: still stop the plugins properly
            log.error("agent failed", error=f"{type(exc).__name__}: {exc}")
            await self._bounded_stop()
            raise StartupError(f"{type(exc).__name__}: {exc}") from None
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            self._lock_file.close()  # release the state-dir lock for a later Agent in this process

    async def _bounded_stop(self) -> int:
        try:
            async with self._busy:  # a reload in progress finishes first
                await asyncio.wait_for(self.stop(), self.settings.stop_timeout)
        except TimeoutError:
            log.error("graceful stop timed out", timeout=self.settings.stop_timeout)
            return 1
        return 0

    async def _serve(self) -> None:
        """(Re)start the API on the socket: plugin routes are fixed per app, so a reload that
        adds or removes a plugin serves a new app (a few milliseconds without a listener)."""
        for runner in self._runners:
            await runner.cleanup()
        self._runners = [await api.serve_unix(api.build_app(self), self.settings.socket_path)]
        if self.settings.metrics_address:
            self._runners.append(await api.serve_metrics(self, self.settings.metrics_address))

    def _on_reload_signal(self) -> None:
        if self._stop.is_set():
            log.info("reload ignored: stopping")
            return
        self._reload_task = asyncio.get_running_loop().create_task(self.reload())

    def _on_stop_signal(self, sig) -> None:
        self._signals += 1
        if self._signals == 1:
            log.info("stopping", signal=signal.Signals(sig).name)
            self._stop.set()
            return
        log.warning("second signal: forcing stop", signal=signal.Signals(sig).name)
        for task in asyncio.all_tasks():
            if task is not asyncio.current_task():
                task.cancel()

    def request_stop(self) -> None:
        self._stop.set()

    async def stop(self) -> None:
        for name in reversed(list(self.started)):
            await self._stop_plugin(name)
        for runner in self._runners:
            with contextlib.suppress(Exception):
                await runner.cleanup()
        self._runners = []
        if self.settings.detach_on_stop and self.datapath:
            await asyncio.to_thread(self.datapath.detach)
        if self.datapath:
            self.datapath.close()
            self._sync_records()
        log.info("stopped", detached=self.settings.detach_on_stop)

    async def _stop_plugin(self, name: str) -> None:
        """Stop one plugin; each step is guarded so a failure never skips the rest of teardown."""
        for task in self.tasks.pop(name, []):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        try:
            await _maybe_await(self.manager.call(name, "sluice_stop", ctx=self.manager.contexts[name]))
        except Exception as exc:
            log.error("plugin stop failed", plugin=name, error=f"{type(exc).__name__}: {exc}")
        for collector in self.collectors.pop(name, []):
            with contextlib.suppress(Exception):
                self.registry.unregister(collector)
        self.plugin_routes.pop(name, None)
        self.manager.records[name].state = State.STOPPED
        for b in self.manager.contexts[name].bpf.values():
            try:
                b.cleanup()  # closes fds and tracepoint links; TC filters keep their programs
            except Exception as exc:
                log.error("plugin cleanup failed", plugin=name, error=f"{type(exc).__name__}: {exc}")
        if name in self.started:
            self.started.remove(name)

    async def reload(self) -> None:
        """SIGHUP: read the config again; an invalid one is logged and the running one kept.

        Plugins removed from ``agent.plugins`` stop and are detached, added ones start. A plugin
        whose section changed gets ``sluice_reload`` when its programs are unchanged and it
        implements the hook; otherwise it restarts (pins reused, filters replaced in place).
        ``[agent]`` settings other than ``plugins`` apply only at the next start.
        """
        if self.config_path is None:
            log.info("reload: running on the embedded default, nothing to reload")
            return
        async with self._busy:
            if self._stop.is_set():
                return
            try:
                new = config.load(self.config_path)
                sections = resolve_chain(new, self.manager)
                fixed = [
                    k
                    for k in AgentSettings.model_fields
                    if k != "plugins" and getattr(new.agent, k) != getattr(self.settings, k)
                ]
                if fixed:
                    raise config.ConfigError(
                        [f"{new.source}: agent.{', agent.'.join(fixed)}: changes only at the next start"]
                    )
            except config.ConfigError as exc:
                for line in exc.problems:
                    log.error("reload rejected, keeping the running config", problem=line)
                return
            await self._apply(new, sections)
            _release_compiler_memory()
            log.info("reloaded", plugins=self.states())

    async def _apply(self, new: config.AgentConfig, sections: dict) -> None:
        old_enabled, new_enabled = list(self.settings.plugins), list(new.agent.plugins)
        old_sections = self.sections
        self.cfg, self.sections = new, sections
        routes_before = {n: len(r) for n, r in self.plugin_routes.items()}
        for name in [n for n in reversed(old_enabled) if n not in new_enabled]:
            if name in self.started:
                await self._stop_plugin(name)
            record = self.manager.records[name]
            record.enabled, record.state, record.programs, record.maps = False, State.INSTALLED, [], []
            await asyncio.to_thread(self.datapath.detach, lambda a, n=name: a.plugin != n)
            self._forget_state(name)
        for name in new_enabled:
            ctx = self.manager.contexts.get(name)
            if name not in old_enabled or ctx is None or name not in self.started:
                await self._start_plugin(name)
                continue
            if sections.get(name) == old_sections.get(name):
                continue
            old_config, ctx.config = ctx.config, sections.get(name)
            try:
                programs = list(self.manager.call(name, "sluice_programs", ctx=ctx) or [])
                in_place = programs == self.manager.records[name].programs and self.manager.implements(
                    name, "sluice_reload"
                )
                if in_place:
                    await _maybe_await(
                        self.manager.call(name, "sluice_reload", ctx=ctx, old_config=old_config)
                    )
                    continue
            except Exception as exc:
                log.error("plugin reload failed", plugin=name, error=f"{type(exc).__name__}: {exc}")
                continue
            log.info("restarting plugin for its new config", plugin=name)
            await self._stop_plugin(name)
            await self._start_plugin(name)
        await asyncio.to_thread(self._detach_undeclared)
        self._sync_records()
        if {n: len(r) for n, r in self.plugin_routes.items()} != routes_before:
            await self._serve()


def _release_compiler_memory() -> None:
    """Give the heap LLVM used while compiling back to the system.

    BCC's compiles leave hundreds of MB freed but still held by glibc's arenas; the agent then
    idles for days with that resident. malloc_trim returns it (glibc only; elsewhere a no-op).
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class _PluginStates:
    """``sluice_core_plugin_up{plugin,state}``, read at scrape time (a failing task shows at once)."""

    def __init__(self, agent: Agent):
        self.agent = agent

    def collect(self):
        family = GaugeMetricFamily(
            "sluice_core_plugin_up", "1 when the plugin runs, 0 otherwise", labels=["plugin", "state"]
        )
        for name, state in self.agent.states().items():
            family.add_metric([name, state], 1 if state in ("running", "degraded") else 0)
        yield family


async def _maybe_await(result) -> None:
    if inspect.isawaitable(result):
        await result
