"""What a plugin declares about its BPF programs: the source file and where each function attaches."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

Direction = Literal["ingress", "egress"]
Phase = Literal["observe", "classify", "enforce", "rewrite"]
FailMode = Literal["open", "closed"]

PHASES: tuple[Phase, ...] = ("observe", "classify", "enforce", "rewrite")
PHASE_WIDTH = 100  # orders 0..99 inside a phase
PROLOGUE_PRIO = 1  # the core's prologue runs before every phase


@dataclass(frozen=True)
class TC:
    """Attach ``fn`` as a direct-action TC program on ``iface``'s ``direction`` hook.

    Programs on one hook run phase by phase, ``observe`` < ``classify`` < ``enforce`` <
    ``rewrite``, and by ``order`` (0..99) inside a phase; the pair is one slot, and its rank
    ``100 * (phase index + 1) + order`` is the TC priority (observe 100.., classify 200..,
    enforce 300.., rewrite 400..). Returning ``TC_ACT_UNSPEC`` passes to the next program.
    Two programs of the enabled plugins claiming one slot refuse the config before anything
    is attached.

    ``fail_mode`` says what the slot holds when this program fails to compile, load or attach
    and no earlier program of its plugin holds it: ``"open"`` leaves it empty (packets go on
    to the next program), ``"closed"`` makes the core attach a deny program (``TC_ACT_SHOT``)
    there until the plugin starts. ``None`` means closed in the enforce phase, open elsewhere.
    """

    iface: str
    direction: Direction
    fn: str
    phase: Phase = "enforce"
    order: int = 0
    fail_mode: FailMode | None = None

    @property
    def rank(self) -> int:
        return PHASE_WIDTH * (PHASES.index(self.phase) + 1) + self.order

    @property
    def fails_closed(self) -> bool:
        return (self.fail_mode or ("closed" if self.phase == "enforce" else "open")) == "closed"

    def problem(self) -> str:
        """Why this attach point cannot be placed ("" when it can)."""
        if self.phase not in PHASES:
            return f"unknown phase {self.phase!r} (one of {', '.join(PHASES)})"
        if (
            isinstance(self.order, bool)
            or not isinstance(self.order, int)
            or not 0 <= self.order < PHASE_WIDTH
        ):
            return f"order {self.order!r} outside 0..{PHASE_WIDTH - 1} of the {self.phase} phase"
        if self.fail_mode not in (None, "open", "closed"):
            return f"fail_mode {self.fail_mode!r} is not open or closed"
        return ""


def phase_of(rank: int) -> tuple[str, int]:
    """(phase, order) of a TC priority; other tools' priorities are ("", prio)."""
    if rank == PROLOGUE_PRIO:
        return "prologue", 0
    index, order = divmod(rank, PHASE_WIDTH)
    if 1 <= index <= len(PHASES):
        return PHASES[index - 1], order
    return "", rank


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
