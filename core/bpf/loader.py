"""Compile a plugin's BPF C with BCC, pin its maps, and check reused pins.

BCC's BPF_TABLE_PINNED reuses an existing pin without checking it. A pin left by an older build
with another type, key size, value size or capacity would then be used by code that disagrees
with it. Our policy: after compiling we compare every pinned map the module declares with the
kernel's view of the pin; on a mismatch we log both shapes, unpin the old map (its state is lost:
an incompatible layout cannot be carried over) and compile again so a fresh map is pinned. The old
map lives on until the programs still using it are replaced, so the datapath never sees a gap.
"""

from __future__ import annotations

import ctypes as ct
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import structlog

from sluice.bpf import libbpf
from sluice.programs import Program

log = structlog.get_logger("sluice.loader")

INCLUDE_DIR = Path(__file__).resolve().parent.parent.parent / "bpf" / "include"


def include_dir() -> Path:
    """The shared headers: the source tree's bpf/include, or the installed sluice.include package."""
    if (INCLUDE_DIR / "sluice" / "sluice.h").exists():
        return INCLUDE_DIR
    import sluice.include

    return Path(sluice.include.__file__).parent


def pin_dir(bpffs: Path, owner: str) -> Path:
    return bpffs / "sluice" / owner


@dataclass(frozen=True)
class MapShape:
    type: int
    key_size: int
    value_size: int
    max_entries: int

    def __str__(self) -> str:
        return f"{libbpf.type_name(self.type)} key={self.key_size} value={self.value_size} max_entries={self.max_entries}"


@dataclass(frozen=True)
class PinMismatch:
    path: Path
    declared: MapShape
    pinned: MapShape


class CompileError(Exception):
    """The BPF C did not compile or a program did not load; the message is one line."""


def _bcc_lib():
    from bcc.libbcc import lib

    for fn, res, args in (
        ("bpf_num_tables", ct.c_size_t, [ct.c_void_p]),
        ("bpf_table_name", ct.c_char_p, [ct.c_void_p, ct.c_size_t]),
        ("bpf_table_key_size_id", ct.c_size_t, [ct.c_void_p, ct.c_size_t]),
        ("bpf_table_leaf_size_id", ct.c_size_t, [ct.c_void_p, ct.c_size_t]),
        ("bpf_table_fd_id", ct.c_int, [ct.c_void_p, ct.c_size_t]),
    ):
        getattr(lib, fn).restype = res
        getattr(lib, fn).argtypes = args
    return lib


def declared_shapes(bpf) -> dict[str, tuple[MapShape, int]]:
    """Every map the compiled module declares: name → (declared shape, fd)."""
    lib = _bcc_lib()
    shapes = {}
    for i in range(lib.bpf_num_tables(bpf.module)):
        name = lib.bpf_table_name(bpf.module, i)
        shape = MapShape(
            type=lib.bpf_table_type_id(bpf.module, i),
            key_size=lib.bpf_table_key_size_id(bpf.module, i),
            value_size=lib.bpf_table_leaf_size_id(bpf.module, i),
            max_entries=lib.bpf_table_max_entries_id(bpf.module, i),
        )
        shapes[name.decode()] = (shape, lib.bpf_table_fd_id(bpf.module, i))
    return shapes


def _kernel_shape(fd: int) -> MapShape:
    info = libbpf.map_info(fd)
    return MapShape(info.type, info.key_size, info.value_size, info.max_entries)


def pin_mismatches(bpf, pin_dirs: list[Path]) -> list[PinMismatch]:
    """Pinned maps whose kernel shape differs from what the module declares."""
    found = []
    for name, (declared, fd) in declared_shapes(bpf).items():
        for d in pin_dirs:
            path = d / name
            if path.exists() and fd >= 0:
                actual = _kernel_shape(fd)
                if actual != declared:
                    found.append(PinMismatch(path, declared, actual))
    return found


_SLUICE_INCLUDE = re.compile(r'^\s*#\s*include\s*[<"](sluice/[\w.]+)[">]', re.M)


def expand_source(source: Path, inc: Path | None = None) -> str:
    """The program's C with every ``#include <sluice/...>`` expanded in place.

    BCC rewrites map method calls (``m.lookup()``, ``rb.ringbuf_reserve()``) only in the main file,
    so the shared library's helpers that touch maps must be part of it. ``#line`` keeps compiler
    diagnostics pointing at the real file and line.
    """
    inc = inc or include_dir()
    seen: set[str] = set()

    def expand(path: Path) -> str:
        out = [f'#line 1 "{path}"']
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            m = _SLUICE_INCLUDE.match(line)
            if not m:
                out.append(line)
                continue
            if m.group(1) not in seen:
                seen.add(m.group(1))
                header = inc / m.group(1)
                if not header.is_file():
                    raise CompileError(f"{path}:{lineno}: no shared header {m.group(1)} in {inc}")
                out.append(expand(header))
            out.append(f'#line {lineno + 1} "{path}"')
        return "\n".join(out)

    return expand(source) + "\n"


def cflags_for(owner: str, bpffs: Path, extra: list[str] | tuple[str, ...] = ()) -> list[str]:
    return [
        f"-I{include_dir()}",
        f'-DSLUICE_PIN_DIR="{pin_dir(bpffs, owner)}"',
        f'-DSLUICE_CORE_PIN_DIR="{pin_dir(bpffs, "core")}"',
        f'-DSLUICE_PLUGIN="{owner[:15]}"',
        "-Wno-unused-function",
        # BCC turns an undeclared function into a call the kernel rejects ("jump out of range").
        "-Werror=implicit-function-declaration",
        *extra,
    ]


def compile_program(owner: str, program: Program, *, bpffs: Path, cflags: list[str] | tuple[str, ...] = ()):
    """Compile ``program`` for plugin ``owner`` and return the BCC object with checked pins."""
    from bcc import BPF

    dirs = [pin_dir(bpffs, owner), pin_dir(bpffs, "core")]
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
    flags = cflags_for(owner, bpffs, [*cflags, *program.cflags])
    source = Path(program.source)
    if not source.is_file():
        raise CompileError(f"{owner}: BPF source {source} not found")

    for attempt in (1, 2):
        bpf = _bcc_compile(BPF, owner, source, flags)
        mismatches = pin_mismatches(bpf, dirs)
        if not mismatches:
            return bpf
        bpf.cleanup()
        if attempt == 2:
            raise CompileError(f"{owner}: pins still mismatch after replacing them: {mismatches[0].path}")
        for m in mismatches:
            log.warning(
                "pinned map has another shape: replacing it, its entries are lost",
                plugin=owner,
                pin=str(m.path),
                pinned=str(m.pinned),
                declared=str(m.declared),
            )
            m.path.unlink()
    raise AssertionError("unreachable")


def _bcc_compile(BPF, owner: str, source: Path, flags: list[str]):
    # BCC prints compiler diagnostics on stderr and raises a bare Exception: capture them in a file
    # (a pipe could fill up and block the compiler) and keep the first error line.
    with tempfile.TemporaryFile() as diag:
        saved = os.dup(2)
        os.dup2(diag.fileno(), 2)
        try:
            return BPF(text=expand_source(source).encode(), cflags=flags)
        except Exception as exc:
            os.dup2(saved, 2)
            diag.seek(0)
            lines = diag.read().decode(errors="replace").splitlines()
            first = next((ln for ln in lines if ": error:" in ln), None) or next(
                (ln for ln in lines if "error" in ln.lower()), str(exc)
            )
            raise CompileError(f"{owner}: {source.name}: {first.strip()}") from None
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def load_tc(bpf, owner: str, fn: str) -> int:
    """Load a SCHED_CLS function and return its fd (the verifier's first error line on failure)."""
    from bcc import BPF

    try:
        return bpf.load_func(fn.encode(), BPF.SCHED_CLS).fd
    except Exception as exc:
        raise CompileError(f"{owner}: {fn}: {str(exc).splitlines()[0]}") from None
