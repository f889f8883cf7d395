"""The firewall in the lab: the real agent on the gateway, real TCP/UDP/ICMP from the client to the
server, the DNS proxy in front of the real dnsmasq, the CLI against the running agent."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from sluice.client import AgentClient
from tests.netlab import lab, ping

pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(os.geteuid() != 0, reason="lab tests need root: namespaces and BPF"),
]

SLUICE = str(Path(sys.executable).parent / "sluice")
GW4, GW6 = "10.99.1.1", "fd00:99:1::1"
SRV = {4: "10.99.2.2", 6: "fd00:99:2::2"}
OTHER = {4: "10.99.2.3", 6: "fd00:99:2::3"}
TCP_PORTS = (8080, 8081, 8082, 8083)  # 8080 by CIDR; 8081 via allowed.test; 8082 via cname.test; 8083 never
UDP_PORT = 9000
DNS_TTL = 5  # with grace 1: an allow lives 6 s, room for a slow client (or CLI) after the answer
# Probes expected to succeed wait long enough for a loaded machine; probes expected to be
# blocked give up sooner (they can only pass wrongly by getting an answer, which is fast).
ALLOWED, BLOCKED = 5.0, 1.0

CONFIG = """
[agent]
plugins = ["firewall"]
bpffs = "{bpffs}"
state_dir = "{state}"
metrics_address = ""
log_level = "info"

[plugins.firewall]
interface = "ingress0"
map_preset = "test"
management = ["10.99.9.0/24", "fd00:99:9::/64"]
settings = {{ "tcp-syn-timeout" = 3, "ilb-snat" = 0 }}

[plugins.firewall.dns]
listen = ["{gw4}", "{gw6}"]
upstream = "10.99.2.53"
min_ttl = 0
grace = 1
timeout = 5

[plugins.firewall.geneve]
enabled = true
interface = "underlay0"

[plugins.firewall.ilb]
enabled = true
interface = "egress0"
address = "10.99.2.1"

[[plugins.firewall.networks]]
name = "clients"
sources = ["10.99.1.0/24", "fd00:99:1::/64"]
default = "deny"
rules = [
  {{ action = "allow", proto = "tcp", dst = "10.99.2.2", ports = 8080 }},
  {{ action = "allow", proto = "tcp", dst = "fd00:99:2::2", ports = 8080 }},
  {{ action = "deny", proto = "udp", dst = "10.99.2.3" }},
  {{ action = "allow", proto = "udp", dst = "10.99.2.0/24", ports = 9000 }},
  {{ action = "allow", proto = "udp", dst = "fd00:99:2::/64", ports = 9000 }},
  {{ action = "allow", proto = "icmp", dst = "10.99.2.2" }},
  {{ action = "allow", proto = "icmp", dst = "fd00:99:2::2" }},
  {{ action = "allow", proto = "tcp", host = "allowed.test", ports = 8081 }},
  {{ action = "allow", proto = "tcp", host = "cname.test", ports = 8082 }},
]
"""


# ---- servers in the server namespace ----


class Servers:
    """TCP echo on TCP_PORTS and UDP echo on UDP_PORT, v4 and v6, in the server namespace."""

    def __init__(self, lab_):
        self.socks: list[socket.socket] = []
        self.peers: list[tuple[str, int]] = []  # who connected, as the server saw it
        for family in (4, 6):
            for port in TCP_PORTS:
                s = lab_.socket("server", family, socket.SOCK_STREAM)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == 6:
                    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                s.bind(("::" if family == 6 else "0.0.0.0", port))
                s.listen(64)
                self._spawn(self._accept, s)
            for addr in (SRV[family], OTHER[family]):  # bound per address: replies come from it
                u = lab_.socket("server", family, socket.SOCK_DGRAM)
                u.bind((addr, UDP_PORT))
                self._spawn(self._udp, u)

    def _spawn(self, fn, sock):
        self.socks.append(sock)
        threading.Thread(target=fn, args=(sock,), daemon=True).start()

    def _accept(self, s):
        while True:
            try:
                conn, peer = s.accept()
            except OSError:
                return
            self.peers.append(peer[:2])
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn):
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    @staticmethod
    def _udp(u):
        while True:
            try:
                data, addr = u.recvfrom(2048)
                if addr is None:  # shut down
                    return
                u.sendto(data, addr)
            except OSError:
                return

    def close(self):
        for s in self.socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()


def tcp_connect(lab_, dst: str, port: int, timeout: float = ALLOWED) -> socket.socket | None:
    """A connected socket from the client, or None when the handshake does not complete."""
    s = lab_.socket("client", 6 if ":" in dst else 4, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect((dst, port))
        return s
    except OSError:
        s.close()
        return None


def tcp_echo(lab_, dst: str, port: int, timeout: float = ALLOWED) -> bool:
    s = tcp_connect(lab_, dst, port, timeout)
    if s is None:
        return False
    with s:
        s.sendall(b"hello")
        try:
            return s.recv(16) == b"hello"
        except OSError:
            return False


def udp_echo(lab_, dst: str, port: int = UDP_PORT, timeout: float = ALLOWED) -> bool:
    with lab_.socket("client", 6 if ":" in dst else 4, socket.SOCK_DGRAM) as u:
        u.settimeout(timeout)
        u.sendto(b"ping", (dst, port))
        try:
            return u.recvfrom(64)[0] == b"ping"
        except OSError:
            return False


def can_ping(lab_, src: str, dst: str, timeout: float = ALLOWED) -> bool:
    try:
        ping(lab_.ns(src), dst, timeout=timeout)
        return True
    except TimeoutError:
        return False


# ---- the agent ----


class Agent:
    def __init__(self, lab_, root: Path, bpffs: Path):
        self.lab, self.root = lab_, root
        self.state = root / "state"
        self.config = root / "agent.toml"
        self.config.write_text(CONFIG.format(bpffs=bpffs, state=self.state, gw4=GW4, gw6=GW6))
        self.proc: subprocess.Popen | None = None

    def start(self):
        with open(self.root / "agent.log", "ab") as log:  # the process keeps its own copy
            self.proc = subprocess.Popen(
                [SLUICE, "--netns", self.lab.ns("gw"), "-c", str(self.config), "agent", "run"],
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"agent exited: {self.log_tail()}")
            try:
                if self.api("GET", "/v1/firewall/policy")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"agent not ready: {self.log_tail()}")

    def stop(self):
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

    def api_text(self, path: str) -> str:
        status, text = self.api("GET", path)
        assert status == 200 and isinstance(text, str), status
        return text

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [SLUICE, "-c", str(self.config), "fw", *args], capture_output=True, text=True, timeout=30
        )
        if check:
            assert proc.returncode == 0, proc.stderr
        return proc


@pytest.fixture(scope="module")
def env(kernel_ready, tmp_path_factory):
    root = tmp_path_factory.mktemp("fw")
    bpffs = Path("/sys/fs/bpf") / f"sluice-test-{uuid.uuid4().hex[:8]}"
    bpffs.mkdir()
    try:
        with lab(dns_ttl=DNS_TTL) as lab_:
            servers = Servers(lab_)
            agent = Agent(lab_, root, bpffs)
            agent.servers = servers
            try:
                agent.start()
                yield lab_, agent
            finally:
                agent.stop()
                servers.close()
    finally:  # even when the lab could not be built or torn down
        shutil.rmtree(bpffs, ignore_errors=True)


def dns(lab_, name: str, qtype: str = "A", server: str = GW4):
    return lab_.dns_query("client", name, qtype, server=server, timeout=10.0)


def wait_unlearned(agent, addr: str, timeout: float = DNS_TTL + 1 + 10) -> None:
    """Until the agent holds no learned allow for ``addr`` (it expires them on their own)."""
    deadline = time.monotonic() + timeout
    while addr in {r["addr"] for r in agent.api("GET", "/v1/firewall/dns")[1]["learned"]}:
        assert time.monotonic() < deadline, f"learned allow for {addr} never expired"
        time.sleep(0.2)


# ---- policy per protocol and family ----


@pytest.mark.parametrize("family", [4, 6])
def test_tcp_allowed_and_blocked(env, family):
    lab_, _ = env
    assert tcp_echo(lab_, SRV[family], 8080)
    assert not tcp_echo(lab_, SRV[family], 8083, timeout=BLOCKED)  # no rule: default deny
    assert not tcp_echo(lab_, OTHER[family], 8080, timeout=BLOCKED)  # the rule names one host


@pytest.mark.parametrize("family", [4, 6])
def test_udp_allowed_and_blocked(env, family):
    lab_, _ = env
    assert udp_echo(lab_, SRV[family])
    # IPv4: rule 3 denies 10.99.2.3 before rule 4 allows its /24; IPv6 has no such deny
    assert udp_echo(lab_, OTHER[family], timeout=ALLOWED if family == 6 else BLOCKED) == (family == 6)


@pytest.mark.parametrize("family", [4, 6])
def test_icmp_allowed_and_blocked(env, family):
    lab_, _ = env
    assert can_ping(lab_, "client", SRV[family])
    assert not can_ping(lab_, "client", OTHER[family], timeout=BLOCKED)


@pytest.mark.parametrize("family", [4, 6])
def test_unsolicited_inbound_blocked(env, family):
    lab_, _ = env
    client = "10.99.1.2" if family == 4 else "fd00:99:1::2"
    listener = lab_.socket("client", family, socket.SOCK_STREAM)
    if family == 6:
        listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    listener.bind(("::" if family == 6 else "0.0.0.0", 7000))
    listener.listen(4)
    try:
        s = lab_.socket("server", family, socket.SOCK_STREAM)
        s.settimeout(1.0)
        with s, pytest.raises(OSError):
            s.connect((client, 7000))
        assert not can_ping(lab_, "server", client, timeout=BLOCKED)
    finally:
        listener.close()


# ---- hostname rules through the DNS proxy ----


@pytest.mark.parametrize("family", [4, 6])
def test_hostname_reachable_right_after_resolution_then_expires(env, family):
    lab_, agent = env
    qtype = "A" if family == 4 else "AAAA"
    # a fresh start for this family: wait out any allow an earlier test learned
    wait_unlearned(agent, SRV[family])
    assert not tcp_echo(lab_, SRV[family], 8081, timeout=BLOCKED)
    reply = dns(lab_, "allowed.test", qtype, server=GW4 if family == 4 else GW6)
    assert reply.rcode == 0 and reply.values(qtype) == [SRV[family]]
    assert tcp_echo(lab_, SRV[family], 8081)  # the very first SYN after the answer passes
    assert not tcp_echo(lab_, SRV[family], 8082, timeout=BLOCKED)  # only the rule's port
    time.sleep(DNS_TTL + 1 + 1.5)  # TTL + grace, and a little
    assert not tcp_echo(lab_, SRV[family], 8081, timeout=BLOCKED)


def test_cname_chain_followed(env):
    lab_, _ = env
    reply = dns(lab_, "cname.test")
    assert reply.rcode == 0 and "allowed.test" in reply.values("CNAME") and reply.values("A") == [SRV[4]]
    assert tcp_echo(lab_, SRV[4], 8082)  # learned for cname.test's rule through the chain


@pytest.mark.parametrize("name", ["other.test", "nothing.example"])
def test_disallowed_names_refused(env, name):
    lab_, _ = env
    assert dns(lab_, name).rcode == 3  # NXDOMAIN (dns.deny defaults to nxdomain)
    assert not tcp_echo(lab_, OTHER[4], 8081, timeout=BLOCKED)


def _forged_answer(qid: int, name: str, addr: str) -> bytes:
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.split("."))
    question = labels + b"\0" + struct.pack("!HH", 1, 1)
    record = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 300, 4) + socket.inet_aton(addr)
    return struct.pack("!HHHHHH", qid, 0x8180, 1, 1, 0, 0) + question + record


def test_forged_answers_from_a_rogue_host_open_nothing(env):
    lab_, agent = env
    before = agent.api("GET", "/v1/firewall/dns")[1]["stats"]["ignored"]
    # a rogue host (the tunnel peer) sprays answers for a name that would be allowed, pointing at
    # the "other" server, at the proxy's port and at the client itself
    with lab_.socket("peer", 4, socket.SOCK_DGRAM) as rogue:
        for qid in range(0, 65536, 257):
            rogue.sendto(_forged_answer(qid, "allowed.test", OTHER[4]), (GW4, 53))
    with lab_.socket("server", 4, socket.SOCK_DGRAM) as rogue:
        rogue.bind(("10.99.2.53", 0))  # even from the upstream's own address, from the wrong port
        for qid in range(0, 65536, 4099):
            rogue.sendto(_forged_answer(qid, "allowed.test", OTHER[4]), (GW4, 53))
    assert not tcp_echo(lab_, OTHER[4], 8081, timeout=BLOCKED)
    after = agent.api("GET", "/v1/firewall/dns")[1]
    assert after["stats"]["ignored"] > before
    assert OTHER[4] not in {r["addr"] for r in after["learned"]}


def test_dns_over_tcp(env):
    lab_, _ = env
    name = b"".join(bytes([len(p)]) + p.encode() for p in ("allowed", "test")) + b"\0"
    query = struct.pack("!HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0) + name + struct.pack("!HH", 1, 1)
    with lab_.socket("client", 4, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect((GW4, 53))
        s.sendall(struct.pack("!H", len(query)) + query)
        size = struct.unpack("!H", s.recv(2))[0]
        reply = b""
        while len(reply) < size:
            reply += s.recv(size - len(reply))
    assert struct.unpack_from("!H", reply)[0] == 0x1234 and reply[3] & 0xF == 0
    assert socket.inet_aton(SRV[4]) in reply
    assert tcp_echo(lab_, SRV[4], 8081)


# ---- settings, audit, CLI ----


def test_audit_mode_passes_and_reports_live(env):
    lab_, agent = env
    assert not tcp_echo(lab_, SRV[4], 8083, timeout=BLOCKED)
    agent.cli("settings", "set", "audit-mode", "1")
    try:
        assert json.loads(agent.cli("settings", "get", "audit-mode", "--json").stdout) == {"audit-mode": 1}
        assert tcp_echo(lab_, SRV[4], 8083)  # would be blocked: passes, reported
    finally:
        agent.cli("settings", "set", "audit-mode", "0")
    assert not tcp_echo(lab_, SRV[4], 8083, timeout=0.5)  # the change back is live too
    out = agent.cli("audit", "--follow", "--timeout", "1", "--json").stdout
    events = [json.loads(line) for line in out.splitlines()]
    assert any(e["dport"] == 8083 and e["audit_mode"] and e["action"] == "deny" for e in events)
    assert any(e["dport"] == 8083 and not e["audit_mode"] for e in events)


def test_cli_rules_add_delete_and_bad_input(env):
    lab_, agent = env
    assert not tcp_echo(lab_, OTHER[4], 8083, timeout=0.5)
    agent.cli(
        "rules", "add", "clients", "--proto", "tcp", "--dst", OTHER[4], "--ports", "8083", "--position", "1"
    )
    listed = json.loads(agent.cli("rules", "list", "--json").stdout)
    assert listed["networks"][0]["rules"][0]["dst"] == OTHER[4]
    assert tcp_echo(lab_, OTHER[4], 8083)
    agent.cli("rules", "delete", "clients", "1")
    assert not tcp_echo(lab_, OTHER[4], 8083, timeout=0.5)
    for bad in (
        ["rules", "add", "clients", "--proto", "icmp", "--ports", "80"],
        ["rules", "add", "nosuch", "--dst", "10.0.0.1"],
        ["rules", "add", "clients", "--dst", "10.0.0.300"],
        ["rules", "delete", "clients", "99"],
        ["settings", "set", "nosuch", "1"],
        ["settings", "set", "audit-mode", "x"],
        ["sessions", "--src", "not-an-ip"],
    ):
        proc = agent.cli(*bad, check=False)
        assert proc.returncode != 0 and len(proc.stderr.strip().splitlines()) == 1, (bad, proc.stderr)
        assert "Traceback" not in proc.stderr
    assert len(json.loads(agent.cli("rules", "list", "--json").stdout)["networks"][0]["rules"]) == 9


def test_cli_sessions_counters_dns(env):
    lab_, agent = env
    with tcp_connect(lab_, SRV[4], 8080) as s:
        s.sendall(b"x" * 1000)
        assert s.recv(2000)
        rows = json.loads(agent.cli("sessions", "--dst", SRV[4], "--port", "8080", "--json").stdout)
    mine = [r for r in rows if r["state"] == "established" and r["dport"] == 8080]
    assert mine and mine[0]["bytes_out"] >= 1000 and mine[0]["packets_in"] >= 1
    assert not tcp_echo(lab_, SRV[4], 8083, timeout=0.5)
    counters = json.loads(agent.cli("counters", "--json").stdout)
    assert counters["allowed_new"] > 0 and counters["blocked_policy"] > 0 and counters["replies"] > 0
    dns(lab_, "allowed.test")
    learned = json.loads(agent.cli("dns", "--json").stdout)["learned"]
    assert {"name": "allowed.test", "addr": SRV[4]}.items() <= next(
        r for r in learned if r["addr"] == SRV[4]
    ).items()
    assert agent.cli("rules", "apply", "-f", "/nonexistent.toml", check=False).returncode != 0


def test_metrics(env):
    _, agent = env
    metrics = agent.api_text("/metrics")
    for line in (
        'sluice_firewall_packets_total{verdict="allowed"}',
        'sluice_firewall_packets_total{verdict="blocked"}',
        "sluice_firewall_sessions ",
        "sluice_firewall_dns_learned_names ",
        'sluice_firewall_audit_events_total{outcome="lost"}',
        'sluice_firewall_dns_queries_total{result="denied"}',
    ):
        assert line in metrics, line


# ---- policy updates under traffic, restart ----


def test_policy_update_under_traffic_never_drops_an_allowed_flow(env):
    lab_, agent = env
    stream = tcp_connect(lab_, SRV[4], 8080)
    failures, stop = [], threading.Event()

    def traffic():
        with stream:
            while not stop.is_set():
                try:
                    stream.sendall(b"y" * 100)
                    got = b""
                    while len(got) < 100:
                        got += stream.recv(100 - len(got))
                except OSError as exc:
                    failures.append(f"stream: {exc}")
                    return
                if not tcp_echo(lab_, SRV[4], 8080):
                    failures.append("new connection failed")

    t = threading.Thread(target=traffic)
    t.start()
    try:
        status, policy = agent.api("GET", "/v1/firewall/policy")
        base = policy["policy"]
        for i in range(20):
            extra = {"action": "deny", "proto": "tcp", "dst": f"192.0.2.{i}", "ports": 1000 + i}
            changed = json.loads(json.dumps(base))
            changed["networks"][0]["rules"].insert(0, extra)
            assert agent.api("PUT", "/v1/firewall/policy", changed)[0] == 200
        assert agent.api("PUT", "/v1/firewall/policy", base)[0] == 200
    finally:
        stop.set()
        t.join(10)
    assert failures == []


def test_established_tcp_survives_agent_restart(env):
    lab_, agent = env
    conn = tcp_connect(lab_, SRV[4], 8080)
    with conn:
        conn.settimeout(ALLOWED)
        conn.sendall(b"before")
        assert conn.recv(16) == b"before"
        agent.stop()
        conn.sendall(b"while-down")  # the datapath enforces with no agent
        assert conn.recv(16) == b"while-down"
        assert not tcp_echo(lab_, SRV[4], 8083, timeout=0.5)
        agent.start()
        conn.sendall(b"after")
        assert conn.recv(16) == b"after"
    assert tcp_echo(lab_, SRV[4], 8080)
    assert not tcp_echo(lab_, SRV[4], 8083, timeout=0.5)


# ---- GENEVE appliance mode: the tunnel peer plays the load balancer ----

PEER_MAC, GW_UNDERLAY_MAC = bytes.fromhex("029903000002"), bytes.fromhex("029903000001")


def _geneve_exchange(lab_, frame: bytes, timeout: float = ALLOWED) -> bytes | None:
    """Send ``frame`` from the peer's eth0 and return the first GENEVE frame that comes back."""
    with lab_.socket("peer", socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0800)) as raw:
        raw.bind(("eth0", 0))
        raw.settimeout(timeout)
        raw.send(frame)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                got, addr = raw.recvfrom(4096)
            except TimeoutError:
                return None
            # the returned frame: from the gateway's MAC, UDP to 6081 (not our own outgoing copy)
            if got[6:12] == GW_UNDERLAY_MAC and got[23] == 17 and got[36:38] == b"\x17\xc1":
                return got
    return None


def test_geneve_allowed_flow_returned_byte_for_byte(env):
    lab_, agent = env
    from sluice.plugins.firewall import frames

    outer = dict(lb=(PEER_MAC, "10.99.3.2"), appliance=(GW_UNDERLAY_MAC, "10.99.3.1"), sport=6081)
    syn = frames.geneve(frames.packet("10.99.1.2", SRV[4], 6, 45678, 8080, "S")[14:], **outer)
    assert _geneve_exchange(lab_, syn) == frames.geneve_returned(syn)
    denied = frames.geneve(frames.packet("10.99.1.2", SRV[4], 6, 45679, 8083, "S")[14:], **outer)
    assert _geneve_exchange(lab_, denied, timeout=0.5) is None
    rows = json.loads(agent.cli("sessions", "--port", "45678", "--json").stdout)
    assert rows and rows[0]["dport"] == 8080
    assert (rows[0]["tunnel"], rows[0]["vni"], rows[0]["outer_src"]) == ("geneve", 0x123456, "10.99.3.2")
    assert json.loads(agent.cli("counters", "--json").stdout)["redirected"] >= 1


# ---- ILB mode: SNAT to the egress address ----


def test_ilb_snat_and_reverse_translation_with_real_tcp(env):
    lab_, agent = env
    from sluice.plugins.firewall.maps import FirewallMaps

    agent.cli("settings", "set", "ilb-snat", "1")
    agent.cli("settings", "set", "tcp-closing-timeout", "1")
    try:
        conn = tcp_connect(lab_, SRV[4], 8080)
        with conn:
            conn.sendall(b"through-nat")
            assert conn.recv(32) == b"through-nat"  # replies translated back to the client
            sport = conn.getsockname()[1]
            peer = agent.servers.peers[-1]
            assert peer[0] == "10.99.2.1" and 20000 <= peer[1] <= 32767  # the server saw the SNAT address
            [row] = json.loads(agent.cli("sessions", "--port", str(sport), "--json").stdout)
            assert row["nat_port"] == peer[1]
            assert udp_echo(lab_, SRV[4])  # UDP too
        pin_dir = Path(agent.config.read_text().split('bpffs = "')[1].split('"')[0]) / "sluice" / "firewall"
        with FirewallMaps.from_pins(pin_dir) as maps:
            nat = maps.map("fw_nat")

            def nat_ports():
                return {k.nat_port for k, _ in nat.items()}

            assert peer[1] in nat_ports()
            # the connection closed (FIN both ways): once GC removes the session, its NAT entry goes too
            deadline = time.monotonic() + 10
            while peer[1] in nat_ports() and time.monotonic() < deadline:
                time.sleep(0.3)
            assert peer[1] not in nat_ports()
            assert not json.loads(agent.cli("sessions", "--port", str(sport), "--json").stdout)
    finally:
        agent.cli("settings", "set", "ilb-snat", "0")
        agent.cli("settings", "set", "tcp-closing-timeout", "10")


def test_api_rejects_bad_input_and_changes_nothing(env):
    _, agent = env
    before = agent.api("GET", "/v1/firewall/policy")[1]
    for method, path, body in (
        ("PUT", "/v1/firewall/policy", {"networks": [{"name": "x", "sources": ["nope"]}]}),
        ("PUT", "/v1/firewall/policy", [1, 2, 3]),
        ("POST", "/v1/firewall/rules", {"network": "clients", "rule": {"proto": "tcp", "ports": "99999"}}),
        ("POST", "/v1/firewall/rules", {"network": "clients", "rule": {}, "position": 99}),
        ("POST", "/v1/firewall/rules", {"network": "clients", "rule": {}, "position": 0}),
        ("POST", "/v1/firewall/rules", {"network": "clients", "rule": {}, "position": True}),
        ("PUT", "/v1/firewall/settings/audit-mode", {"value": -1}),
        ("PUT", "/v1/firewall/settings/audit-mode", {"value": "1"}),
        ("DELETE", "/v1/firewall/rules/clients/0", None),
        ("GET", "/v1/firewall/sessions?port=x", None),
        ("GET", "/v1/firewall/audit?after=x", None),
    ):
        status, reply = agent.api(method, path, body)
        assert status == 400, (method, path, reply)
        assert isinstance(reply["error"], str) and "\n" not in reply["error"], reply
    assert agent.api("GET", "/v1/firewall/policy")[1] == before
    assert agent.api("GET", "/v1/firewall/settings")[1]["audit-mode"] == 0
