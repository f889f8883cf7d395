"""flowmon vs softflowd vs no agent: iperf3 TCP throughput and the agent's CPU, interleaved rounds.

    python benchmarks/flowmon/bench_vs_softflowd.py [--rounds 5] [--seconds 5]

One veth pair; the sender's veth is where the agent watches (both directions: data and ACKs).
Each round runs the three modes once, in a rotated order, each with a fresh agent:

- none: no agent (the baseline);
- softflowd: ``softflowd -d -v 10`` on the veth (libpcap), exporting IPFIX to a local nfcapd;
- flowmon: the real ``sluice agent run`` with flowmon's default config on the veth, exporting
  IPFIX to the same nfcapd.

An agent's CPU is counted over the iperf3 run only (not start-up): its process's user+system
time from /proc, and for flowmon also the kernel time its BPF programs ran (BPF_ENABLE_STATS
run_time_ns of its TC programs), which the kernel charges to whoever carried the packet, not to
the agent. softflowd's packet copy into its capture ring is likewise charged to the sender (not
measured). Reported: medians over the rounds, and ratios to none (throughput) and to softflowd
(CPU).
"""

from __future__ import annotations

import argparse
import ctypes as ct
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.common import table  # noqa: E402
from sluice import kernel  # noqa: E402
from sluice.bpf import libbpf  # noqa: E402
from tests.netlab import netns_pair  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
MODES = ("none", "softflowd", "flowmon")
_libbpf = ct.CDLL("libbpf.so.1", use_errno=True)
_libbpf.bpf_enable_stats.argtypes = [ct.c_int]
_libbpf.bpf_obj_get_info_by_fd.argtypes = [ct.c_int, ct.c_void_p, ct.POINTER(ct.c_uint32)]
RUN_TIME_NS_OFFSET = 192  # struct bpf_prog_info: __u64 run_time_ns (then run_cnt)


def cpu_s(pid: int) -> float:
    """User + system seconds of a process (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime


def prog_run_ns(prog_ids: list[int]) -> int:
    total = 0
    for pid in prog_ids:
        fd = libbpf.prog_get_fd_by_id(pid)
        try:
            buf = ct.create_string_buffer(RUN_TIME_NS_OFFSET + 16)
            size = ct.c_uint32(len(buf))
            if _libbpf.bpf_obj_get_info_by_fd(fd, buf, ct.byref(size)) != 0:
                raise OSError(ct.get_errno(), "bpf_obj_get_info_by_fd")
            total += int.from_bytes(buf.raw[RUN_TIME_NS_OFFSET : RUN_TIME_NS_OFFSET + 8], "little")
        finally:
            os.close(fd)
    return total


def flowmon_prog_ids(pair) -> list[int]:
    ids = []
    for direction in ("ingress", "egress"):
        out = subprocess.run(
            ["tc", "-n", pair.a, "filter", "show", "dev", pair.ifname, direction],
            capture_output=True,
            text=True,
        ).stdout
        if "sluice:flowmon" in out:
            ids += [int(m) for m in re.findall(r"\bid (\d+)", out)]
    return ids


def iperf(pair, seconds: int) -> float:
    """Gbit/s received by the server for one iperf3 run from a to b."""
    out = subprocess.run(
        ["ip", "netns", "exec", pair.a, "iperf3", "-J", "-c", pair.addr("b"), "-t", str(seconds)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return json.loads(out)["end"]["sum_received"]["bits_per_second"] / 1e9


def wait(what: str, check, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            sys.exit(f"timed out waiting for {what}")
        time.sleep(0.1)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Round:
    def __init__(self, pair, tmp: Path, collector: str, bpffs: Path):
        self.pair, self.tmp, self.collector, self.bpffs = pair, tmp, collector, bpffs

    def start(self, mode: str) -> subprocess.Popen | None:
        pair = self.pair
        if mode == "softflowd":
            proc = subprocess.Popen(
                ["ip", "netns", "exec", pair.a, "softflowd", "-d", "-v", "10", "-i", pair.ifname,
                 "-n", self.collector, "-p", str(self.tmp / "sfd.pid"), "-c", str(self.tmp / "sfd.ctl")],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            time.sleep(1.0)  # softflowd has no readiness signal; its capture opens at once
            return proc
        if mode == "flowmon":
            cfg = self.tmp / "sluice.toml"
            cfg.write_text(
                f'[agent]\nplugins = ["flowmon"]\nbpffs = "{self.bpffs}"\nstate_dir = "{self.tmp / "state"}"\n'
                f'detach_on_stop = true\n\n[plugins.flowmon]\ninterfaces = ["{pair.ifname}"]\n'
                f'ipfix = [{{ address = "{self.collector}" }}]\n'
            )
            proc = subprocess.Popen(
                [sys.executable, "-m", "sluice", "--netns", pair.a, "agent", "run", "-c", str(cfg)],
                stdout=subprocess.DEVNULL, stderr=open(self.tmp / "agent.log", "a"),  # noqa: SIM115
            )  # fmt: skip
            wait("flowmon attached", lambda: len(flowmon_prog_ids(pair)) == 2)
            time.sleep(0.5)
            return proc
        return None

    def measure(self, mode: str, seconds: int) -> tuple[float, float, float]:
        """(Gbit/s, agent CPU s, of which BPF s) for one run."""
        proc = self.start(mode)
        try:
            ids = flowmon_prog_ids(self.pair) if mode == "flowmon" else []
            stats_fd = _libbpf.bpf_enable_stats(0) if ids else -1  # BPF_STATS_RUN_TIME, while open
            try:
                cpu0, bpf0 = (cpu_s(proc.pid) if proc else 0.0), prog_run_ns(ids)
                gbps = iperf(self.pair, seconds)
                cpu1, bpf1 = (cpu_s(proc.pid) if proc else 0.0), prog_run_ns(ids)
            finally:
                if stats_fd >= 0:
                    os.close(stats_fd)
        finally:
            if proc:
                stop(proc)
        bpf_s = (bpf1 - bpf0) / 1e9
        return gbps, cpu1 - cpu0 + bpf_s, bpf_s


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=int, default=5)
    args = ap.parse_args(argv)
    for tool in ("iperf3", "softflowd", "nfcapd"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is not installed")
    kernel.prepare_bcc(Path("/var/cache/sluice"))
    bpffs = Path("/sys/fs/bpf") / f"sluice-bench-{uuid.uuid4().hex[:8]}"
    bpffs.mkdir()
    results: dict[str, list[tuple[float, float, float]]] = {m: [] for m in MODES}
    with tempfile.TemporaryDirectory(prefix="flowmon-vs-sfd-") as t, netns_pair() as pair:
        tmp = Path(t)
        subprocess.run(["ip", "-n", pair.a, "link", "set", "lo", "up"], check=True)
        (tmp / "nfcapd").mkdir()
        collector = "127.0.0.1:9995"
        procs = [
            subprocess.Popen(
                [
                    "ip",
                    "netns",
                    "exec",
                    pair.a,
                    "nfcapd",
                    "-w",
                    str(tmp / "nfcapd"),
                    "-p",
                    "9995",
                    "-b",
                    "127.0.0.1",
                    "-t",
                    "3600",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            ),  # fmt: skip
            subprocess.Popen(
                ["ip", "netns", "exec", pair.b, "iperf3", "-s"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            ),
        ]
        try:
            time.sleep(0.5)  # iperf3 -s and nfcapd have no readiness signal
            rnd = Round(pair, tmp, collector, bpffs)
            for r in range(args.rounds):
                order = MODES[r % 3 :] + MODES[: r % 3]  # rotated: no mode always runs first
                for mode in order:
                    results[mode].append(rnd.measure(mode, args.seconds))
                    print(f"round {r + 1} {mode}: {results[mode][-1]}", file=sys.stderr)
        finally:
            for p in procs:
                stop(p)
            shutil.rmtree(bpffs, ignore_errors=True)
    med = {m: [statistics.median(x[i] for x in results[m]) for i in range(3)] for m in MODES}
    none_gbps, sfd_cpu = med["none"][0], med["softflowd"][1]
    rows = [
        (
            mode,
            round(med[mode][0], 2),
            round(med[mode][0] / none_gbps, 3),
            "-" if mode == "none" else round(med[mode][1], 3),
            "-" if mode != "flowmon" else round(med[mode][2], 3),
            "-" if mode == "none" else round(med[mode][1] / sfd_cpu, 3),
        )
        for mode in MODES
    ]
    print(
        table(
            ["agent", "Gbit/s (median)", "vs none", "agent CPU s", "of which BPF s", "CPU vs softflowd"], rows
        )
    )
    print(f"{args.rounds} interleaved rounds of {args.seconds} s iperf3 each; CPU over the iperf3 run only")


if __name__ == "__main__":
    main()
