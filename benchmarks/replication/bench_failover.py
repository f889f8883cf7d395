"""Failover through a running standby, and how fast a new session reaches the bucket.

    python benchmarks/replication/bench_failover.py [--connections 200] [--seconds 3]

The lab of tests/lab/test_replication_standby.py: gateways A and B (firewall + replication,
default deny) both running, one nats-server. Two measurements:

1. **SYN to bucket**: ``--connections`` TCP connections opened one after another through A; a
   watcher on the bucket (in the nats namespace) notes when each one's record arrives. Time
   from just before ``connect()`` to the record's arrival: the datapath event, the agent, the
   JetStream ack and the delivery to a watcher. Baseline, same run: a bare KV put from the
   watcher's own connection until the watcher receives it.
2. **Failover**: an established TCP stream (a 64-byte echo every 2 ms) and a 1000 pps ping
   through A; SIGKILL A's agent and move the routes to B at once. Resets on the stream, time from
   the route move to the stream's next echo, pings lost. Baseline, same run: the longest
   echo gap and the pings lost over an equal window before the kill.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import nats  # noqa: E402

from benchmarks.common import table  # noqa: E402
from sluice import lab as sl  # noqa: E402
from sluice.plugins.replication.records import decode  # noqa: E402
from tests.lab.test_replication_standby import PORT, SERVER, echo, standby_pair  # noqa: E402


def quantile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(len(s) * q))]


class BucketWatcher:
    """A thread in the nats namespace: arrival time of each record per client port."""

    def __init__(self, ns: str, bucket: str = "standby"):
        self.ns, self.bucket = ns, bucket
        self.arrived: dict[int, float] = {}
        self.baseline: list[float] = []
        self.ready = threading.Event()
        self.stop = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        with sl.in_netns(self.ns):
            asyncio.run(self._watch())

    async def _watch(self):
        nc = await nats.connect("nats://127.0.0.1:4222")
        js = nc.jetstream()
        while True:
            try:
                await js.stream_info(f"KV_{self.bucket}")
                break
            except Exception:
                await asyncio.sleep(0.1)
        probes: dict[str, float] = {}

        async def on_msg(msg):
            now = time.monotonic()
            key = msg.subject.split(".", 2)[2]
            if key in probes:
                self.baseline.append(now - probes.pop(key))
                return
            if not msg.data:
                return
            attrs = decode(key, msg.data).session.attrs
            if attrs.get("dport") == PORT:
                self.arrived.setdefault(attrs["sport"], now)

        from nats.js import api

        await js.subscribe(
            f"$KV.{self.bucket}.>",
            cb=on_msg,
            ordered_consumer=True,
            config=api.ConsumerConfig(deliver_policy=api.DeliverPolicy.NEW),
        )
        self.ready.set()
        kv = await js.key_value(self.bucket)
        for i in range(200):  # baseline: put → delivered to this watcher
            key = f"bench.{i:04x}"
            probes[key] = time.monotonic()
            await kv.put(key, b"x" * 64)
            await asyncio.sleep(0.005)
        for i in range(200):
            await kv.purge(f"bench.{i:04x}")
        while not self.stop.is_set():
            await asyncio.sleep(0.1)
        await nc.close()


def syn_to_bucket(lab_, connections: int) -> tuple[list[float], list[float]]:
    watcher = BucketWatcher(lab_.ns["nats"])
    watcher.ready.wait(10)
    started: dict[int, float] = {}
    conns = []
    for _ in range(connections):
        s = lab_.socket("client")
        s.settimeout(3.0)
        s.bind(("0.0.0.0", 0))
        started[s.getsockname()[1]] = time.monotonic()
        s.connect((SERVER, PORT))
        conns.append(s)
        time.sleep(0.005)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and len(watcher.arrived) < connections:
        time.sleep(0.05)
    while time.monotonic() < deadline and len(watcher.baseline) < 200:
        time.sleep(0.05)
    watcher.stop.set()
    for s in conns:
        s.close()
    lags = [watcher.arrived[p] - t for p, t in started.items() if p in watcher.arrived]
    return lags, watcher.baseline


class Pinger:
    """1000 pps ICMP echo from the client namespace (a ping socket); counts replies by seq."""

    def __init__(self, ns: str):
        sl.set_sysctl(ns, "net.ipv4.ping_group_range", "0 0")
        self.sock = sl.netns_socket(ns, 4, socket.SOCK_DGRAM, socket.IPPROTO_ICMP)
        self.sock.settimeout(0.2)
        self.sent: dict[int, float] = {}
        self.got: set[int] = set()
        self.running = True
        threading.Thread(target=self._send, daemon=True).start()
        threading.Thread(target=self._recv, daemon=True).start()

    def _send(self):
        seq, t = 0, time.monotonic()
        while self.running:
            seq = (seq + 1) & 0xFFFF
            self.sent[seq] = time.monotonic()
            self.sock.sendto(struct.pack("!BBHHH", 8, 0, 0, 0, seq) + b"sluice", (SERVER, 0))
            t += 0.001
            time.sleep(max(0.0, t - time.monotonic()))

    def _recv(self):
        while self.running:
            try:
                data = self.sock.recv(64)
            except OSError:
                continue
            self.got.add(struct.unpack_from("!H", data, 6)[0])

    def lost_between(self, t0: float, t1: float) -> int:
        return sum(1 for seq, t in list(self.sent.items()) if t0 <= t < t1 and seq not in self.got)


def failover(lab_, a, seconds: float) -> dict:
    conn = lab_.socket("client")
    conn.settimeout(5.0)
    conn.connect((SERVER, PORT))
    pinger = Pinger(lab_.ns["client"])
    echoes: list[float] = []
    resets = 0
    stop = threading.Event()

    def stream():
        nonlocal resets
        while not stop.is_set():
            try:
                echo(conn, b"s" * 64)
            except OSError:
                resets += 1
                return
            echoes.append(time.monotonic())
            time.sleep(0.002)

    th = threading.Thread(target=stream, daemon=True)
    th.start()
    time.sleep(1.0)  # let A report the session and the ping settle
    t_base = time.monotonic()
    time.sleep(seconds)
    t_kill = time.monotonic()
    a.proc.kill()
    a.proc.wait()
    lab_.route_via("gb")
    t_moved = time.monotonic()
    time.sleep(seconds)
    t_end = time.monotonic()
    time.sleep(0.3)  # replies in flight
    stop.set()
    pinger.running = False
    th.join(5)

    def max_gap(t0, t1):
        ts = [t for t in echoes if t0 <= t < t1]
        return max((b - a_) for a_, b in zip([t0, *ts], [*ts, t1], strict=True))

    after = [t for t in echoes if t > t_moved]
    return {
        "resets": resets,
        "resume_s": (after[0] - t_moved) if after else float("inf"),
        "gap_base": max_gap(t_base, t_kill),
        "gap_fail": max_gap(t_kill, t_end),
        "lost_base": pinger.lost_between(t_base, t_kill),
        "lost_fail": pinger.lost_between(t_kill, t_end),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--connections", type=int, default=200)
    ap.add_argument("--seconds", type=float, default=3.0)
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("needs root (network namespaces)")
    with tempfile.TemporaryDirectory() as tmp, standby_pair(Path(tmp), gc=1.0) as (lab_, a, _b):
        lags, base = syn_to_bucket(lab_, args.connections)
        f = failover(lab_, a, args.seconds)
    ms = 1000.0
    print(f"SYN -> record in the bucket, {len(lags)} of {args.connections} connections (gc_interval 1 s)")
    print(
        table(
            ["path", "samples", "p50 ms", "p99 ms", "x baseline (p50)"],
            [
                ["bare KV put -> watcher (baseline)", len(base), statistics.median(base) * ms,
                 quantile(base, 0.99) * ms, 1.0],
                ["SYN -> datapath event -> agent -> watcher", len(lags), statistics.median(lags) * ms,
                 quantile(lags, 0.99) * ms, statistics.median(lags) / statistics.median(base)],
            ],
        )
    )  # fmt: skip
    print(f"\nFailover: SIGKILL A, routes to B; windows of {args.seconds} s")
    print(
        table(
            ["window", "resets", "max echo gap ms", "pings lost", "TCP resume ms"],
            [
                ["steady, before the kill (baseline)", 0, f["gap_base"] * ms, f["lost_base"], ""],
                ["kill + route move", f["resets"], f["gap_fail"] * ms, f["lost_fail"], f["resume_s"] * ms],
            ],
        )
    )


if __name__ == "__main__":
    main()
