"""The replicator: owners' session events → a NATS JetStream KV bucket, and back at boot.

State kept here:

* ``local``: the sessions this node holds (every created/updated event minus deletes, plus the
  sessions the boot load handed back to their owners). It is what "local" means in the status
  and what the full sync makes the bucket agree with.
* a queue of changed keys, never of values: the value written is always the latest ``local``
  one (or a delete when the key left ``local``), so coalescing is free and a write never sends
  stale data. Created and deleted keys go to ``urgent`` (written at once); updated keys go to
  ``debounced`` (written together when the window opened by the first of them closes). The queue
  is bounded (``max_queue`` keys): past it, changes are counted as overflow and the next full
  sync (run at once after a reconnect) repairs the bucket from ``local``.

Writes are pipelined: a batch publishes up to ``batch_size`` messages on ``$KV.<bucket>.<key>``
without waiting, then awaits their JetStream acks together. A write that is not acked is queued
again. The clock is injectable so debouncing can be tested without sleeping.

Hot standby: after the boot load every node watches the bucket (an ordered consumer on
``$KV.<bucket>.>`` from the stream sequence the load started at, resumed from the last sequence
seen after a reconnect). Peers' records go straight into their owners' maps (``restore``), so
the first packet of a flow that fails over matches with no control-plane round trip; deletes
and expiry markers take them out again (``forget``). ``peers`` holds the keys restored that way
and who wrote them. Ownership moves with the traffic: the owner reports an update for a
restored session the moment it carries a packet here, which makes the key local (written with
this node's id); a node that sees a peer's record for one of its local keys lets it go.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import ssl
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

import nats
from nats.js import api as js_api
from nats.js.errors import NotFoundError

from sluice import log as slog
from sluice.plugins.replication.config import Config
from sluice.plugins.replication.records import (
    Record,
    RecordError,
    decode,
    decode_key,
    encode_key,
    encode_value,
)
from sluice.sessions import Session, SessionEvent

KV_OPERATION = "KV-Operation"
DELETE_OPS = ("DEL", "PURGE")
PROBLEM_LOG_LIMIT = 20  # bad records/events logged one by one; after that only counted


@dataclass
class LocalEntry:
    session: Session
    event_ns: int


@dataclass
class Scan:
    """One pass over the bucket (latest revision per key, deletes left out)."""

    records: dict[str, Record] = field(default_factory=dict)
    skipped: Counter = field(default_factory=Counter)  # reason → count


@dataclass
class Stats:
    writes: Counter = field(default_factory=Counter)  # "put" / "delete" → acked writes
    batches: int = 0
    coalesced: int = 0
    errors: Counter = field(default_factory=Counter)  # "write" / "sync" / "connect" / "event"
    overflow: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason → records skipped while reading
    full_syncs: int = 0
    repaired: Counter = field(default_factory=Counter)  # "put" / "delete" → full-sync repairs
    reconnects: int = 0
    watched: Counter = field(default_factory=Counter)  # what the bucket watch did, per kind


class Replicator:
    def __init__(
        self,
        config: Config,
        *,
        servers: list[str] | None = None,
        restore: Callable[[list[Session]], Any] | None = None,
        forget: Callable[[list[Session]], Any] | None = None,
        clock: Callable[[], float] = time.monotonic,
        log=None,
    ):
        self.cfg = config
        self.node_id = config.node
        self.servers = list(servers or config.servers)
        self.restore = restore  # sessions → {owner: applied} (or an awaitable of it)
        self.forget = forget  # sessions gone from the bucket → {owner: removed} (or an awaitable)
        self.clock = clock
        self.log = log or slog.get("replication")
        self.stream = f"KV_{config.bucket}"
        self.prefix = f"$KV.{config.bucket}."

        self.local: dict[str, LocalEntry] = {}
        self.peers: dict[str, str] = {}  # key → node id: peers' sessions restored into the owners
        self.watch_seq = 0  # the last stream sequence the watch applied (or the boot load covered)
        self._incoming: dict[str, Record | None] = {}  # watched changes to apply (None: gone)
        self._incoming_ready = asyncio.Event()
        self._rewatch = asyncio.Event()
        # Owners seen alive in this run (published, or took restored sessions). The full sync
        # deletes stale records of these only: an owner that failed to start keeps its records.
        self.active_owners: set[str] = set()
        self.urgent: dict[str, float] = {}  # key → time of its oldest unwritten change
        self.debounced: dict[str, float] = {}
        self.window_start: float | None = None
        self.needs_sync = False  # overflow happened: the next full sync must repair
        self.last_write_failed = False
        self.stats = Stats()
        self.lags: deque[float] = deque(maxlen=4096)  # seconds from change to ack, recent writes

        self.state = "starting"  # connecting / loading / ready / disconnected / unreachable / stopped
        self.last_error = ""
        self.recent_errors: deque[str] = deque(maxlen=5)  # an auth failure is followed by a reset
        self.boot: dict[str, Any] = {"state": "pending"}
        self.boot_done = False
        self.boot_timed_out = False
        self.last_sync_wall: float | None = None
        self.nc = None
        self.js = None
        self._wake = asyncio.Event()
        # One write at a time: a later batch always carries newer values than an earlier one, and
        # flush() waits for a batch already in flight.
        self._write_lock = asyncio.Lock()
        self._sync_now = asyncio.Event()
        self._logged_problems = 0
        self._reconnect_task: asyncio.Future | None = None

    # ---- events ---------------------------------------------------------------------------

    def submit(self, event: SessionEvent) -> None:
        """Take one session event (sync, never blocks, never raises for a bad event)."""
        try:
            key = encode_key(event.owner, event.session.key)
        except RecordError as exc:
            self.stats.errors["event"] += 1
            self._log_limited("session event not replicable", error=str(exc))
            return
        now = self.clock()
        self.active_owners.add(event.owner)
        if event.kind == "deleted":
            held = self.local.pop(key, None) is not None
            # A peer's restored session that idled out here: its holder would have refreshed it,
            # so the record is stale (a dead peer's). Anything else is not ours to delete.
            if not held and self.peers.pop(key, None) is None:
                return
        else:
            self.local[key] = LocalEntry(event.session, event.time_ns)
            if self.peers.pop(key, None) is not None:
                self.stats.watched["taken_over"] += 1
        if key in self.urgent:
            self.stats.coalesced += event.kind == "updated"
            return  # already due: the write sends whatever is latest then
        if event.kind == "updated":
            if key in self.debounced:
                self.stats.coalesced += 1
                return
            if not self._room():
                return
            self.debounced[key] = now
            if self.window_start is None:
                self.window_start = now
                self._wake.set()  # the writer learns the window's deadline
            return
        since = self.debounced.pop(key, None)
        if since is None:
            if not self._room():
                return
            since = now
        self.urgent[key] = since
        self._wake.set()

    def _room(self) -> bool:
        if len(self.urgent) + len(self.debounced) < self.cfg.max_queue:
            return True
        self.stats.overflow += 1
        self.needs_sync = True
        return False

    @property
    def queue_depth(self) -> int:
        return len(self.urgent) + len(self.debounced)

    def _next_due(self) -> float | None:
        """Seconds until something is due to be written (0: now), None when nothing is queued."""
        if self.urgent:
            return 0.0
        if self.debounced and self.window_start is not None:
            return max(0.0, self.window_start + self.cfg.debounce - self.clock())
        return None

    # ---- writing --------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self.js is not None and self.nc is not None and self.nc.is_connected

    async def write_due(self, force: bool = False) -> int:
        """Write what is due (urgent keys; debounced ones once their window closed, or all with
        ``force``). Returns how many writes were acked; unacked ones are queued again."""
        if not self.connected:
            return 0
        async with self._write_lock:
            return await self._write_due(force)

    async def _write_due(self, force: bool) -> int:
        keys, self.urgent = self.urgent, {}
        window_closed = (
            self.window_start is not None and self.clock() - self.window_start >= self.cfg.debounce
        )
        if self.debounced and (force or window_closed):
            keys.update(self.debounced)
            self.debounced, self.window_start = {}, None
        elif not self.debounced:
            self.window_start = None
        if not keys:
            return 0
        acked, failed = await self._write(keys)
        self.last_write_failed = bool(failed)
        for key, since in failed.items():
            if key not in self.urgent and key not in self.debounced and self._room():
                self.urgent[key] = since
        return acked

    async def _write(self, keys: dict[str, float]) -> tuple[int, dict[str, float]]:
        """Write the current state of ``keys`` in pipelined batches: (acked, failed key → since)."""
        acked, failed = 0, {}
        it = iter(keys.items())
        while chunk := list(islice(it, self.cfg.batch_size)):
            inflight = []
            for key, since in chunk:
                entry = self.local.get(key)
                try:
                    if entry is None:
                        fut = await self.js.publish_async(
                            self.prefix + key, b"", headers={KV_OPERATION: "DEL"}
                        )
                    else:
                        payload = encode_value(entry.session, self.node_id, entry.event_ns)
                        fut = await self.js.publish_async(self.prefix + key, payload)
                except Exception as exc:  # disconnected mid-batch, buffer full: queue again
                    self._note_error("write", exc)
                    failed[key] = since
                    continue
                inflight.append((key, since, entry is None, fut))
            if inflight:
                await asyncio.wait([f for *_, f in inflight], timeout=self.cfg.write_timeout)
            self.stats.batches += 1
            now = self.clock()
            for key, since, is_delete, fut in inflight:
                if fut.done() and not fut.cancelled() and fut.exception() is None:
                    acked += 1
                    self.stats.writes["delete" if is_delete else "put"] += 1
                    self.lags.append(now - since)
                else:
                    if fut.done() and not fut.cancelled():
                        self._note_error("write", fut.exception())
                    else:  # no ack in time
                        fut.cancel()
                        self._note_error("write", TimeoutError(f"no ack in {self.cfg.write_timeout}s"))
                    failed[key] = since
        return acked, failed

    async def flush(self, timeout: float | None = None) -> int:
        """Write everything queued now, debounce window or not. Returns writes acked."""
        deadline = self.clock() + (timeout if timeout is not None else self.cfg.write_timeout * 2)
        total = 0
        while self.connected and self.clock() < deadline:
            if not self.queue_depth:
                async with self._write_lock:  # a batch in flight is part of the flush
                    if not self.queue_depth:
                        break
                continue
            before = self.queue_depth
            total += await self.write_due(force=True)
            if self.queue_depth >= before:  # nothing acked (leader election?): retry until the deadline
                await asyncio.sleep(min(self.cfg.reconnect_wait, max(0.0, deadline - self.clock())))
        return total

    @property
    def idle(self) -> bool:
        """Nothing queued and no batch in flight."""
        return not self.queue_depth and not self._write_lock.locked()

    async def run_writer(self) -> None:
        """Background: write urgent keys at once and debounced ones when their window closes."""
        while True:
            due = self._next_due()
            if due is None or due > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), due)
            self._wake.clear()
            if not self.connected:
                await asyncio.sleep(self.cfg.reconnect_wait)
                continue
            await self.write_due()
            if self.last_write_failed:  # do not spin on a sick server
                await asyncio.sleep(min(self.cfg.reconnect_wait, 1.0))

    # ---- connection, bucket, boot ---------------------------------------------------------

    def connect_options(self) -> dict[str, Any]:
        cfg = self.cfg
        opts: dict[str, Any] = {
            "servers": self.servers,
            "name": f"sluice-replication-{self.node_id}",
            "connect_timeout": cfg.connect_timeout,
            "reconnect_time_wait": cfg.reconnect_wait,
            "max_reconnect_attempts": -1,
            "allow_reconnect": True,
            "disconnected_cb": self._on_disconnected,
            "reconnected_cb": self._on_reconnected,
            "error_cb": self._on_error,
        }
        if cfg.user is not None:
            opts.update(user=cfg.user, password=cfg.password)
        if cfg.token is not None:
            opts["token"] = cfg.token
        if cfg.nkey_seed_file is not None or cfg.credentials_file is not None:
            try:
                import nkeys  # noqa: F401  (nats-py signs with it; it is an optional dependency)
            except ImportError:
                raise RuntimeError("nkey_seed_file and credentials_file need the nkeys package") from None
        if cfg.nkey_seed_file is not None:
            opts["nkeys_seed"] = str(cfg.nkey_seed_file)
        if cfg.credentials_file is not None:
            opts["user_credentials"] = str(cfg.credentials_file)
        if cfg.tls_ca_file or cfg.tls_cert_file or any(s.startswith("tls://") for s in self.servers):
            tls = ssl.create_default_context(cafile=str(cfg.tls_ca_file) if cfg.tls_ca_file else None)
            if cfg.tls_cert_file:
                tls.load_cert_chain(str(cfg.tls_cert_file), str(cfg.tls_key_file))
            opts["tls"] = tls
            if cfg.tls_hostname:
                opts["tls_hostname"] = cfg.tls_hostname
        return opts

    async def _on_disconnected(self) -> None:
        if self.state != "stopped":
            self.state = "disconnected"
            self.log.warning("NATS disconnected: changes queue until it is back", queued=self.queue_depth)

    async def _on_reconnected(self) -> None:
        self.stats.reconnects += 1
        self.state = "ready" if self.boot_done else "loading"
        url = self.nc.connected_url.netloc if self.nc and self.nc.connected_url else "?"
        self.log.info("NATS reconnected: writing the queue, then a full sync", server=url)
        self._wake.set()
        self._sync_now.set()  # a restarted server may have lost unsynced writes: check everything
        self._rewatch.set()  # resume the watch from the last sequence seen

    async def _on_error(self, exc: Exception) -> None:
        # nats-py retries the initial connect itself (max_reconnect_attempts=-1) and reports here.
        self._note_error("nats", exc)

    def _note_error(self, kind: str, exc: BaseException | None) -> None:
        self.stats.errors[kind] += 1
        self.last_error = f"{type(exc).__name__}: {exc}".splitlines()[0] if exc else kind
        if not self.recent_errors or self.recent_errors[-1] != self.last_error:
            self.recent_errors.append(self.last_error)

    async def connect(self) -> None:
        """Connect and bind (or create) the bucket, retrying until it works."""
        opts = self.connect_options()
        while True:
            self.state = "connecting"
            try:
                nc = await nats.connect(**opts)
            except Exception as exc:
                self._note_error("connect", exc)
                self.log.warning("NATS unreachable, retrying", servers=self.servers, error=self.last_error)
                await asyncio.sleep(self.cfg.reconnect_wait)
                continue
            try:
                self.js = nc.jetstream(timeout=self.cfg.write_timeout, publish_async_max_pending=4000)
                self.nc = nc
                await self._bind_bucket()
                return
            except Exception as exc:
                self._note_error("connect", exc)
                self.log.warning(
                    "NATS bucket not usable, retrying", bucket=self.cfg.bucket, error=self.last_error
                )
                self.nc = self.js = None
                with contextlib.suppress(Exception):
                    await nc.close()
                await asyncio.sleep(self.cfg.reconnect_wait)

    async def _bind_bucket(self) -> None:
        cfg = self.cfg
        try:
            info = await self.js.stream_info(self.stream)
        except NotFoundError:
            await self.js.create_key_value(
                bucket=cfg.bucket,
                history=cfg.history,
                ttl=cfg.ttl or None,
                # Expiry leaves a delete marker (Nats-Marker-Reason): watchers forget the session.
                limit_marker_ttl=cfg.ttl or None,
                replicas=cfg.replicas,
                storage=js_api.StorageType.FILE if cfg.storage == "file" else js_api.StorageType.MEMORY,
                description="sluice sessions (plugins/replication, record version 1)",
            )
            self.log.info("bucket created", bucket=cfg.bucket, replicas=cfg.replicas, history=cfg.history)
            return
        have = {
            "replicas": info.config.num_replicas,
            "history": info.config.max_msgs_per_subject,
            "ttl": info.config.max_age or 0,
        }
        want = {"replicas": cfg.replicas, "history": cfg.history, "ttl": cfg.ttl}
        if have != want:
            self.log.warning(
                "bucket exists with other settings: keeping them", bucket=cfg.bucket, have=have, want=want
            )

    async def start(self) -> None:
        """Connect, then load the bucket and hand it to the owners. Bounded by ``boot_timeout``:
        past it the state says why, and loading goes on in the background when NATS comes back."""
        task = asyncio.ensure_future(self._connect_and_load())
        try:
            await asyncio.wait_for(asyncio.shield(task), self.cfg.boot_timeout)
        except TimeoutError:
            self.boot_timed_out = True
            if not self.connected:
                self.state = "unreachable"
            self.boot["state"] = "waiting"
            self.log.error(
                "boot load not finished in time",
                seconds=self.cfg.boot_timeout,
                state=self.state,
                servers=self.servers,
                error=self.last_error,
                ready=not self.cfg.require_boot_load,
            )
        await task

    async def _connect_and_load(self) -> None:
        await self.connect()
        while True:
            self.state = "loading"
            try:
                await self.boot_load()
                break
            except Exception as exc:
                self._note_error("sync", exc)
                self.log.warning("boot load failed, retrying", error=self.last_error)
                await asyncio.sleep(self.cfg.reconnect_wait)
        self.state = "ready" if self.connected else "disconnected"
        self._wake.set()
        self._sync_now.set()  # first full sync right after the load: repairs what changed meanwhile

    async def boot_load(self) -> None:
        t0 = time.monotonic()
        info = await self.js.stream_info(self.stream)
        start_seq = info.state.last_seq  # the watch goes on from here: nothing falls in between
        scan = await self.scan()
        # Keys an owner published during the load are newer than the bucket's copy.
        loaded = {k: r for k, r in scan.records.items() if k not in self.local}
        applied: dict[str, int] = {}
        if self.restore is not None and loaded:
            try:
                result = self.restore([r.session for r in loaded.values()])
                applied = dict(await result if inspect.isawaitable(result) else result)
            except Exception as exc:  # an owner's restore hook broke its contract: load goes on
                self._note_error("restore", exc)
                self.log.error("restoring sessions failed", error=self.last_error, sessions=len(loaded))
        self.active_owners.update(owner for owner, n in applied.items() if n > 0)
        for key, record in loaded.items():
            if record.session.owner not in self.active_owners or key in self.local:
                continue
            if record.node_id == self.node_id:  # held before this restart: ours again
                self.local[key] = LocalEntry(record.session, record.event_ns)
            else:  # a peer's: ours once its traffic passes here
                self.peers[key] = record.node_id
        self.watch_seq = max(self.watch_seq, start_seq)
        self.boot = {
            "state": "loaded",
            "records": len(loaded),
            "restored": applied,
            "skipped": dict(scan.skipped),
            "seconds": round(time.monotonic() - t0, 3),
            "at": time.time(),
        }
        self.boot_done = True
        self.log.info("boot load done", **{k: v for k, v in self.boot.items() if k != "state"})

    # ---- reading the bucket ---------------------------------------------------------------

    async def scan(self, note_skips: bool = True) -> Scan:
        """The latest revision of every key (ordered consumer, last per subject). Unreadable
        records are left out; with ``note_skips`` they are also counted and logged. Raises
        TimeoutError when no message arrives for ``write_timeout`` seconds."""
        out = Scan()
        done = asyncio.get_running_loop().create_future()
        seen = 0

        async def on_msg(msg) -> None:  # a callback: no task per message (iterators make one)
            nonlocal seen
            seen += 1
            key = msg.subject[len(self.prefix) :]
            headers = msg.headers
            if not headers or (
                headers.get(KV_OPERATION) not in DELETE_OPS and "Nats-Marker-Reason" not in headers
            ):
                try:
                    out.records[key] = decode(key, msg.data)
                except RecordError as exc:
                    out.skipped[exc.reason] += 1
                    if note_skips:
                        self._skip(key, exc)
            if msg.metadata.num_pending == 0 and not done.done():
                done.set_result(None)

        sub = await self.js.subscribe(
            self.prefix + ">",
            stream=self.stream,
            cb=on_msg,
            ordered_consumer=True,
            deliver_policy=js_api.DeliverPolicy.LAST_PER_SUBJECT,
            inactive_threshold=60.0,
        )
        try:
            info = await sub.consumer_info()
            # Messages may be delivered before this answer: count them too (0 + 0: empty bucket).
            if info.num_pending + (info.delivered.consumer_seq if info.delivered else 0) == 0:
                return out
            while not done.done():
                before = seen
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(done), self.cfg.write_timeout)
                if not done.done() and seen == before:
                    raise TimeoutError(f"reading bucket {self.cfg.bucket}: stalled after {seen} records")
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        return out

    def _skip(self, key: str, exc: RecordError) -> None:
        self.stats.skipped[exc.reason] += 1
        self._log_limited("record skipped", key=key[:120], reason=exc.reason, error=str(exc)[:200])

    def _log_limited(self, message: str, **fields) -> None:
        """Bad records and events are logged one by one up to a limit, then only counted."""
        self._logged_problems += 1
        if self._logged_problems <= PROBLEM_LOG_LIMIT:
            self.log.warning(message, **fields)
        elif self._logged_problems == PROBLEM_LOG_LIMIT + 1:
            self.log.warning("more bad records or events: counted in the metrics, no longer logged")

    # ---- watching the bucket --------------------------------------------------------------

    async def run_watch(self) -> None:
        """Background: follow the bucket from ``watch_seq`` on; resubscribe from the last
        sequence seen after a reconnect (the stream keeps what was written meanwhile)."""
        applier = asyncio.ensure_future(self._apply_incoming())
        try:
            while True:
                if not (self.connected and self.boot_done):
                    await asyncio.sleep(min(self.cfg.reconnect_wait, 0.2))
                    continue
                self._rewatch.clear()
                try:
                    sub = await self.js.subscribe(
                        self.prefix + ">",
                        stream=self.stream,
                        cb=self._on_watched,
                        ordered_consumer=True,
                        config=js_api.ConsumerConfig(
                            deliver_policy=js_api.DeliverPolicy.BY_START_SEQUENCE,
                            opt_start_seq=self.watch_seq + 1,
                        ),
                        inactive_threshold=60.0,
                    )
                except Exception as exc:
                    self._note_error("watch", exc)
                    await asyncio.sleep(self.cfg.reconnect_wait)
                    continue
                self.stats.watched["subscribed"] += 1
                try:
                    await self._rewatch.wait()
                finally:
                    with contextlib.suppress(Exception):
                        await sub.unsubscribe()
        finally:
            applier.cancel()

    async def _on_watched(self, msg) -> None:
        seq = msg.metadata.sequence.stream
        if seq <= self.watch_seq:
            return  # seen before a resubscribe
        self.watch_seq = seq
        key = msg.subject[len(self.prefix) :]
        headers = msg.headers or {}
        if headers.get(KV_OPERATION) in DELETE_OPS or "Nats-Marker-Reason" in headers:
            self._incoming[key] = None
        else:
            try:
                record = decode(key, msg.data)
            except RecordError as exc:
                self._skip(key, exc)
                return
            if record.node_id == self.node_id:
                self.stats.watched["own"] += 1  # our own write coming back: newer than a peer's
                self._incoming.pop(key, None)
                return
            self._incoming[key] = record
        self._incoming_ready.set()

    async def _apply_incoming(self) -> None:
        while True:
            await self._incoming_ready.wait()
            self._incoming_ready.clear()
            batch, self._incoming = self._incoming, {}
            try:
                await self.apply_watched(batch)
            except Exception as exc:  # an owner's hook broke its contract: the watch goes on
                self._note_error("restore", exc)
                self._log_limited("applying watched records failed", error=self.last_error)

    async def apply_watched(self, batch: dict[str, Record | None]) -> None:
        """Peers' changes into the owners' maps: records restored, deletes forgotten."""
        restore, forget = [], []
        for key, record in batch.items():
            if record is None:
                if key in self.local:  # we carry it: the next full sync writes it back
                    self.stats.watched["kept"] += 1
                    continue
                if self.peers.pop(key, None) is None:  # our own delete coming back
                    continue
                with contextlib.suppress(RecordError):
                    owner, raw = decode_key(key)
                    forget.append(Session(owner=owner, key=raw, value=b""))
                continue
            entry = self.local.get(key)
            if entry is not None and entry.event_ns >= record.written_ns:
                self.stats.watched["stale"] += 1  # written before we took the flow over
                continue
            if self.local.pop(key, None) is not None:  # its traffic passes the peer now
                self.urgent.pop(key, None)
                self.debounced.pop(key, None)
                self.stats.watched["moved_away"] += 1
            self.peers[key] = record.node_id
            restore.append(record.session)
        for hook, sessions, kind in ((self.restore, restore, "restored"), (self.forget, forget, "forgotten")):
            if hook is None or not sessions:
                continue
            result = hook(sessions)
            result = dict(await result if inspect.isawaitable(result) else result or {})
            self.stats.watched[kind] += sum(result.values())

    # ---- full sync ------------------------------------------------------------------------

    async def full_sync(self) -> dict[str, int]:
        """Make the bucket agree with ``local``: write what is missing or differs; delete what this
        node wrote and no longer holds (for owners alive in this run). Other nodes' records are
        theirs and are left alone."""
        scan = await self.scan()
        stale: dict[str, float] = {}
        now = self.clock()
        for key, entry in self.local.items():
            rec = scan.records.get(key)
            if (
                rec is None
                or rec.session.value != entry.session.value
                or rec.session.attrs != entry.session.attrs
            ):
                stale[key] = now
        puts = len(stale)
        for key, rec in scan.records.items():
            mine = rec.node_id == self.node_id and rec.session.owner in self.active_owners
            if mine and key not in self.local:
                stale[key] = now
        self.needs_sync = False
        async with self._write_lock:
            acked, failed = await self._write(stale)
        if failed:
            self.needs_sync = True
            raise ConnectionError(f"full sync: {len(failed)} of {len(stale)} writes not acked")
        self.stats.full_syncs += 1
        self.stats.repaired["put"] += puts
        self.stats.repaired["delete"] += len(stale) - puts
        self.last_sync_wall = time.time()
        result = {
            "bucket": len(scan.records),
            "local": len(self.local),
            "put": puts,
            "delete": len(stale) - puts,
        }
        if stale:
            self.log.info("full sync repaired drift", **result)
        return result

    async def run_sync(self) -> None:
        """Background: a full sync every ``sync_interval`` (and at once after a reconnect)."""
        interval = self.cfg.sync_interval or None
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._sync_now.wait(), interval)
            self._sync_now.clear()
            if not (self.connected and self.boot_done):
                continue
            await self.write_due(force=True)
            try:
                await self.full_sync()
            except Exception as exc:
                self._note_error("sync", exc)
                self.log.warning("full sync failed", error=self.last_error)

    # ---- status ---------------------------------------------------------------------------

    def lag_seconds(self) -> float:
        """Age of the oldest change not yet in the bucket (0 when everything is written)."""
        oldest = min([*self.urgent.values(), *self.debounced.values()], default=None)
        return 0.0 if oldest is None else max(0.0, self.clock() - oldest)

    def lag_quantiles(self) -> dict[str, float | None]:
        if not self.lags:
            return {"p50": None, "p99": None}
        ordered = sorted(self.lags)
        return {
            "p50": ordered[len(ordered) // 2],
            "p99": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))],
        }

    def ready(self) -> bool | str:
        if self.boot_done:
            return True
        if self.boot_timed_out and not self.cfg.require_boot_load:
            return True
        if self.boot_timed_out:
            return f"NATS {self.state}: boot load pending ({self.last_error or 'no answer'})"
        return f"boot load in progress ({self.state})"

    def summary(self) -> dict[str, Any]:
        """What can be said without asking NATS."""
        return {
            "node_id": self.node_id,
            "state": self.state,
            "servers": self.servers,
            "bucket": self.cfg.bucket,
            "connected": self.connected,
            "last_error": self.last_error,
            "recent_errors": list(self.recent_errors),
            "local": len(self.local),
            "queue": self.queue_depth,
            "overflow": self.stats.overflow,
            "needs_sync": self.needs_sync,
            "lag_seconds": round(self.lag_seconds(), 6),
            "write_lag_seconds": self.lag_quantiles(),
            "last_sync": self.last_sync_wall,
            "boot": self.boot,
            "writes": dict(self.stats.writes),
            "batches": self.stats.batches,
            "coalesced": self.stats.coalesced,
            "errors": dict(self.stats.errors),
            "skipped": dict(self.stats.skipped),
            "peers": len(self.peers),
            "watch": {"seq": self.watch_seq, **self.stats.watched},
            "reconnects": self.stats.reconnects,
        }

    async def status(self) -> dict[str, Any]:
        """Local against the bucket: counts, in both, only local, only in the bucket."""
        out = self.summary()
        if not self.connected:
            out["bucket_count"] = None
            return out
        scan = await self.scan(note_skips=False)
        local, bucket = set(self.local), set(scan.records)
        out.update(
            bucket_count=len(bucket),
            in_both=len(local & bucket),
            only_local=len(local - bucket),
            only_bucket=len(bucket - local),
            unreadable=sum(scan.skipped.values()),
        )
        return out

    async def list_bucket(self, limit: int = 100, owner: str | None = None) -> list[dict[str, Any]]:
        scan = await self.scan(note_skips=False)
        rows = []
        for key, rec in sorted(scan.records.items()):
            if owner and rec.session.owner != owner:
                continue
            rows.append(
                {
                    "key": key,
                    "owner": rec.session.owner,
                    "node_id": rec.node_id,
                    "written": rec.written_ns / 1e9,
                    "local": key in self.local,
                    "value_bytes": len(rec.session.value),
                    "attrs": rec.session.attrs,
                }
            )
            if len(rows) >= limit:
                break
        return rows

    # ---- reload ---------------------------------------------------------------------------

    CONNECTION_FIELDS = (
        "servers", "user", "password", "token", "nkey_seed_file", "credentials_file", "tls_ca_file",
        "tls_cert_file", "tls_key_file", "tls_hostname", "connect_timeout", "reconnect_wait",
        "bucket", "replicas", "history", "ttl", "storage",
    )  # fmt: skip

    async def reconfigure(self, config: Config, servers: list[str] | None = None) -> bool:
        """New settings without a restart (SIGHUP). What is held and queued stays. Behaviour
        settings (debounce, batches, intervals, limits) apply at once; when where or how to
        connect, or the bucket, changed the connection is rebuilt in the background and a full
        sync writes everything held into the (new) bucket. Returns whether it reconnects."""
        old, self.cfg = self.cfg, config
        self.node_id = config.node
        new_servers = list(servers) if servers is not None else self.servers
        same = new_servers == self.servers and all(
            getattr(old, f) == getattr(config, f) for f in self.CONNECTION_FIELDS if f != "servers"
        )
        self._wake.set()
        if same:
            return False
        try:
            self.connect_options_for(new_servers)  # bad TLS files fail here, nothing changed yet
        except Exception:
            self.cfg, self.node_id = old, old.node
            raise
        self.servers = new_servers
        if config.bucket != old.bucket:
            self.stream, self.prefix = f"KV_{config.bucket}", f"$KV.{config.bucket}."
            self.watch_seq = 0  # a new bucket: read it all
            self.peers.clear()
        old_nc, self.nc, self.js = self.nc, None, None
        if old_nc is not None:
            with contextlib.suppress(Exception):
                await old_nc.close()
        self._reconnect_task = asyncio.ensure_future(self._reconnect())
        return True

    def connect_options_for(self, servers: list[str]) -> dict[str, Any]:
        current, self.servers = self.servers, servers
        try:
            return self.connect_options()
        finally:
            self.servers = current

    async def _reconnect(self) -> None:
        await self.connect()
        self.stats.reconnects += 1
        self.state = "ready" if self.boot_done else "loading"
        self.log.info("replication reconfigured: connected", servers=self.servers, bucket=self.cfg.bucket)
        self._wake.set()
        self._sync_now.set()
        self._rewatch.set()

    # ---- stop -----------------------------------------------------------------------------

    async def close(self) -> None:
        """Flush what is queued (bounded), then close the connection."""
        if self._reconnect_task is not None:
            self._reconnect_task.cancel()
        if self.connected:
            await self.flush(timeout=self.cfg.write_timeout)  # within the agent's stop_timeout
        if self.queue_depth:
            self.log.warning("stopping with unwritten changes", queued=self.queue_depth, state=self.state)
        self.state = "stopped"
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await self.nc.close()
        self.nc = self.js = None
