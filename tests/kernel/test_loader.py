"""Compiling, pinning, pin reuse and the pin-shape check, on the real kernel."""

import ctypes as ct
from pathlib import Path

import pytest

from sluice.bpf import loader
from sluice.bpf.maps import Map
from sluice.bpf.testrun import test_run
from sluice.programs import Program

pytestmark = pytest.mark.kernel

PROBE_C = (
    Path(__file__).resolve().parents[1]
    / "plugins"
    / "sluice-chainprobe"
    / "sluice_chainprobe"
    / "chainprobe.bpf.c"
)
UDP_FRAME = bytes.fromhex(
    "020000000002"
    "020000000001"
    "0800"  # ethernet
    "4500001c00004000401100000a0000010a000002"  # ipv4, udp
    "d43100090008"
    "0000"  # udp sport 54321 → dport 9
)


def probe(seen_max=16):
    return Program("chainprobe", PROBE_C, (), cflags=[f"-DCHAINPROBE_SEEN_MAX={seen_max}"])


def seen(bpf, slot):
    return Map.from_bcc(bpf[b"probe_seen"]).get(ct.c_uint32(slot))


def test_compile_pins_maps_under_the_plugin_dir(bpffs):
    bpf = loader.compile_program("chainprobe", probe(), bpffs=bpffs)
    pins = {p.name for p in (bpffs / "sluice" / "chainprobe").iterdir()}
    assert pins == {"probe_seen", "probe_drop_port"}
    core = {p.name for p in (bpffs / "sluice" / "core").iterdir()}
    assert core == {"sluice_trace_cfg", "sluice_trace_events", "sluice_pkt_ctx"}
    bpf.cleanup()


def test_pinned_state_survives_a_restart(bpffs):
    first = loader.compile_program("chainprobe", probe(), bpffs=bpffs)
    fd = loader.load_tc(first, "chainprobe", "probe_count")
    for _ in range(3):
        assert test_run(fd, UDP_FRAME).retval == -1  # TC_ACT_UNSPEC: pass on
    assert seen(first, 0) == 3
    first.cleanup()

    second = loader.compile_program("chainprobe", probe(), bpffs=bpffs)
    assert seen(second, 0) == 3  # the same pinned map, not a new one
    fd = loader.load_tc(second, "chainprobe", "probe_count")
    test_run(fd, UDP_FRAME)
    assert seen(second, 0) == 4
    second.cleanup()


def test_pin_of_another_shape_is_replaced(bpffs):
    old = loader.compile_program("chainprobe", probe(seen_max=16), bpffs=bpffs)
    Map.from_bcc(old[b"probe_seen"]).set(ct.c_uint32(0), ct.c_uint64(7))
    old.cleanup()

    new = loader.compile_program("chainprobe", probe(seen_max=32), bpffs=bpffs)
    with Map.open_pinned(bpffs / "sluice" / "chainprobe" / "probe_seen") as pinned:
        assert pinned.info.max_entries == 32
    assert seen(new, 0) == 0  # an incompatible layout cannot carry its entries over
    new.cleanup()


def test_pin_mismatch_is_detected_before_use(bpffs):
    loader.compile_program("chainprobe", probe(seen_max=16), bpffs=bpffs).cleanup()
    from bcc import BPF

    dirs = [bpffs / "sluice" / "chainprobe", bpffs / "sluice" / "core"]
    flags = loader.cflags_for("chainprobe", bpffs, ["-DCHAINPROBE_SEEN_MAX=8"])
    raw = BPF(text=loader.expand_source(PROBE_C).encode(), cflags=flags)  # BCC alone reuses blindly
    (mismatch,) = loader.pin_mismatches(raw, dirs)
    assert mismatch.path.name == "probe_seen"
    assert mismatch.declared.max_entries == 8 and mismatch.pinned.max_entries == 16
    raw.cleanup()


def test_compile_error_is_one_line(bpffs, tmp_path):
    bad = tmp_path / "bad.bpf.c"
    bad.write_text("#include <sluice/sluice.h>\nint f(struct __sk_buff *skb) { return undefined_thing; }\n")
    with pytest.raises(loader.CompileError) as info:
        loader.compile_program("bad", Program("bad", bad), bpffs=bpffs)
    message = str(info.value)
    assert "\n" not in message and "bad.bpf.c" in message and "undefined_thing" in message


def test_missing_shared_header_is_reported(bpffs, tmp_path):
    bad = tmp_path / "bad.bpf.c"
    bad.write_text("#include <sluice/nope.h>\n")
    with pytest.raises(loader.CompileError, match="no shared header sluice/nope.h"):
        loader.compile_program("bad", Program("bad", bad), bpffs=bpffs)
