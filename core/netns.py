"""Network namespaces by name (``/run/netns/<name>``), entered with setns(2).

Python 3.11 (the interpreter Debian's BCC bindings are built for) has no os.setns. Entering a
namespace this way keeps the mount namespace, so bpffs pins stay visible; ``ip netns exec`` would
remount /sys and hide them.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import subprocess
from collections.abc import Iterator

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def setns(fd: int) -> None:
    """Move the calling thread into the network namespace behind ``fd``."""
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def enter(name: str) -> None:
    """Move the calling thread (at start-up: the whole process) into namespace ``name`` for good."""
    path = name if "/" in name else f"/run/netns/{name}"
    with open(path) as target:
        setns(target.fileno())


@contextlib.contextmanager
def inside(name: str) -> Iterator[None]:
    """Run the body with the calling thread inside namespace ``name``, then come back.

    Only this thread moves. Sockets opened inside stay bound to that namespace afterwards.
    """
    with open("/proc/thread-self/ns/net") as home, open(f"/run/netns/{name}") as target:
        setns(target.fileno())
        try:
            yield
        finally:
            setns(home.fileno())


@contextlib.contextmanager
def scratch(name: str) -> Iterator[str]:
    """A new, empty namespace that is removed afterwards.

    Made with ``ip netns add`` rather than pyroute2's NetNS, which forks a helper process: a forked
    child shares asyncio's signal wake-up fd, so the SIGTERM pyroute2 sends it would reach the
    agent's own signal handler.
    """
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)
