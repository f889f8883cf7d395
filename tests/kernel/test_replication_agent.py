"""The replication plugin inside a real agent: embedded nats-server, a test-only owner plugin that
keeps its sessions in a real BPF hash map, the boot load finished before /readyz says ready, the
API and the `sluice repl` CLI on the agent's unix socket, metrics, and the embedded server
stopped with the agent."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
import types

import aiohttp
import nats
import pytest
from click.testing import CliRunner
from prometheus_client import generate_latest

from sluice import config, hookimpl
from sluice.agent import Agent
from sluice.bpf.maps import Map, MapType
from sluice.cli import build_cli
from sluice.manager import PluginManager
from sluice.plugins.replication.embedded import NatsServer
from sluice.sessions import Session, SessionEvent
from tests.e2e.test_replication_nats import aio, free_port

pytestmark = pytest.mark.kernel

OWNER = "testowner"
KEY_SIZE, VALUE_SIZE = 4, 8
CORRUPT = {
    f"{OWNER}.000000aa": b"\x00" * 40,  # not our magic
    f"{OWNER}.000000bb": b"SLRS\x07" + bytes(40),  # a version this agent does not read
    "not-a-session-key": b"SLRS",
}


def make_owner() -> types.ModuleType:
    """A test-only session owner: sessions live in a BPF hash map (u32 → 8 bytes)."""
    mod = types.ModuleType("sluice_test_owner")
    mod.map = None
    mod.ctx = None
    mod.restore_calls = []
    mod.map_size_when_ready = None

    @hookimpl
    def sluice_start(ctx):
        mod.ctx = ctx
        mod.map = Map.create(MapType.HASH, KEY_SIZE, VALUE_SIZE, 4096, name="test_sessions")

    @hookimpl
    def sluice_session_restore(ctx, sessions):
        applied = 0
        for s in sessions:
            if len(s.key) == KEY_SIZE and len(s.value) == VALUE_SIZE:
                mod.map.set(s.key, s.value)
                applied += 1
        mod.restore_calls.append(len(sessions))
        return applied

    @hookimpl
    def sluice_stop(ctx):
        mod.map.close()

    def publish(kind: str, i: int, value: bytes) -> None:
        k = i.to_bytes(KEY_SIZE, "big")
        if kind == "deleted":
            mod.map.delete(k)
        else:
            mod.map.set(k, value)
        s = Session(OWNER, k, value, {"id": i})
        mod.ctx.hook.sluice_session_event(event=SessionEvent(kind, s, time.time_ns()))

    mod.sluice_start, mod.sluice_session_restore, mod.sluice_stop = (
        sluice_start,
        sluice_session_restore,
        sluice_stop,
    )
    mod.publish = publish
    return mod


def agent_config(bpffs, state_dir, node: str, servers=(), extra: str = "") -> tuple[str, config.AgentConfig]:
    text = f"""
[agent]
plugins = ["replication", "{OWNER}"]   # replication first: its restore must wait for the owner
bpffs = "{bpffs}"
state_dir = "{state_dir}"
metrics_address = ""
stop_timeout = 20

[plugins.replication]
node_id = "{node}"
debounce = 0.1
servers = {json.dumps(list(servers))}
{extra}
"""
    return text, config.parse(text, "test.toml")


class Running:
    """One agent run in this event loop, with the test owner and the real replication plugin."""

    def __init__(self, bpffs, state_dir, node: str, servers=(), extra: str = ""):
        self.owner = make_owner()
        self.manager = PluginManager()
        self.manager.register("sluice.plugins.replication", "replication")
        self.manager.register(self.owner, OWNER)
        _, cfg = agent_config(bpffs, state_dir, node, servers, extra)
        self.agent = Agent(cfg, self.manager)
        self.socket = cfg.agent.socket_path
        self.task: asyncio.Task | None = None

    async def __aenter__(self):
        self.task = asyncio.ensure_future(self.agent.run())
        return self

    async def __aexit__(self, *exc):
        self.agent.request_stop()
        await self.task
        # Agent.run() keeps its state-dir lock until the process exits; a second agent in this
        # same process (the restart below) needs it released.
        lock = getattr(self.agent, "_lock_file", None)
        if lock is not None:
            lock.close()
        self.manager.unregister(OWNER)
        self.manager.unregister("replication")

    async def request(self, method: str, path: str):
        conn = aiohttp.UnixConnector(path=str(self.socket))
        async with (
            aiohttp.ClientSession(connector=conn) as http,
            http.request(method, "http://agent" + path) as resp,
        ):
            return resp.status, await resp.json(content_type=None)

    async def wait_ready(self, timeout: float = 60.0) -> None:
        """Poll /readyz; record the owner's map size the first time it says ready."""
        deadline = time.monotonic() + timeout  # the start compiles BPF: slow on a loaded machine
        while time.monotonic() < deadline:
            try:
                status, _ = await self.request("GET", "/readyz")
            except aiohttp.ClientConnectionError:
                status = 0  # not serving yet (or the previous run's socket file)
            if status == 200:
                self.owner.map_size_when_ready = self.owner.map.count()
                return
            await asyncio.sleep(0.025)
        raise AssertionError("agent never became ready")


@aio
async def test_agent_replicates_and_restores_before_ready(bpffs, tmp_path):
    state_dir = tmp_path / "state"
    async with Running(bpffs, state_dir, "node-a") as a:
        await a.wait_ready()
        assert a.owner.map_size_when_ready == 0
        for i in range(50):
            a.owner.publish("created", i, i.to_bytes(VALUE_SIZE, "big"))
        for i in range(10):
            a.owner.publish("updated", i, b"updated!")
        a.owner.publish("deleted", 49, b"")
        # an event replication cannot store never raises into the owner: counted instead
        bad = Session("not.an.owner", b"\x01", b"x")
        a.owner.ctx.hook.sluice_session_event(event=SessionEvent("created", bad, time.time_ns()))
        status, body = await a.request("POST", "/v1/replication/flush")
        assert status == 200 and body["queued"] == 0
        status, st = await a.request("GET", "/v1/replication/status")
        assert status == 200
        assert (st["local"], st["bucket_count"], st["in_both"]) == (49, 49, 49)
        assert (st["only_local"], st["only_bucket"]) == (0, 0)
        # corrupt and foreign records a broken or newer writer left in the bucket
        nc = await nats.connect(st["servers"][0])
        kv = await nc.jetstream().key_value("sluice-sessions")
        for key, junk in CORRUPT.items():
            await kv.put(key, junk)
        await nc.close()
        embedded_pid = int((state_dir / "replication" / "nats" / "nats-server.pid").read_text())
        metrics = generate_latest(a.agent.registry).decode()
        assert "sluice_replication_writes_total" in metrics
        assert 'sluice_replication_writes_total{op="delete"} 1.0' in metrics
        assert 'sluice_replication_errors_total{kind="event"} 1.0' in metrics
    # graceful stop: the embedded server is gone with the agent
    assert not (state_dir / "replication" / "nats" / "nats-server.pid").exists()
    with pytest.raises(ProcessLookupError):
        os.kill(embedded_pid, 0)

    # a new agent on the same state dir: boot load into a fresh, empty BPF map before ready
    async with Running(bpffs, state_dir, "node-b") as b:
        await b.wait_ready()
        assert b.owner.map_size_when_ready == 49
        assert b.owner.map.get((3).to_bytes(4, "big")) == b"updated!"
        assert b.owner.map.get((20).to_bytes(4, "big")) == (20).to_bytes(8, "big")
        assert b.owner.map.count() == 49  # nothing of the corrupt records reached the map
        _, st = await b.request("GET", "/v1/replication/status")
        assert st["boot"]["records"] == 49 and st["boot"]["restored"] == {OWNER: 49}
        assert st["boot"]["skipped"] == {"foreign": 1, "version": 1, "bad-key": 1}
        # node-a's sessions: held ready here, this node's once their traffic passes it
        assert (st["in_both"], st["only_local"], st["only_bucket"], st["unreadable"]) == (0, 0, 49, 3)
        assert st["peers"] == 49


@aio
async def test_cli_repl_commands_through_the_socket(bpffs, tmp_path):
    state_dir = tmp_path / "state"
    text, _ = agent_config(bpffs, state_dir, "node-c")
    cfg_file = tmp_path / "sluice.toml"
    cfg_file.write_text(text)
    async with Running(bpffs, state_dir, "node-c") as a:
        await a.wait_ready()
        for i in range(5):
            a.owner.publish("created", i, bytes(8))
        a.owner.publish("updated", 1, b"12345678")
        cli = build_cli(a.manager)

        def sluice(*args):
            return CliRunner().invoke(cli, ["-c", str(cfg_file), *args], catch_exceptions=False)

        out = await asyncio.to_thread(sluice, "repl", "flush", "--json")
        assert out.exit_code == 0, out.output
        out = await asyncio.to_thread(sluice, "repl", "status", "--json")
        assert out.exit_code == 0 and json.loads(out.output)["in_both"] == 5
        out = await asyncio.to_thread(sluice, "repl", "status")
        assert out.exit_code == 0 and "in both       5" in out.output
        out = await asyncio.to_thread(sluice, "repl", "sync")
        assert out.exit_code == 0 and "0 written, 0 deleted" in out.output
        out = await asyncio.to_thread(sluice, "repl", "list", "--owner", OWNER, "--json")
        rows = json.loads(out.output)
        assert out.exit_code == 0 and len(rows) == 5 and all(r["node_id"] == "node-c" for r in rows)
        out = await asyncio.to_thread(sluice, "repl", "list", "--limit", "0")
        assert out.exit_code != 0 and "Traceback" not in out.output
        status, body = await a.request("GET", "/v1/replication/list?limit=abc")
        assert status == 400 and "limit" in body["error"]
    manager = PluginManager()
    manager.register("sluice.plugins.replication", "replication")
    manager.register(make_owner(), OWNER)
    out = CliRunner().invoke(build_cli(manager), ["-c", str(cfg_file), "repl", "status"])
    assert out.exit_code == 1 and "agent not running" in out.output


@aio
async def test_readyz_waits_for_unreachable_nats_when_the_boot_load_is_required(bpffs, tmp_path):
    port = free_port()
    extra = "boot_timeout = 0.5\nrequire_boot_load = true\nconnect_timeout = 0.3\nreconnect_wait = 0.2"
    srv = NatsServer(tmp_path / "nats", port=port, die_with_parent=False)
    async with Running(bpffs, tmp_path / "state", "node-d", [f"nats://127.0.0.1:{port}"], extra) as a:
        status, reason = 0, ""
        deadline = time.monotonic() + 60  # the agent compiles its BPF first: slow under load
        while time.monotonic() < deadline:
            with contextlib.suppress(aiohttp.ClientConnectionError):
                status, body = await a.request("GET", "/readyz")
                reason = body["plugins"]["replication"].get("reason", "")
                if "boot load pending" in reason:
                    break
            await asyncio.sleep(0.025)
        assert status == 503 and "unreachable" in reason  # a clear state, and not ready
        _, st = await a.request("GET", "/v1/replication/status")
        assert st["state"] == "unreachable" and st["bucket_count"] is None
        await asyncio.to_thread(srv.start)  # NATS comes up: the load runs, the agent gets ready
        try:
            await a.wait_ready()
            assert a.owner.restore_calls == []  # an empty bucket: nothing to hand over
        finally:
            await asyncio.to_thread(srv.stop)


@aio
async def test_reload_moves_replication_to_new_servers_without_a_restart(bpffs, tmp_path):
    """SIGHUP's path (Agent.reload with the config file rewritten): replication follows the new
    servers and batch size at once; the agent, the owner's map and what replication holds stay."""
    first = NatsServer(tmp_path / "n1", die_with_parent=False)
    second = NatsServer(tmp_path / "n2", die_with_parent=False)
    first.start()
    second.start()
    state_dir, cfg_file = tmp_path / "state", tmp_path / "sluice.toml"
    try:
        async with Running(bpffs, state_dir, "node-r", servers=[first.url]) as a:
            cfg_file.write_text(agent_config(bpffs, state_dir, "node-r", [first.url])[0])
            a.agent.config_path = cfg_file
            await a.wait_ready()
            for i in range(5):
                a.owner.publish("created", i, bytes(8))
            await a.request("POST", "/v1/replication/flush")
            task = a.task

            cfg_file.write_text(
                agent_config(bpffs, state_dir, "node-r", [second.url], "batch_size = 1000")[0]
            )
            await a.agent.reload()
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                _, st = await a.request("GET", "/v1/replication/status")
                if st.get("servers") == [second.url] and st.get("connected") and st.get("bucket_count") == 5:
                    break
                await asyncio.sleep(0.1)
            assert st["servers"] == [second.url] and st["state"] == "ready"
            assert st["bucket_count"] == 5  # the full sync after the move wrote what it holds
            a.owner.publish("created", 9, bytes(8))
            await a.request("POST", "/v1/replication/flush")
            _, st = await a.request("GET", "/v1/replication/status")
            assert (st["local"], st["bucket_count"], st["in_both"]) == (6, 6, 6)
            assert a.task is task and not task.done()  # the same agent run throughout
            assert a.owner.map.count() == 6  # the owner's own sessions, nothing restored on top
            from sluice.plugins import replication

            assert replication.current().cfg.batch_size == 1000
    finally:
        first.stop()
        second.stop()
