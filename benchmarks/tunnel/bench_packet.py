"""Per-packet cost of the tunnel program, as a ratio to the empty-program baseline.

    python benchmarks/tunnel/bench_packet.py [--routes N] [--repeat N] [--trials T]

BPF_PROG_TEST_RUN on 64-byte frames with ``--routes`` prefixes in the trie (v4 /24s and v6 /64s).
Cases: a miss (kernel routing), one nexthop (set the tunnel key, rewrite the MAC, redirect), four
healthy nexthops (rendezvous hashing over the flow hash first), an IPv6 packet over an IPv6
underlay. Tracing is off, as in production.
"""

from __future__ import annotations

import argparse
import ipaddress
import statistics
import struct
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.common import empty_program_ns, ns_per_run, table, udp_frame  # noqa: E402
from sluice import kernel  # noqa: E402
from sluice.plugins.tunnel.engine import Tunnel  # noqa: E402
from sluice.plugins.tunnel.model import Nexthop, Route  # noqa: E402
from sluice.plugins.tunnel.testing import compiled_tunnel  # noqa: E402

PEERS = [Nexthop(peer=f"p{i}", underlay=f"10.99.{i}.2", vni=100 + i) for i in range(4)]
PEER6 = Nexthop(peer="v6", underlay="fd00:99::2", vni=600)


def frame_to(dst: str) -> bytes:
    """udp_frame(64) re-addressed to ``dst`` (v4 or v6)."""
    a = ipaddress.ip_address(dst)
    if a.version == 4:
        f = bytearray(udp_frame(64))
        f[30:34] = a.packed
        return bytes(f)
    l4 = struct.pack("!HHHH", 40000, 9, 10, 0) + b"xx"
    ip6 = struct.pack(
        "!IHBB16s16s", 6 << 28, len(l4), 17, 64, ipaddress.ip_address("fd00::1").packed, a.packed
    )
    return bytes.fromhex("02000000000202000000000186dd") + ip6 + l4


def fill(tunnel: Tunnel, n: int) -> None:
    routes = [Route(dst="10.200.0.0/24", nexthops=PEERS[:1]), Route(dst="10.201.0.0/24", nexthops=PEERS)]
    routes.append(Route(dst="fd00:200::/64", nexthops=[PEER6]))
    for i in range(n - len(routes)):
        dst = (
            f"fd01:{i >> 16:x}:{i & 0xFFFF:x}::/64"
            if i % 4 == 3
            else f"{11 + (i >> 16)}.{(i >> 8) & 255}.{i & 255}.0/24"
        )
        routes.append(Route(dst=dst, nexthops=PEERS[: 1 + i % 4]))
    tunnel.replace_api_routes(routes)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--routes", type=int, default=10_000)
    ap.add_argument("--repeat", type=int, default=200_000, help="runs per trial (one syscall)")
    ap.add_argument("--trials", type=int, default=5)
    args = ap.parse_args(argv)
    kernel.mount_filesystems()
    kernel.prepare_bcc(Path("/var/cache/sluice"))
    base = empty_program_ns(args.repeat, args.trials)
    gen = compiled_tunnel(max_routes=args.routes + 16)
    compiled = next(gen)
    try:
        tunnel = Tunnel(compiled.raw("tunnel_routes"), lambda nh: 1)
        fill(tunnel, args.routes)
        rows = [("empty program (baseline)", base, 1.0)]
        for name, dst in (
            ("miss (no route)", "192.0.2.1"),
            ("one nexthop: set key, MAC, redirect", "10.200.0.9"),
            ("four nexthops: rendezvous + encap", "10.201.0.9"),
            ("IPv6 over IPv6 underlay", "fd00:200::9"),
        ):
            ns = statistics.median(ns_per_run(compiled.prog_fd, frame_to(dst), args.repeat, args.trials))
            rows.append((name, float(ns), ns / base))
        print(f"{args.routes:,} routes in the trie, {args.repeat:,} runs x {args.trials} trials, median")
        print(table(["case", "ns/packet", "x empty"], rows))
    finally:
        gen.close()


if __name__ == "__main__":
    main()
