"""``sluice doctor`` against the real kernel: probes, the BCC header tree, no leftovers."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from sluice import kernel
from sluice.doctor import format_table, run_doctor

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(
        os.geteuid() != 0, reason="needs root: loads BPF programs and creates network namespaces"
    ),
]

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def doctor(cache_dir):
    # prepare_bcc sets BCC_KERNEL_SOURCE for this process: keep it for this module's tests only.
    saved = os.environ.get("BCC_KERNEL_SOURCE")
    try:
        started = time.monotonic()
        checks = run_doctor(cache_dir)
        cold = time.monotonic() - started
        started = time.monotonic()
        kernel.probe(cache_dir)
        warm = time.monotonic() - started
        print(
            f"\n{format_table(checks)}\ndoctor {cold:.2f}s (builds the header tree), probe again {warm:.2f}s"
        )
        yield {c.name: c for c in checks}
    finally:
        if saved is None:
            os.environ.pop("BCC_KERNEL_SOURCE", None)
        else:
            os.environ["BCC_KERNEL_SOURCE"] = saved


def test_every_feature_is_reported(doctor):
    assert set(kernel.FEATURES) <= set(doctor)


# What the project's development kernel offers; the built-in plugins rely on these.
@pytest.mark.parametrize(
    "name",
    ["tc", "tcx", "ringbuf", "lpm-trie", "batch-ops", "prog-test-run", "tunnel:vxlan", "conntrack-netlink"],
)
def test_feature_present(doctor, name):
    assert doctor[name].ok, doctor[name]


def test_geneve_is_missing_with_a_fix(doctor):
    # The development kernel is built without geneve: this checks the missing path for real.
    geneve = doctor["tunnel:geneve"]
    assert not geneve.ok
    assert "geneve" in geneve.detail and geneve.fix


def test_every_missing_check_says_what_to_do(doctor):
    assert [c.name for c in doctor.values() if not c.ok and not c.fix] == []


def test_header_tree_lets_bcc_compile(doctor):
    from bcc import BPF

    assert doctor["kernel-headers"].ok, doctor["kernel-headers"]
    # No BCC_KERNEL_SOURCE here means prepare_bcc found BCC can locate headers by itself.
    bpf = BPF(src_file=str(DATA / "doctor_min.bpf.c").encode())
    try:
        assert bpf.load_func(b"doctor_min", BPF.SCHED_CLS).fd >= 0
    finally:
        bpf.cleanup()


def test_probe_leaves_no_namespaces(doctor):
    leftovers = [n for n in os.listdir("/run/netns") if n.startswith(f"sluice-probe-{os.getpid()}-")]
    assert leftovers == []


def test_features_work_inside_a_running_event_loop(cache_dir):
    # pyroute2's synchronous API cannot run inside a running loop; the agent's hooks do.
    async def ask() -> tuple[bool, bool]:
        features = kernel.Features(cache_dir)
        return features.has("tunnel:vxlan"), features.has("conntrack-netlink")

    assert asyncio.run(ask()) == (True, True)


def test_generic_tracepoint_name(cache_dir):
    features = kernel.Features(cache_dir)
    assert features.has("tracepoint:skb/kfree_skb")
    assert not features.has("tracepoint:skb/no_such_event")
