"""TC clsact attachment through pyroute2.

Each sluice program is a direct-action cls_bpf filter named ``sluice:<plugin>:<fn>`` at a priority
equal to its declared order, so a chain on one (interface, direction) runs in order and a program
returning TC_ACT_UNSPEC hands the packet to the next. Attaching uses ``replace`` at the same
priority and handle: on an agent restart the new program takes the old one's place atomically, so
no packet passes unfiltered. The filter keeps the program alive after the agent exits.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl.tcmsg import sched_bpf

from sluice.programs import Direction

# pyroute2's cls_bpf options stop at TCA_BPF_FLAGS: without the attributes after it the kernel's
# program id (TCA_BPF_ID) is never decoded. Appended once, at import, before any message is parsed.
_BPF_OPTIONS = sched_bpf.options
if not any(name == "TCA_BPF_ID" for name, _ in _BPF_OPTIONS.nla_map):
    _BPF_OPTIONS.nla_map = tuple(_BPF_OPTIONS.nla_map) + (
        ("TCA_BPF_FLAGS_GEN", "uint32"),
        ("TCA_BPF_TAG", "hex"),
        ("TCA_BPF_ID", "uint32"),
    )

NAME_PREFIX = "sluice:"
HANDLE = 1
PARENT = {"ingress": "ffff:fff2", "egress": "ffff:fff3"}
MAX_ORDER = 49151  # priorities above are left to other tools sharing the hook


class AttachError(Exception):
    """Attaching failed; the message is one line naming the interface and the reason."""


@dataclass(frozen=True)
class Filter:
    iface: str
    ifindex: int
    direction: Direction
    prio: int
    name: str
    prog_id: int

    @property
    def owned(self) -> bool:
        return self.name.startswith(NAME_PREFIX)

    @property
    def plugin(self) -> str:
        return self.name.split(":")[1] if self.owned else ""


def filter_name(plugin: str, fn: str) -> str:
    return f"{NAME_PREFIX}{plugin}:{fn}"


def ifindex(ipr: IPRoute, iface: str) -> int:
    found = ipr.link_lookup(ifname=iface)
    if not found:
        raise AttachError(f"interface {iface} not found")
    return found[0]


def ensure_clsact(ipr: IPRoute, index: int) -> bool:
    """Add the clsact qdisc unless present. Returns True when we added it."""
    for q in ipr.get_qdiscs(index=index):
        if q.get_attr("TCA_KIND") == "clsact":
            return False
    try:
        ipr.tc("add", "clsact", index)
    except NetlinkError as exc:
        if exc.code != errno.EEXIST:
            raise
        return False
    return True


def attach(ipr: IPRoute, iface: str, direction: Direction, prio: int, fd: int, name: str) -> int:
    """Attach (or atomically replace) the program ``fd`` at ``prio``; returns the ifindex."""
    if not 1 <= prio <= MAX_ORDER:
        raise AttachError(f"{name}: order {prio} outside 1..{MAX_ORDER}")
    index = ifindex(ipr, iface)
    ensure_clsact(ipr, index)
    try:
        ipr.tc(
            "replace-filter",
            "bpf",
            index,
            HANDLE,
            fd=fd,
            name=name,
            parent=PARENT[direction],
            prio=prio,
            classid=1,
            direct_action=True,
        )
    except NetlinkError as exc:
        raise AttachError(
            f"{iface} {direction} prio {prio}: {exc.args[1] if len(exc.args) > 1 else exc}"
        ) from None
    return index


def list_filters(ipr: IPRoute, iface: str | None = None) -> list[Filter]:
    """Every cls_bpf filter on the clsact hooks of ``iface`` (or of every interface), in chain order."""
    links = ipr.get_links() if iface is None else [ipr.get_links(ifindex(ipr, iface))[0]]
    out = []
    for link in links:
        index, name = link["index"], link.get_attr("IFLA_IFNAME")
        for direction, parent in PARENT.items():
            try:
                msgs = ipr.get_filters(index=index, parent=parent)
            except NetlinkError:
                continue
            for msg in msgs:
                if msg.get_attr("TCA_KIND") != "bpf":
                    continue
                opts = msg.get_attr("TCA_OPTIONS")
                if opts is None:
                    continue
                out.append(
                    Filter(
                        iface=name,
                        ifindex=index,
                        direction=direction,
                        prio=msg["info"] >> 16,
                        name=opts.get_attr("TCA_BPF_NAME") or "",
                        prog_id=opts.get_attr("TCA_BPF_ID") or 0,
                    )
                )
    return sorted(out, key=lambda f: (f.iface, f.direction, f.prio))


def has_foreign_filters(ipr: IPRoute, index: int) -> bool:
    """Whether any filter of any kind (u32, flower, another tool's bpf …) not named by sluice sits
    on either clsact hook of ``index``: then the clsact qdisc is not ours to remove."""
    for parent in PARENT.values():
        try:
            msgs = ipr.get_filters(index=index, parent=parent)
        except NetlinkError:
            continue
        for msg in msgs:
            kind = msg.get_attr("TCA_KIND")
            if kind is None:
                continue  # the per-priority header entries the kernel dumps
            opts = msg.get_attr("TCA_OPTIONS")
            name = (opts.get_attr("TCA_BPF_NAME") if kind == "bpf" and opts is not None else "") or ""
            if not name.startswith(NAME_PREFIX):
                return True
    return False


def detach(ipr: IPRoute, index: int, direction: Direction, prio: int) -> bool:
    """Remove the filter at ``prio``; False when it was already gone."""
    try:
        ipr.tc("del-filter", "bpf", index, HANDLE, parent=PARENT[direction], prio=prio)
    except NetlinkError as exc:
        if exc.code in (errno.ENOENT, errno.ENODEV, errno.EINVAL):
            return False
        raise
    return True


def remove_clsact(ipr: IPRoute, index: int) -> None:
    try:
        ipr.tc("del", "clsact", index)
    except NetlinkError:
        pass
