"""Desired state → kernel: the route table, peer health and the one reconcile that applies both.

Everything that changes the trie (config load, API/CLI route edits, `health set`, health probes)
goes through :meth:`Tunnel.apply`: render the desired routes with current health into trie
entries, diff them against what the kernel holds, delete the stale ones and write the new and
changed ones with batch calls. Unchanged entries are never touched, so a restart that finds the
pinned trie already right writes nothing and the datapath sees no gap.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pydantic

from sluice.bpf.maps import Map
from sluice.plugins.tunnel.model import (
    NO_STATS,
    STATS_SLOTS,
    IPNet,
    Nexthop,
    Route,
    RouteValue,
    lookup_key,
    slot_bytes,
    value_bytes,
)

Resolver = Callable[[Nexthop], "int | str"]


def mix32(h: int) -> int:
    """tunnel.bpf.c's mix32 (murmur3 finaliser)."""
    h &= 0xFFFFFFFF
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    return h ^ (h >> 16)


def nexthop_seed(remote16: bytes, vni: int) -> int:
    """tunnel.bpf.c's nexthop_seed: the nexthop's identity for rendezvous hashing."""
    w = [int.from_bytes(remote16[i : i + 4], "little") for i in range(0, 16, 4)]
    return mix32(w[0] ^ mix32(w[1] ^ mix32(w[2] ^ mix32(w[3] ^ mix32(vni)))))


def rendezvous(flow_hash: int, seeds: list[int]) -> int:
    """Index of the winner among ``seeds`` (the kernel's choice for a healthy set)."""
    weights = [mix32(flow_hash ^ s) for s in seeds]
    return max(range(len(seeds)), key=lambda i: (weights[i], -i))


@dataclass
class ReconcileResult:
    added: int = 0
    changed: int = 0
    removed: int = 0
    unchanged: int = 0
    unusable: dict[str, dict[str, str]] = field(default_factory=dict)  # dst → nexthop → reason
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return self.__dict__ | {"seconds": round(self.seconds, 4)}


def read_entries(trie: Map) -> dict[bytes, bytes]:
    """Every trie entry as raw key → value bytes (batch lookup; per key where unsupported)."""
    return {bytes(k): bytes(v) for k, v in trie.items()}


def diff_and_write(trie: Map, desired: dict[bytes, bytes], batch: bool = True) -> ReconcileResult:
    """Make ``trie`` hold exactly ``desired``: stale removed, changed rewritten, the rest untouched."""
    current = read_entries(trie) if batch else {bytes(k): bytes(v) for k, v in trie.items_per_key()}
    stale = [k for k in current if k not in desired]
    writes = [(k, v) for k, v in desired.items() if current.get(k) != v]
    result = ReconcileResult(removed=len(stale), unchanged=len(desired) - len(writes))
    result.added = sum(1 for k, _ in writes if k not in current)
    result.changed = len(writes) - result.added
    if batch:
        trie.delete_batch(stale)
        trie.update_batch(writes)
    else:
        for k in stale:
            trie.delete(k)
        trie.update_per_key(writes)
    return result


class RoutesFile(pydantic.BaseModel):
    """What the plugin keeps in its state dir across restarts: API routes, peer health and which
    stats slot counts which nexthop (so counters survive restarts and stay with their nexthop)."""

    routes: list[Route] = []
    health: dict[str, bool] = {}
    stats_slots: dict[str, int] = {}


class Tunnel:
    """The plugin's state: config routes, API routes, peer health; one lock, one apply path."""

    def __init__(
        self,
        trie: Map,
        resolve: Resolver,
        state_file: Path | None = None,
        on_transition: Callable[[str, bool, str], None] | None = None,
        stats: Map | None = None,
    ):
        self.trie = trie
        self.stats = stats  # the per-CPU counters array; a newly assigned slot is zeroed in it
        self.stats_slots: dict[str, int] = {}  # nexthop_ident → slot
        self.resolve = resolve
        self.state_file = state_file
        self.on_transition = on_transition or (lambda peer, up, source: None)
        self.config_routes: dict[IPNet, Route] = {}
        self.api_routes: dict[IPNet, Route] = {}
        self.health: dict[str, bool] = {}
        self.last = ReconcileResult()
        self.lock = threading.RLock()
        self._load_state()

    # ---- persistence ------------------------------------------------------------------------

    def _load_state(self) -> None:
        if self.state_file is None or not self.state_file.exists():
            return
        saved = RoutesFile.model_validate_json(self.state_file.read_text())
        self.api_routes = {r.dst: r for r in saved.routes}
        self.health = dict(saved.health)
        self.stats_slots = dict(saved.stats_slots)

    def _save_state(self) -> None:
        if self.state_file is None:
            return
        data = RoutesFile(
            routes=list(self.api_routes.values()), health=self.health, stats_slots=self.stats_slots
        )
        _write_atomic(self.state_file, data.model_dump_json(indent=1))

    # ---- the desired state ------------------------------------------------------------------

    def routes(self) -> dict[IPNet, tuple[Route, str]]:
        """dst → (route, source); an API route replaces a config route for the same dst."""
        out = {dst: (r, "config") for dst, r in self.config_routes.items()}
        out.update({dst: (r, "api") for dst, r in self.api_routes.items()})
        return out

    def peers(self) -> dict[str, set]:
        """peer → the underlay addresses its nexthops use."""
        out: dict[str, set] = {}
        for route, _ in self.routes().values():
            for nh in route.nexthops:
                out.setdefault(nh.peer, set()).add(nh.underlay)
        return out

    def render(self) -> tuple[dict[bytes, bytes], dict[str, dict[str, str]]]:
        """Trie entries for the desired routes, and the nexthops that cannot be used (with why).

        Hot for big tables: each distinct nexthop is resolved and encoded once (keyed by identity,
        hashing models and addresses costs more than encoding), keys are cached on the routes."""
        entries: dict[bytes, bytes] = {}
        unusable: dict[str, dict[str, str]] = {}
        slots: dict[int, bytes | str] = {}
        in_use: set[str] = set()
        for route in self._desired():
            usable = []
            for nh in route.nexthops:
                slot = slots.get(id(nh))
                if slot is None:
                    where = self.resolve(nh)
                    if isinstance(where, str):
                        slot = slots[id(nh)] = where
                    else:
                        ident = nexthop_ident(nh.underlay, nh.vni, nh.protocol.label)
                        in_use.add(ident)
                        up = self.health.get(nh.peer, True)
                        slot = slots[id(nh)] = slot_bytes(nh, where, up, self._stats_slot(ident))
                if isinstance(slot, str):
                    unusable.setdefault(str(route.dst), {})[nh.describe()] = slot
                else:
                    usable.append(slot)
            if usable:
                entries[route.key] = value_bytes(route, usable)
        for gone in set(self.stats_slots) - in_use:
            del self.stats_slots[gone]  # its slot is zeroed when it is handed out again
        return entries, unusable

    def _stats_slot(self, ident: str) -> int:
        slot = self.stats_slots.get(ident)
        if slot is not None:
            return slot
        taken = set(self.stats_slots.values())
        slot = next((i for i in range(STATS_SLOTS) if i not in taken), NO_STATS)
        if slot != NO_STATS:
            self.stats_slots[ident] = slot
            if self.stats is not None:
                self.stats.set(slot.to_bytes(4, "little"), bytes(self.stats.info.value_size))
        return slot

    def _desired(self) -> Iterator[Route]:
        """The routes of :meth:`routes` without building the merged dict."""
        api = self.api_routes
        yield from (r for dst, r in self.config_routes.items() if dst not in api)
        yield from api.values()

    def apply(self, batch: bool = True) -> ReconcileResult:
        with self.lock:
            t0 = time.perf_counter()
            slots_before = dict(self.stats_slots)
            entries, unusable = self.render()
            if self.stats_slots != slots_before:
                self._save_state()
            result = diff_and_write(self.trie, entries, batch)
            result.unusable = unusable
            result.seconds = time.perf_counter() - t0
            self.last = result
            self._save_status()
            return result

    def status(self) -> dict:
        """What the CLI needs besides the trie: peer names, health, unusable nexthops, last apply."""
        with self.lock:
            names = {}
            for route, _ in self.routes().values():
                for nh in route.nexthops:
                    names[nexthop_ident(nh.underlay, nh.vni, nh.protocol.label)] = nh.peer
            return {
                "peers": self.peer_health(),
                "nexthop_peers": names,
                "sources": {str(dst): source for dst, (_, source) in self.routes().items()},
                "unusable": self.last.unusable,
                "stats_slots": dict(self.stats_slots),
                "last_reconcile": self.last.as_dict() | {"unusable": len(self.last.unusable)},
            }

    def _save_status(self) -> None:
        if self.state_file is not None:
            _write_atomic(self.state_file.with_name("status.json"), json.dumps(self.status(), indent=1))

    # ---- edits (each validates fully before touching anything) -------------------------------

    @contextlib.contextmanager
    def _all_or_nothing(self) -> Iterator[None]:
        """An edit the trie cannot take (full: more routes than max_routes) is undone, so the
        desired state never holds what no later apply (health, reload, restart) could write."""
        saved = dict(self.config_routes), dict(self.api_routes)
        try:
            yield
        except OSError as exc:
            self.config_routes, self.api_routes = saved
            self._save_state()
            self.apply()  # the trie back to the previous routes
            raise ValueError(f"routes not applied, nothing changed: {exc}") from None

    def set_config_routes(self, routes: Iterable[Route]) -> ReconcileResult:
        with self.lock, self._all_or_nothing():
            self.config_routes = _by_dst(routes)
            return self.apply()

    def put_route(self, route: Route) -> ReconcileResult:
        with self.lock, self._all_or_nothing():
            self.api_routes[route.dst] = route
            self._save_state()
            return self.apply()

    def delete_route(self, dst: IPNet) -> ReconcileResult:
        with self.lock:
            if dst not in self.api_routes:
                where = "the config" if dst in self.config_routes else "no route"
                raise KeyError(f"{dst}: {where} (only routes added through the API can be deleted)")
            del self.api_routes[dst]
            self._save_state()
            return self.apply()

    def replace_api_routes(self, routes: Iterable[Route]) -> ReconcileResult:
        with self.lock, self._all_or_nothing():
            self.api_routes = _by_dst(routes)
            self._save_state()
            return self.apply()

    def set_health(self, peer: str, up: bool, source: str = "manual") -> int:
        """Withdraw (down) or restore (up) every nexthop of ``peer``; returns trie entries changed."""
        with self.lock:
            if peer not in self.peers():
                raise KeyError(f"no nexthop uses peer {peer!r}")
            was = self.health.get(peer, True)
            self.health[peer] = up
            self._save_state()
            result = self.apply()
        if was != up:
            self.on_transition(peer, up, source)
        return result.changed

    def peer_health(self) -> dict[str, bool]:
        with self.lock:
            return {p: self.health.get(p, True) for p in sorted(self.peers())}


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def nexthop_ident(underlay, vni: int, protocol: str) -> str:
    """How status.json names a nexthop: the fields the trie and the stats map both carry."""
    return f"{underlay}|{vni}|{protocol}"


def _by_dst(routes: Iterable[Route]) -> dict[IPNet, Route]:
    out: dict[IPNet, Route] = {}
    for r in routes:
        if r.dst in out:
            raise ValueError(f"route {r.dst} is given twice")
        out[r.dst] = r
    return out


def lookup(trie: Map, address: str) -> RouteValue | None:
    """The route a packet to ``address`` matches (longest prefix), as the kernel sees it."""
    addr = ipaddress.ip_address(address)
    raw = trie.get(bytes(lookup_key(addr)))
    return None if raw is None else RouteValue.from_buffer_copy(bytes(raw))


def trie_dump(trie: Map) -> list[RouteValue]:
    return [RouteValue.from_buffer_copy(v) for v in read_entries(trie).values()]
