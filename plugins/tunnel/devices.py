"""The shared external-mode (collect_md) tunnel devices the datapath redirects to.

Only kinds some route uses are created; a kind the kernel lacks makes the nexthops needing it
unusable with a reason (reported by `sluice tunnel routes`), never dropped silently. The devices
are named ``sluice-<kind>`` and are the plugin's own: `sluice tunnel cleanup` removes them.
"""

from __future__ import annotations

import json
import socket
import subprocess
from collections.abc import Callable

from sluice.plugins.tunnel.model import DEFAULT_DEVICES, Nexthop, Protocol, tunnel_mac

OUTER_UDP = 8 + 8 + 14  # UDP + VXLAN/GENEVE header + inner Ethernet
OUTER_IP = {4: 20, 6: 40}


class DeviceError(Exception):
    """A device could not be created or changed; one line."""


def _ip(*args: str) -> str:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise DeviceError(f"ip {' '.join(args)}: {proc.stderr.strip() or f'exit {proc.returncode}'}")
    return proc.stdout


def link(name: str) -> dict | None:
    """`ip -d -j link show` of one device, or None when it does not exist."""
    proc = subprocess.run(["ip", "-d", "-j", "link", "show", "dev", name], capture_output=True, text=True)
    if proc.returncode != 0:
        return None
    found = json.loads(proc.stdout or "[]")
    return found[0] if found else None


def ifindex(name: str) -> int | None:
    try:
        return socket.if_nametoindex(name)
    except OSError:
        return None


def encap_mtu(underlay_mtu: int, kind: str, families: set[int]) -> int:
    """The device MTU that keeps encapsulated packets within the underlay's MTU."""
    outer = max(OUTER_IP[f] for f in families or {4})
    return underlay_mtu - outer - (OUTER_UDP if kind in ("vxlan", "geneve") else 0)


def _create_args(kind: str, name: str, port: int) -> list[str]:
    if kind == "vxlan":
        return ["link", "add", name, "type", "vxlan", "external", "dstport", str(port)]
    if kind == "geneve":
        return ["link", "add", name, "type", "geneve", "external"]
    return ["link", "add", name, "type", kind, "external"]


class DeviceManager:
    """Resolves nexthops to ifindexes, creating the shared devices they need on first use."""

    def __init__(
        self,
        has_feature: Callable[[str], bool],
        underlay_iface: str,
        underlay_address=None,
        vxlan_port: int = 4789,
    ):
        self.has_feature = has_feature
        self.underlay_iface = underlay_iface
        self.underlay_address = underlay_address
        self.vxlan_port = vxlan_port

    def resolve(self, nh: Nexthop) -> int | str:
        """The ifindex to redirect to, or why the nexthop cannot be used."""
        if nh.protocol.collect_md:
            kind = nh.protocol.label
            if not self.has_feature(f"tunnel:{kind}"):
                return f"tunnel:{kind}: kernel has no {kind} device"
            if nh.device and nh.device != DEFAULT_DEVICES[kind]:
                found = ifindex(nh.device)
                return found if found else f"device {nh.device} not found"
            return self.ensure(kind)
        if nh.protocol is Protocol.WIREGUARD and not self.has_feature("tunnel:wireguard"):
            return "tunnel:wireguard: kernel has no wireguard device"
        found = ifindex(nh.device)
        return found if found else f"device {nh.device} not found"

    def ensure(self, kind: str) -> int | str:
        name = DEFAULT_DEVICES[kind]
        index = ifindex(name)
        if index:
            return index
        try:
            _ip(*_create_args(kind, name, self.vxlan_port))
            if self.underlay_address is not None:
                _ip("link", "set", name, "address", tunnel_mac(self.underlay_address))
            _ip("link", "set", name, "up")
        except DeviceError as exc:
            return str(exc)
        return ifindex(name) or f"device {name} vanished after creation"

    def set_mtus(self, families_by_kind: dict[str, set[int]]) -> None:
        """Give each device in use the MTU its encapsulation leaves within the underlay's."""
        under = link(self.underlay_iface)
        if under is None:
            return
        for kind, families in families_by_kind.items():
            name = DEFAULT_DEVICES[kind]
            current = link(name)
            want = encap_mtu(under["mtu"], kind, families)
            if current is not None and current.get("mtu") != want:
                _ip("link", "set", name, "mtu", str(want))

    def prune(self, in_use: set[str]) -> list[str]:
        """Remove the plugin's devices no usable route needs any more."""
        removed = []
        for kind, name in DEFAULT_DEVICES.items():
            if kind not in in_use and ifindex(name):
                remove(name)
                removed.append(name)
        return removed


def remove(name: str) -> bool:
    if not ifindex(name):
        return False
    _ip("link", "del", name)
    return True


def remove_all() -> list[str]:
    return [name for name in DEFAULT_DEVICES.values() if remove(name)]


def describe() -> list[dict]:
    """The plugin's devices as they exist now."""
    out = []
    for kind, name in DEFAULT_DEVICES.items():
        info = link(name)
        if info is None:
            continue
        data = info.get("linkinfo", {}).get("info_data", {})
        out.append(
            {
                "name": name,
                "kind": kind,
                "ifindex": info.get("ifindex"),
                "mtu": info.get("mtu"),
                "mac": info.get("address"),
                "state": info.get("operstate"),
                "external": bool(data.get("external", data.get("collect_metadata", False))),
                "port": data.get("port"),
            }
        )
    return out
