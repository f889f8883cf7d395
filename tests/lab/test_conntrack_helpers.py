"""Helpers the conntrack lab tests share (no tests here): the plugin's program on a namespace
pair, and connections between the pair's two ends."""

from __future__ import annotations

import contextlib
import shutil
import socket
import uuid
from pathlib import Path

from sluice.datapath import Datapath
from sluice.lab import in_netns, netns_socket
from sluice.plugins.conntrack import Config, configure_datapath, program
from tests.netlab import netns_pair


@contextlib.contextmanager
def conntrack_on_pair(state_dir: Path, config: Config, side: str = "a", prepare=None):
    """A namespace pair with the conntrack program on the configured interfaces of ``side``
    (``prepare(pair)`` runs first, to add devices): ``(pair, pin_dir, bpf)``."""
    root = Path("/sys/fs/bpf") / f"sluice-test-{uuid.uuid4().hex[:8]}"
    root.mkdir()
    try:
        with netns_pair() as pair:
            if prepare:
                prepare(pair)
            with in_netns(pair.ns(side)):
                bpf = Datapath(root, state_dir, []).load("conntrack", [program(config)])["conntrack"]
                configure_datapath(root / "sluice" / "conntrack", config)
            try:
                yield pair, root / "sluice" / "conntrack", bpf
            finally:
                bpf.cleanup()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def tcp_connection(pair, family: int = 4):
    """An established TCP connection a → b: ``(client, server_side, listener)``."""
    srv = netns_socket(pair.b, family)
    srv.bind((pair.addr("b", family), 0))
    srv.listen()
    cli = netns_socket(pair.a, family)
    cli.connect((pair.addr("b", family), srv.getsockname()[1]))
    peer, _ = srv.accept()
    return cli, peer, srv


def udp_flow(pair, family: int = 4) -> tuple[int, int]:
    """One datagram a → b; returns (source port, destination port)."""
    srv = netns_socket(pair.b, family, socket.SOCK_DGRAM)
    srv.bind((pair.addr("b", family), 0))
    cli = netns_socket(pair.a, family, socket.SOCK_DGRAM)
    cli.bind((pair.addr("a", family), 0))
    cli.sendto(b"x", (pair.addr("b", family), srv.getsockname()[1]))
    srv.recv(10)
    ports = cli.getsockname()[1], srv.getsockname()[1]
    cli.close()
    srv.close()
    return ports
