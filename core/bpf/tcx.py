"""TCX attachment (kernel 6.6+): each sluice program is a BPF link on the interface's TCX hook.

A link is pinned in bpffs (``<bpffs>/sluice/<owner>/links/<iface>:<direction>:<phase>:<order>:<fn>``)
so it outlives the agent, like a cls_bpf filter does. A restart opens the pin and swaps the
link's program (``bpf_link_update``): the hook never runs without a program in that place.

Order: the kernel keeps one ordered list of programs per hook (bpf_mprog). A new link goes
right before the next sluice link in chain order, or right after the previous one; the first
sluice link on a hook goes to its head. Other tools' programs keep their places; TCX runs before
any cls_bpf filter of the clsact qdisc, and a program returning TC_ACT_UNSPEC passes on to them.

Not wired into the datapath yet (core/datapath.py still attaches cls_bpf filters only).
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

from sluice.bpf import libbpf

ATTACH_TYPE = {"ingress": libbpf.BPF_TCX_INGRESS, "egress": libbpf.BPF_TCX_EGRESS}


def supported() -> bool:
    """Whether this kernel has TCX hooks: querying one on ``lo`` answers (EINVAL before 6.6)."""
    try:
        libbpf.prog_query_tcx(1, libbpf.BPF_TCX_INGRESS)  # lo is ifindex 1 in every namespace
    except OSError:
        return False
    return True


def link_name(iface: str, direction: str, phase: str, order: int, fn: str) -> str:
    # interface names cannot hold ':' or '/': the name splits back into its parts
    return f"{iface}:{direction}:{phase}:{order}:{fn}"


def pinned(pin: Path) -> libbpf.LinkInfo | None:
    """The pinned link's info, None when there is no pin."""
    try:
        fd = libbpf.obj_get(pin)
    except FileNotFoundError:
        return None
    try:
        return libbpf.link_info(fd)
    finally:
        os.close(fd)


def live(pin: Path, ifindex: int, direction: str) -> bool:
    """The pin holds a link still attached to that hook (a device's removal leaves it defunct)."""
    info = pinned(pin)
    return info is not None and info.ifindex == ifindex and info.attach_type == ATTACH_TYPE[direction]


def attach(
    ifindex: int,
    direction: str,
    prog_fd: int,
    pin: Path,
    *,
    before: Path | None = None,
    after: Path | None = None,
) -> None:
    """Run ``prog_fd`` in the link pinned at ``pin``: swap the program of a live link in place, or
    create the link right before the link pinned at ``before`` (else right after ``after``, else
    at the head of the hook) and pin it."""
    if live(pin, ifindex, direction):
        fd = libbpf.obj_get(pin)
        try:
            try:
                libbpf.link_update(fd, prog_fd)
            except FileExistsError:  # this very program already runs on the hook
                if libbpf.link_info(fd).prog_id != libbpf.prog_id(prog_fd):
                    raise
        finally:
            os.close(fd)
        return
    with contextlib.suppress(FileNotFoundError):
        pin.unlink()  # a defunct link (its device was removed)
    relative, flags = 0, libbpf.BPF_F_BEFORE
    neighbour = before or after
    if neighbour is not None:
        relative = libbpf.obj_get(neighbour)
        flags = (libbpf.BPF_F_BEFORE if before else libbpf.BPF_F_AFTER) | libbpf.BPF_F_LINK
    try:
        fd = libbpf.link_create_tcx(prog_fd, ifindex, ATTACH_TYPE[direction], flags, relative)
    finally:
        if relative:
            os.close(relative)
    try:
        pin.parent.mkdir(parents=True, exist_ok=True)
        libbpf.obj_pin(fd, pin)
    except OSError:
        libbpf.link_detach(fd)
        raise
    finally:
        os.close(fd)


def detach(pin: Path) -> bool:
    """Detach the pinned link and remove its pin; False when there was none."""
    try:
        fd = libbpf.obj_get(pin)
    except FileNotFoundError:
        return False
    try:
        with contextlib.suppress(OSError):  # already defunct: removing the pin is all there is
            libbpf.link_detach(fd)
    finally:
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            pin.unlink()
    return True


def chain(ifindex: int, direction: str) -> list[tuple[int, int]]:
    """(program id, link id) on one hook, in the order packets see them; link id 0: attached
    without a link (bpf_prog_attach)."""
    try:
        progs, links = libbpf.prog_query_tcx(ifindex, ATTACH_TYPE[direction])
    except OSError as exc:
        if exc.errno in (errno.ENODEV, errno.EINVAL):
            return []
        raise
    return list(zip(progs, links, strict=True))
