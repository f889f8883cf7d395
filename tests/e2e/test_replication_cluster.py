"""A 3-node NATS cluster on loopback (routes + JetStream, bucket with replicas=3): the stream
leader is killed with SIGKILL while sessions change under load, and nothing is lost. Also: the
embedded server dies with an agent killed by SIGKILL, and a stale one is stopped on restart."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time

import nats
import nats.errors
import pytest
from nats.js.errors import NoKeysError

from sluice.plugins.replication.config import Config
from sluice.plugins.replication.embedded import NatsServer, process_alive
from sluice.plugins.replication.records import decode
from sluice.plugins.replication.replicator import Replicator
from tests.e2e.test_replication_nats import aio, background, churn, free_port, until


def cluster_config(name: str, cluster_port: int, peers: list[int]) -> str:
    routes = ", ".join(f"nats-route://127.0.0.1:{p}" for p in peers)
    return f"""
server_name: {name}
cluster {{
  name: sluice-test
  listen: 127.0.0.1:{cluster_port}
  routes: [{routes}]
}}
"""


@pytest.fixture
def cluster(tmp_path):
    cports = [free_port() for _ in range(3)]
    servers = [
        NatsServer(
            tmp_path / f"n{i}",
            port=free_port(),
            name=f"n{i}",
            config=cluster_config(f"n{i}", cports[i], [p for j, p in enumerate(cports) if j != i]),
            die_with_parent=False,
        )
        for i in range(3)
    ]
    try:
        for s in servers:
            s.start()
        yield servers
    finally:
        for s in servers:
            s.stop()


async def bucket_values(urls: list[str]) -> dict[str, bytes]:
    nc = await nats.connect(urls)
    try:
        kv = await nc.jetstream().key_value("sessions")
        return {k: decode(k, (await kv.get(k)).value).session.value for k in await kv.keys()}
    finally:
        await nc.close()


async def settled_values(urls: list[str], expected: dict, seconds: float = 30.0) -> dict | None:
    """The bucket as an independent client reads it, once the cluster answers consistently: right
    after a leader election reads may time out or see an empty consumer for a moment. A lost
    write never comes back, so waiting cannot hide one."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            got = await bucket_values(urls)
        except (NoKeysError, nats.errors.TimeoutError):
            got = None
        if got == expected or time.monotonic() > deadline:
            return got
        await asyncio.sleep(0.5)


@pytest.mark.slow
@aio
async def test_stream_leader_killed_under_load_loses_nothing(cluster):
    urls = [s.url for s in cluster]
    cfg = Config(node_id="node-a", bucket="sessions", replicas=3, debounce=0.05, write_timeout=2.0,
                 reconnect_wait=0.2, boot_timeout=60)  # fmt: skip
    r = Replicator(cfg, servers=urls)
    await r.start()  # retries until the cluster has a JetStream leader and the R3 bucket exists
    async with background(r):
        info = await r.js.stream_info(r.stream)
        assert info.config.num_replicas == 3
        live: set[int] = set()
        killed = None
        for step in range(3000):
            churn(r, step, live, sessions=400, delete_every=5)
            if step == 1000:
                leader = (await r.js.stream_info(r.stream)).cluster.leader
                killed = next(s for s in cluster if s.name == leader)
                killed.kill()
            if step % 10 == 0:
                await asyncio.sleep(0.005)
        survivors = [s.url for s in cluster if s is not killed]
        await until(lambda: r.connected and r.idle, 30.0)
        await r.flush(timeout=30)
        assert r.queue_depth == 0
        new_leader = (await r.js.stream_info(r.stream)).cluster.leader
        assert new_leader and new_leader != killed.name
        expected = {k: e.session.value for k, e in r.local.items()}
        assert len(expected) == len(live)
        assert await settled_values(survivors, expected) == expected
        result = await r.full_sync()
        assert (result["put"], result["delete"]) == (0, 0)  # nothing needed repair


SPAWN = """
import sys, time
from pathlib import Path
from sluice.plugins.replication.embedded import NatsServer
srv = NatsServer(Path(sys.argv[1]))
print(srv.start(), srv.proc.pid, flush=True)
time.sleep(60)
"""


def test_embedded_server_dies_with_a_killed_agent_and_stale_ones_are_stopped(tmp_path):
    data = tmp_path / "nats"
    agent = subprocess.Popen([sys.executable, "-c", SPAWN, str(data)], stdout=subprocess.PIPE, text=True)
    try:
        url, pid = agent.stdout.readline().split()
        agent.send_signal(signal.SIGKILL)
        agent.wait()
        deadline = time.monotonic() + 20  # SIGTERM: a JetStream server shuts down, slower under load
        while process_alive(int(pid)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not process_alive(int(pid))
    finally:
        agent.kill()
        agent.wait()

    # a server left running (pid file in the data dir) is stopped by the next start
    stale = NatsServer(data, die_with_parent=False)
    stale.start()
    old_pid = stale.proc.pid
    fresh = NatsServer(data, die_with_parent=False)
    try:
        fresh.start()
        stale.proc.wait(10)
        assert not process_alive(old_pid) and fresh.running
    finally:
        fresh.stop()
        stale.stop()
