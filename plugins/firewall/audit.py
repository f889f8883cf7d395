"""Reading audit events from the pinned ring buffer ``fw_audit``.

The datapath writes one event per blocked decision (every decision while ``monitor`` is 1),
bounded per CPU by the ``audit-rate`` setting; events it could not write (ring full) or chose not
to (over the rate) are counted in ``audit_lost`` and ``audit_rate_limited``. One reader at a time
consumes the ring: the agent (to structlog) or ``sluice fw audit --follow`` when the agent is down.
"""

from __future__ import annotations

import ctypes as ct
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from sluice.bpf import libbpf

from .maps import PROTO_NAMES, REASONS, AuditEvent, addr_text


def event_dict(ev: AuditEvent) -> dict:
    f = ev.flow
    return {
        "ts_ns": ev.ts_ns,
        "action": "allow" if ev.action == 0 else "deny",
        "reason": REASONS.get(ev.reason, str(ev.reason)),
        "audit_mode": bool(ev.audit_mode),
        "direction": "from-client" if ev.direction == 0 else "to-client",
        "src": addr_text(f.saddr),
        "dst": addr_text(f.daddr),
        "sport": f.sport,
        "dport": f.dport,
        "proto": PROTO_NAMES.get(f.proto, str(f.proto)),
        "net_id": ev.net_id,
        "rule": ev.rule_order,
        "ifindex": ev.ifindex,
    }


class AuditReader:
    """Consume ``<pin_dir>/fw_audit``; :meth:`poll` returns the decoded events that arrived."""

    def __init__(self, pin_dir: Path):
        path = pin_dir / "fw_audit"
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: is the firewall plugin loaded?")
        from bcc.libbcc import _RINGBUF_CB_TYPE, lib

        self._fd = libbpf.obj_get(path)
        self._events: list[dict] = []
        self._lock = threading.Lock()  # close() waits for a poll running in another thread

        def on_event(_ctx, data, size):
            if size >= ct.sizeof(AuditEvent):
                self._events.append(event_dict(ct.cast(data, ct.POINTER(AuditEvent)).contents))
            return 0

        self._cb = _RINGBUF_CB_TYPE(on_event)  # referenced: libbcc keeps only the pointer
        self._lib = lib
        self._rb = lib.bpf_new_ringbuf(self._fd, self._cb, None)
        if not self._rb:
            os.close(self._fd)
            raise OSError(f"cannot open the ring buffer {path}")

    def poll(self, timeout_ms: int = 200) -> list[dict]:
        with self._lock:
            if self._fd >= 0:
                self._lib.bpf_poll_ringbuf(self._rb, timeout_ms)
            out, self._events = self._events, []
        return out

    def follow(
        self, stop: Callable[[], bool] = lambda: False, timeout_s: float | None = None
    ) -> Iterator[dict]:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not stop() and (deadline is None or time.monotonic() < deadline):
            yield from self.poll()

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                self._lib.bpf_free_ringbuf(self._rb)
                os.close(self._fd)
                self._fd = -1

    def __enter__(self) -> AuditReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
