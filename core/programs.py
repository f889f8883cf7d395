"""What a plugin declares about its BPF programs: the source file and where each function attaches."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

Direction = Literal["ingress", "egress"]


@dataclass(frozen=True)
class TC:
    """Attach ``fn`` as a direct-action cls_bpf filter on the clsact hook of ``iface``.

    Programs on one (interface, direction) run in ascending ``order`` (it becomes the TC
    priority, 1..49151; 49152 and up are left to other tools). Returning ``TC_ACT_UNSPEC`` passes to the next program. Conventional
    orders: observers 100 (flowmon), conntrack 200, policy 300 (firewall), forwarding 400 (tunnel).
    """

    iface: str
    direction: Direction
    fn: str
    order: int


@dataclass(frozen=True)
class Tracepoint:
    """Attach ``fn`` to the tracepoint ``category:event`` (``skb:kfree_skb``)."""

    tracepoint: str
    fn: str


Attach = TC | Tracepoint


@dataclass(frozen=True)
class Program:
    """One BPF C file of a plugin, compiled once by BCC, with the attach points of its functions.

    ``name`` keys the compiled object in ``ctx.bpf``; ``cflags`` are added to the agent's own.
    """

    name: str
    source: Path
    attach: Sequence[Attach] = ()
    cflags: Sequence[str] = field(default_factory=tuple)
