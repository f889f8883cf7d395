"""Consuming a BPF ring buffer pinned on bpffs, without compiling anything.

Uses libbcc's ring-buffer manager (``bpf_new_ringbuf``/``bpf_poll_ringbuf``), which works on any
map fd, so the CLI reads a plugin's events while the agent is down.
"""

from __future__ import annotations

import ctypes as ct
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from sluice.bpf import libbpf


class PinnedRingBuffer:
    """Read the ring buffer pinned at ``path``; ``decode(record)`` turns each record (a ctypes
    instance of ``record_type``) into what :meth:`poll` returns. Shorter records are skipped."""

    def __init__(self, path: Path, record_type: type, decode: Callable[[Any], Any]):
        from bcc.libbcc import _RINGBUF_CB_TYPE, lib

        self._fd = libbpf.obj_get(path)
        self._items: list = []
        self._lock = threading.Lock()  # close() waits for a poll running in another thread

        def on_record(_ctx, data, size):
            if size >= ct.sizeof(record_type):
                self._items.append(decode(ct.cast(data, ct.POINTER(record_type)).contents))
            return 0

        self._cb = _RINGBUF_CB_TYPE(on_record)  # referenced: libbcc keeps only the pointer
        self._lib = lib
        self._rb = lib.bpf_new_ringbuf(self._fd, self._cb, None)
        if not self._rb:
            os.close(self._fd)
            raise OSError(f"cannot open the ring buffer {path}")

    def poll(self, timeout_ms: int = 200) -> list:
        """The records that arrived, waiting up to ``timeout_ms`` for the first."""
        with self._lock:
            if self._fd >= 0:
                self._lib.bpf_poll_ringbuf(self._rb, timeout_ms)
            out, self._items = self._items, []
        return out

    def follow(self, stop: Callable[[], bool] = lambda: False, timeout_s: float | None = None) -> Iterator:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not stop() and (deadline is None or time.monotonic() < deadline):
            yield from self.poll()

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                self._lib.bpf_free_ringbuf(self._rb)
                os.close(self._fd)
                self._fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
