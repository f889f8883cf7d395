"""Test-only plugin: attach fixed-verdict programs where the config says.

``probe_count`` counts and passes on (slot 0 of ``probe_seen``), ``probe_pass`` ends the chain
with TC_ACT_OK (slot 1), ``probe_drop`` drops UDP to ``drop_udp_port`` (slot 2) and passes on
everything else. ``seen_max`` changes a map's capacity, to exercise the pin-shape check.
"""

from __future__ import annotations

import ctypes as ct
from pathlib import Path
from typing import Literal

import pydantic

from sluice import hookimpl
from sluice.programs import TC, Program, Tracepoint


class Attach(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    fn: Literal["probe_count", "probe_pass", "probe_drop"]
    iface: str
    direction: Literal["ingress", "egress"] = "ingress"
    phase: str = "observe"  # checked by the core, like any plugin's declaration
    order: int = 0


class Config(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    attach: list[Attach] = []
    drop_udp_port: int = 0
    seen_max: int = 16
    count_drops: bool = False  # a tracepoint program on skb:kfree_skb


@hookimpl
def sluice_config_schema():
    return Config


@hookimpl
def sluice_requirements():
    return ["tc"]


@hookimpl
def sluice_programs(ctx):
    points = [TC(a.iface, a.direction, a.fn, a.phase, a.order) for a in ctx.config.attach]
    drops = Program(
        "drops",
        Path(__file__).parent / "drops.bpf.c",
        [Tracepoint("skb:kfree_skb", "tracepoint__skb__kfree_skb")],
    )
    return [drops] * ctx.config.count_drops + [
        Program(
            "chainprobe",
            Path(__file__).parent / "chainprobe.bpf.c",
            points,
            cflags=[f"-DCHAINPROBE_SEEN_MAX={ctx.config.seen_max}"],
        )
    ]


@hookimpl
def sluice_start(ctx):
    ctx.table("probe_drop_port").set(ct.c_uint32(0), ct.c_uint32(ctx.config.drop_udp_port))


@hookimpl
def sluice_reload(ctx, old_config):
    sluice_start(ctx)
