"""Garbage collection of the BPF conntrack tables, with Cilium's adaptive interval.

A run walks every table in batches (``Map.items``: one syscall per chunk), picks the entries the
filter selects, then re-reads each one right before deleting it: an entry the datapath refreshed
since the walk saw it (its lifetime moved past "now") is kept. That closes the race Cilium
measured at 1 in 4×10⁵ connections, where GC deleted an entry a packet had just renewed.

The interval adapts to how much each run deleted, relative to the table size (Cilium's rule):
more than 25 % deleted shrinks it by (1 − ratio), down to ``min_interval``; under 5 % grows it by
half, up to ``max_interval``. The datapath's creation counters give an early wake-up: when the
entries created since the last run would fill a table past ``pressure_ratio``, GC runs at once.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from sluice.bpf.maps import Map
from sluice.plugins.conntrack.table import Conn, CtEntry, CtKey, Tables, monotonic_s

Clock = Callable[[], float]
_LIFETIME_WORD = CtEntry.lifetime.offset // 4  # index of lifetime among a value's u32 words


@dataclass
class GcFilter:
    """What a run deletes, tested in Cilium's order: expired, IPs, then the callback.

    ``expired``: lifetime below now. ``match_ips``: either address in the set (16-byte,
    v4-mapped). ``callback(conn) -> bool``: anything else. An entry matching any test goes.
    """

    expired: bool = True
    match_ips: set[bytes] = field(default_factory=set)
    callback: Callable[[Conn], bool] | None = None

    def selects(self, conn: Conn, now: float) -> bool:
        if self.expired and conn.entry.lifetime < now:
            return True
        if self.match_ips and conn.matches(self.match_ips):
            return True
        return bool(self.callback and self.callback(conn))

    def still_selects(self, conn: Conn, now: float) -> bool:
        """The re-check before delete: an entry selected only for being expired must still be."""
        if self.match_ips and conn.matches(self.match_ips):
            return True
        if self.callback and self.callback(conn):
            return True
        return self.expired and conn.entry.lifetime < now


@dataclass
class GcStats:
    """One run: per-table counts summed, the deleted entries, and the interval chosen next."""

    started: float
    duration_s: float = 0.0
    scanned: int = 0
    selected: int = 0
    deleted: int = 0
    refreshed: int = 0  # selected by the walk, renewed by the datapath before the delete: kept
    max_entries: int = 0
    alive: dict[str, int] = field(default_factory=dict)  # "tenant/kind" → entries left
    interval_s: float = 0.0
    dry_run: bool = False
    deleted_entries: list[Conn] = field(default_factory=list)


@dataclass(frozen=True)
class GcSettings:
    initial_interval: float = 300.0
    min_interval: float = 10.0
    max_interval: float = 43200.0
    pressure_ratio: float = 0.9
    chunk: int = 4096


def next_interval(current: float, deleted: int, max_entries: int, s: GcSettings) -> float:
    """Cilium's adaptation: shrink by (1 − ratio) above 25 % deleted, grow ×1.5 below 5 %."""
    ratio = deleted / max_entries if max_entries else 0.0
    if ratio > 0.25:
        current *= 1.0 - ratio
    elif ratio < 0.05:
        current *= 1.5
    return min(max(current, s.min_interval), s.max_interval)


class Collector:
    """Runs GC over the tables behind ``tables`` (opened per run, so tenants come and go)."""

    def __init__(
        self,
        open_tables: Callable[[], Tables],
        settings: GcSettings = GcSettings(),
        clock: Clock = monotonic_s,
        created_counter: Callable[[], int] | None = None,
        batched: bool = True,
    ):
        self.open_tables = open_tables
        self.settings = settings
        self.clock = clock  # the datapath's clock; tests inject their own "now"
        self.created_counter = created_counter  # datapath creations so far (pressure signal)
        self.batched = batched  # False: walk with one get_next_key + lookup per entry (benchmarks)
        self.interval = settings.initial_interval
        self.observers: list[Callable[[GcStats], None]] = []
        self.runs = 0
        self.deleted_total = 0
        self.last: GcStats | None = None
        self.wakeups = 0  # early runs caused by table pressure
        self._created_at_last_run = 0
        self._wake = asyncio.Event()

    # --- one run -------------------------------------------------------------------------------

    def scan(self, tables: Tables, flt: GcFilter, now: float, stats: GcStats) -> list[tuple[object, Conn]]:
        """The walk: every entry the filter selects, with the table it is in (batched reads).

        Chunks are read raw and only the entries the filter picks are decoded: the lifetimes of a
        whole chunk are one strided view of its values, so an expiry-only walk costs little more
        than the batch syscalls themselves.
        """
        picked = []
        only_expiry = flt.expired and not flt.match_ips and flt.callback is None
        for tenant, kind, m in tables.each():
            stats.max_entries = max(stats.max_entries, m.info.max_entries)
            alive = 0
            ks, vs = m.info.key_size, m.info.value_size
            for n, kb, vb in self._chunks(m):
                stats.scanned += n
                lifetimes = memoryview(vb).cast("I")[_LIFETIME_WORD :: vs // 4]
                if only_expiry:
                    candidates = [i for i, lifetime in enumerate(lifetimes) if lifetime < now]
                else:
                    candidates = range(n)
                alive += n - len(candidates)
                for i in candidates:
                    conn = Conn(
                        tenant, kind, CtKey.from_buffer_copy(kb, i * ks), CtEntry.from_buffer_copy(vb, i * vs)
                    )
                    if flt.selects(conn, now):
                        picked.append(((tenant, kind), conn))
                    else:
                        alive += 1
            stats.alive[f"{tenant}/{kind}"] = alive
        stats.selected = len(picked)
        return picked

    def _chunks(self, m: Map):
        """Raw ``(n, keys, values)`` chunks: batched, or one entry per syscall pair (benchmarks)."""
        if self.batched:
            yield from m.items_raw(chunk=self.settings.chunk)
            return
        with Map(os.dup(m.fd), label=m.what) as raw:  # untyped: items come back as bytes
            for kb, vb in raw.items_per_key():
                yield 1, kb, vb

    def reap(
        self,
        tables: Tables,
        picked: Iterable[tuple[object, Conn]],
        flt: GcFilter,
        stats: GcStats,
        dry_run: bool,
    ) -> None:
        """Delete what the walk picked, re-reading each entry first (see the module doc)."""
        open_maps: dict[object, object] = {}
        try:
            for where, conn in picked:
                m = open_maps.get(where)
                if m is None:
                    m = open_maps[where] = tables.table(where[1], where[0])
                if m is None:
                    continue
                current: CtEntry | None = m.get(conn.key)
                if current is None:
                    continue  # gone already (LRU eviction, another GC)
                fresh = Conn(conn.tenant, conn.kind, conn.key, current)
                if not flt.still_selects(fresh, self.clock()):
                    stats.refreshed += 1
                    name = f"{conn.tenant}/{conn.kind}"
                    stats.alive[name] = stats.alive.get(name, 0) + 1
                    continue
                if dry_run or m.delete(conn.key):
                    stats.deleted += 1
                    stats.deleted_entries.append(fresh)
        finally:
            for m in open_maps.values():
                if m is not None:
                    m.close()

    def run(self, flt: GcFilter | None = None, dry_run: bool = False) -> GcStats:
        flt = flt or GcFilter()
        started = time.perf_counter()
        now = self.clock()
        stats = GcStats(started=now, dry_run=dry_run)
        with self.open_tables() as tables:
            picked = self.scan(tables, flt, now, stats)
            self.reap(tables, picked, flt, stats, dry_run)
        stats.duration_s = time.perf_counter() - started
        if not dry_run:
            self.interval = next_interval(self.interval, stats.deleted, stats.max_entries, self.settings)
            self.runs += 1
            self.deleted_total += stats.deleted
            self._created_at_last_run = self.created_counter() if self.created_counter else 0
        stats.interval_s = self.interval
        self.last = stats
        for observe in self.observers:
            observe(stats)
        return stats

    # --- scheduling ----------------------------------------------------------------------------

    def under_pressure(self) -> bool:
        """Would the entries created since the last run fill a table past pressure_ratio?"""
        if not self.created_counter or not self.last or not self.last.max_entries:
            return False
        created = self.created_counter() - self._created_at_last_run
        biggest = max(self.last.alive.values(), default=0)
        return biggest + created >= self.settings.pressure_ratio * self.last.max_entries

    def wake(self) -> None:
        self._wake.set()

    async def loop(self, poll_s: float = 1.0) -> None:
        """Run now, then after each interval, or early on pressure or wake()."""
        while True:
            await asyncio.to_thread(self.run)
            deadline = time.monotonic() + self.interval
            while time.monotonic() < deadline:
                try:
                    await asyncio.wait_for(
                        self._wake.wait(), timeout=min(poll_s, deadline - time.monotonic())
                    )
                    self._wake.clear()
                    break
                except TimeoutError:
                    pass
                if await asyncio.to_thread(self.under_pressure):
                    self.wakeups += 1
                    break
