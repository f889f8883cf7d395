"""Helpers for testing sluice and its plugins against the real agent (shipped for plugin authors)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from sluice.client import AgentClient


class AgentProcess:
    """``sluice [--netns NS] agent run [-c CONFIG]`` as a subprocess, its output in ``log_path``.

    ``config=None`` runs the embedded default. ``plugin_path`` is prepended to PYTHONPATH so
    plugins installed there (``pip install --target``) are discovered through their entry points.
    """

    def __init__(
        self,
        config: Path | None,
        netns: str | None,
        plugin_path: Path | None,
        log_path: Path,
        socket_path: Path,
    ):
        self.config, self.netns, self.plugin_path = config, netns, plugin_path
        self.log_path, self.socket_path = Path(log_path), Path(socket_path)
        self.client = AgentClient(self.socket_path, timeout=5)
        self.proc: subprocess.Popen | None = None

    def start(self, wait_ready: bool = True, timeout: float = 60) -> dict | None:
        env = dict(os.environ)
        if self.plugin_path:
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(self.plugin_path), env.get("PYTHONPATH")]))
        argv = [sys.executable, "-m", "sluice"]
        if self.netns:
            argv += ["--netns", self.netns]
        argv += ["agent", "run"]
        if self.config:
            argv += ["-c", str(self.config)]
        if self.socket_path.exists():
            self.socket_path.unlink()  # a dead agent's socket must not pass for a live one
        self.log = open(self.log_path, "ab")  # noqa: SIM115 (closed in wait())
        self.proc = subprocess.Popen(argv, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        return self.wait_ready(timeout) if wait_ready else None

    def get(self, path: str) -> tuple[int, object]:
        return self.client.get(path)

    def wait_ready(self, timeout: float = 60) -> dict:
        """Wait until the API answers /readyz (ready or not); returns its body."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"agent exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                status, body = self.get("/readyz")
                if status in (200, 503):
                    return body
            except OSError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"agent not serving after {timeout}s:\n{self.log_tail()}")

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self.log.close()

    def stop(self) -> int | None:
        """SIGTERM and wait (SIGKILL after 30 s)."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                return self.wait(10)
        return self.proc.returncode if self.proc else None

    def kill(self) -> None:
        self.proc.kill()
        self.wait(10)
