"""The lab plus a firewall agent for the lab benchmarks (the lab tests' agent and config)."""

from __future__ import annotations

import contextlib
import shutil
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from sluice import kernel  # noqa: E402
from tests.lab.test_firewall_lab import Agent  # noqa: E402
from tests.netlab import lab  # noqa: E402


@contextlib.contextmanager
def lab_and_agent() -> Iterator[tuple[object, Agent, Path]]:
    """A fresh lab and an Agent (not started) with private state and bpffs: ``(lab, agent, bpffs)``.

    The agent is stopped and everything removed on the way out."""
    kernel.prepare_bcc(Path("/var/cache/sluice"))
    root = Path(f"/tmp/sluice-bench-{uuid.uuid4().hex[:8]}")
    root.mkdir()
    bpffs = Path("/sys/fs/bpf") / f"sluice-bench-{uuid.uuid4().hex[:8]}"
    bpffs.mkdir()
    try:
        with lab() as lab_:
            agent = Agent(lab_, root, bpffs)
            try:
                yield lab_, agent, bpffs
            finally:
                agent.stop()
    finally:
        shutil.rmtree(bpffs, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)
