"""Replication on the lab: agents in the gw namespace replicate over mgmt0 into the lab's own
nats-server (nats namespace). Agent A publishes sessions and is killed with SIGKILL; agent B, a
fresh process with an empty BPF map, loads them from the bucket before it reports ready.

Then the failover with the real firewall: a TCP connection established through gateway A keeps
flowing through gateway B after A is killed (test_replication_failover_with_traffic)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from sluice.client import AgentClient
from sluice.lab import Lab, in_netns
from tests.netlab import lab

pytestmark = pytest.mark.lab
ROOT = Path(__file__).resolve().parents[2]
SESSIONS = 200
MARK = "RESULT "  # the agent's logs share stdout


def result(lines) -> dict:
    for line in lines:
        if line.startswith(MARK):
            return json.loads(line[len(MARK) :])
    raise AssertionError("the agent process printed no result")


async def _drive(mode: str, bpffs: str, state_dir: str, node: str, url: str) -> None:
    from tests.kernel.test_replication_agent import Running

    async with Running(Path(bpffs), Path(state_dir), node, servers=[url]) as run:
        await run.wait_ready()
        if mode == "publish":
            for i in range(SESSIONS):
                run.owner.publish("created", i, i.to_bytes(8, "big"))
            for i in range(0, SESSIONS, 2):
                run.owner.publish("updated", i, b"updated!")
            _, flushed = await run.request("POST", "/v1/replication/flush")
            _, status = await run.request("GET", "/v1/replication/status")
            print(MARK + json.dumps({"flushed": flushed, "status": status}), flush=True)
            await asyncio.sleep(300)  # until SIGKILL
        else:
            _, status = await run.request("GET", "/v1/replication/status")
            entries = {bytes(k).hex(): bytes(v).hex() for k, v in run.owner.map.items()}
            result = {"at_ready": run.owner.map_size_when_ready, "map": entries, "status": status}
            print(MARK + json.dumps(result), flush=True)


def agent(mode: str, netns: str, bpffs: Path, state_dir: Path, node: str, url: str) -> subprocess.Popen:
    args = [mode, netns, str(bpffs), str(state_dir), node, url]
    return subprocess.Popen(
        [sys.executable, "-m", "tests.lab.test_replication_lab", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )


def test_agent_killed_sessions_restored_by_the_next_agent(kernel_ready, tmp_path):
    bpffs = Path("/sys/fs/bpf") / f"sluice-test-{uuid.uuid4().hex[:8]}"
    bpffs.mkdir()
    procs = []
    try:
        with lab() as lb:
            url = f"nats://{Lab.addr('nats')}:{lb.spec.nats_port}"
            gw = lb.ns("gw")
            a = agent("publish", gw, bpffs, tmp_path / "a", "gw-a", url)
            procs.append(a)
            published = result(a.stdout)
            assert published["flushed"]["queued"] == 0
            assert published["status"]["in_both"] == SESSIONS
            os.kill(a.pid, signal.SIGKILL)  # no graceful stop, no flush
            a.wait()

            b = agent("restore", gw, bpffs, tmp_path / "b", "gw-b", url)
            procs.append(b)
            out, _ = b.communicate(timeout=60)
            restored = result(out.splitlines())
            assert restored["at_ready"] == SESSIONS  # all in the map before /readyz said ready
            expected = {
                i.to_bytes(4, "big").hex(): (b"updated!" if i % 2 == 0 else i.to_bytes(8, "big")).hex()
                for i in range(SESSIONS)
            }
            assert restored["map"] == expected
            assert restored["status"]["boot"]["restored"] == {"testowner": SESSIONS}
            assert restored["status"]["bucket_count"] == SESSIONS
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        shutil.rmtree(bpffs, ignore_errors=True)


# ---- failover with the firewall and real traffic ---------------------------------------------

SLUICE = str(Path(sys.executable).parent / "sluice")
GW4, SERVER4, PORT = "10.99.1.1", "10.99.2.2", 8081
DNS_TTL, DNS_GRACE = 2, 1
FAILOVER_CONFIG = """
[agent]
plugins = {plugins}
bpffs = "{bpffs}"
state_dir = "{state}"
metrics_address = ""

[plugins.firewall]
interface = "ingress0"
map_preset = "test"
management = ["10.99.9.0/24"]
gc_interval = 0.2

[plugins.firewall.dns]
listen = ["{gw4}"]
upstream = "10.99.2.53"
min_ttl = 0
grace = {grace}

[[plugins.firewall.networks]]
name = "clients"
sources = ["10.99.1.0/24"]
default = "deny"
rules = [{{ action = "allow", proto = "tcp", host = "allowed.test", ports = {port} }}]
"""
REPLICATION_SECTION = """
[plugins.replication]
servers = ["{nats}"]
node_id = "{node}"
bucket = "failover"
"""


def firewall_restore_available() -> bool:
    from sluice.manager import PluginManager

    manager = PluginManager()
    record = manager.register("sluice.plugins.firewall", "firewall")
    return record.module is not None and manager.implements("firewall", "sluice_session_restore")


class EchoServer:
    """TCP echo on SERVER4:PORT in the lab's server namespace."""

    def __init__(self, lab_):
        self.sock = lab_.socket("server", 4, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((SERVER4, PORT))
        self.sock.listen(8)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn):
        with conn, contextlib.suppress(OSError):
            while data := conn.recv(4096):
                conn.sendall(data)

    def close(self):
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


def echo(conn: socket.socket, payload: bytes) -> bool:
    try:
        conn.sendall(payload)
        return conn.recv(64) == payload
    except OSError:
        return False


def new_connection_works(lab_) -> bool:
    s = lab_.socket("client", 4, socket.SOCK_STREAM)
    s.settimeout(1.0)
    with s:
        try:
            s.connect((SERVER4, PORT))
        except OSError:
            return False
        return echo(s, b"new")


class Gateway:
    """`sluice agent run` (firewall + replication) in the lab's gw namespace."""

    def __init__(self, lab_, root: Path, node: str, replication: bool = True):
        self.root, self.node = root, node
        self.bpffs = Path("/sys/fs/bpf") / f"sluice-test-{uuid.uuid4().hex[:8]}"
        self.bpffs.mkdir()
        self.state = root / node
        self.state.mkdir(parents=True)
        self.config = root / f"{node}.toml"
        nats_url = f"nats://{Lab.addr('nats')}:{lab_.spec.nats_port}"
        plugins = ["firewall", "replication"] if replication else ["firewall"]
        text = FAILOVER_CONFIG.format(
            plugins=json.dumps(plugins),
            bpffs=self.bpffs,
            state=self.state,
            gw4=GW4,
            grace=DNS_GRACE,
            port=PORT,
        )
        if replication:
            text += REPLICATION_SECTION.format(nats=nats_url, node=node)
        self.config.write_text(text)
        log = open(root / f"{node}.log", "ab")  # noqa: SIM115 (kept open for the process)
        self.proc = subprocess.Popen(
            [SLUICE, "--netns", lab_.ns("gw"), "-c", str(self.config), "agent", "run"],
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
        )

    def api(self, path: str):
        return AgentClient(self.state / "sluice.sock").get(path)

    def wait(self, check, what: str, timeout: float = 40.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.node} exited ({self.proc.returncode}): {self.log_tail()}")
            with contextlib.suppress(OSError, ValueError):
                result = check()
                if result:
                    return result
            time.sleep(0.1)
        raise AssertionError(f"{self.node}: {what} not within {timeout}s: {self.log_tail()}")

    def ready(self) -> bool:
        return self.api("/readyz")[0] == 200

    def log_tail(self) -> str:
        return "\n".join((self.root / f"{self.node}.log").read_text(errors="replace").splitlines()[-15:])

    def session(self):
        """This gateway's firewall session of the test connection (its own map), or None."""
        _, rows = self.api("/v1/firewall/sessions")
        return next((r for r in rows if r["dport"] == PORT and r["state"] == "established"), None)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.bpffs, ignore_errors=True)


@pytest.mark.slow
def test_replication_failover_with_traffic(kernel_ready, tmp_path):
    """A TCP connection established through gateway A keeps flowing through gateway B after A
    is killed with SIGKILL: B restores A's sessions from the bucket before it says ready.

    Both gateways run in the lab's gw namespace one after the other, each with its own bpffs
    root and state: B's firewall program replaces A's on ingress0 and sees only its own maps, so
    the connection passes B only if B restored its session (the DNS allow that let it start has
    expired by then, and a new connection is refused). Control: a third gateway without
    replication, after B is killed the same way, drops the connection."""
    if not firewall_restore_available():
        pytest.skip("firewall: plugins/firewall does not implement sluice_session_restore")
    gateways = []
    with lab(dns_ttl=DNS_TTL) as lab_:
        server = EchoServer(lab_)
        try:
            a = Gateway(lab_, tmp_path, "gw-a")
            gateways.append(a)
            a.wait(a.ready, "ready")
            assert lab_.dns_query("client", "allowed.test", "A", server=GW4).values("A") == [SERVER4]
            conn = lab_.socket("client", 4, socket.SOCK_STREAM)
            conn.settimeout(2.0)
            conn.connect((SERVER4, PORT))
            assert echo(conn, b"through A")
            deadline = time.monotonic() + DNS_TTL + DNS_GRACE + 1.5  # the DNS allow expires
            while time.monotonic() < deadline:
                assert echo(conn, b"keepalive")
                time.sleep(0.3)
            assert not new_connection_works(lab_)  # only the session carries the connection now
            assert echo(conn, b"still A")

            def replicated():
                _, rows = a.api("/v1/replication/list?owner=firewall")
                return [r for r in rows if r["attrs"].get("dport") == PORT]

            a.wait(replicated, "the session in the bucket")
            a.proc.kill()  # SIGKILL: no flush, no goodbye
            a.proc.wait()

            b = Gateway(lab_, tmp_path, "gw-b")
            gateways.append(b)
            b.wait(b.ready, "ready")
            _, status = b.api("/v1/replication/status")
            assert status["boot"]["restored"].get("firewall", 0) >= 1
            before = b.wait(b.session, "the restored session in B's map")
            assert echo(conn, b"through B")  # the same TCP connection, now through B
            after = b.wait(
                lambda: (s := b.session()) and s["packets_out"] > before["packets_out"] and s,
                "B counting the connection's packets",
            )
            assert after["packets_out"] > before["packets_out"]
            assert not new_connection_works(lab_)

            # Control: the same failover to a gateway without replication drops the connection.
            b.proc.kill()
            b.proc.wait()
            c = Gateway(lab_, tmp_path, "gw-c", replication=False)
            gateways.append(c)
            c.wait(c.ready, "ready")
            assert c.session() is None
            assert not echo(conn, b"through C")
            conn.close()
        finally:
            for g in gateways:
                g.stop()
            server.close()


if __name__ == "__main__":  # the agent process the test starts: MODE NETNS BPFFS STATE_DIR NODE URL
    mode, netns, bpffs_dir, state, node_id, nats_url = sys.argv[1:7]
    with in_netns(netns):
        asyncio.run(_drive(mode, bpffs_dir, state, node_id, nats_url))
