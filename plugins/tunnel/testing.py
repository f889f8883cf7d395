"""For tests and benchmarks: compile tunnel.bpf.c once into a private bpffs root (never the real one)."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path

from sluice.bpf import loader
from sluice.bpf.maps import Map
from sluice.plugins import tunnel
from sluice.programs import Program


class Compiled:
    def __init__(self, root: Path, max_routes: int = 1024):
        self.root = root
        self.bpf = loader.compile_program(
            "tunnel",
            Program("tunnel", tunnel.SOURCE),
            bpffs=root,
            cflags=[f"-DTUNNEL_MAX_ROUTES={max_routes}"],
        )
        self.prog_fd = loader.load_tc(self.bpf, "tunnel", "tunnel_egress")

    def raw(self, name: str) -> Map:
        """A raw-bytes view of one of the program's maps."""
        return Map(os.dup(self.bpf[name].map_fd))

    def typed(self, name: str) -> Map:
        return Map.from_bcc(self.bpf[name])

    def close(self) -> None:
        self.bpf.cleanup()


def compiled_tunnel(max_routes: int = 1024):
    """Generator for a module-scoped fixture: the compiled program, its pins removed after."""
    root = Path("/sys/fs/bpf") / f"sluice-test-{uuid.uuid4().hex[:8]}"
    root.mkdir(parents=True)
    try:
        c = Compiled(root, max_routes)
        try:
            yield c
        finally:
            c.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)


# ---- a small overlay lab: host A runs the program, peers B and C decapsulate with kernel vxlan ----

VNI_V4, VNI_V6 = 100, 600
UNDERLAY = {  # (namespace side, family) → address; A-B on net 1, A-C on net 2
    ("a-b", 4): "10.98.1.1", ("b", 4): "10.98.1.2", ("a-b", 6): "fd00:98:1::1", ("b", 6): "fd00:98:1::2",
    ("a-c", 4): "10.98.2.1", ("c", 4): "10.98.2.2",
}  # fmt: skip
A_OVERLAY = {4: "10.201.0.1", 6: "fd00:201::1"}
# overlay prefixes: B alone (v4 underlay), B alone over the v6 underlay, B and C (ECMP anycast)
OVERLAY = {"b": "10.202.0.0/24", "b6": "fd00:202::/64", "b-v6u": "10.203.0.0/24", "b6-v6u": "fd00:203::/64",
           "ecmp": "10.204.0.0/24"}  # fmt: skip


def _first(cidr: str) -> str:
    import ipaddress

    return str(next(ipaddress.ip_network(cidr).hosts()))


def overlay_addr(name: str) -> str:
    """The address the peer(s) of overlay prefix ``name`` answer on (.1 / ::1)."""
    return _first(OVERLAY[name])


def tunnel_config(extra: dict | None = None) -> dict:
    """The plugin's config for the overlay lab's host A."""
    b4 = {"peer": "b", "underlay": UNDERLAY[("b", 4)], "vni": VNI_V4}
    b6 = {"peer": "b", "underlay": UNDERLAY[("b", 6)], "vni": VNI_V6}
    c4 = {"peer": "c", "underlay": UNDERLAY[("c", 4)], "vni": VNI_V4}
    routes = [
        {"dst": OVERLAY["b"], "nexthops": [b4]},
        {"dst": OVERLAY["b6"], "nexthops": [b4]},
        {"dst": OVERLAY["b-v6u"], "nexthops": [b6]},
        {"dst": OVERLAY["b6-v6u"], "nexthops": [b6]},
        {"dst": OVERLAY["ecmp"], "nexthops": [b4, c4]},
    ]
    return {"interface": "ulb", "underlay_address": UNDERLAY[("a-b", 4)], "routes": routes, **(extra or {})}


def _peer_vxlan(
    ns: str, dev: str, vni: int, local: str, remote: str, addrs: list[str], replies: bool = True
) -> None:
    """A standard (not external) kernel vxlan device that decapsulates what A sends (and, with
    ``replies``, carries the peer's answers back to A)."""
    import ipaddress

    from sluice import lab as sl
    from sluice.plugins.tunnel.model import tunnel_mac

    mac = tunnel_mac(ipaddress.ip_address(local))
    sl.run_ip("-n", ns, "link", "add", dev, "type", "vxlan", "id", str(vni), "local", local, "remote", remote,
              "dstport", "4789", "nolearning")  # fmt: skip
    sl.run_ip("-n", ns, "link", "set", dev, "address", mac, "up")
    a_mac = tunnel_mac(ipaddress.ip_address(UNDERLAY[("a-b", 4)]))
    for cidr in addrs:
        sl.run_ip("-n", ns, "addr", "add", cidr, "dev", dev, *(["nodad"] if ":" in cidr else []))
    for family, addr in A_OVERLAY.items() if replies else ():
        # replies go back through the vxlan device to A's external device, whose MAC A owns
        sl.run_ip("-n", ns, "route", "add", f"{addr}/{32 if family == 4 else 128}", "dev", dev)
        sl.run_ip("-n", ns, "neigh", "replace", addr, "lladdr", a_mac, "dev", dev, "nud", "permanent")


@contextlib.contextmanager
def overlay_lab(prefix: str):
    """Namespaces ``<prefix>a`` (the tunnel host), ``<prefix>b`` and ``<prefix>c`` (peers).

    A-B: veth ulb/eth0 (v4+v6 underlay), A-C: veth ulc/eth0 (v4). A's kernel routes send the
    overlay prefixes out of ulb (where the program runs). Removed on exit, failures included.
    """
    from sluice import lab as sl

    names = {side: f"{prefix}{side}" for side in "abc"}
    created: list[str] = []
    try:
        for ns in names.values():
            sl.netns_add(ns)
            created.append(ns)
            sl.set_sysctl(ns, "net.ipv4.conf.all.rp_filter", 0)
            sl.set_sysctl(ns, "net.ipv4.conf.default.rp_filter", 0)
        a, b, c = names["a"], names["b"], names["c"]
        for dev, peer, index in (("ulb", b, 31), ("ulc", c, 32)):
            sl.run_ip("-n", a, "link", "add", dev, "index", str(index), "type", "veth", "peer", "name", "eth0",
                      "index", str(index + 10), "netns", peer)  # fmt: skip
        for ns, dev, addrs in (
            (a, "ulb", [f"{UNDERLAY[('a-b', 4)]}/24", f"{UNDERLAY[('a-b', 6)]}/64"]),
            (b, "eth0", [f"{UNDERLAY[('b', 4)]}/24", f"{UNDERLAY[('b', 6)]}/64"]),
            (a, "ulc", [f"{UNDERLAY[('a-c', 4)]}/24"]),
            (c, "eth0", [f"{UNDERLAY[('c', 4)]}/24"]),
        ):
            for cidr in addrs:
                sl.run_ip("-n", ns, "addr", "add", cidr, "dev", dev, *(["nodad"] if ":" in cidr else []))
            sl.run_ip("-n", ns, "link", "set", dev, "up")
        sl.wait_links_ready([(a, "ulb"), (a, "ulc"), (b, "eth0"), (c, "eth0")])
        sl.run_ip("-n", a, "addr", "add", f"{A_OVERLAY[4]}/32", "dev", "lo")
        sl.run_ip("-n", a, "addr", "add", f"{A_OVERLAY[6]}/128", "dev", "lo", "nodad")
        for name, cidr in OVERLAY.items():
            v6 = ":" in cidr
            via = UNDERLAY[("b", 6 if v6 else 4)]
            src = A_OVERLAY[6 if v6 else 4]
            mtu = "1430" if v6 or name.endswith("v6u") else "1450"  # leave room for the encapsulation
            sl.run_ip("-n", a, "route", "add", cidr, "via", via, "dev", "ulb", "src", src, "mtu", mtu)
        _peer_vxlan(b, "vx4", VNI_V4, UNDERLAY[("b", 4)], UNDERLAY[("a-b", 4)],
                    [f"{overlay_addr('b')}/24", f"{overlay_addr('b6')}/64", f"{overlay_addr('ecmp')}/24"])  # fmt: skip
        _peer_vxlan(b, "vx6", VNI_V6, UNDERLAY[("b", 6)], UNDERLAY[("a-b", 6)],
                    [f"{overlay_addr('b-v6u')}/24", f"{overlay_addr('b6-v6u')}/64"], replies=False)  # fmt: skip
        _peer_vxlan(
            c, "vx4", VNI_V4, UNDERLAY[("c", 4)], UNDERLAY[("a-c", 4)], [f"{overlay_addr('ecmp')}/24"]
        )
        yield names
    finally:
        for ns in reversed(created):
            sl.netns_delete(ns)


@contextlib.contextmanager
def plugin_in_netns(ns: str, config: dict, state_dir: Path, cache_dir: Path = Path("/var/cache/sluice")):
    """The tunnel plugin as the agent runs it (compile, attach, build, apply), inside namespace ``ns``,
    with a private bpffs root. Yields the PluginContext (``ctx.tunnel`` is the engine); everything
    it attached, pinned or created is removed on exit."""
    from sluice import kernel
    from sluice.config import AgentSettings
    from sluice.datapath import Datapath
    from sluice.lab import in_netns
    from sluice.manager import PluginContext, PluginManager
    from sluice.plugins.tunnel import devices

    root = Path("/sys/fs/bpf") / f"sluice-test-{uuid.uuid4().hex[:8]}"
    root.mkdir(parents=True)
    manager = PluginManager()
    manager.register(tunnel, "tunnel")
    settings = AgentSettings(bpffs=root, state_dir=state_dir, cache_dir=cache_dir)
    ctx = PluginContext("tunnel", manager, settings, tunnel.Config.model_validate(config))
    ctx.features = kernel.Features(cache_dir)
    try:
        with in_netns(ns):
            datapath = Datapath(root, state_dir, [])
            ctx.bpf = datapath.load("tunnel", list(tunnel.sluice_programs(ctx)))
            ctx.tunnel = tunnel.build_tunnel(ctx)
            tunnel.apply_config(ctx)
        yield ctx
    finally:
        with in_netns(ns):
            if getattr(ctx, "tunnel", None) is not None:
                ctx.tunnel.trie.close()
                ctx.tunnel.stats.close()
            for b in ctx.bpf.values():
                b.cleanup()
            devices.remove_all()
        shutil.rmtree(root, ignore_errors=True)
