"""Agent cold start with every built-in plugin, and resident memory at idle.

    python benchmarks/core/bench_agent.py [--trials N] [--idle S] [--timeout S]

Brings up a namespace lab with a unique prefix (torn down at the end, whatever happens), then per
trial, for an agent with NO plugins (the baseline) and one with every built-in plugin (the
embedded default's list), alternately:

* writes a config with a private bpffs root (/sys/fs/bpf/sluice-bench-<rand>), a temporary
  state_dir and no metrics listener;
* spawns ``python -m sluice --netns <prefix>gw agent run -c <config>`` and times spawn → the
  first answer of /readyz on the agent's unix socket (200 or 503: both mean it finished starting;
  the status and each plugin's state are recorded);
* after ``--idle`` seconds reads VmRSS and VmHWM of the agent (and VmRSS of its child processes,
  e.g. an embedded nats-server), then SIGTERMs it and runs ``sluice cleanup`` for that config.

Plugins that fail to start do not stop the benchmark: their states are reported. Target: cold
start under 10 s and under 300 MB resident. When the full start takes over 3 s, one more start
runs under ``python -X importtime`` and the ten most expensive imports are printed.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.common import table  # noqa: E402
from sluice import config  # noqa: E402
from sluice.lab import Lab, LabSpec  # noqa: E402

TARGET_S, TARGET_MB = 10.0, 300.0
IMPORTTIME_OVER_S = 3.0


def builtin_plugins() -> list[str]:
    """The plugins of the embedded default config: every built-in one."""
    return list(config.parse(config.default_text(), "<embedded default>").agent.plugins)


def readyz(sock_path: Path, timeout: float = 5.0) -> tuple[int, dict]:
    class Conn(http.client.HTTPConnection):
        def connect(self):
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(timeout)
            self.sock.connect(str(sock_path))

    conn = Conn("localhost", timeout=timeout)
    try:
        conn.request("GET", "/readyz")
        resp = conn.getresponse()
        body = resp.read()
    finally:
        conn.close()
    try:
        return resp.status, json.loads(body)
    except ValueError:
        return resp.status, {"raw": body.decode(errors="replace")[:200]}


def proc_status(pid: int) -> dict[str, str]:
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return {}
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


def kb(status: dict[str, str], field: str) -> int:
    return int(status.get(field, "0 kB").split()[0])


def descendants(pid: int) -> list[tuple[int, str]]:
    """``(pid, starttime)`` of every live descendant of ``pid``."""
    parent: dict[int, int] = {}
    start: dict[int, str] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2 :].split()
            parent[int(d.name)], start[int(d.name)] = int(fields[1]), fields[19]
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for c, pp in parent.items():
            if pp == p:
                out.append((c, start[c]))
                todo.append(c)
    return out


def kill_if_same(pid: int, starttime: str) -> None:
    """SIGKILL a leftover child we saw earlier, unless its pid was reused since."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return
    if stat[stat.rindex(")") + 2 :].split()[19] == starttime:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def write_config(path: Path, plugins: list[str], bpffs: Path, state_dir: Path) -> None:
    path.write_text(
        "[agent]\n"
        f"plugins = {json.dumps(plugins)}\n"
        f'bpffs = "{bpffs}"\n'
        f'state_dir = "{state_dir}"\n'
        'metrics_address = ""\n'
        'log_level = "info"\n'
    )


def sluice_argv(netns: str, *args: str, python_flags: tuple[str, ...] = ()) -> list[str]:
    return [sys.executable, *python_flags, "-m", "sluice", "--netns", netns, *args]


def one_start(
    netns: str,
    plugins: list[str],
    work: Path,
    idle: float,
    timeout: float,
    python_flags: tuple[str, ...] = (),
) -> dict:
    """Start, time, sample, stop, clean up one agent. Never raises for agent failures."""
    tag = secrets.token_hex(4)
    bpffs = Path(f"/sys/fs/bpf/sluice-bench-{tag}")
    state_dir = work / f"state-{tag}"
    cfg = work / f"agent-{tag}.toml"
    log_path, err_path = work / f"agent-{tag}.log", work / f"agent-{tag}.stderr"
    bpffs.mkdir()
    state_dir.mkdir()
    write_config(cfg, plugins, bpffs, state_dir)
    sock = state_dir / "sluice.sock"
    result: dict = {"config": str(cfg), "log": str(log_path), "stderr": str(err_path)}
    argv = sluice_argv(netns, "agent", "run", "-c", str(cfg), python_flags=python_flags)
    children: list[tuple[int, str]] = []
    with open(log_path, "wb") as out, open(err_path, "wb") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        try:
            deadline = t0 + timeout
            while True:
                if proc.poll() is not None:
                    result["error"] = f"agent exited with {proc.returncode} before serving"
                    break
                if time.perf_counter() > deadline:
                    result["error"] = f"no /readyz answer within {timeout:.0f}s"
                    break
                if sock.exists():
                    try:
                        status, body = readyz(sock)
                    except OSError:
                        status = None
                    if status in (200, 503):
                        result["seconds"] = time.perf_counter() - t0
                        result["status"] = status
                        result["plugins"] = {
                            n: p.get("state", "?") + ("" if p.get("ready") else f" ({p.get('reason', '')})")
                            for n, p in body.get("plugins", {}).items()
                        }
                        break
                time.sleep(0.02)
            if "seconds" in result:
                time.sleep(idle)
                if proc.poll() is None:
                    st = proc_status(proc.pid)
                    result["rss_mb"] = kb(st, "VmRSS") / 1024
                    result["hwm_mb"] = kb(st, "VmHWM") / 1024
                    children = descendants(proc.pid)
                    result["children_mb"] = sum(kb(proc_status(p), "VmRSS") for p, _ in children) / 1024
                    result["children"] = len(children)
                else:
                    result["error"] = f"agent exited with {proc.returncode} while idle"
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)
                    result["stop"] = "killed after 30 s"
            result["exit"] = proc.returncode
            for pid, start in children:
                kill_if_same(pid, start)
            clean = subprocess.run(
                sluice_argv(netns, "-c", str(cfg), "cleanup"), capture_output=True, text=True, timeout=120
            )
            result["cleanup"] = (clean.stdout or clean.stderr).strip().splitlines()[-1:] or [""]
            if clean.returncode:
                result["cleanup"] = [f"FAILED ({clean.returncode}): {result['cleanup'][0]}"]
            shutil.rmtree(bpffs, ignore_errors=True)
            shutil.rmtree(state_dir, ignore_errors=True)
    if "error" in result:
        tail = (
            Path(err_path).read_text(errors="replace")[-1500:]
            + Path(log_path).read_text(errors="replace")[-1500:]
        )
        result["tail"] = tail
    return result


def importtime_top(stderr_path: Path, n: int = 10) -> tuple[list[tuple], float]:
    """The ``n`` imports with the largest self time, and the sum of all self times (seconds)."""
    rows = []
    for line in stderr_path.read_text(errors="replace").splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        self_us, cum_us, name = (x.strip() for x in line[len("import time:") :].split("|"))
        rows.append((name.strip(), int(self_us) / 1e3, int(cum_us) / 1e3))
    total = sum(r[1] for r in rows) / 1e3
    return sorted(rows, key=lambda r: -r[1])[:n], total


def summary_rows(name: str, runs: list[dict]) -> tuple:
    ok = [r for r in runs if "seconds" in r]
    secs = [r["seconds"] for r in ok]
    rss = [r["rss_mb"] for r in ok if "rss_mb" in r]
    hwm = [r["hwm_mb"] for r in ok if "hwm_mb" in r]
    kids = [r["children_mb"] for r in ok if "children_mb" in r]
    statuses = ",".join(sorted({str(r.get("status", "error")) for r in runs}))

    def mm(xs):
        return (min(xs), statistics.median(xs)) if xs else ("-", "-")

    return (name, f"{len(ok)}/{len(runs)}", statuses, *mm(secs), *mm(rss), mm(hwm)[1], mm(kids)[1])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--idle", type=float, default=5.0, help="seconds after ready before sampling RSS")
    ap.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for /readyz")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (configs, logs)")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("needs root (namespaces, BPF)")

    plugins = builtin_plugins()
    prefix = f"sb{secrets.token_hex(2)}-"
    work = Path(tempfile.mkdtemp(prefix="sluice-bench-agent-"))
    runs: dict[str, list[dict]] = {"no plugins": [], "all built-in": []}
    importtime: tuple[list[tuple], float, float | None] | None = None
    lab = None
    try:
        t = time.perf_counter()
        lab = Lab.up(LabSpec(prefix=prefix))
        print(f"lab {prefix} up in {time.perf_counter() - t:.1f} s; built-in plugins: {', '.join(plugins)}")
        netns = lab.ns("gw")
        for trial in range(args.trials):
            for name, enabled in (("no plugins", []), ("all built-in", plugins)):
                r = one_start(netns, enabled, work, args.idle, args.timeout)
                runs[name].append(r)
                took = f"{r['seconds']:.2f} s" if "seconds" in r else r.get("error")
                print(f"  trial {trial + 1} {name}: {took}, rss {r.get('rss_mb', 0):.0f} MB", flush=True)
                if "error" in r:
                    print("    " + r["tail"].replace("\n", "\n    "))
        full = [r["seconds"] for r in runs["all built-in"] if "seconds" in r]
        if full and statistics.median(full) > IMPORTTIME_OVER_S:
            r = one_start(netns, plugins, work, 0.0, args.timeout, python_flags=("-X", "importtime"))
            top, total = importtime_top(Path(r["stderr"]))
            importtime = (top, total, r.get("seconds"))
    finally:
        if lab is not None:
            try:
                lab.down()
            except Exception as exc:
                print(f"warning: lab {prefix} down: {exc}", file=sys.stderr)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    print()
    print(
        f"agent cold start (spawn → /readyz answers) and idle memory after {args.idle:g} s, {args.trials} trials"
    )
    headers = [
        "agent",
        "started",
        "readyz",
        "min s",
        "median s",
        "min RSS MB",
        "median RSS MB",
        "median peak (HWM) MB",
        "children RSS MB",
    ]
    rows = [summary_rows(name, rs) for name, rs in runs.items()]
    print(table(headers, rows))
    base = [r["seconds"] for r in runs["no plugins"] if "seconds" in r]
    full = [r["seconds"] for r in runs["all built-in"] if "seconds" in r]
    full_rss = [r["rss_mb"] + r.get("children_mb", 0) for r in runs["all built-in"] if "rss_mb" in r]
    if base and full:
        ratio = statistics.median(full) / statistics.median(base)
        print(f"cold start, all built-in ÷ no plugins (medians): {ratio:.1f}x")
    print(f"target: under {TARGET_S:g} s, under {TARGET_MB:g} MB", end="")
    if full and full_rss:
        s, mb = statistics.median(full), statistics.median(full_rss)
        verdict = "met" if s < TARGET_S and mb < TARGET_MB else "NOT met"
        print(f"; all built-in: {s:.2f} s, {mb:.0f} MB agent+children → {verdict}")
    else:
        print("; all built-in: never answered /readyz → NOT met")

    print()
    print("plugin states at /readyz (all built-in), per trial:")
    for i, r in enumerate(runs["all built-in"], 1):
        if "plugins" in r:
            states = "; ".join(f"{n}: {s}" for n, s in r["plugins"].items())
            print(f"  trial {i}: readyz {r['status']}: {states}")
        else:
            print(f"  trial {i}: {r.get('error')}")
        print(
            f"           exit {r['exit']}{', ' + r['stop'] if 'stop' in r else ''}; cleanup: {r['cleanup'][0]}"
        )
    if importtime:
        top, total, secs = importtime
        took = f"{secs:.2f} s" if secs else "did not start"
        print()
        print(
            f"note: the full start exceeds {IMPORTTIME_OVER_S:g} s; one more start under -X importtime "
            f"({took}, imports {total:.2f} s in total, self times summed), top 10 imports by self time:"
        )
        print(table(["module", "self ms", "cumulative ms"], top))


if __name__ == "__main__":
    main()
