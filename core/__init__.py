"""sluice: a pluggable eBPF network agent.

Plugins implement the hooks declared in :mod:`sluice.hookspecs` with the :data:`hookimpl` marker and
register a module under the ``sluice.plugins`` entry-point group.
"""

import pluggy

__version__ = "0.1.0"

PROJECT = "sluice"
hookimpl = pluggy.HookimplMarker(PROJECT)

__all__ = ["hookimpl", "__version__", "PROJECT"]
