"""Kernel feature probes, and the preparation BCC needs (mounted filesystems, a header tree).

Every probe is cheap: nothing here compiles with BCC. Maps and two-instruction programs go
through libbpf (:mod:`sluice.bpf.libbpf`); link types and TC attachment are tried in a throwaway
network namespace, never in the caller's. ``sluice doctor`` prints the results and the core asks
:class:`Features` whether a plugin's requirements are met.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import functools
import os
import platform
import re
import secrets
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Check:
    """The outcome of one probe or preparation step; ``fix`` says what to do when not ``ok``."""

    name: str
    ok: bool
    detail: str
    fix: str = ""


ROOT_FIX = "run as root (or with CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON)"


def _errno(exc: BaseException) -> int | None:
    """OSError and pyroute2's NetlinkError (not an OSError) carry the errno differently."""
    return getattr(exc, "code", None) or getattr(exc, "errno", None)


# --------------------------------------------------------------------------------------------
# Filesystems
# --------------------------------------------------------------------------------------------

BPFFS = Path("/sys/fs/bpf")
TRACEFS = Path("/sys/kernel/tracing")
# BCC prefers the debugfs path when it exists, so tracepoints may live under either.
TRACEFS_PATHS = (TRACEFS, Path("/sys/kernel/debug/tracing"))
LOCKDOWN = Path("/sys/kernel/security/lockdown")


def _mounts(mounts_file: Path = Path("/proc/self/mounts")) -> dict[str, str]:
    """Mount point -> filesystem type (the last mount on a point wins, as it hides the others)."""
    mounts = {}
    for line in mounts_file.read_text().splitlines():
        fields = line.split()
        if len(fields) >= 3:
            # /proc/self/mounts escapes spaces and the like as octal (\040).
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[1])
            mounts[point] = fields[2]
    return mounts


def _mount(fstype: str, target: Path) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(fstype.encode(), str(target).encode(), fstype.encode(), 0, None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(target))


def mount_filesystems() -> list[Check]:
    """Mount bpffs and tracefs where sluice expects them; report only what had to be done."""
    done = []
    mounts = _mounts()
    for name, fstype, target in (("bpffs", "bpf", BPFFS), ("tracefs", "tracefs", TRACEFS)):
        if mounts.get(str(target)) == fstype:
            continue
        try:
            _mount(fstype, target)
        except OSError as exc:
            done.append(
                Check(
                    f"mount:{name}",
                    False,
                    f"mounting {fstype} at {target} failed: {exc.strerror}",
                    f"as root: mount -t {fstype} {fstype} {target}",
                )
            )
        else:
            done.append(Check(f"mount:{name}", True, f"mounted {fstype} at {target}"))
    return done


def _tracefs() -> Path | None:
    # os.path.isdir, unlike Path.is_dir on 3.11, answers False (not EACCES) to non-root users.
    return next((p for p in TRACEFS_PATHS if os.path.isdir(p / "events")), None)


def _no_tracefs(name: str) -> Check:
    if any(_mounts().get(str(p)) == "tracefs" for p in TRACEFS_PATHS):
        return Check(name, False, "tracefs is mounted but not readable", ROOT_FIX)
    return Check(
        name, False, "no tracefs mounted", f"sluice doctor (as root) or: mount -t tracefs tracefs {TRACEFS}"
    )


def _lockdown() -> str | None:
    """The active lockdown mode (``none``, ``integrity``, ``confidentiality``), if readable."""
    try:
        found = re.search(r"\[(\w+)\]", LOCKDOWN.read_text())
    except OSError:
        return None
    return found.group(1) if found else None


# --------------------------------------------------------------------------------------------
# Kernel headers for BCC
# --------------------------------------------------------------------------------------------

SRC_ROOT = Path("/usr/src")
MODULES_ROOT = Path("/lib/modules")
KHEADERS = Path("/sys/kernel/kheaders.tar.xz")
# platform.machine() -> the kernel's arch/ directory, to skip headers built for another machine.
_KERNEL_ARCH = {
    "x86_64": "x86",
    "i686": "x86",
    "aarch64": "arm64",
    "armv7l": "arm",
    "ppc64le": "powerpc",
    "s390x": "s390",
    "riscv64": "riscv",
}


@dataclass(frozen=True)
class HeaderPair:
    """A Debian headers package: generated per-flavour files plus the shared source headers."""

    version: str  # "6.1.0-56-amd64"
    arch: Path  # /usr/src/linux-headers-6.1.0-56-amd64
    common: Path  # /usr/src/linux-headers-6.1.0-56-common


def _is_header_tree(path: Path) -> bool:
    return (path / "include/linux/kconfig.h").exists()


def _numbers(version: str) -> tuple[int, ...]:
    """Leading numeric parts: "6.1.0-56-amd64" -> (6, 1, 0, 56), "6.18.44-fc" -> (6, 18, 44)."""
    found = re.match(r"\d+(?:[.-]\d+)*", version)
    return tuple(int(n) for n in re.split(r"[.-]", found.group(0))) if found else ()


def find_header_pairs(src_root: Path = SRC_ROOT, machine: str | None = None) -> list[HeaderPair]:
    """Every Debian header pair under ``src_root`` built for ``machine`` (default: this one).

    Debian's per-flavour directory holds a one-line Makefile including its common directory's
    Makefile; that line is what pairs them (it also covers ``-rt`` flavours with ``-common-rt``).
    """
    karch = _KERNEL_ARCH.get(machine or platform.machine())
    pairs = []
    for arch_dir in sorted(src_root.glob("linux-headers-*")):
        try:
            included = re.search(r"^include\s+(\S+)/Makefile\s*$", (arch_dir / "Makefile").read_text(), re.M)
        except OSError:
            continue
        if not included:
            continue
        common = src_root / Path(included.group(1)).name
        if not _is_header_tree(common) or not (arch_dir / "include/generated").is_dir():
            continue
        if karch and not (arch_dir / "arch" / karch).is_dir():
            continue
        pairs.append(HeaderPair(arch_dir.name.removeprefix("linux-headers-"), arch_dir, common))
    return pairs


def pick_header_pair(pairs: Iterable[HeaderPair], release: str) -> HeaderPair | None:
    """Same major.minor as the running ``release`` if any, else the newest; plain flavours first."""
    running = _numbers(release)[:2]

    def rank(pair: HeaderPair) -> tuple:
        numbers = _numbers(pair.version)
        # A shorter name at equal version is the plain flavour ("amd64" over "cloud-amd64").
        return (numbers[:2] == running, numbers, -len(pair.version))

    return max(pairs, key=rank, default=None)


def _merge_trees(layers: list[Path], dst: Path) -> None:
    """Fill the empty directory ``dst`` with the union of ``layers`` as absolute symlinks.

    Reads like ``cp -rs`` of each layer in turn (later layers win), with fewer links: an entry
    only one layer has is linked whole, even a directory; only a directory several layers share
    becomes a real directory, merged recursively. Links point at resolved targets, because
    Debian's relative ``scripts`` link would dangle from the cache. Only ``dst`` is written to.
    """
    entries: dict[str, list[Path]] = {}
    for layer in layers:
        for entry in os.scandir(layer):
            entries.setdefault(entry.name, []).append(Path(entry.path))
    for name, sources in entries.items():
        # Both halves link "scripts" to the same kbuild directory: that is one directory.
        shared_dirs = list(dict.fromkeys(Path(os.path.realpath(s)) for s in sources if s.is_dir()))
        if len(shared_dirs) > 1 and sources[-1].is_dir():
            (dst / name).mkdir()
            _merge_trees(shared_dirs, dst / name)
        else:
            os.symlink(os.path.realpath(sources[-1]), dst / name)


def _build_header_tree(pair: HeaderPair, dest: Path) -> None:
    """Build the merged tree in a temporary sibling and rename it into place (atomic for readers)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    # A stale tree (its package was removed or replaced). Its entries are links, which rmtree
    # removes without following.
    if dest.is_symlink():
        dest.unlink()
    elif dest.exists():
        shutil.rmtree(dest)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the headers are not secret
    try:
        _merge_trees([pair.common, pair.arch], tmp)  # the flavour's generated files win
        os.rename(tmp, dest)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not _is_header_tree(dest):  # else another process won the race: use its tree
            raise


def bcc_header_tree(
    cache_dir: Path,
    *,
    release: str | None = None,
    machine: str | None = None,
    src_root: Path = SRC_ROOT,
    modules_root: Path = MODULES_ROOT,
) -> Path | None:
    """The header tree BCC should be pointed at, or ``None`` when BCC finds headers by itself.

    BCC looks in ``/lib/modules/<release>/build``, then the kernel's built-in kheaders. Failing
    both, merge the best Debian header pair under ``src_root`` into
    ``cache_dir/kernel-headers/<version>`` (reused once built). Raises ``FileNotFoundError``
    when there are no usable headers at all.
    """
    release = release or platform.release()
    if _is_header_tree(modules_root / release / "build") or KHEADERS.exists():
        return None
    pair = pick_header_pair(find_header_pairs(src_root, machine), release)
    if pair is None:
        raise FileNotFoundError(
            f"no headers for {release}: nothing in {modules_root / release / 'build'}, "
            f"no {KHEADERS}, no Debian linux-headers pair in {src_root}"
        )
    dest = cache_dir / "kernel-headers" / pair.version
    if not _is_header_tree(dest):
        _build_header_tree(pair, dest)
    return dest


def prepare_bcc(cache_dir: Path) -> Check:
    """Make BCC find kernel headers, setting ``BCC_KERNEL_SOURCE`` when it would not by itself."""
    preset = os.environ.get("BCC_KERNEL_SOURCE")
    cache_root = (cache_dir / "kernel-headers").resolve()
    if preset and _is_header_tree(Path(preset)) and cache_root not in Path(preset).resolve().parents:
        return Check("kernel-headers", True, f"{preset} (BCC_KERNEL_SOURCE set by the caller)")
    release = platform.release()
    try:
        tree = bcc_header_tree(cache_dir)
    except FileNotFoundError as exc:
        return Check(
            "kernel-headers",
            False,
            str(exc),
            "install headers for this kernel (Debian: apt install linux-headers-$(dpkg --print-architecture))",
        )
    except OSError as exc:
        return Check(
            "kernel-headers", False, f"building the header tree: {exc}", f"make {cache_dir} writable"
        )
    if tree is None:
        where = MODULES_ROOT / release / "build"
        return Check(
            "kernel-headers", True, f"{where if _is_header_tree(where) else KHEADERS} (found by BCC)"
        )
    os.environ["BCC_KERNEL_SOURCE"] = str(tree)
    # Other versions' headers serve TC programs (stable UAPI structs) but not reads of kernel
    # internals, whose layouts change between versions: worth saying.
    differs = "" if _numbers(tree.name)[:2] == _numbers(release)[:2] else "; versions differ"
    return Check("kernel-headers", True, f"{tree} (Debian {tree.name} for running {release}{differs})")


# --------------------------------------------------------------------------------------------
# BPF objects through sluice.bpf (libbpf, no BCC)
# --------------------------------------------------------------------------------------------

# r0 = 0; exit. Each struct bpf_insn is 8 bytes with the opcode first; the rest is zero here,
# so these bytes are right on either endianness.
_RETURN_ZERO = bytes.fromhex("b7000000000000009500000000000000")
_PROBE_NAME = "sluice_probe"


def _libbpf():
    """:mod:`sluice.bpf.libbpf`, imported on first use: without libbpf 1.x (it binds the 1.x API
    at import) only the BPF probes fail, each with a fix, and the other checks still run."""
    try:
        from sluice.bpf import libbpf
    except (OSError, AttributeError) as exc:
        raise OSError(errno.ENOENT, f"libbpf >= 1.0 not loadable ({exc})") from exc
    return libbpf


@contextmanager
def _closing(fd: int) -> Iterator[int]:
    try:
        yield fd
    finally:
        os.close(fd)


def _map(map_type: str, key: int | type, value: int | type, max_entries: int, flags: int = 0):
    """A :class:`~sluice.bpf.maps.Map` of the ``MapType`` named ``map_type``, closed on exit."""
    lb = _libbpf()
    from sluice.bpf.maps import Map

    return Map.create(lb.MapType[map_type], key, value, max_entries, name=_PROBE_NAME, flags=flags)


def _prog(prog_type: str, attach_type: int = 0, attach_btf_id: int = 0):
    """The fd of a loaded ``return 0`` program of the ``ProgType`` named ``prog_type``, closed on exit."""
    lb = _libbpf()
    fd = lb.prog_load(
        lb.ProgType[prog_type],
        _RETURN_ZERO,
        name=_PROBE_NAME,
        expected_attach_type=attach_type,
        attach_btf_id=attach_btf_id,
    )
    return _closing(fd)


def _bpf_fix(err: OSError) -> str:
    if err.errno in (errno.EPERM, errno.EACCES):
        return f"{ROOT_FIX}; if root already, check kernel lockdown and seccomp"
    if err.errno == errno.ENOSYS:
        return "use a kernel built with CONFIG_BPF_SYSCALL"
    if err.errno == errno.ENOENT and "not loadable" in str(err):
        return "install libbpf 1.x (Debian: apt install libbpf1)"
    return "use a newer kernel (see the detail for what the kernel refused)"


def _bpf_check(name: str, what: Callable[[], str]) -> Check:
    """Run a libbpf probe whose failures are kernel answers, phrased as a missing feature."""
    try:
        return Check(name, True, what())
    except OSError as exc:
        return Check(name, False, exc.strerror or str(exc), _bpf_fix(exc))


# --------------------------------------------------------------------------------------------
# Network namespace helpers (pyroute2)
# --------------------------------------------------------------------------------------------


def _outside_event_loop(fn: Callable[[], object]) -> object:
    """Call ``fn`` where pyroute2's synchronous API works: it runs its own asyncio loop, which
    fails inside a running one (the agent's hooks run in its event loop thread)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return fn()
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(fn).result()


@contextmanager
def _scratch_netns():
    """An IPRoute in a fresh, uniquely named network namespace, removed afterwards."""
    from pyroute2 import IPRoute

    from sluice import netns

    name = f"sluice-probe-{os.getpid()}-{secrets.token_hex(3)}"
    with netns.scratch(name), netns.inside(name), IPRoute() as ipr:
        yield ipr


# --------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------

CAP_NET_ADMIN, CAP_SYS_ADMIN, CAP_BPF = 12, 21, 39


def check_root() -> Check:
    caps = int(re.search(r"^CapEff:\s*([0-9a-f]+)", Path("/proc/self/status").read_text(), re.M).group(1), 16)
    has = {
        name: bool(caps >> bit & 1) for name, bit in (("CAP_BPF", CAP_BPF), ("CAP_NET_ADMIN", CAP_NET_ADMIN))
    }
    # Kernels before 5.8 have no CAP_BPF and ask for CAP_SYS_ADMIN instead.
    has["CAP_BPF"] |= bool(caps >> CAP_SYS_ADMIN & 1)
    lacking = [name for name, present in has.items() if not present]
    detail = f"euid {os.geteuid()}, " + (
        f"lacking {', '.join(lacking)}" if lacking else "CAP_BPF and CAP_NET_ADMIN"
    )
    if lacking:
        return Check("root", False, detail, ROOT_FIX)
    return Check("root", True, detail)


def check_bpffs() -> Check:
    if _mounts().get(str(BPFFS)) == "bpf":
        return Check("bpffs", True, f"mounted at {BPFFS}")
    return Check(
        "bpffs",
        False,
        f"no bpf filesystem at {BPFFS}",
        f"sluice doctor (as root) or: mount -t bpf bpf {BPFFS}",
    )


def check_tracefs() -> Check:
    found = _tracefs()
    return Check("tracefs", True, f"events at {found / 'events'}") if found else _no_tracefs("tracefs")


def check_btf() -> Check:
    vmlinux = Path("/sys/kernel/btf/vmlinux")
    if os.access(vmlinux, os.R_OK):
        return Check("btf", True, f"{vmlinux} ({vmlinux.stat().st_size // 1024} KiB)")
    return Check("btf", False, f"no readable {vmlinux}", "use a kernel built with CONFIG_DEBUG_INFO_BTF")


def check_bpf_syscall() -> Check:
    def create() -> str:
        with _map("HASH", 4, 4, 1):
            return "created a hash map"

    return _bpf_check("bpf-syscall", create)


def check_tc() -> Check:
    """Load a SCHED_CLS program and attach it to a clsact hook, which also proves clsact and
    cls_bpf are there (loading alone would not)."""
    try:
        loaded = _prog("SCHED_CLS")
    except OSError as exc:
        return Check("tc", False, exc.strerror or str(exc), _bpf_fix(exc))
    with loaded as fd:
        try:
            _outside_event_loop(functools.partial(_attach_clsact, fd))
        except Exception as exc:  # pyroute2's NetlinkError is not an OSError
            denied = _errno(exc) in (errno.EPERM, errno.EACCES)
            fix = (
                ROOT_FIX
                if denied
                else "use a kernel with CONFIG_NET_SCH_INGRESS (clsact) and CONFIG_NET_CLS_BPF"
            )
            return Check("tc", False, f"attaching to clsact failed: {exc}", fix)
    return Check("tc", True, "SCHED_CLS program loaded and attached to clsact ingress (scratch netns)")


def check_tcx() -> Check:
    """TCX hooks (bpf_mprog, kernel 6.6+). The datapath attaches cls_bpf filters either way: the
    check says which attach path this kernel could use, not a requirement."""
    from sluice.bpf import tcx

    if tcx.supported():
        return Check(
            "tcx", True, "TCX hooks present; the datapath attaches cls_bpf filters (TCX links not wired in)"
        )
    return Check(
        "tcx",
        False,
        "no TCX hooks (kernel < 6.6): the datapath uses cls_bpf filters",
        "nothing to do: cls_bpf is the fallback; kernel 6.6+ adds TCX",
    )


def _attach_clsact(prog_fd: int) -> None:
    with _scratch_netns() as ipr:
        lo = ipr.link_lookup(ifname="lo")[0]
        ipr.tc("add", "clsact", lo)
        ipr.tc(
            "add-filter",
            "bpf",
            lo,
            ":1",
            fd=prog_fd,
            name="sluice_probe",
            parent="ffff:fff2",
            direct_action=True,
        )


_NAME = re.compile(r"\w+")


def check_tracepoint(category: str, event: str, tracefs: Path | None = None) -> Check:
    """``tracepoint:<category>/<event>``: the event exists and its id is readable."""
    name = f"tracepoint:{category}/{event}"
    if not (_NAME.fullmatch(category) and _NAME.fullmatch(event)):
        return Check(
            name,
            False,
            "malformed name",
            "write tracepoint:<category>/<event>, e.g. tracepoint:skb/kfree_skb",
        )
    tracefs = tracefs or _tracefs()
    if tracefs is None:
        return _no_tracefs(name)
    try:
        tp_id = (tracefs / "events" / category / event / "id").read_text().strip()
    except OSError as exc:
        return Check(
            name,
            False,
            f"{category}/{event} not in {tracefs / 'events'} ({exc.strerror})",
            "use a kernel with this tracepoint",
        )
    return Check(name, True, f"id {tp_id}")


def check_tracepoints(tracefs: Path | None = None) -> Check:
    """Tracepoints are usable: the events directory is listable and skb/kfree_skb is there."""
    tracefs = tracefs or _tracefs()
    try:
        count = len(os.listdir(tracefs / "events")) if tracefs else 0
    except OSError as exc:
        return Check("tracepoints", False, f"cannot list {tracefs / 'events'}: {exc.strerror}", ROOT_FIX)
    kfree_skb = check_tracepoint("skb", "kfree_skb", tracefs)
    detail = f"{count} categories; skb/kfree_skb {kfree_skb.detail}" if tracefs else kfree_skb.detail
    return Check("tracepoints", kfree_skb.ok, detail, kfree_skb.fix)


# perf_event_open(2) numbers; other machines fall back to tracefs kprobe_events.
_PERF_EVENT_OPEN = {"x86_64": 298, "aarch64": 241, "riscv64": 241, "ppc64le": 319, "s390x": 331}
_KPROBE_PMU = Path("/sys/bus/event_source/devices/kprobe/type")
_KPROBE_TARGET = "vfs_read"  # exported, never inlined, not on the kprobe blacklist


_u32, _u64 = ctypes.c_uint32, ctypes.c_uint64


class _PerfEventAttr(ctypes.Structure):  # PERF_ATTR_SIZE_VER1 prefix
    _fields_ = [("type", _u32), ("size", _u32), ("config", _u64), ("sample_period", _u64)]
    _fields_ += [("sample_type", _u64), ("read_format", _u64), ("flags", _u64), ("wakeup_events", _u32)]
    _fields_ += [("bp_type", _u32), ("config1", _u64), ("config2", _u64)]


def _perf_kprobe(pmu_type: int, syscall_nr: int) -> None:
    """Create (disabled) and drop a kprobe perf event, as BCC does to attach a kprobe."""
    func = ctypes.create_string_buffer(_KPROBE_TARGET.encode())
    attr = _PerfEventAttr(type=pmu_type, size=ctypes.sizeof(_PerfEventAttr), flags=1)  # bit 0: disabled
    attr.config1 = ctypes.addressof(func)  # kprobe_func
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.syscall(syscall_nr, ctypes.byref(attr), -1, 0, -1, 8)  # pid -1, cpu 0, FD_CLOEXEC
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"perf_event_open(kprobe {_KPROBE_TARGET}): {os.strerror(err)}")
    os.close(fd)


def _tracefs_kprobe(tracefs: Path) -> None:
    """Define and remove a kprobe through kprobe_events (BCC's fallback without the PMU)."""
    event = f"sluice_probe_{os.getpid()}"
    with open(tracefs / "kprobe_events", "a") as events:
        events.write(f"p:{event} {_KPROBE_TARGET}\n")
        events.flush()
        events.write(f"-:{event}\n")


def check_kprobes() -> Check:
    """Kprobes attach. Under lockdown=confidentiality or without CONFIG_KPROBES, BCC can load a
    kprobe program but not attach it, so the probe creates a kprobe rather than loading one."""
    if not check_root().ok:  # else every answer below is just "permission denied"
        return Check("kprobes", False, "not probed: needs privileges", ROOT_FIX)
    lockdown = _lockdown()
    suffix = f" (lockdown: {lockdown})" if lockdown else ""
    fix = "boot with lockdown=none/integrity on a kernel with CONFIG_KPROBES and CONFIG_KPROBE_EVENTS"
    tracefs = _tracefs()
    try:
        if _KPROBE_PMU.exists() and platform.machine() in _PERF_EVENT_OPEN:
            _perf_kprobe(int(_KPROBE_PMU.read_text()), _PERF_EVENT_OPEN[platform.machine()])
            how = "kprobe PMU"
        elif tracefs and (tracefs / "kprobe_events").exists():
            _tracefs_kprobe(tracefs)
            how = "tracefs kprobe_events"
        else:
            return Check("kprobes", False, f"no kprobe PMU and no kprobe_events in tracefs{suffix}", fix)
    except OSError as exc:
        return Check("kprobes", False, f"{exc.strerror or exc}{suffix}", fix)
    return Check("kprobes", True, f"created a kprobe on {_KPROBE_TARGET} via {how}{suffix}")


# Only ever called by BPF_PROG_TEST_RUN, so attaching to it briefly disturbs nothing.
_FENTRY_TARGET = "bpf_fentry_test1"


def check_fentry() -> Check:
    """Load an fentry program against a function in vmlinux BTF and attach it for a moment."""
    if not check_root().ok:  # else the answer below is just "permission denied"
        return Check("fentry", False, "not probed: needs privileges", ROOT_FIX)
    lockdown = _lockdown()
    suffix = f" (lockdown: {lockdown})" if lockdown else ""
    if not check_btf().ok:
        return Check("fentry", False, "needs vmlinux BTF", "use a kernel built with CONFIG_DEBUG_INFO_BTF")

    def attach() -> str:
        lb = _libbpf()
        btf_id = lb.find_vmlinux_btf_id(_FENTRY_TARGET, lb.BPF_TRACE_FENTRY)
        with _prog("TRACING", lb.BPF_TRACE_FENTRY, btf_id) as fd:
            os.close(lb.raw_tracepoint_open(None, fd))  # the link: closing it detaches
        return f"attached to {_FENTRY_TARGET}{suffix}"

    try:
        return Check("fentry", True, attach())
    except OSError as exc:
        return Check(
            "fentry",
            False,
            f"fentry on {_FENTRY_TARGET}: {exc.strerror or exc}{suffix}",
            "optional: a kernel allowing BPF tracing programs (no lockdown, CONFIG_DYNAMIC_FTRACE_WITH_DIRECT_CALLS)",
        )


def check_ringbuf() -> Check:
    def create() -> str:
        with _map("RINGBUF", 0, 0, 4096):
            return "created a 4 KiB ring buffer"

    return _bpf_check("ringbuf", create)


def check_lpm_trie() -> Check:
    def create() -> str:
        with _map("LPM_TRIE", 8, 4, 16, flags=_libbpf().BPF_F_NO_PREALLOC):  # LPM tries require it
            return "created an LPM trie"

    return _bpf_check("lpm-trie", create)


def check_batch_ops() -> Check:
    def lookup() -> str:
        u32 = ctypes.c_uint32
        with _map("HASH", u32, u32, 8) as bpf_map:
            bpf_map.set(1, 2)
            keys, values, out_batch, count = (u32 * 8)(), (u32 * 8)(), u32(), u32(8)
            try:  # straight to libbpf: Map's walks fall back to per-key calls without batch support
                _libbpf().map_lookup_batch(bpf_map.fd, None, out_batch, keys, values, count)
            except FileNotFoundError:  # ENOENT: the batch reached the end of the map, a success
                pass
            return f"batch lookup returned {count.value} of 1 entries"

    return _bpf_check("batch-ops", lookup)


def check_prog_test_run() -> Check:
    def run() -> str:
        frame = bytes(12) + b"\x08\x00" + bytes(50)  # 64 bytes, IPv4 ethertype
        with _prog("SCHED_CLS") as fd:
            from sluice.bpf.testrun import test_run

            result = test_run(fd, frame, data_size_out=0)
        return f"ran a SCHED_CLS program on a 64-byte frame: retval {result.retval}"

    return _bpf_check("prog-test-run", run)


# External (collect-metadata) mode: what sluice's tunnel plugin drives from BPF, and a mode that
# needs no endpoint configuration, so a bare device is valid.
_TUNNEL_ARGS = {
    "vxlan": {"vxlan_id": 1, "vxlan_collect_metadata": 1},
    "geneve": {"geneve_collect_metadata": True},
    "ipip": {"ipip_collect_metadata": True},
}


def check_tunnel(kind: str) -> Check:
    """``tunnel:<kind>``: the kernel can create a ``kind`` link (tried in a scratch namespace)."""
    name = f"tunnel:{kind}"
    if not _NAME.fullmatch(kind):
        return Check(name, False, "malformed name", "write tunnel:<link kind>, e.g. tunnel:vxlan")

    def create() -> Exception | None:
        with _scratch_netns() as ipr:
            try:
                ipr.link("add", ifname="probe0", kind=kind, **_TUNNEL_ARGS.get(kind, {}))
            except Exception as exc:  # the kernel's answer: judged below
                return exc
        return None

    try:
        refused = _outside_event_loop(create)
    except Exception as exc:
        fix = ROOT_FIX if _errno(exc) in (errno.EPERM, errno.EACCES) else "check that network namespaces work"
        return Check(name, False, f"cannot create a scratch netns: {exc}", fix)
    if refused is None:
        return Check(name, True, f"created a {kind} link in a scratch netns")
    # rtnetlink answers EOPNOTSUPP only for an unknown link kind (after trying to load its
    # module); any other error came from the driver judging our bare probe device.
    if _errno(refused) == errno.EOPNOTSUPP:
        return Check(
            name, False, f"kernel has no {kind} link type", f"modprobe {kind}, or use a kernel built with it"
        )
    if _errno(refused) in (errno.EPERM, errno.EACCES):
        return Check(name, False, f"creating the {kind} link: {refused}", ROOT_FIX)
    return Check(name, True, f"kernel knows {kind} links (the probe device was refused: {refused})")


def check_conntrack_netlink() -> Check:
    def count() -> int | None:
        from pyroute2 import Conntrack

        with Conntrack() as ct:
            return ct.count()

    try:
        entries = _outside_event_loop(count)
    except Exception as exc:
        if _errno(exc) in (errno.EPERM, errno.EACCES):
            return Check("conntrack-netlink", False, f"ctnetlink: {exc}", ROOT_FIX)
        return Check(
            "conntrack-netlink",
            False,
            f"ctnetlink: {exc}",
            "use a kernel with nf_conntrack and nf_conntrack_netlink (modprobe nf_conntrack_netlink)",
        )
    return Check("conntrack-netlink", True, f"ctnetlink answered: {entries} entries")


def _checks(cache_dir: Path) -> dict[str, Callable[[], Check]]:
    """Every fixed-name check, in the order ``probe`` reports them."""
    return {
        "root": check_root,
        "bpffs": check_bpffs,
        "tracefs": check_tracefs,
        "btf": check_btf,
        "kernel-headers": functools.partial(prepare_bcc, cache_dir),
        "bpf-syscall": check_bpf_syscall,
        "tc": check_tc,
        "tcx": check_tcx,
        "tracepoints": check_tracepoints,
        "kprobes": check_kprobes,
        "fentry": check_fentry,
        "ringbuf": check_ringbuf,
        "lpm-trie": check_lpm_trie,
        "batch-ops": check_batch_ops,
        "prog-test-run": check_prog_test_run,
        "tunnel:vxlan": functools.partial(check_tunnel, "vxlan"),
        "tunnel:geneve": functools.partial(check_tunnel, "geneve"),
        "tunnel:ipip": functools.partial(check_tunnel, "ipip"),
        "tunnel:wireguard": functools.partial(check_tunnel, "wireguard"),
        "conntrack-netlink": check_conntrack_netlink,
    }


FEATURES = tuple(_checks(Path()))


def check(name: str, cache_dir: Path) -> Check:
    """Run the check called ``name``: a fixed name from :data:`FEATURES`, or the generic
    ``tracepoint:<category>/<event>`` and ``tunnel:<kind>``. Never raises."""
    fixed = _checks(cache_dir).get(name)
    if fixed:
        run = fixed
    elif name.startswith("tracepoint:"):
        category, _, event = name.removeprefix("tracepoint:").partition("/")
        run = functools.partial(check_tracepoint, category, event)
    elif name.startswith("tunnel:"):
        run = functools.partial(check_tunnel, name.removeprefix("tunnel:"))
    else:
        known = ", ".join(FEATURES)
        return Check(
            name,
            False,
            "unknown feature name",
            f"use one of {known}, tracepoint:<cat>/<event>, tunnel:<kind>",
        )
    try:
        result = run()
    except Exception as exc:  # a probe's own bug must not take the doctor or the agent down
        return Check(name, False, f"probe failed: {type(exc).__name__}: {exc}", "report this as a sluice bug")
    # Generic checks name themselves canonically; report under the name that was asked for.
    return result if result.name == name else Check(name, result.ok, result.detail, result.fix)


def probe(cache_dir: Path) -> list[Check]:
    """Run every fixed-name check (this prepares BCC's headers as a side effect)."""
    return [check(name, cache_dir) for name in FEATURES]


class Features:
    """Probe results by name, computed on first use and cached for the life of the object.

    ``known`` seeds the cache (say, with the results of a :func:`probe` run at start-up).
    """

    def __init__(self, cache_dir: Path, known: Iterable[Check] = ()):
        self._cache_dir = cache_dir
        self._results = {c.name: c for c in known}
        self._lock = threading.Lock()  # probes are not free: never run one twice concurrently

    def check(self, name: str) -> Check:
        with self._lock:
            if name not in self._results:
                self._results[name] = check(name, self._cache_dir)
            return self._results[name]

    def has(self, name: str) -> bool:
        return self.check(name).ok

    def missing(self, names: Iterable[str]) -> list[Check]:
        """The failing checks among ``names``, for one clear log line when disabling a plugin."""
        return [c for c in map(self.check, names) if not c.ok]
