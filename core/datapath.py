"""The datapath: compiles plugins' programs, attaches them, and remembers exactly what it attached.

The datapath outlives the agent: filters hold their programs and programs hold their (pinned)
maps, so enforcement continues while the agent is stopped or dead. A restart compiles again,
reuses the pins and replaces each filter in place. Every attachment is recorded in
``<state_dir>/attachments.json`` (per network namespace), so ``sluice cleanup`` removes exactly
what sluice attached, and a plugin removed from the config has its filters removed at next start.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from pyroute2 import IPRoute

from sluice import log as slog
from sluice.bpf import loader, tc
from sluice.programs import PROLOGUE_PRIO, TC, Program, Tracepoint

log = slog.get()

BPF_DIR = Path(__file__).resolve().parent / "bpf"
DENY = Program("deny", BPF_DIR / "deny.bpf.c")
DENY_FN = "sluice_deny"
CORE = "core"  # the owner of the core's own programs
PROLOGUE = Program("prologue", BPF_DIR / "prologue.bpf.c")
PROLOGUE_FN = "sluice_prologue"


@dataclass(frozen=True)
class Attachment:
    plugin: str
    program: str
    fn: str
    iface: str
    direction: str
    prio: int
    added_clsact: bool = False


def netns_id() -> str:
    """Identity of the network namespace we run in (attachments are per namespace)."""
    return str(os.stat("/proc/thread-self/ns/net").st_ino)  # thread-self: setns moves threads


class AttachmentRecord:
    def __init__(self, state_dir: Path):
        self.path = state_dir / "attachments.json"

    def _read_all(self) -> dict[str, list[dict]]:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def read(self) -> list[Attachment]:
        return [Attachment(**a) for a in self._read_all().get(netns_id(), [])]

    def write(self, attachments: list[Attachment]) -> None:
        data = self._read_all()
        data[netns_id()] = [asdict(a) for a in attachments]
        if not data[netns_id()]:
            del data[netns_id()]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(self.path)


class Datapath:
    def __init__(self, bpffs: Path, state_dir: Path, cflags: list[str]):
        self.bpffs = bpffs
        self.cflags = cflags
        self.record = AttachmentRecord(state_dir)
        self.attached: list[Attachment] = self._reconciled(self.record.read())
        self._prologue = None  # the compiled prologue, kept while this datapath lives
        self._prologue_placed: set[tuple[str, str]] = set()  # hooks given this run's prologue

    def _reconciled(self, recorded: list[Attachment]) -> list[Attachment]:
        """Keep only records whose filter is really there under its name. A namespace deleted and
        made again can reuse the inode the record is keyed by; the kernel is the truth."""
        if not recorded:
            return recorded
        with IPRoute() as ipr:
            live = {(f.iface, f.direction, f.prio, f.name) for f in tc.list_filters(ipr)}
        kept = [a for a in recorded if (a.iface, a.direction, a.prio, tc.filter_name(a.plugin, a.fn)) in live]
        if len(kept) != len(recorded):
            self.record.write(kept)
        return kept

    def load(self, plugin: str, programs: list[Program]) -> dict:
        """Compile, load and attach one plugin's programs; returns program name → BCC object."""
        compiled = {}
        try:
            with IPRoute() as ipr:
                for program in programs:
                    bpf = loader.compile_program(plugin, program, bpffs=self.bpffs, cflags=self.cflags)
                    compiled[program.name] = bpf
                    for point in program.attach:
                        if isinstance(point, TC):
                            self._attach_tc(ipr, bpf, plugin, program, point)
                        elif isinstance(point, Tracepoint):
                            self._attach_tracepoint(bpf, plugin, point)
        except BaseException:
            for bpf in compiled.values():  # fds, tracepoint links; attached filters keep their programs
                bpf.cleanup()
            self._fail_closed(plugin, programs)
            raise
        return compiled

    def _fail_closed(self, plugin: str, programs: list[Program]) -> None:
        """After ``plugin`` failed to load: its program attached before stays in each slot; a
        slot of a fail-closed program (TC.fails_closed) that nothing of it holds gets the core's
        deny program, recorded under the plugin, so its next start replaces it in place."""
        held = {(a.iface, a.direction, a.prio) for a in self.attached}
        points = [
            p
            for prog in programs
            for p in prog.attach
            if isinstance(p, TC) and p.fails_closed and (p.iface, p.direction, p.rank) not in held
        ]
        if not points:
            return
        bpf = None
        try:
            bpf = loader.compile_program(plugin, DENY, bpffs=self.bpffs, cflags=self.cflags)
            with IPRoute() as ipr:
                for point in points:
                    deny = TC(point.iface, point.direction, DENY_FN, point.phase, point.order, "open")
                    self._attach_tc(ipr, bpf, plugin, DENY, deny)
                    log.error(
                        "hook fails closed: dropping every packet until the plugin starts",
                        plugin=plugin,
                        fn=point.fn,
                        iface=point.iface,
                        direction=point.direction,
                        phase=point.phase,
                        order=point.order,
                    )
        except Exception as exc:
            log.error("could not fail closed", plugin=plugin, error=f"{type(exc).__name__}: {exc}")
        finally:
            if bpf is not None:
                bpf.cleanup()

    def _attach_tracepoint(self, bpf, plugin: str, point: Tracepoint) -> None:
        """Tracepoint links live with the agent process: they observe, never enforce.

        BCC attaches ``TRACEPOINT_PROBE`` functions by itself when it compiles; attach only the others.
        """
        tp = point.tracepoint.encode()
        if tp not in bpf.tracepoint_fds:
            try:
                bpf.attach_tracepoint(tp=tp, fn_name=point.fn.encode())
            except Exception as exc:
                raise loader.CompileError(f"{plugin}: tracepoint {point.tracepoint}: {exc}") from None
        log.info("attached", plugin=plugin, fn=point.fn, tracepoint=point.tracepoint)

    def _attach_tc(self, ipr, bpf, plugin: str, program: Program, point: TC) -> None:
        problem = point.problem()
        if problem:
            raise tc.AttachError(f"{plugin}:{point.fn}: {problem}")
        slot = (point.iface, point.direction, point.rank)
        previous = next((a for a in self.attached if (a.iface, a.direction, a.prio) == slot), None)
        # a plugin replaces its own earlier program in place (its deny program, a renamed fn);
        # the config check refuses clashes between plugins before this point
        if previous and previous.plugin != plugin:
            raise tc.AttachError(
                f"{point.iface} {point.direction} {point.phase} order {point.order} is taken by"
                f" {previous.plugin}:{previous.fn}"
            )
        fd = loader.load_tc(bpf, plugin, point.fn)
        index = tc.ifindex(ipr, point.iface)
        added = tc.ensure_clsact(ipr, index)
        added = self._place_prologue(ipr, point.iface, point.direction, added)
        tc.attach(ipr, point.iface, point.direction, point.rank, fd, tc.filter_name(plugin, point.fn))
        entry = Attachment(
            plugin,
            program.name,
            point.fn,
            point.iface,
            point.direction,
            point.rank,
            added_clsact=added or bool(previous and previous.added_clsact),
        )
        self.attached = [a for a in self.attached if a is not previous] + [entry]
        self.record.write(self.attached)
        log.info(
            "attached",
            plugin=plugin,
            fn=point.fn,
            iface=point.iface,
            direction=point.direction,
            phase=point.phase,
            order=point.order,
        )

    def _place_prologue(self, ipr, iface: str, direction: str, added_clsact: bool) -> bool:
        """Put the core's prologue first on the hook (once per datapath, replacing the one a
        previous agent left in place); returns whether sluice added the hook's clsact qdisc."""
        hook = (iface, direction)
        previous = next(
            (a for a in self.attached if a.plugin == CORE and (a.iface, a.direction) == hook), None
        )
        added_clsact = added_clsact or bool(previous and previous.added_clsact)
        if hook in self._prologue_placed:
            return added_clsact
        self._prologue_placed.add(hook)
        try:
            if self._prologue is None:
                self._prologue = loader.compile_program(CORE, PROLOGUE, bpffs=self.bpffs, cflags=self.cflags)
            fd = loader.load_tc(self._prologue, CORE, PROLOGUE_FN)
            tc.attach(ipr, iface, direction, PROLOGUE_PRIO, fd, tc.filter_name(CORE, PROLOGUE_FN))
        except (loader.CompileError, tc.AttachError) as exc:
            # not fatal: without a published parse each program parses the packet itself
            log.error("prologue not attached", iface=iface, direction=direction, error=str(exc))
            return added_clsact
        entry = Attachment(CORE, PROLOGUE.name, PROLOGUE_FN, iface, direction, PROLOGUE_PRIO, added_clsact)
        self.attached = [a for a in self.attached if a is not previous] + [entry]
        self.record.write(self.attached)
        log.info("attached", plugin=CORE, fn=PROLOGUE_FN, iface=iface, direction=direction, phase="prologue")
        return added_clsact

    def close(self) -> None:
        """Release the compiled prologue's fds (its filters keep the program)."""
        if self._prologue is not None:
            self._prologue.cleanup()
            self._prologue = None

    def detach(self, keep=lambda a: False) -> list[Attachment]:
        """Detach every recorded attachment for which ``keep(a)`` is false; returns those removed.
        The core's prologue goes with the last plugin program on its hook."""
        plugins_kept = {(a.iface, a.direction) for a in self.attached if a.plugin != CORE and keep(a)}

        def kept_(a: Attachment) -> bool:
            return (a.iface, a.direction) in plugins_kept if a.plugin == CORE else keep(a)

        removed, kept = [], []
        with IPRoute() as ipr:
            for a in self.attached:
                if kept_(a):
                    kept.append(a)
                    continue
                found = ipr.link_lookup(ifname=a.iface)
                if found:
                    tc.detach(ipr, found[0], a.direction, a.prio)
                removed.append(a)
            for a in removed:
                still_used = any(k.iface == a.iface for k in kept)
                found = ipr.link_lookup(ifname=a.iface)
                if a.added_clsact and found and not still_used and not tc.has_foreign_filters(ipr, found[0]):
                    tc.remove_clsact(ipr, found[0])
        self.attached = kept
        self._prologue_placed -= {(a.iface, a.direction) for a in removed if a.plugin == CORE}
        self.record.write(kept)
        for a in removed:
            log.info("detached", plugin=a.plugin, fn=a.fn, iface=a.iface, direction=a.direction, order=a.prio)
        return removed

    def detach_stale(self, declared: set[tuple[str, str, str, int]]) -> list[Attachment]:
        """Remove recorded attachments that no enabled plugin declares any more."""
        return self.detach(keep=lambda a: (a.plugin, a.iface, a.direction, a.prio) in declared)


class CleanupRefused(Exception):
    """Cleanup would pull programs and pins from under a running agent."""


def remove_pins(bpffs: Path, plugin: str) -> int:
    """Remove one plugin's pinned maps (its state); returns how many pins there were."""
    root = bpffs / "sluice" / plugin
    if not root.is_dir():
        return 0
    pins = sum(1 for p in root.rglob("*") if not p.is_dir())
    shutil.rmtree(root, ignore_errors=True)
    return pins


def cleanup(bpffs: Path, state_dir: Path, plugin_cleanup=None, plugin: str | None = None) -> dict:
    """Remove everything sluice attached in this network namespace, and its pins; with
    ``plugin``, only that plugin's filters and pins (the core's prologue goes with the last
    plugin program on its hook; other plugins' pins and other tools' filters stay).

    Recorded attachments are removed first; then any filter still named ``sluice:*`` (or
    ``sluice:<plugin>:*``; a record lost with /run) is removed too; then ``plugin_cleanup()``
    (plugins' own leftovers, such as devices). Pins go last: the programs using them are gone by then.
    """
    lock = state_dir / "agent.lock"
    if lock.exists():
        with open(lock) as held:
            try:
                fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise CleanupRefused(
                    f"an agent (pid {held.read().strip() or '?'}) is running with state_dir {state_dir}: stop it first"
                ) from None
    dp = Datapath(bpffs, state_dir, [])
    removed = len(dp.detach(keep=(lambda a: False) if plugin is None else (lambda a: a.plugin != plugin)))
    with IPRoute() as ipr:
        for f in tc.list_filters(ipr):
            if (
                f.owned
                and (plugin is None or f.plugin == plugin)
                and tc.detach(ipr, f.ifindex, f.direction, f.prio)
            ):
                removed += 1
    others = plugin_cleanup() if plugin_cleanup else []
    if plugin is not None:
        return {"filters": removed, "pins": remove_pins(bpffs, plugin), "other": others}
    pins = 0
    root = bpffs / "sluice"
    if root.is_dir():
        pins = sum(1 for p in root.rglob("*") if not p.is_dir())
        shutil.rmtree(root, ignore_errors=True)
    return {"filters": removed, "pins": pins, "other": others}
