"""The plugin manager: discovers plugins through the entry-point group, enables those the config
names, calls per-plugin hooks on one plugin at a time, and records what each plugin owns."""

from __future__ import annotations

import enum
import importlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from types import ModuleType
from typing import Any

import pluggy

from sluice import PROJECT, hookspecs
from sluice import log as slog
from sluice.programs import Attach, Program

ENTRY_POINT_GROUP = "sluice.plugins"


class State(enum.StrEnum):
    INSTALLED = "installed"  # discovered, not enabled by the config
    ENABLED = "enabled"  # enabled, not started yet
    RUNNING = "running"
    DEGRADED = "degraded"  # running, but a background task failed
    DISABLED = "disabled"  # enabled, but a required kernel feature is missing
    FAILED = "failed"  # failed to import, validate, compile, attach or start
    STOPPED = "stopped"


@dataclass
class PluginRecord:
    """What the core knows about one plugin, for `sluice plugins list` and /readyz."""

    name: str
    module: ModuleType | None
    distribution: str = ""
    version: str = ""
    enabled: bool = False
    state: State = State.INSTALLED
    error: str = ""
    programs: list[Program] = field(default_factory=list)
    maps: list[str] = field(default_factory=list)
    attached: list[str] | None = None  # what is attached now (set by the agent); None: not known

    @property
    def attach(self) -> list[Attach]:
        return [a for p in self.programs for a in p.attach]

    def fail(self, state: State, error: str) -> None:
        self.state, self.error = state, error.splitlines()[0] if error else ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "distribution": self.distribution,
            "enabled": self.enabled,
            "state": str(self.state),
            "error": self.error,
            "programs": [p.name for p in self.programs],
            "maps": self.maps,
            "attach": self.attached if self.attached is not None else [_describe(a) for a in self.attach],
        }


def _describe(a: Attach) -> str:
    if hasattr(a, "iface"):
        return f"tc/{a.iface}/{a.direction}#{a.rank}:{a.fn}"
    return f"tracepoint/{a.tracepoint}:{a.fn}"


class PluginContext:
    """Everything the core hands one plugin. One instance per enabled plugin, kept across reloads."""

    def __init__(self, name: str, manager: PluginManager, settings, config):
        self.name = name
        self.manager = manager
        self.settings = settings  # the [agent] table (sluice.config.AgentSettings)
        self.config = config  # this plugin's validated section (its own pydantic model) or None
        self.bpf: dict[str, Any] = {}  # program name → compiled BCC object
        self.log = slog.get(name)
        self.features = None  # sluice.kernel.Features, set by the agent
        self.hook = manager.pm.hook  # broadcast hooks: ctx.hook.sluice_session_event(event=...)

    @property
    def pin_dir(self) -> Path:
        return self.settings.bpffs / "sluice" / self.name

    @property
    def state_dir(self) -> Path:
        d = self.settings.state_dir / self.name
        d.mkdir(parents=True, exist_ok=True)
        return d

    def table(self, name: str, program: str | None = None):
        """A typed view (sluice.bpf.maps.Map) of one of this plugin's maps from its compiled program."""
        from sluice.bpf.maps import Map

        programs = [self.bpf[program]] if program else list(self.bpf.values())
        for b in programs:
            try:
                return Map.from_bcc(b[name.encode()])
            except KeyError:
                continue
        raise KeyError(f"{self.name}: no map {name}")

    def restore_sessions(self, sessions: Sequence) -> dict[str, int]:
        """Hand recovered sessions to their owners' sluice_session_restore; returns applied per owner."""
        return self.manager.restore_sessions(sessions)


class PluginManager:
    """A thin typed facade over pluggy for sluice's hooks."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.records: dict[str, PluginRecord] = {}
        self.contexts: dict[str, PluginContext] = {}

    # ---- discovery ------------------------------------------------------------------------

    def discover(self) -> None:
        """Import every plugin of the entry-point group; an import error marks that plugin failed."""
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            if ep.name in self.records:
                continue
            dist = ep.dist
            record = PluginRecord(
                name=ep.name,
                module=None,
                distribution=dist.name if dist else "",
                version=dist.version if dist else "",
            )
            self.records[ep.name] = record
            try:
                module = ep.load()
            except Exception as exc:  # a broken third-party plugin must not take the agent down
                record.fail(State.FAILED, f"import failed: {type(exc).__name__}: {exc}")
                continue
            self._register(record, module)

    def register(self, module: ModuleType | str, name: str) -> PluginRecord:
        """Register a plugin programmatically (tests, embedding)."""
        if isinstance(module, str):
            module = importlib.import_module(module)
        record = PluginRecord(name=name, module=None, version=getattr(module, "__version__", ""))
        self.records[name] = record
        self._register(record, module)
        return record

    def unregister(self, name: str) -> None:
        if self.pm.has_plugin(name):
            self.pm.unregister(name=name)
        self.records.pop(name, None)
        self.contexts.pop(name, None)

    def _register(self, record: PluginRecord, module: ModuleType) -> None:
        try:
            self.pm.register(module, name=record.name)
        except Exception as exc:  # wrong hook names or signatures
            record.fail(State.FAILED, f"invalid plugin: {exc}")
            return
        record.module = module

    def available(self) -> list[str]:
        return sorted(self.records)

    # ---- calling hooks --------------------------------------------------------------------

    def call(self, plugin: str, hook: str, **kwargs):
        """Call ``hook`` on ``plugin`` alone. Returns its result (None when it does not implement it)."""
        if not self.pm.has_plugin(plugin):
            return None
        others = [p for n, p in self.pm.list_name_plugin() if n != plugin and p is not None]
        caller = self.pm.subset_hook_caller(hook, remove_plugins=others)
        result = caller(**kwargs)
        if getattr(hookspecs, hook).sluice_spec["firstresult"]:
            return result
        return result[0] if result else None

    def implements(self, plugin: str, hook: str) -> bool:
        return any(impl.plugin_name == plugin for impl in getattr(self.pm.hook, hook).get_hookimpls())

    def restore_sessions(self, sessions: Sequence) -> dict[str, int]:
        by_owner: dict[str, list] = {}
        for s in sessions:
            by_owner.setdefault(s.owner, []).append(s)
        applied = {}
        for owner, items in by_owner.items():
            ctx = self.contexts.get(owner)
            record = self.records.get(owner)
            if ctx is None or record is None or record.state not in (State.RUNNING, State.DEGRADED):
                applied[owner] = 0
                continue
            applied[owner] = self.call(owner, "sluice_session_restore", ctx=ctx, sessions=items) or 0
        return applied
