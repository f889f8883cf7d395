"""Reading audit events from the pinned ring buffer ``fw_audit``.

The datapath writes one event per blocked decision (every decision while ``monitor`` is 1),
bounded per CPU by the ``audit-rate`` setting; events it could not write (ring full) or chose not
to (over the rate) are counted in ``audit_lost`` and ``audit_rate_limited``. One reader at a time
consumes the ring: the agent (to structlog) or ``sluice fw audit --follow`` when the agent is down.
"""

from __future__ import annotations

from pathlib import Path

from sluice.bpf.ringbuf import PinnedRingBuffer

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


class AuditReader(PinnedRingBuffer):
    """Consume ``<pin_dir>/fw_audit``; :meth:`poll` returns the decoded events that arrived."""

    def __init__(self, pin_dir: Path):
        path = pin_dir / "fw_audit"
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: is the firewall plugin loaded?")
        super().__init__(path, AuditEvent, event_dict)
