"""The replicator against a real nats-server with JetStream (no mocks): debouncing with a
controllable clock, pipelined writes, flush, full sync, boot load, corrupt records, unreachable
NATS, credentials, a NATS restart mid-stream and a bounded queue."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import shutil
import socket
import subprocess
import time
import uuid

import nats
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
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


async def until(condition, seconds: float) -> bool:
    """Poll ``condition`` until it holds or ``seconds`` pass; the assertion after says what failed."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


async def boot_given_up(r: Replicator) -> Replicator:
    """Start ``r`` and return once its bounded boot wait has passed (the retrying goes on no more)."""
    task = asyncio.ensure_future(r.start())
    await until(lambda: r.boot_timed_out, 10)
    task.cancel()
    return r


def churn(r: Replicator, step: int, live: set[int], sessions: int, delete_every: int) -> None:
    """One event of a create/update/delete mix over ``sessions`` sessions; ``live`` tracks them."""
    i = step % sessions
    if i not in live:
        r.submit(event("created", i, b"%d" % step))
        live.add(i)
    elif step % delete_every == 0:
        r.submit(event("deleted", i))
        live.discard(i)
    else:
        r.submit(event("updated", i, b"%d" % step))


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


@contextlib.asynccontextmanager
async def background(r: Replicator):
    """The replicator's writer and full-sync tasks running (as the agent runs them), then closed."""
    tasks = [asyncio.ensure_future(r.run_writer()), asyncio.ensure_future(r.run_sync())]
    try:
        yield r
    finally:
        for t in tasks:
            t.cancel()
        await r.close()


def config(**kw) -> Config:
    kw.setdefault("node_id", "node-a")
    kw.setdefault("bucket", "sessions")
    kw.setdefault("reconnect_wait", 0.2)
    kw.setdefault("write_timeout", 2.0)
    return Config(**kw)


@contextlib.asynccontextmanager
async def clocked(url: str, **kw):
    """A connected replicator on a clock the test moves by hand (no background tasks)."""
    clock = FakeClock()
    r = await connected(url, clock=clock, **kw)
    try:
        yield r, clock
    finally:
        await r.close()


async def connected(url: str, clock=time.monotonic, restore=None, forget=None, **kw) -> Replicator:
    r = Replicator(config(**kw), servers=[url], clock=clock, restore=restore, forget=forget)
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
    async with clocked(server.url) as (r, clock):
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


@aio
async def test_delete_is_written_at_once_and_cancels_a_pending_update(server):
    async with clocked(server.url) as (r, clock):
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


@aio
async def test_created_then_updated_within_the_window_is_one_write_of_the_latest(server):
    async with clocked(server.url) as (r, clock):
        r.submit(event("created", 3, b"first"))
        r.submit(event("updated", 3, b"second"))
        assert await r.write_due() == 1
        assert values(await bucket(server.url)) == {key(3): b"second"}
        assert r.queue_depth == 0


steps = st.lists(
    st.one_of(
        st.tuples(
            st.sampled_from(["created", "updated", "deleted"]), st.integers(0, 5), st.binary(max_size=4)
        ),
        st.tuples(st.just("tick"), st.floats(0, 0.7), st.just(b"")),  # time passes, the writer runs
    ),
    max_size=40,
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=steps)
def test_any_event_sequence_ends_with_the_bucket_equal_to_local(server, steps):
    """Whatever the order of events, windows and writes: after a flush the bucket holds exactly
    the sessions the owner still has, with their last values, and nothing stays queued."""

    async def run():
        bucket_name = f"prop{uuid.uuid4().hex[:12]}"
        async with clocked(server.url, bucket=bucket_name) as (r, clock):
            alive: dict[str, bytes] = {}
            for kind, arg, value in steps:
                if kind == "tick":
                    clock.now += arg
                    await r.write_due()
                    continue
                r.submit(event(kind, arg, value))
                if kind == "deleted":
                    alive.pop(key(arg), None)
                else:
                    alive[key(arg)] = value
            await r.flush()
            assert r.queue_depth == 0
            assert values(await bucket(server.url, bucket_name)) == alive
            assert r.lag_seconds() == 0

    asyncio.run(asyncio.wait_for(run(), 60))


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
        # created is written at once; updates submitted before that write would just ride along
        assert await until(lambda: r.idle and r.stats.writes["put"] == 50, 15.0)
        for _ in range(10):
            for i in range(50):
                r.submit(event("updated", i, b"last"))
        assert await until(lambda: r.idle and r.stats.writes["put"] >= 100, 15.0)
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
        # ours too, but its owner has not shown up in this run (failed to start?): kept
        idle_owner = Session("sleepy", b"\x01", b"kept")
        await raw_put(server.url, encode_key("sleepy", b"\x01"), encode_value(idle_owner, "node-a", 0))
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
        expected[encode_key("sleepy", b"\x01")] = b"kept"
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
        assert not r.local and len(r.peers) == 20  # node-a's: ours once their traffic passes here
        status = await r.status()
        assert (status["in_both"], status["only_local"], status["only_bucket"]) == (0, 0, 20)
        assert status["unreadable"] == len(bad)
        result = await r.full_sync()  # corrupt records are never rewritten or deleted
        assert (result["put"], result["delete"]) == (0, 0)
        assert set(bad) <= set(await bucket(server.url))
    finally:
        await r.close()


@aio
async def test_a_restore_hook_that_raises_does_not_stop_the_boot(server):
    seed = await connected(server.url)
    seed.submit(event("created", 1))
    await seed.flush()
    await seed.close()

    def broken(sessions):
        raise RuntimeError("owner bug")

    r = await connected(server.url, node_id="node-b", restore=broken)
    try:
        assert r.boot_done and r.ready() is True and r.stats.errors["restore"] == 1
        assert "owner bug" in r.last_error and not r.local  # nothing adopted
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
        assert await until(lambda: r.boot_timed_out and strict.boot_timed_out, 15.0)
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

        wrong = await boot_given_up(Replicator(config(boot_timeout=0.5, **bad), servers=[srv.url]))
        assert wrong.state == "unreachable"
        assert any("authorization" in e.lower() for e in wrong.recent_errors)
    finally:
        srv.stop()


def openssl(*args: str, cwd) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def issue(cwd, name: str, ext: str) -> None:
    """A P-256 key and a certificate for it signed by ca.pem."""
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=cwd)  # fmt: skip
    (cwd / f"{name}.ext").write_text(ext)
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.pem", "-days", "1", "-extfile", f"{name}.ext", cwd=cwd)  # fmt: skip


@pytest.fixture
def tls_files(tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("openssl: not installed, cannot make test certificates")
    d = tmp_path / "pki"
    d.mkdir()
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", "ca.key", "-out", "ca.pem", "-days", "1", "-subj", "/CN=sluice-test-ca", cwd=d)  # fmt: skip
    issue(d, "server", "subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    issue(d, "client", "extendedKeyUsage=clientAuth\n")
    return d


@aio
async def test_mutual_tls(tmp_path, tls_files):
    d = tls_files
    conf = f"""
tls {{
  cert_file: "{d / "server.pem"}"
  key_file: "{d / "server.key"}"
  ca_file: "{d / "ca.pem"}"
  verify: true
}}
"""
    srv = NatsServer(tmp_path / "nats", config=conf, die_with_parent=False)
    srv.start()
    url = f"tls://127.0.0.1:{srv.port}"
    client = {
        "tls_ca_file": d / "ca.pem",
        "tls_cert_file": d / "client.pem",
        "tls_key_file": d / "client.key",
    }
    try:
        r = await connected(url, **client)
        r.submit(event("created", 1))
        await r.flush()
        await r.close()
        assert r.stats.writes["put"] == 1

        anonymous = await boot_given_up(
            Replicator(config(boot_timeout=0.5, tls_ca_file=d / "ca.pem"), servers=[url])
        )
        assert anonymous.state == "unreachable" and anonymous.recent_errors  # no client certificate
    finally:
        srv.stop()


@aio
async def test_nats_restarted_mid_stream_loses_nothing(server):
    r = await connected(server.url, debounce=0.05, write_timeout=1.0)
    async with background(r):
        live: set[int] = set()
        for step in range(600):
            churn(r, step, live, sessions=200, delete_every=7)
            if step == 200:
                server.kill()  # a crash, not a shutdown
            if step == 400:
                server.start()  # same port, same store
            await asyncio.sleep(0.002)
        assert await until(lambda: r.connected and r.idle and r.stats.reconnects, 30.0)
        await r.flush()
        await r.full_sync()
        expected = {k: e.session.value for k, e in r.local.items()}
        assert len(expected) == len(live)
        assert values(await bucket(server.url)) == expected
        assert r.stats.reconnects >= 1


@aio
async def test_queue_is_bounded_while_nats_is_down_and_overflow_is_repaired(server):
    r = await connected(server.url, max_queue=10, write_timeout=0.5)
    async with background(r):
        server.kill()
        assert await until(lambda: not r.connected, 10.0)
        for i in range(100):
            r.submit(event("created", i))
        assert r.queue_depth == 10 and r.stats.overflow == 90 and r.needs_sync
        server.start()
        assert await until(lambda: r.stats.full_syncs and not r.needs_sync and r.idle, 30.0)
        assert set(await bucket(server.url)) == {key(i) for i in range(100)}
        assert r.stats.repaired["put"] >= 90


# ---- 4. hot standby: the watch -------------------------------------------------------------


class OwnerMap:
    """An owner's map as restore/forget see it: key → value, with what each hook was handed."""

    def __init__(self):
        self.map: dict[bytes, bytes] = {}
        self.restored: list[bytes] = []
        self.forgotten: list[bytes] = []

    def restore(self, sessions):
        for s in sessions:
            self.map[s.key] = s.value
            self.restored.append(s.key)
        return {OWNER: len(sessions)}

    def forget(self, sessions):
        for s in sessions:
            self.map.pop(s.key, None)
            self.forgotten.append(s.key)
        return {OWNER: len(sessions)}


@contextlib.asynccontextmanager
async def watching(url: str, node: str, **kw):
    """A replicator with the agent's tasks (writer, sync, watch) and an owner map behind it."""
    owner = OwnerMap()
    r = await connected(url, node_id=node, restore=owner.restore, forget=owner.forget, **kw)
    watch = asyncio.ensure_future(r.run_watch())
    try:
        async with background(r):
            yield r, owner
    finally:
        watch.cancel()


def k(i: int) -> bytes:
    return i.to_bytes(4, "big")


@aio
async def test_a_standby_holds_its_peers_sessions_as_they_are_written(server):
    async with watching(server.url, "node-a") as (a, _), watching(server.url, "node-b") as (b, owner):
        for i in range(10):
            a.submit(event("created", i, b"a%d" % i))
        assert await until(lambda: len(owner.map) == 10, 10.0)  # no restart, no boot load
        assert owner.map == {k(i): b"a%d" % i for i in range(10)}
        assert set(b.peers.values()) == {"node-a"} and not b.local

        a.submit(event("updated", 1, b"a1-new"))
        a.submit(event("deleted", 2))
        assert await until(lambda: owner.map.get(k(1)) == b"a1-new" and k(2) not in owner.map, 10.0)
        assert owner.forgotten == [k(2)] and key(2) not in b.peers

        # The flow of session 3 now passes B: B's owner reports it, the record names B, A lets go.
        b.submit(event("updated", 3, b"b3"))
        await b.flush()
        assert await until(lambda: a.peers.get(key(3)) == "node-b" and key(3) not in a.local, 10.0)
        assert decode(key(3), (await bucket(server.url))[key(3)]).node_id == "node-b"
        assert b.stats.watched["taken_over"] == 1 and a.stats.watched["moved_away"] == 1
        assert owner.restored.count(k(3)) == 1  # B's own write came back and was not restored
        assert b.stats.watched["own"] >= 1

        # B lets its copy of a peer's session idle out: the record was the dead peer's, B deletes it.
        b.submit(event("deleted", 4))
        await b.flush()
        assert key(4) not in await bucket(server.url)
        b.submit(event("deleted", 99))  # neither held nor a peer's: nothing to write
        assert b.queue_depth == 0


@aio
async def test_the_watch_skips_bad_records_with_a_counter(server):
    async with watching(server.url, "node-a") as (a, _), watching(server.url, "node-b") as (b, owner):
        await raw_put(server.url, "testowner.0102", b"garbage")
        await raw_put(server.url, "testowner.0103", b"SLRS\x09" + bytes(40))
        a.submit(event("created", 7, b"good"))
        assert await until(lambda: k(7) in owner.map, 10.0)
        assert b.stats.skipped["truncated"] == 1 and b.stats.skipped["version"] == 1
        assert len(owner.map) == 1 and b.connected


@aio
async def test_expired_records_are_forgotten_by_the_standby(server):
    kw = {"ttl": 1.0, "sync_interval": 0.5, "bucket": "expiring"}
    async with watching(server.url, "node-b", **kw) as (b, owner):
        a = await connected(server.url, node_id="node-a", **kw)
        a.submit(event("created", 5, b"short-lived"))
        await a.flush()
        await a.close()  # A is gone: nobody refreshes the record
        assert await until(lambda: k(5) in owner.map, 10.0)
        assert await until(lambda: k(5) in owner.forgotten, 15.0)  # the server's expiry marker
        assert key(5) not in b.peers


@aio
async def test_the_watch_resumes_after_nats_restarts(server):
    async with watching(server.url, "node-a") as (a, _), watching(server.url, "node-b") as (b, owner):
        a.submit(event("created", 1))
        assert await until(lambda: k(1) in owner.map, 10.0)
        server.kill()
        assert await until(lambda: not b.connected, 10.0)
        server.start()
        assert await until(lambda: a.connected and b.connected, 20.0)
        for i in range(2, 12):
            a.submit(event("created", i))
        assert await until(lambda: len(owner.map) == 11, 20.0)
        assert b.stats.reconnects >= 1 and b.stats.watched["subscribed"] >= 2
