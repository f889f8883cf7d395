"""The firewall while the agent runs: the active policy, DNS learning, session GC and events,
audit events, session restore. One instance per agent, created in ``sluice_start``.

Threading: everything runs in the agent's event loop except map walks (``asyncio.to_thread``);
map writes that belong to the policy (apply, learned allows) hold ``FirewallMaps.lock``.
"""

from __future__ import annotations

import asyncio
import collections
import ctypes as ct
import hashlib
import ipaddress
import json
from collections.abc import Sequence
from dataclasses import dataclass

from sluice.sessions import Session, SessionEvent

from . import dnswire
from .audit import AuditReader
from .dns import DnsProxy, Verdict
from .maps import (
    DNS_SLOTS,
    FirewallMaps,
    IlbCfg,
    SessionKey,
    SessionValue,
    Tunnel,
    nat_key,
    now_ns,
    session_dict,
    tunnel_dict,
)
from .policy import Policy, Rule, Slot, addr16, compile_policy, host_slots, parse_ports

NS = 1_000_000_000
SESSION_KEY_SIZE, SESSION_VALUE_SIZE, TUNNEL_SIZE = 40, 64, 80


def policy_hash(policy: Policy) -> str:
    return hashlib.sha256(json.dumps(policy.model_dump(), sort_keys=True).encode()).hexdigest()[:16]


def session_timeout_s(settings: dict[str, int], proto: int, tcp_state: int) -> int:
    """The idle timeout the datapath applies (fw_timeout_ns in firewall.bpf.c)."""
    if proto == 6:
        name = {1: "tcp-syn-timeout", 2: "tcp-established-timeout"}.get(tcp_state, "tcp-closing-timeout")
    elif proto == 17:
        name = "udp-timeout"
    elif proto in (1, 58):
        name = "icmp-timeout"
    else:
        name = "other-timeout"
    return settings[name]


def replicated_value(v: SessionValue) -> bytes:
    """The session value as replication stores it: the map's layout with the packet and byte
    counters zeroed (they are node-local; only state and last-seen matter to a successor)."""
    out = SessionValue.from_buffer_copy(bytes(v))
    out.packets[0] = out.packets[1] = out.bytes[0] = out.bytes[1] = 0
    return bytes(out)


@dataclass
class Known:
    last_seen_ns: int
    emitted_ns: int
    tcp_state: int
    restored: bool = False  # written by restore (a peer's session) and not carried here since


class Firewall:
    def __init__(self, ctx):
        self.ctx = ctx
        self.cfg = ctx.config
        self.log = ctx.log
        self.maps = FirewallMaps.from_pins(ctx.pin_dir)
        self.policy = Policy()
        self.generation = 0
        # (network name, query name) -> {address: expires_ns}: the truth behind fw_dns_*
        self.learned: dict[tuple[str, str], dict[str, int]] = {}
        self.known: dict[bytes, Known] = {}
        self.audit: collections.deque[tuple[int, dict]] = collections.deque(maxlen=2000)
        self.audit_seq = 0
        self.audit_signal = asyncio.Event()
        self.proxy: DnsProxy | None = None
        self.dns_error = ""  # why the proxy is not running, for /readyz

    @property
    def policy_file(self):
        return self.ctx.state_dir / "policy.json"

    # ---- policy ----

    def implicit_rules(self) -> list[Rule]:
        """Every network may reach the DNS proxy: hostname rules work only through it."""
        d = self.cfg.dns
        if not d.enabled:
            return []
        return [Rule(action="allow", proto=p, dst=a, ports=d.port) for a in d.listen for p in ("udp", "tcp")]

    def write_ilb(self) -> None:
        ilb = self.cfg.ilb
        lo, hi = parse_ports(ilb.ports)
        addr = ipaddress.IPv4Address(ilb.address).packed if ilb.enabled else bytes(4)
        self.maps.map("fw_ilb").set(0, IlbCfg((ct.c_uint8 * 4)(*addr), lo, hi))

    def start(self) -> None:
        self.maps.init_settings(self.cfg.settings)
        self.write_ilb()
        policy, source = self.cfg.policy(), "config"
        saved = self._load_saved()
        if saved is not None:
            policy, source = saved, "runtime changes saved in " + str(self.policy_file)
        self.apply(policy, persist=False)
        self.log.info(
            "policy applied", source=source, generation=self.generation, networks=len(policy.networks)
        )

    def _load_saved(self) -> Policy | None:
        """Runtime changes survive restarts while the config's policy stays what it was when they were made."""
        try:
            data = json.loads(self.policy_file.read_text())
            if data.get("config_hash") != policy_hash(self.cfg.policy()):
                self.log.info("config policy changed: runtime policy changes dropped")
                self.policy_file.unlink()
                return None
            return Policy.model_validate(data["policy"])
        except FileNotFoundError:
            return None
        except Exception as exc:
            self.log.warning("saved policy unreadable: using the config", error=str(exc).splitlines()[0])
            return None

    def apply(self, policy: Policy, persist: bool = True) -> int:
        """Compile ``policy`` and switch the datapath to it atomically; raises ValueError before
        touching anything when it does not compile."""
        compiled = compile_policy(policy, self.implicit_rules())
        with self.maps.lock:
            try:
                generation = self.maps.apply(compiled, self._dns_entries(policy))
            except OSError as exc:  # a map is full: only the inactive generation was written
                raise ValueError(f"the policy does not fit the datapath's maps: {exc}") from None
            self.generation = generation
            self.policy = policy
        if persist:
            tmp = self.policy_file.with_suffix(".tmp")
            tmp.write_text(
                json.dumps(
                    {"config_hash": policy_hash(self.cfg.policy()), "policy": policy.model_dump()}, indent=1
                )
            )
            tmp.replace(self.policy_file)
        return self.generation

    def reload(self, cfg) -> None:
        """Follow a new config; raises ValueError, changing nothing, when its policy does not compile."""
        old, self.cfg = self.cfg, cfg
        try:
            compile_policy(cfg.policy(), self.implicit_rules())
        except ValueError:
            self.cfg = old
            raise
        self.maps.init_settings(cfg.settings)
        self.write_ilb()
        saved = self._load_saved()
        self.apply(saved if saved is not None else cfg.policy(), persist=False)

    # ---- DNS learning ----

    def decide(self, client: str, qname: str) -> Verdict:
        found = self.policy.network_of(client)
        if found is None:
            return Verdict(forward=not self.maps.get_setting("drop-unmatched-sources"))
        _, network = found
        slots = host_slots(network, qname)
        if (
            slots
            and slots[0].action == 1
            and slots[0].proto == 0
            and (slots[0].port_lo, slots[0].port_hi) == (0, 65535)
        ):
            return Verdict(forward=False)  # the first matching rule denies the name outright
        if any(s.action == 0 for s in slots):
            return Verdict(forward=True, learn=True)
        return Verdict(forward=network.default == "allow", learn=bool(slots))

    def learn(self, client: str, qname: str, addrs: dict[str, int]) -> None:
        found = self.policy.network_of(client)
        if found is None:
            return
        net_id, network = found
        # An AAAA record of ::ffff:a.b.c.d would be keyed like the IPv4 address a.b.c.d: an
        # IPv6 answer never opens IPv4 (and no IPv6 packet with such an address passes anyway).
        addrs = {a: t for a, t in addrs.items() if not getattr(ipaddress.ip_address(a), "ipv4_mapped", None)}
        if not addrs:
            return
        d, now = self.cfg.dns, now_ns()
        entry = self.learned.setdefault((network.name, qname), {})
        for addr, ttl in addrs.items():
            keep = min(max(ttl, d.min_ttl), d.max_ttl) + d.grace
            entry[addr] = max(entry.get(addr, 0), now + keep * NS)
        with self.maps.lock:
            for addr in addrs:
                self._write_dns_entry(net_id, network.name, addr)
        self.log.info("dns learned", client=client, name=qname, addrs=sorted(addrs))

    def _entry(self, policy: Policy, net_name: str, addr: str, now: int) -> tuple[int, list[Slot]]:
        """(expires, slots) of one (network, address) from every name that resolved to it."""
        network = policy.network(net_name)
        expires, slots = 0, {}
        for (net, qname), addrs in self.learned.items():
            exp = addrs.get(addr, 0) if net == net_name else 0
            if exp > now:
                expires = max(expires, exp)
                for s in host_slots(network, qname):
                    slots[s.order] = s
        return expires, sorted(slots.values(), key=lambda s: s.order)[:DNS_SLOTS]

    def _write_dns_entry(self, net_id: int, net_name: str, addr: str) -> None:
        expires, slots = self._entry(self.policy, net_name, addr, now_ns())
        self.maps.set_dns(net_id, addr16(addr), expires, slots)

    def _dns_entries(self, policy: Policy) -> dict[tuple[int, bytes], tuple[int, list[Slot]]]:
        """Learned allows re-derived for ``policy`` (its network ids and hostname rules)."""
        now, out = now_ns(), {}
        ids = {n.name: i for i, n in enumerate(policy.networks, 1)}
        pairs = {(net, a) for (net, _), addrs in self.learned.items() if net in ids for a in addrs}
        for net, addr in pairs:
            expires, slots = self._entry(policy, net, addr, now)
            if slots:
                out[(ids[net], addr16(addr))] = (expires, slots)
        return out

    def expire_learned(self) -> None:
        now = now_ns()
        stale: set[tuple[str, str]] = set()
        for (net, qname), addrs in list(self.learned.items()):
            for addr, exp in list(addrs.items()):
                if exp <= now:
                    del addrs[addr]
                    stale.add((net, addr))
            if not addrs:
                del self.learned[(net, qname)]
        ids = {n.name: i for i, n in enumerate(self.policy.networks, 1)}
        with self.maps.lock:
            for net, addr in stale:
                if net in ids:
                    self._write_dns_entry(ids[net], net, addr)

    def learned_view(self) -> list[dict]:
        now = now_ns()
        return [
            {"network": net, "name": qname, "addr": addr, "ttl_s": round((exp - now) / NS, 1)}
            for (net, qname), addrs in sorted(self.learned.items())
            for addr, exp in sorted(addrs.items())
            if exp > now
        ]

    async def start_dns(self) -> None:
        """(Re)start the proxy. A failure to listen leaves the policy enforced and is reported by
        /readyz (dns_error) rather than failing the plugin, which would keep an older policy."""
        if self.proxy is not None:
            self.proxy.close()
            self.proxy = None
        self.dns_error = ""
        d = self.cfg.dns
        if not d.enabled:
            return
        proxy = DnsProxy(
            d.listen,
            d.port,
            (d.upstream, d.upstream_port),
            self.decide,
            self.learn,
            dnswire.RCODES[d.deny],
            d.timeout,
            self.log,
            d.max_ttl,
        )
        try:
            await proxy.start()
        except OSError as exc:
            proxy.close()
            self.dns_error = (
                f"dns proxy cannot listen on {', '.join(d.listen)} port {d.port}: {exc.strerror or exc}"
            )
            self.log.error("dns proxy not started", error=self.dns_error)
            return
        self.proxy = proxy
        self.log.info("dns proxy listening", listen=d.listen, port=d.port, upstream=d.upstream)

    # ---- sessions ----

    def gc_once(self) -> list[tuple[str, bytes, SessionValue]]:
        """Remove idle sessions and return the session events since the last call (runs in a thread)."""
        settings = self.maps.settings()
        sessions, nat = self.maps.map("fw_sessions"), self.maps.map("fw_nat")
        now = now_ns()
        current: dict[bytes, tuple[SessionKey, SessionValue]] = {}
        idle: list[SessionKey] = []
        for k, v in sessions.items():
            if now - v.last_seen_ns > session_timeout_s(settings, k.proto, v.tcp_state) * NS:
                idle.append(k)
            else:
                current[bytes(k)] = (k, v)
        events: list[tuple[str, bytes, SessionValue]] = []
        for k in idle:
            # Read again before deleting: the datapath may have refreshed it since the walk.
            v = sessions.get(k)
            if v is None:
                continue
            if now_ns() - v.last_seen_ns <= session_timeout_s(settings, k.proto, v.tcp_state) * NS:
                current[bytes(k)] = (k, v)
                continue
            sessions.delete(k)
            events.append(("deleted", bytes(k), v))
            if v.nat_port:
                nat.delete(nat_key(k, v.nat_port))
        gone = {kb for kind, kb, _ in events}
        # A flow's tunnel metadata lives exactly as long as its session: none is ever orphaned.
        flows = self.maps.map("fw_geneve_flows")
        flows.delete_batch([fk for fk in flows.keys() if bytes(fk) not in current])  # noqa: SIM118 (a Map)
        # Likewise a NAT entry: gone with its session, or when its session moved to another port.
        nat.delete_batch(
            [
                nk
                for nk, sk in nat.items()
                if (bytes(sk) not in current or current[bytes(sk)][1].nat_port != nk.nat_port)
            ]
        )
        for kb, (_, v) in current.items():
            prev = self.known.get(kb)
            if prev is None:
                events.append(("created", kb, v))
                self.known[kb] = Known(v.last_seen_ns, now, v.tcp_state)
            elif v.last_seen_ns != prev.last_seen_ns and (
                prev.restored  # a peer's flow now passes here: say so at once (ownership moves)
                or v.tcp_state != prev.tcp_state
                or now - prev.emitted_ns >= self.cfg.session_update_interval * NS
            ):
                events.append(("updated", kb, v))
                self.known[kb] = Known(v.last_seen_ns, now, v.tcp_state)
        # list(): the event loop adds to known meanwhile (restore, datapath session events).
        for kb in [kb for kb in list(self.known) if kb not in current]:
            if kb not in gone and sessions.get(SessionKey.from_buffer_copy(kb)) is not None:
                continue  # written after the walk: the next pass sees it
            self.known.pop(kb, None)
            if kb not in gone:  # removed by someone else (cleanup, a restart of the map)
                events.append(("deleted", kb, SessionValue()))
        return events

    def publish(self, events: list[tuple[str, bytes, SessionValue]]) -> None:
        t = now_ns()
        flows = self.maps.map("fw_geneve_flows")
        for kind, kb, v in events:
            k = SessionKey.from_buffer_copy(kb)
            attrs, value = session_dict(k, v), replicated_value(v)
            tunnel = flows.get(k) if kind != "deleted" else None
            if tunnel is not None:  # GENEVE mode: the successor needs it to return the flow's packets
                attrs.update(tunnel_dict(tunnel))
                value += bytes(tunnel)
            session = Session(owner=self.ctx.name, key=kb, value=value, attrs=attrs)
            self.ctx.hook.sluice_session_event(event=SessionEvent(kind=kind, session=session, time_ns=t))

    def announce(self, keys: list[bytes]) -> list[tuple[str, bytes, SessionValue]]:
        """Session events at once for the keys the datapath reported (fw_session_events: a new
        session, an established handshake), instead of a gc_interval later."""
        sessions, events, now = self.maps.map("fw_sessions"), [], now_ns()
        for kb in keys:
            v = sessions.get(SessionKey.from_buffer_copy(kb))
            if v is None:
                continue
            prev = self.known.get(kb)
            if prev is not None and prev.tcp_state == v.tcp_state and not prev.restored:
                continue
            events.append(("created" if prev is None else "updated", kb, v))
            self.known[kb] = Known(v.last_seen_ns, now, v.tcp_state)
        return events

    async def session_event_task(self) -> None:
        from sluice.bpf.ringbuf import PinnedRingBuffer

        reader = PinnedRingBuffer(self.ctx.pin_dir / "fw_session_events", SessionKey, bytes)
        try:
            while True:
                keys = await asyncio.to_thread(reader.poll, 200)
                if keys:
                    self.publish(self.announce(keys))
        finally:
            reader.close()

    async def gc_task(self) -> None:
        while True:
            events = await asyncio.to_thread(self.gc_once)
            self.publish(events)
            self.expire_learned()
            await asyncio.sleep(self.cfg.gc_interval)

    def restore(self, sessions: Sequence[Session]) -> int:
        """Write replicated sessions into fw_sessions (and their GENEVE metadata into
        fw_geneve_flows); ages are kept, timestamps rebased to now."""
        m, flows, applied, now = self.maps.map("fw_sessions"), self.maps.map("fw_geneve_flows"), 0, now_ns()
        for s in sessions:
            sizes = (SESSION_VALUE_SIZE, SESSION_VALUE_SIZE + TUNNEL_SIZE)
            if len(s.key) != SESSION_KEY_SIZE or len(s.value) not in sizes:
                self.log.warning(
                    "restore: skipped a session of the wrong size", key=len(s.key), value=len(s.value)
                )
                continue
            v = SessionValue.from_buffer_copy(s.value)
            age = max(0, v.last_seen_ns - v.first_seen_ns)
            v.last_seen_ns, v.first_seen_ns = now, now - age
            v.flags |= 0x2
            try:
                key = SessionKey.from_buffer_copy(s.key)
                if v.nat_port:
                    self.maps.map("fw_nat").set(nat_key(key, v.nat_port), key)
                if len(s.value) > SESSION_VALUE_SIZE:
                    tunnel = Tunnel.from_buffer_copy(s.value, SESSION_VALUE_SIZE)
                    tunnel.last_seen_ns = now
                    flows.set(key, tunnel)
                m.set(key, v)
            except OSError as exc:
                self.log.warning("restore: map refused a session", error=str(exc))
                continue
            self.known[bytes(s.key)] = Known(now, now, v.tcp_state, restored=True)
            applied += 1
        return applied

    def forget(self, sessions: Sequence[Session]) -> int:
        """Remove restored sessions that left the bucket (the peer deleted them or they expired),
        unless they carried traffic here since they were restored: those are this node's now."""
        m, forgotten = self.maps.map("fw_sessions"), 0
        for s in sessions:
            known = self.known.get(bytes(s.key))
            if len(s.key) != SESSION_KEY_SIZE or known is None or not known.restored:
                continue
            key = SessionKey.from_buffer_copy(s.key)
            v = m.get(key)
            if v is None or v.last_seen_ns != known.last_seen_ns:
                continue
            m.delete(key)
            if v.nat_port:
                self.maps.map("fw_nat").delete(nat_key(key, v.nat_port))
            self.maps.map("fw_geneve_flows").delete(key)
            del self.known[bytes(s.key)]
            forgotten += 1
        return forgotten

    # ---- audit ----

    async def audit_task(self) -> None:
        reader = AuditReader(self.ctx.pin_dir)
        try:
            while True:
                events = await asyncio.to_thread(reader.poll, 200)
                for ev in events:
                    self.audit_seq += 1
                    self.audit.append((self.audit_seq, ev))
                    if self.cfg.audit_log:
                        self.log.info("audit", **{k: v for k, v in ev.items() if k != "ts_ns"})
                if events:
                    self.audit_signal.set()
                    self.audit_signal = asyncio.Event()
        finally:
            reader.close()

    def audit_after(self, seq: int) -> list[dict]:
        return [dict(e, seq=s) for s, e in self.audit if s > seq]

    def stop(self) -> None:
        if self.proxy is not None:
            self.proxy.close()
        self.maps.close()
