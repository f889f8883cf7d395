"""flowmon on the lab gateway with real traffic: exact counts, flags, both families, drops with
the kernel's reasons, DNS against the lab's dnsmasq, TCP RTT, and IPFIX decoded by nfdump.

Bytes are L3 (what IPFIX's octetDeltaCount means): the senders' datagram sizes plus IP and
transport headers, nftables' counters (which count from L3, one GSO packet as one), and for TCP
the segments the server's kernel received (tcp_info segs_in) as the wire's packet count."""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import NamedTuple

import pytest

from sluice.lab import in_netns
from sluice.plugins.flowmon import drops
from sluice.plugins.flowmon.config import Config
from sluice.plugins.flowmon.monitor import Attacher, FlowMonitor, compile_datapath
from sluice.plugins.flowmon.records import KEY, Flow
from tests.netlab import lab, netns_pair, ping

pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: namespaces and BPF"),
]
INGRESS0, EGRESS0 = 11, 12  # ifindexes of the gw's interfaces (sluice.lab)
SETTLE_S = 0.3  # let the last ACKs of a closed connection cross the gateway before evicting


def wait_until(what: str, check, timeout: float = 15.0, every: float = 0.05):
    """Poll ``check`` until it is truthy (packets cross the lab in softirqs, which a loaded host
    runs late); fail naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not (result := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(every)
    return result


def quiet(read, timeout: float = 15.0) -> None:
    """Wait until ``read()`` gives the same value twice ``SETTLE_S`` apart (traffic has drained)."""
    deadline, last = time.monotonic() + timeout, read()
    while True:
        time.sleep(SETTLE_S)
        if (now := read()) == last:
            return
        assert time.monotonic() < deadline, "the traffic did not drain"
        last = now


def tcp_closed(lb, port: int) -> bool:
    """No socket of client or server on ``port`` is still closing (only TIME_WAIT, or none): the
    last FIN and ACK were delivered, so they have crossed the gateway."""
    for host in ("client", "server"):
        text = lb.exec(host, ["cat", "/proc/net/tcp", "/proc/net/tcp6"]).stdout
        for line in text.splitlines():
            fields = line.split()
            if len(fields) < 4 or fields[0] == "sl":
                continue
            ports = {int(fields[1].rsplit(":", 1)[1], 16), int(fields[2].rsplit(":", 1)[1], 16)}
            if port in ports and fields[3] != "06":  # 06: TIME_WAIT
                return False
    return True


@pytest.fixture(scope="module")
def env(kernel_ready):
    root = Path("/sys/fs/bpf") / f"sluice-test-{uuid.uuid4().hex[:8]}"
    root.mkdir()
    try:
        with lab() as lb:
            bpf = compile_datapath(root, Config(), drops=True)
            mon = FlowMonitor(root / "sluice" / "flowmon", drops.kernel_reasons())
            mon.configure(Config())
            with in_netns(lb.ns("gw")):
                attacher = Attacher(bpf)
                assert attacher.sync(["ingress0", "egress0"], []) == ["egress0", "ingress0"]
            yield lb, mon, bpf
            mon.close()
            bpf.cleanup()
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def gw(env):
    lb, mon, _ = env
    mon.configure(Config())
    mon.evict()
    return lb, mon


def find(flows, src, dst, proto, dport=None):
    out = [f for f in flows if (f.src, f.dst, f.proto) == (src, dst, proto) and dport in (None, f.dport)]
    assert len(out) == 1, f"expected one {proto} flow {src} -> {dst}:{dport}, got {out}"
    return out[0]


def ip_header(family: int) -> int:
    return 20 if family == 4 else 40


@pytest.mark.parametrize("family", [4, 6])
def test_udp_counts_are_exact_and_counted_once(gw, family):
    lb, mon = gw
    src, dst = lb.addr("client", family), lb.addr("server", family)
    rx = lb.socket("server", family, socket.SOCK_DGRAM)
    tx = lb.socket("client", family, socket.SOCK_DGRAM)
    with rx, tx:
        rx.bind((dst, 7001))
        rx.settimeout(2)
        sizes = [1, 100, 1000, 1400, 37]
        for n in sizes:
            tx.sendto(b"u" * n, (dst, 7001))
        for _ in sizes:
            rx.recv(2048)
    f = find(mon.evict(), src, dst, 17, 7001)
    assert f.packets == len(sizes)
    assert f.bytes == sum(ip_header(family) + 8 + n for n in sizes)  # L3: no Ethernet header
    assert (f.ifindex, f.direction) == (INGRESS0, 0)  # counted where it entered the gateway ...
    assert f.seen == [(EGRESS0, 1)]  # ... and only listed where it left it
    assert f.src_mac == "02:99:01:00:00:02" and f.dst_mac == "02:99:01:00:00:01"
    assert f.family == family


@pytest.mark.parametrize("family", [4, 6])
def test_icmp_echo_counts_by_type_and_code(gw, family):
    lb, mon = gw
    src, dst = lb.addr("client", family), lb.addr("server", family)
    for _ in range(3):
        ping(lb.ns("client"), dst, timeout=5)
    flows = mon.evict()
    proto, request, reply = (1, 8, 0) if family == 4 else (58, 128, 129)
    req = [f for f in flows if (f.src, f.dst, f.proto, f.sport) == (src, dst, proto, request)]
    rep = [f for f in flows if (f.src, f.dst, f.proto, f.sport) == (dst, src, proto, reply)]
    assert len(req) == 1 and len(rep) == 1
    size = ip_header(family) + 8 + len(b"sluice-lab-ping")
    assert (req[0].packets, req[0].bytes, req[0].dport) == (3, 3 * size, 0)
    assert (rep[0].packets, rep[0].ifindex) == (3, EGRESS0)


def nft(lb, host: str, script: str) -> None:
    lb.exec(host, ["nft", "-f", "-"], input=script)


def nft_counter(lb, host: str, table: str) -> tuple[int, int]:
    out = json.loads(lb.exec(host, ["nft", "-j", "list", "table", "inet", table]).stdout)
    for item in out["nftables"]:
        for expr in item.get("rule", {}).get("expr", []):
            if "counter" in expr:
                return expr["counter"]["packets"], expr["counter"]["bytes"]
    raise AssertionError(f"no counter in table {table}")


TCP_INFO_SEGS_IN = 140  # struct tcp_info: __u32 tcpi_segs_in (segments, GSO ones counted as sent)
TCP_TS_HEADER = 32  # a data segment's TCP header with the timestamp option (Linux's default)


class Exchange(NamedTuple):
    connect_s: float  # the client's connect() time
    segs_in: int  # segments the server received from the client: the wire's packet count


def tcp_exchange(lb, family: int, port: int, payload: bytes) -> Exchange:
    """Connect client -> server, send payload, get it echoed; the server closes first, so its
    socket has received every segment of the client (up to its FIN) when it reads tcp_info."""
    dst = lb.addr("server", family)
    srv = lb.socket("server", family, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((dst, port))
    srv.listen(1)
    segs_in: list[int] = []

    def serve():
        conn, _ = srv.accept()
        with conn:
            data = b""
            while len(data) < len(payload):
                data += conn.recv(65536)
            conn.sendall(data)
            conn.shutdown(socket.SHUT_WR)
            while conn.recv(65536):  # until the client's FIN
                pass
            info = conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
            segs_in.append(struct.unpack_from("I", info, TCP_INFO_SEGS_IN)[0])

    t = threading.Thread(target=serve)
    t.start()
    cli = lb.socket("client", family, socket.SOCK_STREAM)
    with cli:
        cli.settimeout(5)
        t0 = time.perf_counter()
        cli.connect((dst, port))
        connect_s = time.perf_counter() - t0
        cli.sendall(payload)
        got = b""
        while chunk := cli.recv(65536):
            got += chunk
        assert got == payload
    t.join(5)
    srv.close()
    wait_until(f"the TCP connection to port {port} to close", lambda: tcp_closed(lb, port))
    return Exchange(connect_s, segs_in[0])


def tcp_counter(lb, family: int, port: int):
    """An nftables counter on the gateway's forward hook for client -> server:port."""
    src, l3 = lb.addr("client", family), "ip" if family == 4 else "ip6"
    table = f"fm_count{port}"
    nft(
        lb,
        "gw",
        f"table inet {table} {{\n chain c {{\n type filter hook forward priority 0; policy accept;\n"
        f" {l3} saddr {src} tcp dport {port} counter\n }}\n}}\n",
    )
    return table


def tcp_truth(lb, family: int, port: int, payload: bytes) -> tuple[Exchange, int, int]:
    """An exchange and its client -> server L3 truth: (exchange, packets, bytes) on the wire.

    nftables counts L3 bytes but one GSO packet as one; the wire carries segs_in segments, each
    extra one with its own IP and TCP headers (data segments: timestamps, no SACK: no loss)."""
    table = tcp_counter(lb, family, port)
    try:
        ex = tcp_exchange(lb, family, port, payload)
        skbs, nbytes = nft_counter(lb, "gw", table)
    finally:
        lb.exec("gw", ["nft", "delete", "table", "inet", table], check=False)
    return ex, ex.segs_in, nbytes + (ex.segs_in - skbs) * (ip_header(family) + TCP_TS_HEADER)


@pytest.mark.parametrize("family", [4, 6])
def test_tcp_counts_are_the_wire_segments_and_flags(gw, family):
    lb, mon = gw
    src, dst, port = lb.addr("client", family), lb.addr("server", family), 7100 + family
    ex, packets, nbytes = tcp_truth(lb, family, port, b"t" * 200_000)  # TSO: GSO packets cross
    flows = mon.evict()
    fwd = find(flows, src, dst, 6, port)
    assert (fwd.packets, fwd.bytes) == (packets, nbytes)
    assert {"SYN", "ACK", "PSH", "FIN"} <= set(fwd.as_dict()["tcp_flags_names"])
    rev = find(flows, dst, src, 6)
    assert {"SYN-ACK", "FIN-ACK"} <= set(rev.as_dict()["tcp_flags_names"])
    # RTT: SYN at ingress0 to SYN-ACK at egress0 lies inside the client's connect().
    assert rev.rtt_method == "tc-handshake"
    assert 0 < rev.rtt_ns <= ex.connect_s * 1e9


@pytest.mark.parametrize("family", [4, 6])
def test_tcp_counts_equal_netfilter_without_gso(gw, family):
    """No GSO from the client (one segment per skb): every skb is a wire packet, and nftables'
    counter is the truth."""
    lb, mon = gw
    src, dst, port = lb.addr("client", family), lb.addr("server", family), 7110 + family
    lb.exec("client", ["ip", "link", "set", "dev", "eth0", "gso_max_segs", "1"])
    try:
        table = tcp_counter(lb, family, port)
        try:
            tcp_exchange(lb, family, port, b"o" * 50_000)
            packets, nbytes = nft_counter(lb, "gw", table)
        finally:
            lb.exec("gw", ["nft", "delete", "table", "inet", table], check=False)
    finally:
        lb.exec("client", ["ip", "link", "set", "dev", "eth0", "gso_max_segs", "65535"], check=False)
    fwd = find(mon.evict(), src, dst, 6, port)
    assert (fwd.packets, fwd.bytes) == (packets, nbytes)


def drop_rows(mon) -> list[Flow]:
    return [Flow(KEY.unpack(bytes(k)[: KEY.size])) for k, _ in mon.drops.items()]


def send_udp(
    lb, host: str, family: int, dst: str, port: int, *payloads: bytes, hopopts: bool = False
) -> None:
    """``payloads`` from one socket: one flow."""
    with lb.socket(host, family, socket.SOCK_DGRAM) as tx:
        if hopopts:  # a hop-by-hop header (one PadN option) before the UDP header
            tx.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_HOPOPTS, bytes([0, 0, 1, 4, 0, 0, 0, 0]))
        for payload in payloads:
            tx.sendto(payload, (dst, port))


def test_drops_only_from_monitored_interfaces_with_kernel_reasons(gw):
    """Drops in the gateway on its monitored interfaces are recorded, per flow and reason; drops
    in the server's namespace (not monitored) and on the gateway's unmonitored underlay0 are not."""
    lb, mon = gw
    client, server = lb.addr("client"), lb.addr("server")
    gw4, gw6 = lb.addr("gw-ingress"), lb.addr("gw-ingress", 6)
    nft(
        lb,
        "gw",
        "table inet fm_drop {\n chain c {\n type filter hook forward priority 0; policy accept;\n"
        " udp dport 7203 drop\n }\n}\n",
    )
    nft(  # the unmonitored namespace drops the same kinds of packets
        lb,
        "server",
        "table inet fm_drop {\n chain c {\n type filter hook input priority 0; policy accept;\n"
        " udp dport 7213 drop\n }\n}\n",
    )
    try:
        send_udp(lb, "client", 4, gw4, 7202, b"closed")  # nobody listens on the gw: NO_SOCKET
        send_udp(lb, "client", 4, server, 7203, b"walled", b"walled again")  # gw's nft: NETFILTER_DROP
        send_udp(lb, "client", 6, gw6, 7205, b"hbh", hopopts=True)  # behind hop-by-hop: NO_SOCKET
        with lb.socket("client", 4, socket.SOCK_STREAM) as c:
            c.settimeout(2)
            with pytest.raises(ConnectionRefusedError):
                c.connect((gw4, 7204))  # the SYN is freed with NO_SOCKET, a RST answers
        send_udp(lb, "client", 4, server, 7212, b"closed")  # dropped in the server: not ours
        send_udp(lb, "client", 4, server, 7213, b"walled")  # the server's nftables: not ours
        send_udp(lb, "peer", 4, lb.addr("gw-underlay"), 7214, b"x")  # gw, unmonitored underlay0
        want = {(client, gw4, 17, 7202), (client, server, 17, 7203), (client, gw4, 6, 7204)}
        want.add((lb.addr("client", 6), gw6, 17, 7205))

        def dropped():
            return want <= {(f.src, f.dst, f.proto, f.dport) for f in drop_rows(mon)}

        wait_until("the gateway's drops to be recorded", dropped)
        ping(lb.ns("client"), server, timeout=5)  # a later packet: the server's drops are done
    finally:
        lb.exec("gw", ["nft", "delete", "table", "inet", "fm_drop"], check=False)
        lb.exec("server", ["nft", "delete", "table", "inet", "fm_drop"], check=False)
    rows = drop_rows(mon)
    assert {(f.src, f.dst, f.proto, f.dport) for f in rows} == want  # nothing else: no proto 0
    flows = mon.evict()
    closed, walled = find(flows, client, gw4, 17, 7202), find(flows, client, server, 17, 7203)
    assert (closed.drop_reason, closed.drop_packets, closed.packets) == ("NO_SOCKET", 1, 1)
    assert (walled.drop_reason, walled.drop_packets, walled.packets) == ("NETFILTER_DROP", 2, 2)
    assert walled.drop_bytes == 2 * (20 + 8) + len(b"walled") + len(b"walled again")  # L3
    hbh = find(flows, lb.addr("client", 6), gw6, 17, 7205)
    assert (hbh.drop_reason, hbh.drop_bytes) == ("NO_SOCKET", 40 + 8 + 8 + len(b"hbh"))
    syn = find(flows, client, gw4, 6, 7204)
    assert syn.drop_reason == "NO_SOCKET" and syn.drop_tcp_flags & 0x02
    assert not [f for f in flows if f.drop_packets and f.dst == server and f.dport in (7212, 7213)]
    assert mon.reason_counts() == {"NO_SOCKET": 3, "NETFILTER_DROP": 2}


def test_dns_latency_rcode_and_name_against_dnsmasq(gw):
    lb, mon = gw
    t0 = time.perf_counter()
    answer = lb.dns_query("client", "allowed.test", timeout=5)
    elapsed_ns = (time.perf_counter() - t0) * 1e9
    assert answer.values("A") == ["10.99.2.2"]
    lb.dns_query("client", "missing.test", timeout=5)
    flows = mon.evict()
    responses = {f.dns_qname: f for f in flows if f.dns_flags & 0x8000 and f.src == lb.addr("dns")}
    ok, nx = responses["allowed.test"], responses["missing.test"]
    assert ok.as_dict()["dns_rcode"] == "NOERROR" and nx.as_dict()["dns_rcode"] == "NXDOMAIN"
    assert 0 < ok.dns_latency_ns <= elapsed_ns  # the gateway sees a part of the client's wait
    queries = [f for f in flows if f.dst == lb.addr("dns") and f.dport == 53]
    assert {f.dns_qname for f in queries} == {"allowed.test", "missing.test"}


def dns_over_tcp(lb, name: str) -> bytes:
    """One DNS query over TCP from the client to dnsmasq; returns the response message."""
    qname = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    query = struct.pack("!HHHHHH", 0x4242, 0x0100, 1, 0, 0, 0) + qname + struct.pack("!HH", 1, 1)
    with lb.socket("client", 4, socket.SOCK_STREAM) as s:
        s.settimeout(3)
        s.connect((lb.addr("dns"), 53))
        s.sendall(struct.pack("!H", len(query)) + query)
        data = b""
        while len(data) < 2 or len(data) < 2 + struct.unpack("!H", data[:2])[0]:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    time.sleep(SETTLE_S)
    return data[2:]


def test_dns_over_tcp_against_dnsmasq(gw):
    lb, mon = gw
    response = dns_over_tcp(lb, "other.test")
    assert response[:2] == b"\x42\x42" and response[3] & 0xF == 0
    flows = mon.evict()
    (resp,) = [f for f in flows if f.proto == 6 and f.src == lb.addr("dns") and f.dns_flags & 0x8000]
    assert (resp.dns_qname, resp.dns_id, resp.as_dict()["dns_rcode"]) == ("other.test", 0x4242, "NOERROR")
    assert resp.dns_latency_ns > 0


def test_sampling_one_in_n_on_real_traffic(gw):
    lb, mon = gw
    n, rate = 2000, 4
    mon.configure(Config(sampling=rate))
    before = mon.counter_values()["sampled_out"]
    src, dst = lb.addr("client"), lb.addr("server")
    with lb.socket("client", 4, socket.SOCK_DGRAM) as tx:
        for _ in range(n):
            tx.sendto(b"s", (dst, 7300))  # nobody listens; the gateway forwards them all
    quiet(lambda: (mon.counter_values()["sampled_out"], sum(f.packets for f in mon.peek())))
    flows = [f for f in mon.evict() if (f.src, f.dst, f.dport) == (src, dst, 7300)]
    counted = sum(f.packets for f in flows)
    # Each packet crosses two hooks (ingress0 in, egress0 out), each sampling on its own.
    assert mon.counter_values()["sampled_out"] - before >= n
    assert all(f.sampling == rate for f in flows)
    # Counted once per packet at most, and about 1/rate of them (binomial, 6 sd margins).
    assert n / rate * 0.6 < counted < n / rate * 2.0


# ---- IPFIX decoded by nfdump's collector -----------------------------------------------------


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Nfcapd:
    """nfdump's collector on loopback; stopping it flushes the capture file nfdump then reads."""

    def __init__(self, tmp: Path):
        if not shutil.which("nfcapd"):
            pytest.skip("nfdump: nfcapd is not installed")
        self.dir, self.port = tmp / "nfcapd", free_udp_port()
        self.dir.mkdir()
        self.proc = subprocess.Popen(
            ["nfcapd", "-w", str(self.dir), "-p", str(self.port), "-b", "127.0.0.1", "-t", "3600"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        # nfcapd prints nothing when it is ready: wait for its socket to be bound
        wait_until("nfcapd to bind", lambda: self._rx_queue() is not None)

    def _rx_queue(self) -> int | None:
        """Bytes waiting in nfcapd's socket, None while nothing is bound to its port."""
        for line in Path("/proc/net/udp").read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == self.port:
                return int(fields[4].split(":")[1], 16)
        return None

    def records(self) -> list[dict]:
        # SIGTERM discards what nfcapd has not read: wait until its socket is drained
        wait_until("nfcapd to read its socket", lambda: self._rx_queue() == 0)
        time.sleep(0.5)  # ... and to have handled the last message it read
        self.proc.terminate()
        self.proc.wait(10)
        files = [p for p in self.dir.rglob("nfcapd.*") if p.is_file()]
        assert files, "nfcapd wrote no file"
        out = subprocess.run(
            ["nfdump", "-o", "json", "-r", str(files[0])], capture_output=True, text=True, check=True
        ).stdout
        try:
            return json.loads(out)
        except ValueError:
            raise AssertionError(f"nfdump output of {files}: {out[:300]!r}") from None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def nfcapd(tmp_path):
    n = Nfcapd(tmp_path)
    yield n
    n.stop()


def udp_traffic(lb, family: int, port: int, sizes: list[int]) -> None:
    dst = lb.addr("server", family)
    with (
        lb.socket("server", family, socket.SOCK_DGRAM) as rx,
        lb.socket("client", family, socket.SOCK_DGRAM) as tx,
    ):
        rx.bind((dst, port))
        rx.settimeout(2)
        for n in sizes:
            tx.sendto(b"i" * n, (dst, port))
        for _ in sizes:
            rx.recv(2048)


def assert_decoded(records: list[dict], lb, family: int, port: int, sizes: list[int]) -> None:
    src, dst = lb.addr("client", family), lb.addr("server", family)
    key = "4" if family == 4 else "6"
    got = [
        r
        for r in records
        if r.get(f"src{key}_addr") == src and r.get(f"dst{key}_addr") == dst and r.get("dst_port") == port
    ]
    assert len(got) == 1, f"nfdump records for {src} -> {dst}:{port}: {got or records[:3]}"
    r = got[0]
    assert r["in_packets"] == len(sizes)
    assert r["in_bytes"] == sum(ip_header(family) + 8 + n for n in sizes)
    assert r["proto"] == 17


def test_ipfix_bytes_are_l3_truth_in_nfdump(gw, nfcapd):
    """TCP, UDP and ICMP in both families, exported over UDP to nfcapd and decoded by nfdump:
    packets and bytes equal the senders' and nftables' L3 truth exactly."""
    from sluice.plugins.flowmon.ipfix import Exporter

    lb, mon = gw
    sizes, ping_l3 = [10, 200, 999], 8 + len(b"sluice-lab-ping")
    truth = {}  # (family, proto, dport or ICMP type) -> (packets, bytes)
    for family in (4, 6):
        udp_traffic(lb, family, 7400 + family, sizes)
        truth[family, 17, 7400 + family] = (3, sum(ip_header(family) + 8 + n for n in sizes))
        for _ in range(2):
            ping(lb.ns("client"), lb.addr("server", family), timeout=5)
        truth[family, 1 if family == 4 else 58, 8 if family == 4 else 128] = (
            2,
            2 * (ip_header(family) + ping_l3),
        )
        _, packets, nbytes = tcp_truth(lb, family, 7410 + family, b"x" * 100_000)
        truth[family, 6, 7410 + family] = (packets, nbytes)
    exporter = Exporter(f"127.0.0.1:{nfcapd.port}", "udp")
    try:
        exporter.export(mon.evict())
    finally:
        exporter.close()
    records = nfcapd.records()
    for (family, proto, what), expected in truth.items():
        key = "4" if family == 4 else "6"
        src, dst = lb.addr("client", family), lb.addr("server", family)
        got = [
            r
            for r in records
            if (r.get(f"src{key}_addr"), r.get(f"dst{key}_addr"), r["proto"]) == (src, dst, proto)
            and what == (r.get("icmp_type") if proto in (1, 58) else r.get("dst_port"))
        ]
        assert len(got) == 1, f"nfdump records for {family} {proto} {what}: {got or records[:3]}"
        assert (got[0]["in_packets"], got[0]["in_bytes"]) == expected, (family, proto, what)
        if proto == 6:
            assert {"S", "A", "F", "P"} <= set(got[0]["tcp_flags"])
        if proto in (1, 58):
            assert got[0]["icmp_code"] == 0


def test_ipfix_over_tcp_stream_decoded_by_nfcapd(gw, nfcapd):
    """nfcapd 1.7 collects over UDP only, so the TCP export is received here as a byte stream,
    cut into messages by the IPFIX length field alone, and each message is handed to nfcapd as
    is: what nfdump decodes is exactly what went over TCP."""
    from sluice.plugins.flowmon.ipfix import Exporter

    lb, mon = gw
    sizes = [64, 65, 66, 1300]
    udp_traffic(lb, 4, 7403, sizes)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    exporter = Exporter(f"127.0.0.1:{listener.getsockname()[1]}", "tcp")
    try:
        exporter.export(mon.evict())
        conn, _ = listener.accept()
        exporter.close()
        stream = b""
        while chunk := conn.recv(65536):
            stream += chunk
        conn.close()
    finally:
        exporter.close()
        listener.close()
    messages, off = [], 0
    while off < len(stream):
        assert stream[off : off + 2] == b"\x00\x0a", "not an IPFIX message boundary"
        length = int.from_bytes(stream[off + 2 : off + 4], "big")
        messages.append(stream[off : off + length])
        off += length
    assert off == len(stream) and len(messages) >= 2  # templates first, then data
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for m in messages:
            s.sendto(m, ("127.0.0.1", nfcapd.port))
    assert_decoded(nfcapd.records(), lb, 4, 7403, sizes)


def test_attacher_follows_the_selection_and_sweeps_leftovers(env):
    _, _, bpf = env

    def filters(ns: str) -> str:
        return subprocess.run(
            ["ip", "netns", "exec", ns, "tc", "filter", "show", "dev", "veth0", "egress"],
            capture_output=True,
            text=True,
        ).stdout

    with netns_pair() as pair:
        with in_netns(pair.a):
            assert Attacher(bpf).sync(["veth*"], []) == ["veth0"]
        assert "sluice:flowmon:flowmon_egress" in filters(pair.a)
        with in_netns(pair.a):  # a later run whose config no longer selects veth0
            assert Attacher(bpf).sync(["eth*"], []) == []
        assert "flowmon" not in filters(pair.a)
