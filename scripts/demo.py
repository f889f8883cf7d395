"""`make demo`: the lab, the agent on its embedded default config, real traffic, what each plugin saw.

Everything it makes is removed at the end, also when a step fails; the last line says whether
anything was left behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from sluice.lab import OVERLAY_PEER_ADDR, Lab, LabSpec, lab_cleanup_all
from sluice.testing import AgentProcess

PREFIX = "sl-"
SOCKET = Path("/run/sluice/sluice.sock")

# What to show per built-in plugin once traffic has flowed: CLI argv after `sluice`.
SHOW = {
    "core": [["plugins", "list"], ["hooks"], ["maps", "list"]],
    "flowmon": [["flows", "list", "--host", "10.99.1.2"], ["flows", "dns"], ["flows", "drops"]],
    "conntrack": [["ct", "list", "--limit", "10"], ["ct", "count"]],
    "firewall": [["fw", "counters"], ["fw", "sessions"], ["fw", "dns"], ["fw", "audit"]],
    "tunnel": [["tunnel", "routes"], ["tunnel", "health"], ["tunnel", "devices"]],
    "replication": [["repl", "status"], ["repl", "list", "--owner", "firewall", "--limit", "10"]],
}


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def sluice(*argv: str, check: bool = False) -> int:
    print(f"$ sluice {' '.join(argv)}", flush=True)
    cmd = [sys.executable, "-m", "sluice", "--netns", f"{PREFIX}gw", *argv]
    return subprocess.run(cmd, check=check).returncode


def drive_traffic(lab: Lab) -> None:
    server = lab.popen("server", [sys.executable, "-m", "http.server", "8080", "--bind", "::"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        time.sleep(0.5)
        for family in (4, 6):
            show_ping(lab, lab.addr("server", family), "server")
        gateway = lab.addr("gw-ingress")  # the firewall's DNS proxy: answers become allows
        for name, qtype in (
            ("allowed.test", "A"),
            ("allowed.test", "AAAA"),
            ("cname.test", "A"),
            ("other.test", "A"),
        ):
            try:
                reply = lab.dns_query("client", name, qtype, server=gateway)
                rcode = {0: "NOERROR", 3: "NXDOMAIN", 5: "REFUSED"}.get(reply.rcode, reply.rcode)
                print(f"dns via the gateway {name} {qtype}: {rcode} {[a.data for a in reply.answers]}")
            except Exception as exc:
                print(f"dns {name} {qtype}: {exc}")
        for url, why in (
            ("http://10.99.2.2:8080/", "allowed.test, learned from its DNS answer"),
            ("http://[fd00:99:2::2]:8080/", "allowed.test's AAAA"),
            ("http://10.99.2.3:8080/", "other.test: no rule allows it"),
        ):
            out = lab.exec(
                "client", ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-m", "2", url], check=False
            )
            print(f"http {url} ({why}): {'blocked' if out.stdout in ('', '000') else out.stdout}")
        show_ping(lab, OVERLAY_PEER_ADDR, "the overlay behind the tunnel peer (VXLAN by the tunnel plugin)")
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(5)


def show_ping(lab: Lab, addr: str, what: str) -> None:
    out = lab.exec("client", ["ping", "-c", "3", "-i", "0.2", "-W", "1", "-n", addr], check=False)
    summary = next((ln for ln in out.stdout.splitlines() if "packets transmitted" in ln), out.stderr.strip())
    print(f"ping {addr} ({what}): {summary}")


def leftovers() -> list[str]:
    left = (
        [f"netns {p.name}" for p in Path("/run/netns").glob(f"{PREFIX}*")]
        if Path("/run/netns").exists()
        else []
    )
    if Path("/sys/fs/bpf/sluice").exists():
        left.append("pins under /sys/fs/bpf/sluice")
    ps = subprocess.run(
        [
            "pgrep",
            "-f",
            "sluice.*agent run|nats-server -c /run/sluice|nats-server -js -sd /run/sluice|dnsmasq.*/run/sluice",
        ],
        capture_output=True,
        text=True,
    )
    left += [f"process {pid}" for pid in ps.stdout.split() if int(pid) != os.getpid()]
    return left


def main() -> int:
    t0 = time.monotonic()
    log = Path("/run/sluice/demo-agent.log")
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("")
    lab = None
    agent = None
    try:
        say("lab up: client -- gw -- server, tunnel peer, DNS (dnsmasq), NATS")
        lab = Lab.up(LabSpec(prefix=PREFIX))
        say("agent: every built-in plugin on the embedded default config, in the gateway's namespace")
        agent = AgentProcess(None, lab.ns("gw"), None, log, SOCKET)
        ready = agent.start(timeout=90)
        print(
            f"ready: {ready.get('ready')}  "
            + ", ".join(f"{n}={p['state']}" for n, p in ready["plugins"].items())
        )
        say("traffic from the client through the gateway, and into the overlay behind the tunnel peer")
        drive_traffic(lab)
        time.sleep(1)
        for section, commands in SHOW.items():
            say(f"what {section} saw")
            for argv in commands:
                sluice(*argv)
        say("agent log (last lines)")
        print("\n".join(log.read_text().splitlines()[-8:]))
    finally:
        say("teardown")
        if agent:
            agent.stop()
        sluice("cleanup")
        try:
            if lab:
                lab.down()
            lab_cleanup_all(f"{PREFIX}*")
        except Exception as exc:
            print(f"lab teardown: {exc}".splitlines()[0])
        left = leftovers()
        print(f"done in {time.monotonic() - t0:.0f}s; left behind: {', '.join(left) if left else 'nothing'}")
    return 1 if left else 0


if __name__ == "__main__":
    sys.exit(main())
