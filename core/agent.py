"""The agent's lifecycle: load → attach → start → tasks → ready → run (reload on SIGHUP) → stop.

First SIGTERM/SIGINT stops gracefully within ``stop_timeout``; a second one forces the exit.
Plugins start in config order and stop in reverse; one plugin's failure is recorded and logged
and never stops the others. Programs stay attached after the agent exits unless the config says
``detach_on_stop``: the datapath does not depend on this process.
"""

from __future__ import annotations

import asyncio
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
from sluice.datapath import Datapath
from sluice.manager import PluginContext, PluginManager, State
from sluice.programs import TC

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
        self._signals = 0
        self._runners = []
        self.sections = resolve(cfg, self.manager)
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
        self.datapath = Datapath(s.bpffs, s.state_dir, list(s.cflags))
        enabled = set(s.plugins)
        # pyroute2 runs its own event loop: netlink work goes to a thread
        await asyncio.to_thread(
            self.datapath.detach, lambda a: a.plugin in enabled
        )  # plugins removed from the config
        for name in s.plugins:
            await self._start_plugin(name)
        await asyncio.to_thread(self._detach_undeclared)
        _release_compiler_memory()
        log.info("started", seconds=round(time.monotonic() - t0, 2), plugins=self.states())

    async def _start_plugin(self, name: str) -> None:
        record = self.manager.records[name]
        record.enabled = True
        if record.module is None:
            log.error("plugin failed", plugin=name, error=record.error)
            return
        ctx = PluginContext(name, self.manager, self.settings, self.sections.get(name))
        ctx.features = self.features
        self.manager.contexts[name] = ctx
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
        try:
            record.programs = list(self.manager.call(name, "sluice_programs", ctx=ctx) or [])
            ctx.bpf = await asyncio.to_thread(self.datapath.load, name, record.programs)
            record.maps = sorted(p.name for p in ctx.pin_dir.iterdir()) if ctx.pin_dir.is_dir() else []
            await _maybe_await(self.manager.call(name, "sluice_start", ctx=ctx))
        except (CompileError, AttachError) as exc:
            record.fail(State.FAILED, str(exc))
            log.error("plugin failed", plugin=name, error=record.error)
            return
        except Exception as exc:
            record.fail(State.FAILED, f"start failed: {type(exc).__name__}: {exc}")
            log.exception("plugin failed", plugin=name, error=record.error)
            return
        record.state, record.error = State.RUNNING, ""
        self.started.append(name)
        self.tasks[name] = [
            self._spawn(name, coro) for coro in self.manager.call(name, "sluice_tasks", ctx=ctx) or []
        ]
        self.plugin_routes[name] = list(self.manager.call(name, "sluice_api_routes", ctx=ctx) or [])
        self.collectors[name] = list(self.manager.call(name, "sluice_metrics", ctx=ctx) or [])
        for collector in self.collectors[name]:
            self.registry.register(collector)
        log.info("plugin running", plugin=name, programs=[p.name for p in record.programs])

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
            (n, a.iface, a.direction, a.order)
            for n in running
            for a in self.manager.records[n].attach
            if isinstance(a, TC)
        }
        self.datapath.detach(
            keep=lambda a: a.plugin not in running or (a.plugin, a.iface, a.direction, a.prio) in declared
        )

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
        loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(self.reload()))
        try:
            await self.start()
            app = api.build_app(self)
            self._runners.append(await api.serve_unix(app, self.settings.socket_path))
            if self.settings.metrics_address:
                self._runners.append(await api.serve_metrics(self, self.settings.metrics_address))
            log.info(
                "ready" if self.readiness()[0] else "serving, not ready",
                socket=str(self.settings.socket_path),
                metrics=self.settings.metrics_address,
            )
            await self._stop.wait()
            await asyncio.wait_for(self.stop(), self.settings.stop_timeout)
        except TimeoutError:
            log.error("graceful stop timed out", timeout=self.settings.stop_timeout)
            return 1
        except asyncio.CancelledError:
            log.warning("forced stop")
            return 1
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            self._lock_file.close()  # release the state-dir lock for a later Agent in this process
        return 0

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
        for name in reversed(self.started):
            await self._stop_plugin(name)
        self.started.clear()
        for runner in self._runners:
            await runner.cleanup()
        if self.settings.detach_on_stop and self.datapath:
            await asyncio.to_thread(self.datapath.detach)
        log.info("stopped", detached=self.settings.detach_on_stop)

    async def _stop_plugin(self, name: str) -> None:
        for task in self.tasks.pop(name, []):
            task.cancel()
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
        try:
            await _maybe_await(self.manager.call(name, "sluice_stop", ctx=self.manager.contexts[name]))
        except Exception as exc:
            log.error("plugin stop failed", plugin=name, error=f"{type(exc).__name__}: {exc}")
        for collector in self.collectors.pop(name, []):
            self.registry.unregister(collector)
        self.manager.records[name].state = State.STOPPED
        for b in self.manager.contexts[name].bpf.values():
            b.cleanup()  # closes fds and tracepoint links; TC filters keep their programs

    async def reload(self) -> None:
        """SIGHUP: read the config again; an invalid one is logged and the running one kept."""
        if self.config_path is None:
            log.info("reload: running on the embedded default, nothing to reload")
            return
        try:
            new = config.load(self.config_path)
            sections = resolve(new, self.manager)
        except config.ConfigError as exc:
            for line in exc.problems:
                log.error("reload rejected, keeping the running config", problem=line)
            return
        old_enabled, new_enabled = list(self.settings.plugins), list(new.agent.plugins)
        old_sections = self.sections
        self.cfg, self.sections = new, sections
        for name in [n for n in reversed(old_enabled) if n not in new_enabled]:
            if name in self.started:
                await self._stop_plugin(name)
                self.started.remove(name)
            self.manager.records[name].enabled = False
            await asyncio.to_thread(self.datapath.detach, lambda a, n=name: a.plugin != n)
        for name in new_enabled:
            ctx = self.manager.contexts.get(name)
            if name not in old_enabled or ctx is None:
                await self._start_plugin(name)
            elif sections.get(name) != old_sections.get(name):
                ctx.config, ctx.settings = sections.get(name), new.agent
                try:
                    await _maybe_await(
                        self.manager.call(name, "sluice_reload", ctx=ctx, old_config=old_sections.get(name))
                    )
                except Exception as exc:
                    log.error("plugin reload failed", plugin=name, error=f"{type(exc).__name__}: {exc}")
        log.info("reloaded", plugins=self.states())


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
