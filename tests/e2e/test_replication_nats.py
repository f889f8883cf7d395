"""The replicator against a real nats-server with JetStream (no mocks): debouncing with a
controllable clock, pipelined writes, flush, full sync, boot load, corrupt records, unreachable
NATS, credentials, a NATS restart mid-stream and a bounded queue."""

from __future__ import annotations

import asyncio
import functools
import socket
import time

import nats
import pytest
from nats.js.errors import NoKeysError

from sluice.plugins.replication.config import Config
from sluice.plugins.replication.embedded import NatsServer
from sluice.plugins.replication.records import decode, encode_key, encode_value
from sluice.plugins.replication.replicator import Replicator
from sluice.sessions import Session, SessionEvent

OWNER = "testowner"


def aio(test):
    """Run an async test in its own event loop (no pytest-asyncio here)."""

    @functools.wraps(test)
    def run(*args, **kwargs):
        asyncio.run(asyncio.wait_for(test(*args, **kwargs), 120))

    return run


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def event(kind: str, i: int, value: bytes = b"v0") -> SessionEvent:
    return SessionEvent(kind, Session(OWNER, i.to_bytes(4, "big"), value, {"i": i}), time.time_ns())


def key(i: int) -> str:
    return encode_key(OWNER, i.to_bytes(4, "big"))


@pytest.fixture
def server(tmp_path):
    srv = NatsServer(tmp_path / "nats", die_with_parent=False)
    srv.start()
    yield srv
    srv.stop()


def config(**kw) -> Config:
    kw.setdefault("node_id", "node-a")
    kw.setdefault("bucket", "sessions")
    kw.setdefault("reconnect_wait", 0.2)
    kw.setdefault("write_timeout", 2.0)
    return Config(**kw)


async def connected(url: str, clock=time.monotonic, restore=None, **kw) -> Replicator:
    r = Replicator(config(**kw), servers=[url], clock=clock, restore=restore)
    await r.connect()
    await r.boot_load()
    return r


async def bucket(url: str, name: str = "sessions", **connect) -> dict[str, bytes]:
    """The bucket as an independent client sees it (nats-py's own KV API): key → raw value."""
    nc = await nats.connect(url, **connect)
    try:
        kv = await nc.jetstream().key_value(name)
        try:
            keys = await kv.keys()
        except NoKeysError:
            return {}
        return {k: (await kv.get(k)).value for k in keys}
    finally:
        await nc.close()


async def raw_put(url: str, kv_key: str, value: bytes, name: str = "sessions") -> None:
    nc = await nats.connect(url)
    try:
        await (await nc.jetstream().key_value(name)).put(kv_key, value)
    finally:
        await nc.close()


def values(contents: dict[str, bytes]) -> dict[str, bytes]:
    return {k: decode(k, v).session.value for k, v in contents.items()}


# ---- 1. replication ------------------------------------------------------------------------


@aio
async def test_created_written_at_once_updates_coalesced_in_the_window(server):
    clock = FakeClock()
    r = await connected(server.url, clock=clock)
    try:
        r.submit(event("created", 1, b"c1"))
        r.submit(event("created", 2, b"c2"))
        assert await r.write_due() == 2  # no time passed: created is not debounced
        assert values(await bucket(server.url)) == {key(1): b"c1", key(2): b"c2"}

        for step in range(5):
            clock.now += 0.08
            r.submit(event("updated", 1, b"u1-%d" % step))
            r.submit(event("updated", 2, b"u2-%d" % step))
            assert await r.write_due() == 0  # window (500 ms from the first update) still open
        assert values(await bucket(server.url)) == {key(1): b"c1", key(2): b"c2"}
        assert r.stats.coalesced == 8

        clock.now += 0.5 - 0.08 * 4  # exactly 500 ms after the first update
        batches = r.stats.batches
        assert await r.write_due() == 2  # one write per key, the latest value, one batch
        assert r.stats.batches == batches + 1
        assert values(await bucket(server.url)) == {key(1): b"u1-4", key(2): b"u2-4"}
    finally:
        await r.close()


@aio
async def test_delete_is_written_at_once_and_cancels_a_pending_update(server):
    clock = FakeClock()
    r = await connected(server.url, clock=clock)
    try:
        r.submit(event("created", 7))
        await r.write_due()
        r.submit(event("updated", 7, b"later"))
        r.submit(event("deleted", 7))
        assert await r.write_due() == 1
        assert await bucket(server.url) == {}
        clock.now += 10
        assert await r.write_due() == 0  # the update does not resurrect the session
        assert await bucket(server.url) == {}
        assert r.stats.writes == {"put": 1, "delete": 1}
    finally:
        await r.close()


@aio
async def test_created_then_updated_within_the_window_is_one_write_of_the_latest(server):
    clock = FakeClock()
    r = await connected(server.url, clock=clock)
    try:
        r.submit(event("created", 3, b"first"))
        r.submit(event("updated", 3, b"second"))
        assert await r.write_due() == 1
        assert values(await bucket(server.url)) == {key(3): b"second"}
        assert r.queue_depth == 0
    finally:
        await r.close()


@aio
async def test_graceful_stop_flushes_pending_updates(server):
    clock = FakeClock()
    r = await connected(server.url, clock=clock)
    r.submit(event("created", 1, b"c"))
    await r.write_due()
    r.submit(event("updated", 1, b"pending"))
    assert await r.write_due() == 0
    await r.close()  # what sluice_stop does
    assert values(await bucket(server.url)) == {key(1): b"pending"}


@aio
async def test_writer_task_debounces_in_real_time(server):
    r = await connected(server.url, debounce=0.2)
    writer = asyncio.ensure_future(r.run_writer())
    try:
        for i in range(50):
            r.submit(event("created", i))
        for _ in range(10):
            for i in range(50):
                r.submit(event("updated", i, b"last"))
        for _ in range(100):
            if r.queue_depth == 0 and r.stats.writes["put"] >= 100:
                break
            await asyncio.sleep(0.05)
        assert set(values(await bucket(server.url)).values()) == {b"last"}
        assert r.stats.writes["put"] <= 100  # 50 creates + at most one coalesced write per key
        assert r.stats.coalesced >= 450
    finally:
        writer.cancel()
        await r.close()


@aio
async def test_full_sync_repairs_drift_both_ways(server):
    r = await connected(server.url)
    try:
        for i in range(10):
            r.submit(event("created", i))
        await r.flush()
        other = Session(OWNER, b"\xff\x00", b"theirs")
        mine_stale = Session(OWNER, b"\xee\x00", b"gone-here")
        await raw_put(server.url, encode_key(OWNER, other.key), encode_value(other, "node-b", 0))
        await raw_put(server.url, encode_key(OWNER, mine_stale.key), encode_value(mine_stale, "node-a", 0))
        nc = await nats.connect(server.url)
        kv = await nc.jetstream().key_value("sessions")
        await kv.delete(key(3))  # lost behind our back
        await kv.put(key(4), encode_value(Session(OWNER, b"\0\0\0\4", b"wrong"), "node-a", 0))
        await nc.close()

        result = await r.full_sync()
        assert (result["put"], result["delete"]) == (2, 1)
        got = values(await bucket(server.url))
        expected = {key(i): b"v0" for i in range(10)}
        expected[encode_key(OWNER, other.key)] = b"theirs"  # another node's record is left alone
        assert got == expected
        assert r.last_sync_wall is not None
    finally:
        await r.close()


# ---- 2. boot ---------------------------------------------------------------------------------


@aio
async def test_boot_load_restores_valid_records_and_skips_corrupt_ones(server):
    seed = await connected(server.url, node_id="node-a")
    for i in range(20):
        seed.submit(event("created", i, b"s%d" % i))
    await seed.flush()
    await seed.close()
    bad = {
        "nodot": b"x",
        "testowner.zz": encode_value(Session(OWNER, b"\1", b"v"), "n", 0),
        "testowner.0102": b"garbage",
        "testowner.0103": b"XXXX" + bytes(40),
        "testowner.0104": b"SLRS\x09" + bytes(40),
        "testowner.0105": encode_value(Session(OWNER, b"\1", b"value"), "n", 0)[:30],
    }
    for k, v in bad.items():
        await raw_put(server.url, k, v)

    restored: dict[bytes, bytes] = {}

    def restore(sessions):
        for s in sessions:
            restored[s.key] = s.value
        return {OWNER: len(sessions)}

    r = await connected(server.url, node_id="node-b", restore=restore)
    try:
        assert restored == {i.to_bytes(4, "big"): b"s%d" % i for i in range(20)}
        assert r.boot["records"] == 20 and r.boot_done and r.ready() is True
        assert sum(r.stats.skipped.values()) == len(bad)
        assert r.stats.skipped["bad-key"] == 2 and r.stats.skipped["foreign"] == 1
        assert r.stats.skipped["version"] == 1 and r.stats.skipped["truncated"] == 2
        assert len(r.local) == 20  # restored sessions are now held here
        status = await r.status()
        assert (status["in_both"], status["only_local"], status["only_bucket"]) == (20, 0, 0)
        assert status["unreadable"] == len(bad)
        result = await r.full_sync()  # corrupt records are never rewritten or deleted
        assert (result["put"], result["delete"]) == (0, 0)
        assert set(bad) <= set(await bucket(server.url))
    finally:
        await r.close()


@aio
async def test_unreachable_nats_is_a_clear_state_with_a_bounded_wait(tmp_path):
    port = free_port()
    r = Replicator(
        config(boot_timeout=0.5, connect_timeout=0.3), servers=[f"nats://127.0.0.1:{port}"], restore=None
    )
    strict = Replicator(
        config(boot_timeout=0.5, connect_timeout=0.3, require_boot_load=True),
        servers=[f"nats://127.0.0.1:{port}"],
    )
    tasks = [asyncio.ensure_future(x.start()) for x in (r, strict)]
    srv = NatsServer(tmp_path / "nats", port=port, die_with_parent=False)
    try:
        assert "boot load in progress" in r.ready()
        for _ in range(100):
            if r.boot_timed_out and strict.boot_timed_out:
                break
            await asyncio.sleep(0.05)
        assert r.state == "unreachable" and r.ready() is True  # serves without replicated state
        assert "unreachable" in strict.ready() and "boot load pending" in strict.ready()
        assert r.last_error and r.stats.errors["nats"] >= 1
        r.submit(event("created", 1))  # queued while NATS is away

        srv.start()  # NATS comes back: the load happens and the queue drains
        await asyncio.wait_for(asyncio.gather(*tasks), 15)
        assert r.state == "ready" and strict.ready() is True
        await r.flush()
        assert set(await bucket(srv.url)) == {key(1)}
    finally:
        for t in tasks:
            t.cancel()
        await r.close()
        await strict.close()
        srv.stop()


# ---- 3. connection -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "server_args,good,bad",
    [
        (["--user", "repl", "--pass", "s3cret"], {"user": "repl", "password": "s3cret"},
         {"user": "repl", "password": "wrong"}),
        (["--auth", "t0ken"], {"token": "t0ken"}, {"token": "nope"}),
    ],
    ids=["user-password", "token"],
)  # fmt: skip
@aio
async def test_credentials(tmp_path, server_args, good, bad):
    srv = NatsServer(tmp_path / "nats", args=server_args, die_with_parent=False)
    srv.start()
    try:
        r = await connected(srv.url, **good)
        r.submit(event("created", 1))
        await r.flush()
        await r.close()
        assert set(await bucket(srv.url, **good)) == {key(1)}

        wrong = Replicator(config(boot_timeout=0.5, **bad), servers=[srv.url])
        task = asyncio.ensure_future(wrong.start())
        for _ in range(100):
            if wrong.boot_timed_out:
                break
            await asyncio.sleep(0.05)
        task.cancel()
        assert wrong.state == "unreachable"
        assert any("authorization" in e.lower() for e in wrong.recent_errors)
    finally:
        srv.stop()


@aio
async def test_nats_restarted_mid_stream_loses_nothing(tmp_path):
    port = free_port()
    srv = NatsServer(tmp_path / "nats", port=port, die_with_parent=False)
    srv.start()
    r = await connected(srv.url, debounce=0.05, write_timeout=1.0)
    tasks = [asyncio.ensure_future(r.run_writer()), asyncio.ensure_future(r.run_sync())]
    try:
        live = set()
        for step in range(600):
            i = step % 200
            if i not in live:
                r.submit(event("created", i, b"%d" % step))
                live.add(i)
            elif step % 7 == 0:
                r.submit(event("deleted", i))
                live.discard(i)
            else:
                r.submit(event("updated", i, b"%d" % step))
            if step == 200:
                srv.kill()  # a crash, not a shutdown
            if step == 400:
                srv.start()  # same port, same store
            await asyncio.sleep(0.002)
        for _ in range(200):
            if r.connected and r.queue_depth == 0 and r.stats.reconnects:
                break
            await asyncio.sleep(0.05)
        await r.flush()
        await r.full_sync()
        expected = {k: e.session.value for k, e in r.local.items()}
        assert len(expected) == len(live)
        assert values(await bucket(srv.url)) == expected
        assert r.stats.reconnects >= 1
    finally:
        for t in tasks:
            t.cancel()
        await r.close()
        srv.stop()


@aio
async def test_queue_is_bounded_while_nats_is_down_and_overflow_is_repaired(tmp_path):
    port = free_port()
    srv = NatsServer(tmp_path / "nats", port=port, die_with_parent=False)
    srv.start()
    r = await connected(srv.url, max_queue=10, write_timeout=0.5)
    tasks = [asyncio.ensure_future(r.run_writer()), asyncio.ensure_future(r.run_sync())]
    try:
        srv.kill()
        for _ in range(100):
            if not r.connected:
                break
            await asyncio.sleep(0.02)
        for i in range(100):
            r.submit(event("created", i))
        assert r.queue_depth == 10 and r.stats.overflow == 90 and r.needs_sync
        srv.start()
        for _ in range(300):
            if r.stats.full_syncs and not r.needs_sync and r.queue_depth == 0:
                break
            await asyncio.sleep(0.05)
        assert set(await bucket(srv.url)) == {key(i) for i in range(100)}
        assert r.stats.repaired["put"] >= 90
    finally:
        for t in tasks:
            t.cancel()
        await r.close()
        srv.stop()
