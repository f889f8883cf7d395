"""Feature names, header-tree selection and the doctor table: nothing here needs root."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from sluice import kernel
from sluice.doctor import format_table, to_json
from sluice.kernel import Check, Features, HeaderPair

pytestmark = pytest.mark.unit


# --------------------------------------------------------------------------------------------
# Feature names
# --------------------------------------------------------------------------------------------


def test_fixed_names_are_the_documented_ones():
    assert kernel.FEATURES == (
        "root",
        "bpffs",
        "tracefs",
        "btf",
        "kernel-headers",
        "bpf-syscall",
        "tc",
        "tcx",
        "tracepoints",
        "kprobes",
        "fentry",
        "ringbuf",
        "lpm-trie",
        "batch-ops",
        "prog-test-run",
        "tunnel:vxlan",
        "tunnel:geneve",
        "tunnel:ipip",
        "tunnel:wireguard",
        "conntrack-netlink",
    )


def test_unknown_name_is_missing_and_lists_the_known_ones(tmp_path):
    result = kernel.check("ring-buffer", tmp_path)
    assert not result.ok
    assert result.name == "ring-buffer"
    assert "unknown" in result.detail
    assert "ringbuf" in result.fix and "tracepoint:<cat>/<event>" in result.fix


@pytest.mark.parametrize(
    ("name", "args"),
    [
        ("tracepoint:skb/kfree_skb", ("tracepoint", "skb", "kfree_skb")),
        ("tracepoint:sock/inet_sock_set_state", ("tracepoint", "sock", "inet_sock_set_state")),
        ("tunnel:gre", ("tunnel", "gre")),
        ("tunnel:vxlan", ("tunnel", "vxlan")),
    ],
)
def test_generic_names_dispatch_to_their_probe(monkeypatch, tmp_path, name, args):
    seen = []
    monkeypatch.setattr(
        kernel, "check_tracepoint", lambda c, e: seen.append(("tracepoint", c, e)) or Check("x", True, "")
    )
    monkeypatch.setattr(kernel, "check_tunnel", lambda k: seen.append(("tunnel", k)) or Check("x", True, ""))
    result = kernel.check(name, tmp_path)
    assert seen == [args]
    assert result.name == name  # reported under the name asked for


@pytest.mark.parametrize(
    "name", ["tracepoint:skb", "tracepoint:skb/", "tracepoint:../../x/y", "tracepoint:skb:kfree_skb"]
)
def test_malformed_tracepoint_names_are_missing(tmp_path, name):
    result = kernel.check(name, tmp_path)
    assert not result.ok
    assert result.name == name
    assert "malformed" in result.detail
    assert "tracepoint:<category>/<event>" in result.fix


@pytest.mark.parametrize("name", ["tunnel:", "tunnel:vx lan", "tunnel:../vxlan"])
def test_malformed_tunnel_names_are_missing_without_touching_netlink(tmp_path, name):
    result = kernel.check(name, tmp_path)
    assert not result.ok and "malformed" in result.detail


def test_a_crashing_probe_becomes_a_missing_check(monkeypatch, tmp_path):
    def boom() -> Check:
        raise ValueError("bug")

    monkeypatch.setattr(kernel, "check_ringbuf", boom)
    result = kernel.check("ringbuf", tmp_path)
    assert not result.ok
    assert "ValueError: bug" in result.detail


@pytest.fixture
def fake_tracefs(tmp_path):
    root = tmp_path / "tracing"
    (root / "events/skb/kfree_skb").mkdir(parents=True)
    (root / "events/skb/kfree_skb/id").write_text("1234\n")
    (root / "events/sched").mkdir()
    return root


def test_tracepoint_found_in_tracefs(fake_tracefs):
    result = kernel.check_tracepoint("skb", "kfree_skb", fake_tracefs)
    assert result == Check("tracepoint:skb/kfree_skb", True, "id 1234")


def test_tracepoint_absent_from_tracefs(fake_tracefs):
    result = kernel.check_tracepoint("skb", "consume_skb", fake_tracefs)
    assert not result.ok and "skb/consume_skb" in result.detail and result.fix


def test_tracepoints_needs_kfree_skb(fake_tracefs):
    assert kernel.check_tracepoints(fake_tracefs).ok
    (fake_tracefs / "events/skb/kfree_skb/id").unlink()
    assert not kernel.check_tracepoints(fake_tracefs).ok


# --------------------------------------------------------------------------------------------
# Features
# --------------------------------------------------------------------------------------------


@pytest.fixture
def probed(monkeypatch):
    """Replace the real probes: names ending in "-no" fail, and every call is recorded."""
    calls = []

    def fake_check(name: str, cache_dir: Path) -> Check:
        calls.append(name)
        return Check(name, not name.endswith("-no"), "fake", "" if not name.endswith("-no") else "do x")

    monkeypatch.setattr(kernel, "check", fake_check)
    return calls


def test_features_probe_once_per_name(probed, tmp_path):
    features = Features(tmp_path)
    assert features.has("ringbuf") and features.has("ringbuf")
    assert not features.has("geneve-no")
    assert probed == ["ringbuf", "geneve-no"]


def test_features_missing_returns_only_the_failures_in_order(probed, tmp_path):
    features = Features(tmp_path)
    missing = features.missing(["tc", "b-no", "ringbuf", "a-no"])
    assert [c.name for c in missing] == ["b-no", "a-no"]
    assert all(c.fix == "do x" for c in missing)


def test_features_seeded_with_known_results_do_not_probe_them(probed, tmp_path):
    features = Features(tmp_path, known=[Check("tc", False, "seeded", "fix it")])
    assert features.missing(["tc", "ringbuf"]) == [Check("tc", False, "seeded", "fix it")]
    assert probed == ["ringbuf"]


# --------------------------------------------------------------------------------------------
# Kernel headers
# --------------------------------------------------------------------------------------------


def make_pair(
    src: Path, version: str, flavour: str = "amd64", karch: str = "x86", common: str = "common"
) -> None:
    """A miniature Debian headers pair: generated files per flavour, the rest in -common."""
    common_dir = src / f"linux-headers-{version}-{common}"
    (common_dir / "include/linux").mkdir(parents=True, exist_ok=True)
    (common_dir / "include/linux/kconfig.h").write_text("/* kconfig */\n")
    (common_dir / "Makefile").write_text("# the real kernel Makefile\n")
    arch_dir = src / f"linux-headers-{version}-{flavour}"
    (arch_dir / "include/generated").mkdir(parents=True)
    (arch_dir / "include/generated/autoconf.h").write_text(f"/* {flavour} */\n")
    (arch_dir / f"arch/{karch}/include/generated").mkdir(parents=True)
    (arch_dir / "Makefile").write_text(f"include /usr/src/{common_dir.name}/Makefile\n")


@pytest.fixture(autouse=True)
def no_kheaders(monkeypatch, tmp_path):
    # The build machine's /sys/kernel/kheaders.tar.xz must not decide these tests.
    monkeypatch.setattr(kernel, "KHEADERS", tmp_path / "no-kheaders.tar.xz")


@pytest.fixture
def src(tmp_path):
    src = tmp_path / "usr-src"
    make_pair(src, "6.1.0-56")
    make_pair(src, "6.1.0-56", flavour="cloud-amd64")
    make_pair(src, "6.1.0-56", flavour="rt-amd64", common="common-rt")
    make_pair(src, "6.12.0-1")
    make_pair(src, "6.19.0-1", flavour="arm64", karch="arm64")
    (src / "linux-kbuild-6.1").mkdir()  # not headers
    (src / "linux-headers-5.10.0-9-amd64").mkdir()  # a half-removed package
    return src


def versions(pairs: list[HeaderPair]) -> list[str]:
    return sorted(p.version for p in pairs)


def test_pairs_come_from_the_makefile_include(src):
    pairs = kernel.find_header_pairs(src, machine="x86_64")
    assert versions(pairs) == [
        "6.1.0-56-amd64",
        "6.1.0-56-cloud-amd64",
        "6.1.0-56-rt-amd64",
        "6.12.0-1-amd64",
    ]
    rt = next(p for p in pairs if p.version == "6.1.0-56-rt-amd64")
    assert rt.common.name == "linux-headers-6.1.0-56-common-rt"


def test_pairs_for_another_machine_are_skipped(src):
    assert versions(kernel.find_header_pairs(src, machine="aarch64")) == ["6.19.0-1-arm64"]


@pytest.mark.parametrize(
    ("release", "expected"),
    [
        ("6.1.0-56-amd64", "6.1.0-56-amd64"),  # exact
        ("6.1.158-custom", "6.1.0-56-amd64"),  # same major.minor beats newer; plain beats cloud/rt
        ("6.18.44-fc-v657", "6.12.0-1-amd64"),  # no 6.18 headers: the newest
        ("5.15.0-91-generic", "6.12.0-1-amd64"),
    ],
)
def test_pick_prefers_same_major_minor_then_newest(src, release, expected):
    assert (
        kernel.pick_header_pair(kernel.find_header_pairs(src, machine="x86_64"), release).version == expected
    )


def test_pick_from_nothing_is_none():
    assert kernel.pick_header_pair([], "6.1.0") is None


def snapshot(root: Path) -> dict[str, tuple]:
    return {str(p): (p.is_symlink(), p.lstat().st_mtime_ns) for p in root.rglob("*")}


def test_header_tree_merges_the_pair_as_absolute_links(src, tmp_path):
    (src / "linux-kbuild-6.1/scripts").mkdir()
    (src / "linux-headers-6.12.0-1-common/scripts").symlink_to("../linux-kbuild-6.1/scripts")
    before = snapshot(src)

    tree = kernel.bcc_header_tree(
        tmp_path / "cache",
        release="6.18.44",
        machine="x86_64",
        src_root=src,
        modules_root=tmp_path / "modules",
    )

    assert tree == tmp_path / "cache/kernel-headers/6.12.0-1-amd64"
    assert (
        tree / "include/linux/kconfig.h"
    ).resolve() == src / "linux-headers-6.12.0-1-common/include/linux/kconfig.h"
    assert (tree / "include/generated/autoconf.h").read_text() == "/* amd64 */\n"
    # Both halves have a Makefile; the flavour's one wins, as with `cp -rsf`.
    assert (tree / "Makefile").resolve() == src / "linux-headers-6.12.0-1-amd64/Makefile"
    # A relative link would dangle in the cache: it must point at its resolved target.
    assert os.readlink(tree / "scripts") == str(src / "linux-kbuild-6.1/scripts")
    # Directories both halves have are merged; the rest is linked whole.
    assert (tree / "include").is_dir() and not (tree / "include").is_symlink()
    assert os.readlink(tree / "include/linux") == str(src / "linux-headers-6.12.0-1-common/include/linux")
    assert snapshot(src) == before  # nothing written to the source tree
    assert os.listdir(tree.parent) == [tree.name]  # no temporary directory left behind


def test_header_tree_merging_never_writes_through_a_linked_directory(src, tmp_path):
    kbuild_tools = src / "linux-kbuild-6.1/tools"
    (kbuild_tools / "objtool").mkdir(parents=True)
    (src / "linux-headers-6.12.0-1-common/tools").symlink_to(kbuild_tools)
    (src / "linux-headers-6.12.0-1-amd64/tools").mkdir()
    (src / "linux-headers-6.12.0-1-amd64/tools/extra.h").write_text("")
    before = snapshot(src)

    tree = kernel.bcc_header_tree(
        tmp_path / "cache",
        release="6.12.0",
        machine="x86_64",
        src_root=src,
        modules_root=tmp_path / "modules",
    )

    assert not (tree / "tools").is_symlink()
    assert sorted(os.listdir(tree / "tools")) == ["extra.h", "objtool"]
    assert snapshot(src) == before


def test_header_tree_is_reused_and_rebuilt_when_broken(src, tmp_path):
    build = dict(release="6.12.0", machine="x86_64", src_root=src, modules_root=tmp_path / "modules")
    tree = kernel.bcc_header_tree(tmp_path / "cache", **build)
    marker = tree / "sluice-test-marker"
    marker.write_text("")
    assert kernel.bcc_header_tree(tmp_path / "cache", **build) == tree
    assert marker.exists()  # reused, not rebuilt

    (tree / "include/linux").unlink()  # as if the tree had been damaged
    assert kernel.bcc_header_tree(tmp_path / "cache", **build) == tree
    assert (tree / "include/linux/kconfig.h").exists() and not marker.exists()


def test_no_tree_needed_when_modules_build_has_headers(src, tmp_path):
    build = tmp_path / "modules/6.18.44/build"
    (build / "include/linux").mkdir(parents=True)
    (build / "include/linux/kconfig.h").write_text("")
    assert (
        kernel.bcc_header_tree(
            tmp_path / "cache", release="6.18.44", src_root=src, modules_root=tmp_path / "modules"
        )
        is None
    )
    assert not (tmp_path / "cache").exists()


def test_no_tree_needed_with_builtin_kheaders(src, tmp_path, monkeypatch):
    monkeypatch.setattr(kernel, "KHEADERS", src / "linux-kbuild-6.1")  # any existing path
    assert (
        kernel.bcc_header_tree(tmp_path / "cache", release="6.18.44", src_root=src, modules_root=src) is None
    )


def test_no_headers_at_all_raises(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no headers for 6.18.44"):
        kernel.bcc_header_tree(
            tmp_path / "cache",
            release="6.18.44",
            src_root=tmp_path / "empty",
            modules_root=tmp_path / "empty",
        )


def test_prepare_bcc_points_bcc_at_the_tree(monkeypatch, tmp_path):
    tree = tmp_path / "cache/kernel-headers/6.1.0-56-amd64"
    monkeypatch.delenv("BCC_KERNEL_SOURCE", raising=False)
    monkeypatch.setattr(kernel, "bcc_header_tree", lambda cache_dir: tree)
    result = kernel.prepare_bcc(tmp_path / "cache")
    assert result.ok and result.name == "kernel-headers" and str(tree) in result.detail
    assert os.environ["BCC_KERNEL_SOURCE"] == str(tree)


def test_prepare_bcc_respects_a_callers_tree(monkeypatch, tmp_path):
    mine = tmp_path / "my-headers"
    (mine / "include/linux").mkdir(parents=True)
    (mine / "include/linux/kconfig.h").write_text("")
    monkeypatch.setenv("BCC_KERNEL_SOURCE", str(mine))
    monkeypatch.setattr(kernel, "bcc_header_tree", lambda cache_dir: pytest.fail("must not build"))
    result = kernel.prepare_bcc(tmp_path / "cache")
    assert result.ok and "set by the caller" in result.detail
    assert os.environ["BCC_KERNEL_SOURCE"] == str(mine)


def test_prepare_bcc_without_headers_says_what_to_install(monkeypatch, tmp_path):
    def none_found(cache_dir):
        raise FileNotFoundError("no headers for 6.18.44")

    monkeypatch.delenv("BCC_KERNEL_SOURCE", raising=False)
    monkeypatch.setattr(kernel, "bcc_header_tree", none_found)
    result = kernel.prepare_bcc(tmp_path / "cache")
    assert not result.ok and "no headers" in result.detail and "linux-headers" in result.fix
    assert "BCC_KERNEL_SOURCE" not in os.environ


# --------------------------------------------------------------------------------------------
# Mounts and the doctor table
# --------------------------------------------------------------------------------------------


def test_mounts_decode_escapes_and_keep_the_top_mount(tmp_path):
    mounts = tmp_path / "mounts"
    mounts.write_text(
        "sysfs /sys sysfs rw 0 0\n"
        "none /sys/fs/bpf tmpfs rw 0 0\n"
        "bpf /sys/fs/bpf bpf rw 0 0\n"
        "tracefs /mnt/my\\040trace tracefs rw 0 0\n"
    )
    found = kernel._mounts(mounts)
    assert found["/sys/fs/bpf"] == "bpf"
    assert found["/mnt/my trace"] == "tracefs"


CHECKS = [
    Check("root", True, "euid 0"),
    Check("tunnel:geneve", False, "kernel has no geneve link type", "modprobe geneve"),
    Check("conntrack-netlink", True, "ctnetlink answered: 3 entries"),
]


def test_table_columns_are_aligned_with_fixes_under_missing_rows():
    lines = format_table(CHECKS).splitlines()
    assert lines[0].split() == ["CHECK", "STATUS", "DETAIL"]
    detail_col = lines[0].index("DETAIL")
    rows = [line for line in lines if not line.startswith(" ")]
    assert [line[:detail_col].split() for line in rows[1:]] == [
        ["root", "ok"],
        ["tunnel:geneve", "MISSING"],
        ["conntrack-netlink", "ok"],
    ]
    assert all(line.index(check.detail) == detail_col for line, check in zip(rows[1:], CHECKS, strict=True))
    fix_index = lines.index(next(line for line in lines if line.startswith("tunnel:geneve"))) + 1
    assert lines[fix_index] == " " * detail_col + "fix: modprobe geneve"
    assert sum("fix:" in line for line in lines) == 1


def test_json_round_trips():
    assert [Check(**d) for d in json.loads(to_json(CHECKS))] == CHECKS
