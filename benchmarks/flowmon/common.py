"""What the flowmon benchmarks share: a compiled datapath under a private pin root."""

from __future__ import annotations

import contextlib
import shutil
import uuid
from pathlib import Path

from sluice import kernel
from sluice.plugins.flowmon.config import Config
from sluice.plugins.flowmon.monitor import FlowMonitor, compile_datapath


@contextlib.contextmanager
def flowmon_datapath(config: Config):
    """``(bpf, monitor, pin_root)`` for flowmon compiled with ``config``; all removed after."""
    kernel.prepare_bcc(Path("/var/cache/sluice"))
    root = Path("/sys/fs/bpf") / f"sluice-bench-{uuid.uuid4().hex[:8]}"
    root.mkdir()
    try:
        bpf = compile_datapath(root, config)
        mon = FlowMonitor(root / "sluice" / "flowmon")
        mon.configure(config)
        try:
            yield bpf, mon, root
        finally:
            mon.close()
            bpf.cleanup()
    finally:
        shutil.rmtree(root, ignore_errors=True)
