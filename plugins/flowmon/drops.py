"""Drop-reason names of the running kernel, read from the kfree_skb tracepoint's format.

The tracepoint's ``print fmt`` carries the kernel's own symbol table for ``enum skb_drop_reason``
(``__print_symbolic(REC->reason, { 2, "NOT_SPECIFIED" }, ...)``), so names follow the kernel
actually running instead of a list compiled into sluice.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

TRACEFS = (Path("/sys/kernel/tracing"), Path("/sys/kernel/debug/tracing"))
FORMAT = Path("events/skb/kfree_skb/format")
_SYMBOL = re.compile(r'\{\s*(\d+)\s*,\s*"(\w+)"\s*\}')


def parse_reasons(fmt: str) -> dict[int, str]:
    """``{value: name}`` from a tracepoint format's ``print fmt`` line."""
    for line in fmt.splitlines():
        if line.startswith("print fmt:"):
            return {int(v): name for v, name in _SYMBOL.findall(line)}
    return {}


@functools.cache
def kernel_reasons() -> dict[int, str]:
    """The running kernel's drop reasons; empty when tracefs is not mounted."""
    for root in TRACEFS:
        try:
            return parse_reasons((root / FORMAT).read_text())
        except OSError:
            continue
    return {}


def reason_name(value: int) -> str:
    return kernel_reasons().get(value, str(value))
