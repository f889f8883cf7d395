"""Run the real agent as a subprocess (in a network namespace) and talk to its socket."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


class AgentProcess:
    """``sluice --netns NS agent run -c CONFIG``, its log in ``log_path``."""

    def __init__(
        self, config: Path, netns: str | None, plugin_path: Path | None, log_path: Path, socket_path: Path
    ):
        self.config, self.netns, self.plugin_path = config, netns, plugin_path
        self.log_path, self.socket_path = log_path, socket_path
        self.proc: subprocess.Popen | None = None

    def start(self, wait_ready: bool = True, timeout: float = 60) -> AgentProcess:
        env = dict(os.environ)
        if self.plugin_path:
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(self.plugin_path), env.get("PYTHONPATH")]))
        argv = [sys.executable, "-m", "sluice"]
        if self.netns:
            argv += ["--netns", self.netns]
        argv += ["agent", "run", "-c", str(self.config)]
        self.log = open(self.log_path, "ab")  # noqa: SIM115 (closed in wait())
        self.proc = subprocess.Popen(argv, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        if wait_ready:
            self.wait_ready(timeout)
        return self

    def get(self, path: str) -> tuple[int, object]:
        sock_path = str(self.socket_path)

        class Conn(http.client.HTTPConnection):
            def connect(self):
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.settimeout(5)
                self.sock.connect(sock_path)

        conn = Conn("localhost")
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read()
        return resp.status, json.loads(body) if body.startswith((b"{", b"[")) else body.decode()

    def wait_ready(self, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"agent exited with {self.proc.returncode}:\n{self.log_path.read_text()[-3000:]}"
                )
            try:
                status, body = self.get("/readyz")
                if status in (200, 503):
                    return body
            except OSError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"agent not serving after {timeout}s:\n{self.log_path.read_text()[-3000:]}")

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self.log.close()

    def stop(self) -> int | None:
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
