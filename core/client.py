"""A small client for the agent's control API on its unix socket (the CLI and tests use it)."""

from __future__ import annotations

import http.client
import json
import socket
from pathlib import Path


class AgentUnavailable(OSError):
    """No agent answers on the socket."""


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self.path = str(path)

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.path)


class AgentClient:
    def __init__(self, socket_path: Path, timeout: float = 10.0):
        self.socket_path = Path(socket_path)
        self.timeout = timeout

    def request(self, method: str, path: str, body=None) -> tuple[int, object]:
        """Returns (status, decoded JSON or text). Raises AgentUnavailable when nobody answers."""
        if not self.socket_path.exists():
            raise AgentUnavailable(f"no agent socket at {self.socket_path}: is the agent running?")
        conn = _UnixConnection(self.socket_path, self.timeout)
        try:
            # bytes go as they are (tests send malformed JSON on purpose); anything else as JSON
            payload = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
            headers = {"Content-Type": "application/json"} if payload else {}
            conn.request(method, path, body=payload, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        except OSError as exc:
            raise AgentUnavailable(
                f"agent at {self.socket_path} does not answer: {exc.strerror or exc}"
            ) from None
        finally:
            conn.close()
        text = data.decode(errors="replace")
        try:
            return resp.status, json.loads(text)
        except ValueError:
            return resp.status, text

    def get(self, path: str) -> tuple[int, object]:
        return self.request("GET", path)

    def call(self, method: str, path: str, body=None):
        """The JSON answer of a successful call; an error answer raises ValueError with its message."""
        status, answer = self.request(method, path, body)
        if status >= 400:
            message = answer.get("error") if isinstance(answer, dict) else str(answer)
            raise ValueError(message or f"HTTP {status}")
        return answer
