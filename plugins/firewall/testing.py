"""Loading the firewall's programs without the agent: for its kernel tests and benchmarks."""

from __future__ import annotations

import contextlib
import shutil
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

from sluice.bpf import loader
from sluice.programs import Program

from .maps import FirewallMaps

SOURCE = Path(__file__).parent / "firewall.bpf.c"


@contextlib.contextmanager
def loaded(
    functions: Sequence[str], cflags: Sequence[str] = ()
) -> Iterator[tuple[FirewallMaps, dict[str, int]]]:
    """Compile the firewall under a private bpffs root and load ``functions``: ``(maps, fds)``.

    Settings hold their defaults; everything (pins included) is removed on the way out."""
    root = Path("/sys/fs/bpf") / f"sluice-test-{uuid.uuid4().hex[:8]}"
    root.mkdir()
    bpf = maps = None
    try:
        bpf = loader.compile_program("firewall", Program("firewall", SOURCE), bpffs=root, cflags=list(cflags))
        fds = {fn: loader.load_tc(bpf, "firewall", fn) for fn in functions}
        maps = FirewallMaps.from_pins(root / "sluice" / "firewall")
        maps.init_settings({})
        yield maps, fds
    finally:
        if maps is not None:
            maps.close()
        if bpf is not None:
            bpf.cleanup()
        shutil.rmtree(root, ignore_errors=True)
