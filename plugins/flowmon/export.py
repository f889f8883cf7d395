"""Where evicted flows go: JSON lines, IPFIX collectors, Prometheus aggregates, the recent table.

Every sink takes a batch of flows; a failing sink is counted (``export_errors``) and never stops
the others, and the flows it missed are counted too so nothing is lost silently.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
from collections import Counter, deque
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from sluice.plugins.flowmon import ipfix
from sluice.plugins.flowmon.config import Config
from sluice.plugins.flowmon.records import PROTOCOLS, Flow

OTHER = "other"


class JsonLines:
    """One JSON object per flow, to a file (appended) or stdout ("-")."""

    name = "json"

    def __init__(self, path: str, ifnames):
        self.path, self.ifnames = path, ifnames
        self.out: TextIO = sys.stdout if path == "-" else open(path, "a", buffering=1)  # noqa: SIM115

    def export(self, flows: Sequence[Flow]) -> None:
        names = self.ifnames()
        self.out.write("".join(json.dumps(f.as_dict(names)) + "\n" for f in flows))
        self.out.flush()

    def close(self) -> None:
        if self.out is not sys.stdout:
            self.out.close()


class Ipfix:
    def __init__(self, collector, reason_values: dict[str, int]):
        self.name = f"ipfix-{collector.transport}:{collector.address}"
        self.exporter = ipfix.Exporter(
            collector.address,
            collector.transport,
            domain=collector.observation_domain,
            template_refresh_s=collector.template_refresh_s,
            reasons=reason_values,
        )

    def export(self, flows: Sequence[Flow]) -> None:
        self.exporter.export(flows)

    def close(self) -> None:
        self.exporter.close()


class Nats:
    """JSON lines on a NATS subject, ``batch`` flows per message.

    The exporter thread is not an event loop, so the client lives on a private loop in its own
    thread; each export waits for the server's flush (or fails, and the batch is counted lost).
    """

    def __init__(self, target, ifnames):
        self.target, self.ifnames = target, ifnames
        self.name = f"nats:{target.subject}"
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="flowmon-nats", daemon=True)
        self.thread.start()
        self.nc = None

    async def _publish(self, payloads: list[bytes]) -> None:
        import nats

        if self.nc is None or self.nc.is_closed:
            self.nc = await nats.connect(
                self.target.url, connect_timeout=2, max_reconnect_attempts=2, allow_reconnect=True
            )
        for p in payloads:
            await self.nc.publish(self.target.subject, p)
        await self.nc.flush(timeout=5)

    def export(self, flows: Sequence[Flow]) -> None:
        names = self.ifnames()
        lines = [json.dumps(f.as_dict(names)) for f in flows]
        n = self.target.batch
        payloads = ["\n".join(lines[i : i + n]).encode() for i in range(0, len(lines), n)]
        try:
            asyncio.run_coroutine_threadsafe(self._publish(payloads), self.loop).result(15)
        except Exception as exc:  # nats-py raises its own error types; the caller counts OSError
            raise OSError(f"nats {self.target.url}: {type(exc).__name__}: {exc}") from None

    def close(self) -> None:
        async def drain():
            if self.nc is not None and not self.nc.is_closed:
                await self.nc.close()

        try:
            asyncio.run_coroutine_threadsafe(drain(), self.loop).result(5)
        except Exception:
            pass  # closing a broken connection: nothing left to save
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


class Aggregates:
    """Totals for Prometheus with bounded labels: protocol names from a fixed table (else "other"),
    the first ``max_interfaces`` interface names seen (later ones are "other")."""

    def __init__(self, max_interfaces: int):
        self.max_interfaces = max_interfaces
        self.lock = threading.Lock()
        self.bytes: Counter = Counter()
        self.packets: Counter = Counter()
        self.flows: Counter = Counter()
        self.interfaces: set[str] = set()

    def _iface(self, name: str) -> str:
        if name in self.interfaces:
            return name
        if len(self.interfaces) < self.max_interfaces:
            self.interfaces.add(name)
            return name
        return OTHER

    def add(self, flows: Sequence[Flow], ifnames: dict[int, str]) -> None:
        with self.lock:
            for f in flows:
                if not f.packets:
                    continue  # drop-only records: counted by reason from the kernel's counters
                labels = (PROTOCOLS.get(f.proto, OTHER), self._iface(ifnames.get(f.ifindex, str(f.ifindex))))
                self.bytes[labels] += f.bytes
                self.packets[labels] += f.packets
                self.flows[labels] += 1

    def snapshot(self) -> tuple[dict, dict, dict]:
        with self.lock:
            return dict(self.bytes), dict(self.packets), dict(self.flows)


class Recent:
    """The last ``size`` flows, written to ``<state_dir>/flows.json`` for the CLI (agent down or up).

    Flow objects are kept and turned into JSON only at :meth:`save`, so a large eviction pays
    for ``size`` conversions, not one per evicted flow."""

    def __init__(self, size: int, path: Path):
        self.flows: deque = deque(maxlen=size)
        self.path = path

    def add(self, flows: Sequence[Flow]) -> None:
        if self.flows.maxlen:
            self.flows.extend(flows[-self.flows.maxlen :])

    def as_dicts(self, ifnames: dict[int, str]) -> list[dict]:
        return [f.as_dict(ifnames) for f in self.flows]

    def save(self, ifnames: dict[int, str]) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.as_dicts(ifnames)))
        os.replace(tmp, self.path)


def build_sinks(config: Config, ifnames, reason_values: dict[str, int]) -> list:
    sinks: list = [Ipfix(c, reason_values) for c in config.ipfix]
    if config.json_path:
        sinks.append(JsonLines(config.json_path, ifnames))
    if config.nats:
        sinks.append(Nats(config.nats, ifnames))
    return sinks
