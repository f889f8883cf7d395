"""A reproducible network-namespace lab: the topology the demo, the tests and the benchmarks share.

Five namespaces, all named ``<prefix><host>`` (default prefix ``sl-``); the gateway is the only
router and the place the agent runs. Every link is a veth pair with IPv4 and IPv6 (IPv6 added
with ``nodad`` and DAD switched off, so addresses are usable the moment ``up()`` returns)::

    client ──ingress0┐              ┌egress0── server (+ dnsmasq on .53 / ::53)
                     └──── gw ──────┘
    peer ───underlay0┘              └mgmt0──── nats (nats-server, JetStream)

    host    interface   index  IPv4            IPv6                MAC                role
    ------  ----------  -----  --------------  ------------------  -----------------  ------------------
    gw      ingress0       11  10.99.1.1/24    fd00:99:1::1/64     02:99:01:00:00:01  faces the client
    client  eth0           21  10.99.1.2/24    fd00:99:1::2/64     02:99:01:00:00:02  default via gw
    gw      egress0        12  10.99.2.1/24    fd00:99:2::1/64     02:99:02:00:00:01  faces the server
    server  eth0           22  10.99.2.2/24    fd00:99:2::2/64     02:99:02:00:00:02  default via gw
                               10.99.2.3/24    fd00:99:2::3/64                        "other" service
                               10.99.2.53/24   fd00:99:2::53/64                       dnsmasq (udp+tcp 53)
    gw      underlay0      13  10.99.3.1/24    fd00:99:3::1/64     02:99:03:00:00:01  tunnel underlay
    peer    eth0           23  10.99.3.2/24    fd00:99:3::2/64     02:99:03:00:00:02  tunnel peer
    gw      mgmt0          19  10.99.9.1/24    fd00:99:9::1/64     02:99:09:00:00:01  control plane
    nats    eth0           29  10.99.9.2/24    fd00:99:9::2/64     02:99:09:00:00:02  nats-server :4222

The overlay: the peer decapsulates VXLAN VNI 100 with a plain kernel device ``vx0`` (MAC
02:0a:63:03:02:ff, 10.99.200.1/24) and sends its answers to the client back through the gateway's
underlay address; the gateway routes 10.99.200.0/24 to underlay0 (MTU 1450). Nothing in the lab
encapsulates: with the tunnel plugin's route for 10.99.200.0/24 (the embedded default config) the
client reaches 10.99.200.1 only through the BPF program.

The interface names inside the gw namespace (``ingress0``, ``egress0``, ``underlay0``,
``mgmt0``) are part of the contract: the agent's default config refers to them. The gw forwards
IPv4 and IPv6; every other host has default routes (v4 and v6) via its gw-side address, so
client <-> server traffic (and the client's DNS queries) always crosses the gateway, one hop
(TTL/hop limit 64 arrives as 63).

NATS sits behind its own link (``mgmt0``) rather than beside the server so that the agent's
control-plane traffic never crosses the interfaces its programs filter or tunnel.

dnsmasq (in the server namespace, answering on 10.99.2.53 and fd00:99:2::53) serves, with the
spec's TTL (default 5 s):

    allowed.test   A 10.99.2.2    AAAA fd00:99:2::2
    other.test     A 10.99.2.3    AAAA fd00:99:2::3
    cname.test     CNAME allowed.test
    anything else under .test is NXDOMAIN; other names are REFUSED (nothing goes upstream).

State (configs, logs, pid files, the JetStream store, ``state.json``) lives in
``<state_root>/<prefix>`` (default ``/run/sluice/lab/<prefix>``). From a shell:
``sluice lab up|down|status [--prefix P]``.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import re
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

from sluice import netns

DEFAULT_PREFIX = "sl-"
DEFAULT_STATE_ROOT = "/run/sluice/lab"
HOSTS = ("client", "gw", "server", "peer", "nats")

# The overlay behind the tunnel peer (module docstring). The MACs follow the tunnel plugin's rule,
# 02:<last 4 bytes of the underlay address>:ff, so inner frames arrive as PACKET_HOST.
OVERLAY_NET = "10.99.200.0/24"
OVERLAY_PEER_ADDR = "10.99.200.1"
OVERLAY_VNI = 100
OVERLAY_PEER_MAC = "02:0a:63:03:02:ff"  # from 10.99.3.2
OVERLAY_GW_MAC = "02:0a:63:03:01:ff"  # from 10.99.3.1: the gateway's flow-based tunnel device


class LabError(RuntimeError):
    """The lab could not be built, reached or torn down; the message says which piece."""


# --------------------------------------------------------------------------------------------
# Addressing (fixed: every lab lives in its own namespaces, so labs never clash on addresses)
# --------------------------------------------------------------------------------------------


class _Link(NamedTuple):
    gw_if: str
    host: str  # the namespace on the far side; its end is always called eth0
    net: int  # third octet of 10.99.<net>.0/24 and the fd00:99:<net>::/64 subnet


LINKS = (
    _Link("ingress0", "client", 1),
    _Link("egress0", "server", 2),
    _Link("underlay0", "peer", 3),
    _Link("mgmt0", "nats", 9),
)
FAR_IF = "eth0"


class _Endpoint(NamedTuple):
    host: str
    ifname: str
    net: int
    num: int  # host part; written the same in v4 (decimal) and v6 (read as hex) for legibility


ENDPOINTS: dict[str, _Endpoint] = {
    "gw-ingress": _Endpoint("gw", "ingress0", 1, 1),
    "client": _Endpoint("client", FAR_IF, 1, 2),
    "gw-egress": _Endpoint("gw", "egress0", 2, 1),
    "server": _Endpoint("server", FAR_IF, 2, 2),
    "other": _Endpoint("server", FAR_IF, 2, 3),
    "dns": _Endpoint("server", FAR_IF, 2, 53),
    "gw-underlay": _Endpoint("gw", "underlay0", 3, 1),
    "peer": _Endpoint("peer", FAR_IF, 3, 2),
    "gw-mgmt": _Endpoint("gw", "mgmt0", 9, 1),
    "nats": _Endpoint("nats", FAR_IF, 9, 2),
}

# name -> endpoint whose addresses it resolves to; CNAMEs map to another name.
DNS_HOSTS = {"allowed.test": "server", "other.test": "other"}
DNS_CNAMES = {"cname.test": "allowed.test"}


def _ip(ep: _Endpoint, family: int) -> str:
    return f"10.99.{ep.net}.{ep.num}" if family == 4 else f"fd00:99:{ep.net}::{ep.num}"


def _cidr(ep: _Endpoint, family: int) -> str:
    return f"{_ip(ep, family)}/{24 if family == 4 else 64}"


def _mac(link: _Link, num: int) -> str:
    return f"02:99:{link.net:02x}:00:00:{num:02x}"


def _ifindex(link: _Link, num: int) -> int:
    # Distinct indexes on the two ends matter beyond tidiness: when a veth's index equals its
    # peer's (easy across namespaces: both would be 2), the kernel's linkwatch treats its
    # carrier change as non-urgent and may hold IPv6 back for up to a second.
    return 10 * num + link.net


# --------------------------------------------------------------------------------------------
# Namespace primitives (public: tests/netlab.py builds smaller topologies with them)
# --------------------------------------------------------------------------------------------

in_netns = netns.inside  # kept under this name: tests and plugins use it


def netns_socket(name: str, family: int = 4, kind: int = socket.SOCK_STREAM, proto: int = 0) -> socket.socket:
    """A socket living in namespace ``name``; ``family`` is 4, 6 or an ``AF_*`` constant."""
    af = {4: socket.AF_INET, 6: socket.AF_INET6}.get(family, family)
    with in_netns(name):
        return socket.socket(af, kind, proto)


def set_sysctl(name: str, key: str, value: str | int) -> None:
    """Write a net.* sysctl (dotted ``key``) inside namespace ``name``."""
    with in_netns(name):
        Path("/proc/sys", *key.split(".")).write_text(f"{value}\n")


def run_ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``ip ARGS``; on failure raise LabError carrying the command and its stderr."""
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise LabError(f"ip {' '.join(args)}: {proc.stderr.strip() or f'exit {proc.returncode}'}")
    return proc


def netns_exists(name: str) -> bool:
    return Path("/run/netns", name).exists()


def netns_add(name: str) -> None:
    """Create namespace ``name`` with lo up and IPv6 DAD off (so later addresses are usable at once)."""
    run_ip("netns", "add", name)
    for scope in ("all", "default"):
        set_sysctl(name, f"net.ipv6.conf.{scope}.accept_dad", 0)
    run_ip("-n", name, "link", "set", "lo", "up")


def netns_pids(name: str) -> list[int]:
    if not netns_exists(name):
        return []
    out = run_ip("netns", "pids", name, check=False).stdout
    # Never ourselves: a thread of this process may be inside the namespace (in_netns).
    return [int(p) for p in out.split() if int(p) != os.getpid()]


def netns_delete(name: str, timeout: float = 3.0) -> None:
    """Kill whatever still runs in namespace ``name``, then delete it. Missing is fine."""
    kill_pids(netns_pids(name), timeout)
    if netns_exists(name):
        run_ip("netns", "delete", name, check=False)


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs. Zombies count as dead: our init does not reap orphans."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def kill_pids(pids: Sequence[int], timeout: float = 3.0) -> list[int]:
    """SIGTERM, wait up to ``timeout``, SIGKILL the rest. Returns pids still alive (normally none).

    Nothing is reaped here: a killed child stays a zombie (counted as dead) until whoever holds
    its Popen waits for it, so that caller still sees the real exit status.
    """
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + timeout
        while True:
            pids = [p for p in pids if pid_alive(p)]
            if not pids or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        if not pids:
            break
    return list(pids)


# --------------------------------------------------------------------------------------------
# DNS: just enough of the wire format to probe dnsmasq and let tests check answers
# --------------------------------------------------------------------------------------------

QTYPES = {"A": 1, "NS": 2, "CNAME": 5, "SOA": 6, "PTR": 12, "MX": 15, "TXT": 16, "AAAA": 28}
_QTYPE_NAMES = {v: k for k, v in QTYPES.items()}
RCODE_NOERROR, RCODE_NXDOMAIN = 0, 3


class DnsRecord(NamedTuple):
    name: str
    type: str  # "A", "AAAA", "CNAME", ... or "TYPE<n>"
    ttl: int
    data: str  # address for A/AAAA, target name for CNAME/NS/PTR, hex for anything else


class DnsReply(NamedTuple):
    rcode: int
    answers: list[DnsRecord]

    def values(self, rtype: str) -> list[str]:
        return [r.data for r in self.answers if r.type == rtype]


def _encode_query(qid: int, name: str, qtype: int) -> bytes:
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.rstrip(".").split(".") if p)
    return struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0) + labels + b"\0" + struct.pack(">HH", qtype, 1)


def _read_name(msg: bytes, off: int) -> tuple[str, int]:
    """Decode a possibly compressed name at ``off``; return it and the offset just past it."""
    labels: list[str] = []
    end = None
    for _ in range(128):  # bounds a malicious pointer loop
        length = msg[off]
        if length & 0xC0 == 0xC0:
            end = off + 2 if end is None else end
            off = struct.unpack_from(">H", msg, off)[0] & 0x3FFF
        elif length == 0:
            return ".".join(labels), (off + 1 if end is None else end)
        else:
            labels.append(msg[off + 1 : off + 1 + length].decode())
            off += 1 + length
    raise ValueError("DNS name compression loop")


def _decode_reply(msg: bytes, qid: int) -> DnsReply | None:
    rid, flags, qdcount, ancount = struct.unpack_from(">HHHH", msg)
    if rid != qid or not flags & 0x8000:
        return None
    off = 12
    for _ in range(qdcount):
        off = _read_name(msg, off)[1] + 4
    answers = []
    for _ in range(ancount):
        name, off = _read_name(msg, off)
        rtype, _cls, ttl, rdlen = struct.unpack_from(">HHIH", msg, off)
        off += 10
        rdata = msg[off : off + rdlen]
        if rtype == 1:
            data = socket.inet_ntop(socket.AF_INET, rdata)
        elif rtype == 28:
            data = socket.inet_ntop(socket.AF_INET6, rdata)
        elif rtype in (2, 5, 12):
            data = _read_name(msg, off)[0]
        else:
            data = rdata.hex()
        answers.append(DnsRecord(name, _QTYPE_NAMES.get(rtype, f"TYPE{rtype}"), ttl, data))
        off += rdlen
    return DnsReply(flags & 0xF, answers)


def dns_query(
    netns: str, server: str, name: str, qtype: str | int = "A", *, port: int = 53, timeout: float = 2.0
) -> DnsReply:
    """Send one UDP query from namespace ``netns`` to ``server``; raise TimeoutError on silence."""
    qid = secrets.randbelow(0x10000)
    qt = QTYPES[qtype.upper()] if isinstance(qtype, str) else qtype
    family = 6 if ":" in server else 4
    deadline = time.monotonic() + timeout
    with netns_socket(netns, family, socket.SOCK_DGRAM) as sock:
        sock.connect((server, port))
        sock.send(_encode_query(qid, name, qt))
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            try:
                reply = _decode_reply(sock.recv(4096), qid)
            except TimeoutError:
                break
            except ConnectionRefusedError as exc:  # ICMP port unreachable: nothing listens yet
                raise TimeoutError(f"DNS {server}:{port} refused the query") from exc
            if reply is not None:
                return reply
    raise TimeoutError(f"no DNS answer from {server}:{port} for {name} {qtype} within {timeout}s")


# --------------------------------------------------------------------------------------------
# The lab
# --------------------------------------------------------------------------------------------

_PREFIX_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,30}$")
# Processes this interpreter started, so down() can reap them (Popen objects also stay referenced).
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


@dataclass(frozen=True)
class LabSpec:
    """What to build. Addressing is fixed (see the module docstring); only these knobs vary."""

    prefix: str = DEFAULT_PREFIX
    dns_ttl: int = 5
    nats_port: int = 4222
    state_root: str = DEFAULT_STATE_ROOT
    dnsmasq: str | None = None  # path; default /usr/sbin/dnsmasq, then PATH
    nats_server: str | None = None  # path; default next to this interpreter (the venv), then PATH
    wait_timeout: float = 10.0  # how long up() waits for dnsmasq and NATS to answer

    def __post_init__(self) -> None:
        if not _PREFIX_RE.match(self.prefix):
            raise ValueError(f"lab prefix {self.prefix!r}: use letters, digits, '_', '.', '-' (max 31)")

    def fingerprint(self) -> dict[str, Any]:
        """The fields that shape a built lab; a running lab is reused only if these match."""
        return {k: v for k, v in asdict(self).items() if k != "wait_timeout"}


class Lab:
    """A built (or to-be-built) lab. Get one from :meth:`Lab.up`; it is cheap to construct."""

    def __init__(self, spec: LabSpec | None = None) -> None:
        self.spec = spec or LabSpec()

    def __repr__(self) -> str:
        return f"Lab(prefix={self.spec.prefix!r})"

    # ---- naming and addressing ----

    @property
    def state_dir(self) -> Path:
        return Path(self.spec.state_root) / self.spec.prefix

    def ns(self, host: str) -> str:
        """Full namespace name of ``host`` (one of HOSTS; a full name is passed through)."""
        if host in HOSTS:
            return self.spec.prefix + host
        if host.startswith(self.spec.prefix) and host[len(self.spec.prefix) :] in HOSTS:
            return host
        raise KeyError(f"unknown lab host {host!r}; hosts are {', '.join(HOSTS)}")

    @property
    def namespaces(self) -> list[str]:
        return [self.ns(h) for h in HOSTS]

    @staticmethod
    def addr(endpoint: str, family: int = 4) -> str:
        """Address of ``endpoint`` (a key of ENDPOINTS, e.g. "server", "dns", "gw-ingress")."""
        if family not in (4, 6):
            raise ValueError(f"family must be 4 or 6, not {family!r}")
        try:
            return _ip(ENDPOINTS[endpoint], family)
        except KeyError:
            raise KeyError(
                f"unknown lab endpoint {endpoint!r}; endpoints are {', '.join(ENDPOINTS)}"
            ) from None

    # ---- running things inside ----

    def exec(self, host: str, argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[Any]:
        """``subprocess.run`` inside ``host``; defaults to check=True, capture_output=True, text=True."""
        kwargs = {"check": True, "capture_output": True, "text": True, **kwargs}
        return subprocess.run(["ip", "netns", "exec", self.ns(host), *argv], **kwargs)

    def popen(self, host: str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """``subprocess.Popen`` inside ``host``. down() kills it if it still runs then."""
        return subprocess.Popen(["ip", "netns", "exec", self.ns(host), *argv], **kwargs)

    def socket(
        self, host: str, family: int = 4, kind: int = socket.SOCK_STREAM, proto: int = 0
    ) -> socket.socket:
        """A socket created inside ``host`` (4/6 or AF_*), for in-process probes."""
        return netns_socket(self.ns(host), family, kind, proto)

    def dns_query(
        self, host: str, name: str, qtype: str | int = "A", server: str | None = None, timeout: float = 2.0
    ) -> DnsReply:
        """Query ``name`` from ``host``; ``server`` defaults to the lab's dnsmasq IPv4 address."""
        return dns_query(self.ns(host), server or self.addr("dns"), name, qtype, timeout=timeout)

    # ---- lifecycle ----

    @classmethod
    def up(cls, spec: LabSpec | None = None) -> Lab:
        """Build the lab, or reuse it if it already runs healthy with the same spec.

        A partial or different lab under the same prefix is torn down and rebuilt. If building
        fails, everything built so far is removed before the error propagates.
        """
        lab = cls(spec)
        st = cls.status(lab.spec.prefix, lab.spec.state_root)
        if st["healthy"] and st["spec"] == lab.spec.fingerprint():
            try:
                lab._wait_ready(min(lab.spec.wait_timeout, 2.0))
                return lab
            except LabError:
                pass  # alive but not answering: rebuild below
        if st["exists"]:
            lab.down()
        try:
            lab._build()
            lab._wait_ready(lab.spec.wait_timeout)
        except BaseException:
            with contextlib.suppress(Exception):
                lab.down()
            raise
        return lab

    def down(self) -> None:
        """Remove every process, link, namespace and file of this lab.

        Missing pieces are fine (down twice is a no-op). Raises LabError only if something
        that exists could not be removed.
        """
        for name in ("dnsmasq", "nats"):
            self._stop(name)
        for link in LINKS:  # explicit, in case a socket somewhere still pins the gw namespace
            if netns_exists(self.ns("gw")):
                run_ip("-n", self.ns("gw"), "link", "del", link.gw_if, check=False)
        for ns in self.namespaces:
            netns_delete(ns)
        shutil.rmtree(self.state_dir, ignore_errors=True)

        left = [ns for ns in self.namespaces if netns_exists(ns)]
        left += [f"pid {p}" for ns in left for p in netns_pids(ns)]
        if self.state_dir.exists():
            left.append(str(self.state_dir))
        if left:
            raise LabError(f"lab {self.spec.prefix!r}: could not remove {', '.join(left)}")

    @classmethod
    def status(cls, prefix: str = DEFAULT_PREFIX, state_root: str = DEFAULT_STATE_ROOT) -> dict[str, Any]:
        """What exists of lab ``prefix``: namespaces, interfaces with addresses, processes.

        ``healthy`` is true when everything the lab needs is present and running; ``problems``
        lists what is not; ``exists`` is true when any piece is left (so down() has work).
        """
        lab = cls(LabSpec(prefix=prefix, state_root=state_root))
        problems: list[str] = []
        namespaces = {h: netns_exists(lab.ns(h)) for h in HOSTS}
        problems += [f"namespace {lab.ns(h)} missing" for h, ok in namespaces.items() if not ok]

        interfaces: dict[str, dict[str, Any]] = {}
        for host, ok in namespaces.items():
            if ok:
                interfaces[host] = _interfaces(lab.ns(host))
        for ifname, want in _expected_interfaces().items():
            host, _, dev = ifname.partition(":")
            if not namespaces[host]:
                continue
            have = interfaces[host].get(dev)
            if have is None:
                problems.append(f"{lab.ns(host)}: interface {dev} missing")
                continue
            if not (have["up"] and have["ipv6_ready"]):
                problems.append(f"{lab.ns(host)}: {dev} is not up with IPv6")
            problems += [f"{lab.ns(host)}: {dev} lacks {a}" for a in want if a not in have["addrs"]]

        processes = {name: lab._process(name) for name in ("dnsmasq", "nats")}
        problems += [f"{name} not running" for name, p in processes.items() if not p["alive"]]

        state_file = lab.state_dir / "state.json"
        try:
            spec = json.loads(state_file.read_text())["spec"]
        except (OSError, ValueError, KeyError):
            spec = None
            problems.append(f"{state_file} missing or unreadable")
        return {
            "prefix": prefix,
            "state_dir": str(lab.state_dir),
            "spec": spec,
            "namespaces": {lab.ns(h): ok for h, ok in namespaces.items()},
            "interfaces": interfaces,
            "processes": processes,
            "exists": any(namespaces.values()) or lab.state_dir.exists(),
            "healthy": not problems,
            "problems": problems,
        }

    # ---- building ----

    def _build(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        # Written first so a build that dies half-way is still recognised and cleaned up.
        self._write_state({})
        for host in HOSTS:
            netns_add(self.ns(host))
        gw = self.ns("gw")
        set_sysctl(gw, "net.ipv4.ip_forward", 1)
        set_sysctl(gw, "net.ipv6.conf.all.forwarding", 1)

        for link in LINKS:
            run_ip(
                "-n", gw, "link", "add", link.gw_if, "index", str(_ifindex(link, 1)), "address", _mac(link, 1),
                "type", "veth", "peer", "name", FAR_IF, "index", str(_ifindex(link, 2)), "address", _mac(link, 2),
                "netns", self.ns(link.host),
            )  # fmt: skip
        for ep in ENDPOINTS.values():
            for family in (4, 6):
                nodad = ["nodad"] if family == 6 else []
                run_ip("-n", self.ns(ep.host), "addr", "add", _cidr(ep, family), "dev", ep.ifname, *nodad)
        for link in LINKS:
            far = self.ns(link.host)
            run_ip("-n", gw, "link", "set", link.gw_if, "up")
            run_ip("-n", far, "link", "set", FAR_IF, "up")
            for family in (4, 6):
                via = _ip(_Endpoint("gw", link.gw_if, link.net, 1), family)
                run_ip(f"-{family}", "-n", far, "route", "add", "default", "via", via)
        wait_links_ready([(self.ns(ep.host), ep.ifname) for ep in ENDPOINTS.values()], self.spec.wait_timeout)
        self._build_overlay()

        pids = {"dnsmasq": self._start_dnsmasq(), "nats": self._start_nats()}
        self._write_state(pids)

    def _build_overlay(self) -> None:
        """The tunnel peer's end of the overlay (see the module docstring): a plain kernel vxlan
        device decapsulating what the gateway's tunnel program encapsulates, and answering back
        through the gateway's flow-based tunnel device. Skipped where the kernel has no vxlan."""
        peer, gw = self.ns("peer"), self.ns("gw")
        made = run_ip(
            "-n", peer, "link", "add", "vx0", "address", OVERLAY_PEER_MAC, "type", "vxlan", "id", str(OVERLAY_VNI),
            "dstport", "4789", "local", self.addr("peer"), "nolearning", check=False,
        )  # fmt: skip
        if made.returncode:
            return
        run_ip("-n", peer, "addr", "add", OVERLAY_PEER_ADDR + "/24", "dev", "vx0")
        run_ip("-n", peer, "link", "set", "vx0", "up")
        subprocess.run(
            ["ip", "netns", "exec", peer, "bridge", "fdb", "append", "00:00:00:00:00:00", "dev", "vx0", "dst",
             self.addr("gw-underlay")], check=True, capture_output=True,
        )  # fmt: skip
        run_ip("-n", peer, "route", "add", f"{self.addr('client')}/32", "dev", "vx0")
        run_ip("-n", peer, "neigh", "add", self.addr("client"), "lladdr", OVERLAY_GW_MAC, "dev", "vx0")
        run_ip(
            "-n", gw, "route", "add", OVERLAY_NET, "via", self.addr("peer"), "dev", "underlay0", "mtu", "1450"
        )

    def _write_state(self, pids: dict[str, int]) -> None:
        state = {"spec": self.spec.fingerprint(), "pids": pids, "created": time.time()}
        (self.state_dir / "state.json").write_text(json.dumps(state, indent=2) + "\n")

    def _start_dnsmasq(self) -> int:
        ttl = self.spec.dns_ttl
        lines = [
            f"listen-address={self.addr('dns', 4)},{self.addr('dns', 6)}",
            "bind-interfaces",
            "port=53",
            "no-resolv",  # never forward: the lab has no way out and must not want one
            "no-hosts",
            "no-poll",
            "local=/test/",  # unknown .test names are NXDOMAIN, not REFUSED
            f"local-ttl={ttl}",
            "user=root",
            "log-queries",
            f"log-facility={self.state_dir / 'dnsmasq.log'}",
        ]
        lines += [
            f"host-record={n},{self.addr(ep, 4)},{self.addr(ep, 6)},{ttl}" for n, ep in DNS_HOSTS.items()
        ]
        lines += [f"cname={n},{target},{ttl}" for n, target in DNS_CNAMES.items()]
        conf = self.state_dir / "dnsmasq.conf"
        conf.write_text("\n".join(lines) + "\n")
        binary = self.spec.dnsmasq or _find_binary("dnsmasq", ["/usr/sbin/dnsmasq"])
        # -k: stay in the foreground so this process can reap it; --conf-file: ours, not /etc's.
        return self._spawn("dnsmasq", "server", [binary, "-k", f"--conf-file={conf}"])

    def _start_nats(self) -> int:
        conf = self.state_dir / "nats.conf"
        conf.write_text(
            f'listen: "[::]:{self.spec.nats_port}"\n'  # dual-stack; only lab addresses exist here
            f'server_name: "{self.spec.prefix}nats"\n'
            f"jetstream {{\n"
            f'  store_dir: "{self.state_dir}"\n'  # nats-server appends /jetstream
            f"  max_memory_store: 64MB\n"
            f"  max_file_store: 256MB\n"
            f"}}\n"
        )
        venv_bin = str(Path(sys.executable).parent / "nats-server")
        binary = self.spec.nats_server or _find_binary("nats-server", [venv_bin])
        return self._spawn("nats", "nats", [binary, "-c", str(conf)])

    def _spawn(self, name: str, host: str, argv: list[str]) -> int:
        with open(self.state_dir / f"{name}.log", "ab") as log:
            # A new session keeps the terminal's Ctrl-C away from it when the lab outlives a shell.
            proc = self.popen(
                host, argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
            )
        _CHILDREN[proc.pid] = proc
        (self.state_dir / f"{name}.pid").write_text(f"{proc.pid}\n")
        return proc.pid

    def _process(self, name: str) -> dict[str, Any]:
        pidfile = self.state_dir / f"{name}.pid"
        try:
            pid = int(pidfile.read_text())
        except (OSError, ValueError):
            return {"pid": None, "alive": False}
        return {"pid": pid, "alive": self._is_ours(pid, name)}

    def _is_ours(self, pid: int, name: str) -> bool:
        if (child := _CHILDREN.get(pid)) is not None:
            # Our own unreaped child: its pid cannot have been recycled, and its command line
            # reads empty for an instant while `ip netns exec` execs the server.
            return child.poll() is None
        # Started by another process: a recycled pid must not be mistaken for (or killed as)
        # ours, so require its command line to name our config file in this lab's state dir.
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return False
        conf = str(self.state_dir / f"{name}.conf").encode()
        return conf in cmdline and pid_alive(pid)

    def _stop(self, name: str) -> None:
        pid = self._process(name)["pid"]
        if pid is not None and self._is_ours(pid, name):
            kill_pids([pid])
        if pid is not None and (child := _CHILDREN.pop(pid, None)) is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=1)  # reap: this interpreter is its parent

    def _wait_ready(self, timeout: float) -> None:
        """Wait until dnsmasq answers and NATS greets; raise LabError naming what did not."""
        deadline = time.monotonic() + timeout
        checks = {
            "dnsmasq": lambda: self.dns_query("server", "allowed.test", timeout=0.2).rcode == RCODE_NOERROR,
            "nats-server": self._nats_greets,
        }
        for what, check in checks.items():
            while True:
                pid_name = "nats" if what == "nats-server" else what
                if not self._process(pid_name)["alive"]:
                    raise LabError(f"{what} exited during start-up; log:\n{self._log_tail(pid_name)}")
                with contextlib.suppress(OSError, TimeoutError):
                    if check():
                        break
                if time.monotonic() > deadline:
                    raise LabError(
                        f"{what} did not come up within {timeout:.1f}s; log:\n{self._log_tail(pid_name)}"
                    )
                time.sleep(0.05)
        # The routed path, once: the client's resolver traffic must cross the gateway.
        try:
            self.dns_query("client", "allowed.test", timeout=max(0.5, deadline - time.monotonic()))
        except TimeoutError as exc:
            raise LabError(
                f"client cannot reach dnsmasq at {self.addr('dns')} through the gateway: {exc}"
            ) from exc

    def _nats_greets(self) -> bool:
        with self.socket("gw", 4) as sock:
            sock.settimeout(0.5)
            sock.connect((self.addr("nats"), self.spec.nats_port))
            return sock.recv(4096).startswith(b"INFO ")

    def _log_tail(self, name: str, lines: int = 15) -> str:
        try:
            return "\n".join((self.state_dir / f"{name}.log").read_text().splitlines()[-lines:])
        except OSError:
            return "(no log)"


def _expected_interfaces() -> dict[str, list[str]]:
    """``"host:ifname"`` -> the CIDRs it must carry."""
    want: dict[str, list[str]] = {}
    for ep in ENDPOINTS.values():
        want.setdefault(f"{ep.host}:{ep.ifname}", []).extend(_cidr(ep, f) for f in (4, 6))
    return want


def _interfaces(ns: str) -> dict[str, Any]:
    out = run_ip("-j", "-n", ns, "addr", "show", check=False).stdout
    result = {}
    for link in json.loads(out or "[]"):
        infos = [a for a in link.get("addr_info", []) if not a.get("tentative")]
        flags = link.get("flags", [])
        result[link["ifname"]] = {
            "up": "UP" in flags and "LOWER_UP" in flags and link.get("operstate") == "UP",
            # IPv6 starts on a link (link-local address, neighbour discovery) only once the
            # kernel has marked it operationally up, which can lag the carrier.
            "ipv6_ready": any(a.get("scope") == "link" and a["family"] == "inet6" for a in infos),
            "addrs": [f"{a['local']}/{a['prefixlen']}" for a in infos if a.get("scope") != "link"],
        }
    return result


def wait_links_ready(links: Sequence[tuple[str, str]], timeout: float = 5.0) -> None:
    """Wait until every ``(namespace, ifname)`` is up with IPv6 running; LabError names the laggards."""
    deadline = time.monotonic() + timeout
    while True:
        seen = {ns: _interfaces(ns) for ns in {ns for ns, _ in links}}
        late = [
            f"{ns}:{dev}"
            for ns, dev in links
            if not (seen[ns].get(dev, {}).get("up") and seen[ns][dev]["ipv6_ready"])
        ]
        if not late:
            return
        if time.monotonic() > deadline:
            raise LabError(f"interfaces not up with IPv6 after {timeout:.1f}s: {', '.join(late)}")
        time.sleep(0.02)


def _find_binary(name: str, preferred: list[str]) -> str:
    for path in preferred:
        if os.access(path, os.X_OK):
            return path
    found = shutil.which(name)
    if found is None:
        raise LabError(f"{name} not found (looked in {', '.join(preferred)} and PATH)")
    return found


def lab_cleanup_all(prefix_glob: str = "sl*-", state_root: str = DEFAULT_STATE_ROOT) -> list[str]:
    """Tear down every lab whose prefix matches ``prefix_glob`` (leftovers of crashed runs).

    Labs are found both by their namespaces and by their state dirs. Returns the prefixes
    removed.
    """
    prefixes: set[str] = set()
    netns_dir = Path("/run/netns")
    for entry in netns_dir.iterdir() if netns_dir.is_dir() else ():
        for host in HOSTS:
            prefix = entry.name.removesuffix(host)
            if prefix != entry.name and fnmatch.fnmatchcase(prefix, prefix_glob) and _PREFIX_RE.match(prefix):
                prefixes.add(prefix)
    root = Path(state_root)
    for entry in root.iterdir() if root.is_dir() else ():
        if entry.is_dir() and fnmatch.fnmatchcase(entry.name, prefix_glob) and _PREFIX_RE.match(entry.name):
            prefixes.add(entry.name)
    errors = []
    for prefix in sorted(prefixes):
        try:
            Lab(LabSpec(prefix=prefix, state_root=state_root)).down()
        except LabError as exc:
            errors.append(str(exc))
    if errors:
        raise LabError("; ".join(errors))
    return sorted(prefixes)
