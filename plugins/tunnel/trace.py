"""The tunnel's four trace numbers (tunnel.bpf.c's header comment) decoded for people and JSON."""

from __future__ import annotations

from sluice.plugins.tunnel.model import _protocol_label, network_of

WHY = {
    1: "single nexthop (used even if unhealthy)",
    2: "rendezvous hash over healthy",
    3: "no healthy nexthop",
}
NOT_RUN_SET_KEY = 1


def _s32(v: int) -> int:
    return v - (1 << 32) if v & 0x80000000 else v


def decode_detail(detail: list[int], reason: str) -> dict:
    """What the tunnel program reported for one packet; empty for events without a route."""
    if reason in ("miss", "not-ip", "malformed"):
        return {}
    d0, d1, d2, d3 = detail
    prefix = d0.to_bytes(8, "little") + d1.to_bytes(8, "little")
    chosen = (d2 >> 16) & 0xF
    out = {
        "route": str(network_of(prefix, d2 & 0xFF)),
        "candidates": (d2 >> 8) & 0xF,
        "healthy_mask": (d2 >> 12) & 0xF,
        "chosen": None if chosen == 0xF else chosen,
        "why": WHY.get((d2 >> 20) & 0xF, "?"),
    }
    if out["chosen"] is not None:
        set_key = _s32(d3 & 0xFFFFFFFF)
        out |= {
            "protocol": _protocol_label((d2 >> 24) & 0xFF),
            "vni": d2 >> 32,
            "set_key": None if set_key == NOT_RUN_SET_KEY else set_key,
            "redirect": _s32(d3 >> 32),
        }
    return out


def format_detail(d: dict) -> str:
    if not d:
        return ""
    text = f"route {d['route']} candidates {d['candidates']} healthy {d['healthy_mask']:04b}"
    if d["chosen"] is None:
        return f"{text}: {d['why']}"
    set_key = "n/a" if d["set_key"] is None else d["set_key"]
    return (
        f"{text} chose #{d['chosen']} ({d['why']}) {d['protocol']} vni {d['vni']} "
        f"set-key {set_key} redirect {d['redirect']}"
    )
