"""A lab gateway running every built-in plugin, with a capture on the server's link.

Shared by the lab tests that throw crafted traffic at the whole chain (fragments, the hostile
corpus): the client's frames are written raw to its eth0, addressed to the gateway's MAC, and
what reaches the server is read from a packet socket on the server's eth0 (what tcpdump reads)
plus an nftables counter on the server's input hook, where the kernel has reassembled
fragments: a datagram to the denied port counts there only if all of its fragments got through.
"""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from sluice.client import AgentClient
from sluice.lab import Lab

SLUICE = str(Path(sys.executable).parent / "sluice")
CLIENT = {4: "10.99.1.2", 6: "fd00:99:1::2"}
SRV = {4: "10.99.2.2", 6: "fd00:99:2::2"}
OTHER = {4: "10.99.2.3", 6: "fd00:99:2::3"}
GW4, GW6 = "10.99.1.1", "fd00:99:1::1"
CLIENT_MAC, GW_MAC = "02:99:01:00:00:02", "02:99:01:00:00:01"
ALLOWED_TCP, DENIED_TCP, UDP_PORT = 8080, 9022, 9000
ETH_P_ALL = 0x0003

CONFIG = """
[agent]
plugins = ["flowmon", "conntrack", "firewall", "tunnel", "replication"]
bpffs = "{bpffs}"
state_dir = "{state}"
metrics_address = ""
log_level = "info"

[plugins.flowmon]
interfaces = ["ingress0", "egress0"]

[plugins.conntrack]
interfaces = ["ingress0"]

[plugins.firewall]
interface = "ingress0"
map_preset = "test"
management = ["10.99.9.0/24", "fd00:99:9::/64"]

[plugins.firewall.dns]
listen = ["{gw4}", "{gw6}"]
upstream = "10.99.2.53"
upstream_port = {upstream_port}
timeout = {dns_timeout}
min_ttl = 0
grace = 1

[[plugins.firewall.networks]]
name = "clients"
sources = ["10.99.1.0/24", "fd00:99:1::/64"]
default = "deny"
rules = [
  {{ action = "deny", proto = "tcp", ports = {denied} }},
  {{ action = "allow", proto = "tcp", dst = "10.99.2.2", ports = {allowed} }},
  {{ action = "allow", proto = "tcp", dst = "fd00:99:2::2", ports = {allowed} }},
  {{ action = "allow", proto = "udp", dst = "10.99.2.2", ports = {udp} }},
  {{ action = "allow", proto = "udp", dst = "fd00:99:2::2", ports = {udp} }},
  {{ action = "allow", proto = "icmp", dst = "10.99.2.0/24" }},
  {{ action = "allow", proto = "icmp", dst = "fd00:99:2::/64" }},
  {{ action = "allow", proto = "tcp", host = "allowed.test", ports = 8081 }},
]

[plugins.tunnel]
interface = "underlay0"
underlay_address = "10.99.3.1"
routes = [{{ dst = "10.99.200.0/24", nexthops = [{{ peer = "peer", underlay = "10.99.3.2", vni = 100 }}] }}]

[plugins.replication]
servers = ["nats://10.99.9.2:4222"]
node_id = "hostile-gw"
bucket = "hostile"
"""

# Counted on the server after reassembly (input hook): TCP to the denied port, and what was allowed.
SERVER_NFT = f"""
table inet hostile {{
  counter denied_port {{}}
  counter allowed_port {{}}
  chain input {{
    type filter hook input priority 0; policy accept;
    tcp dport {DENIED_TCP} counter name denied_port
    tcp dport {ALLOWED_TCP} counter name allowed_port
  }}
}}
"""


class Capture:
    """Every frame from the client's addresses seen on the server's eth0, from start() on."""

    def __init__(self, lab_: Lab):
        self.sock = lab_.socket("server", socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        self.sock.bind(("eth0", ETH_P_ALL))
        self.sock.settimeout(0.2)
        self.frames: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        src4 = socket.inet_aton(CLIENT[4])
        src6 = socket.inet_pton(socket.AF_INET6, CLIENT[6])
        while not self._stop.is_set():
            try:
                frame, addr = self.sock.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            if addr[2] == socket.PACKET_OUTGOING:
                continue
            if (frame[12:14] == b"\x08\x00" and frame[26:30] == src4) or (
                frame[12:14] == b"\x86\xdd" and frame[22:38] == src6
            ):
                self.frames.append(frame)

    def clear(self) -> None:
        self.frames = []

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


class Gateway:
    """`sluice agent run` with every plugin in the lab's gw namespace."""

    def __init__(self, lab_: Lab, root: Path, bpffs: Path, upstream_port: int = 53, dns_timeout: float = 5):
        """``upstream_port``: where the DNS proxy forwards on 10.99.2.53 (53: the lab's dnsmasq)."""
        self.lab, self.root = lab_, root
        self.state = root / "state"
        self.config = root / "agent.toml"
        self.config.write_text(
            CONFIG.format(
                bpffs=bpffs,
                state=self.state,
                gw4=GW4,
                gw6=GW6,
                denied=DENIED_TCP,
                allowed=ALLOWED_TCP,
                udp=UDP_PORT,
                upstream_port=upstream_port,
                dns_timeout=dns_timeout,
            )
        )
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.root / "agent.log", "ab") as log:
            self.proc = subprocess.Popen(
                [SLUICE, "--netns", self.lab.ns("gw"), "-c", str(self.config), "agent", "run"],
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"agent exited: {self.log_tail()}"
            with contextlib.suppress(OSError):
                if self.api("GET", "/v1/firewall/policy")[0] == 200:
                    return
            time.sleep(0.2)
        raise AssertionError(f"agent not ready: {self.log_tail()}")

    def alive(self) -> bool:
        return (
            self.proc is not None
            and self.proc.poll() is None
            and self.api("GET", "/v1/firewall/policy")[0] == 200
        )

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log_tail(self) -> str:
        return "\n".join((self.root / "agent.log").read_text(errors="replace").splitlines()[-20:])

    def api(self, method: str, path: str, body=None) -> tuple[int, object]:
        return AgentClient(self.state / "sluice.sock").request(method, path, body)

    def counters(self) -> dict[str, int]:
        return self.api("GET", "/v1/firewall/counters")[1]

    def learned(self) -> set[str]:
        return {r["addr"] for r in self.api("GET", "/v1/firewall/dns")[1]["learned"]}


def server_counters(lab_: Lab) -> dict[str, int]:
    out = lab_.exec("server", ["nft", "-j", "list", "counters", "table", "inet", "hostile"]).stdout
    return {
        item["counter"]["name"]: item["counter"]["packets"]
        for item in json.loads(out)["nftables"]
        if "counter" in item
    }


def client_raw(lab_: Lab) -> socket.socket:
    """A packet socket on the client's eth0: frames go out exactly as written."""
    raw = lab_.socket("client", socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    raw.bind(("eth0", 0))
    return raw
