"""``sluice doctor``: prepare the kernel side as far as sluice can, then report every feature."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

from sluice.kernel import Check, mount_filesystems, probe


def run_doctor(cache_dir: Path) -> list[Check]:
    """Mount bpffs/tracefs if needed, then probe everything.

    The probe's ``kernel-headers`` check is :func:`sluice.kernel.prepare_bcc`, so the header tree
    is built (or reused) and ``BCC_KERNEL_SOURCE`` set before anything compiles. Mounting goes
    first so the ``bpffs``, ``tracefs`` and ``tracepoints`` checks see the result.
    """
    return [*mount_filesystems(), *probe(cache_dir)]


def format_table(checks: Sequence[Check]) -> str:
    """Aligned CHECK / STATUS / DETAIL columns; a missing check gets its fix on the next line."""
    rows = [("CHECK", "STATUS", "DETAIL")] + [(c.name, "ok" if c.ok else "MISSING", c.detail) for c in checks]
    name_width = max(len(name) for name, _, _ in rows)
    status_width = max(len(status) for _, status, _ in rows)
    indent = " " * (name_width + status_width + 4)
    lines = []
    for (name, status, detail), check in zip(rows, [None, *checks], strict=True):
        lines.append(f"{name:<{name_width}}  {status:<{status_width}}  {detail}".rstrip())
        if check is not None and not check.ok and check.fix:
            lines.append(f"{indent}fix: {check.fix}")
    return "\n".join(lines)


def to_json(checks: Sequence[Check]) -> str:
    """The checks as a JSON list of ``{name, ok, detail, fix}`` objects (``sluice doctor --json``)."""
    return json.dumps([dataclasses.asdict(c) for c in checks], indent=2)
