"""Shared fixtures. Kernel and lab tests skip (naming what they need) when not run as root."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import pytest
from hypothesis import settings

CACHE_DIR = Path(os.environ.get("SLUICE_TEST_CACHE", "/var/cache/sluice"))


# CI replays the same examples every run (a red CI then means a change broke something, not that
# the dice found a new case); developers' runs keep exploring, and what they find is fixed and
# pinned as an explicit test.
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


def pytest_collection_modifyitems(config, items):
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root: CAP_BPF and CAP_NET_ADMIN")
    for item in items:
        if "kernel" in item.keywords or "lab" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def kernel_ready():
    """bpffs/tracefs mounted and a kernel header tree for BCC (built once, cached across runs)."""
    from sluice import kernel

    kernel.mount_filesystems()
    check = kernel.prepare_bcc(CACHE_DIR)
    if not check.ok:
        pytest.skip(f"kernel-headers: {check.detail}")
    return check


@pytest.fixture
def bpffs(kernel_ready, request):
    """A private bpffs root for one test: pins land in <it>/sluice/<plugin>/ and are removed after."""
    root = Path("/sys/fs/bpf") / f"sluice-test-{uuid.uuid4().hex[:8]}"
    root.mkdir(parents=True)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def state_dir(tmp_path):
    d = tmp_path / "state"
    d.mkdir()
    return d


ROOT = Path(__file__).resolve().parent.parent
PLUGIN_DISTS = [ROOT / "examples" / "sluice-hello", ROOT / "tests" / "plugins" / "sluice-chainprobe"]


@pytest.fixture(scope="session")
def plugin_path(tmp_path_factory):
    """The example and test plugin packages installed the way users install plugins (pip), into a
    directory the tests put on PYTHONPATH: discovery goes through their entry points."""
    import subprocess
    import sys

    target = tmp_path_factory.mktemp("plugins")
    for stale in [*ROOT.glob("examples/*/build"), *ROOT.glob("tests/plugins/*/build")]:
        shutil.rmtree(stale, ignore_errors=True)  # a stale build/ would install deleted files
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            *map(str, PLUGIN_DISTS),
        ],
        check=True,
    )
    for leftover in [*ROOT.glob("examples/*/build"), *ROOT.glob("tests/plugins/*/build")]:
        shutil.rmtree(leftover, ignore_errors=True)
    return target


@pytest.fixture
def with_plugins(plugin_path, monkeypatch):
    """Make the installed test plugins importable and discoverable in this process."""
    import importlib
    import sys

    monkeypatch.syspath_prepend(str(plugin_path))
    importlib.invalidate_caches()
    yield plugin_path
    for name in [m for m in sys.modules if m.startswith(("sluice_hello", "sluice_chainprobe"))]:
        del sys.modules[name]
