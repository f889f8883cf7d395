"""The lab itself: topology, services, and a lifecycle that never leaves anything behind."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from sluice.lab import (
    HOSTS,
    RCODE_NXDOMAIN,
    Lab,
    LabError,
    LabSpec,
    lab_cleanup_all,
    netns_add,
    netns_delete,
    netns_exists,
    pid_alive,
)
from tests.netlab import Defer, cleanup_leftovers, dns_query, lab, netns_pair, ping, unique_prefix

pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(os.geteuid() != 0, reason="lab tests need root: they create network namespaces"),
]


@pytest.fixture(scope="module")
def shared_lab():
    """One lab for the read-only checks; the lifecycle tests build their own."""
    with lab() as built:
        yield built


def assert_gone(spec: LabSpec, pids: list[int]) -> None:
    lab_ = Lab(spec)
    assert [ns for ns in lab_.namespaces if netns_exists(ns)] == []
    assert [p for p in pids if pid_alive(p)] == []
    assert not lab_.state_dir.exists()
    assert Lab.status(spec.prefix, spec.state_root)["exists"] is False


def service_pids(lab_: Lab) -> list[int]:
    return [p["pid"] for p in Lab.status(lab_.spec.prefix)["processes"].values()]


# ---- topology ----


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize(
    ("src", "dst", "ttl"),
    [
        ("client", "server", 63),  # 63: exactly one routed hop, the gateway
        ("client", "dns", 63),
        ("server", "client", 63),
        ("gw", "peer", 64),
        ("gw", "nats", 64),
    ],
)
def test_paths(shared_lab, src, dst, ttl, family):
    assert ping(shared_lab.ns(src), shared_lab.addr(dst, family)) == ttl


def test_gateway_interfaces_are_named_and_addressed(shared_lab):
    st = Lab.status(shared_lab.spec.prefix)
    assert st["healthy"], st["problems"]
    gw = st["interfaces"]["gw"]
    for ifname, endpoint in [
        ("ingress0", "gw-ingress"),
        ("egress0", "gw-egress"),
        ("underlay0", "gw-underlay"),
        ("mgmt0", "gw-mgmt"),
    ]:
        assert gw[ifname]["up"]
        assert f"{Lab.addr(endpoint, 4)}/24" in gw[ifname]["addrs"]
        assert f"{Lab.addr(endpoint, 6)}/64" in gw[ifname]["addrs"]


# ---- services ----


@pytest.mark.parametrize("family", [4, 6])
def test_client_resolves_through_gateway(shared_lab, family):
    dns = shared_lab.addr("dns", family)

    def query(name, qtype="A"):
        reply = dns_query(shared_lab, "client", dns, name, qtype)
        return reply

    a = query("allowed.test")
    assert a.values("A") == [shared_lab.addr("server", 4)]
    assert {r.ttl for r in a.answers} == {5}
    assert query("allowed.test", "AAAA").values("AAAA") == [shared_lab.addr("server", 6)]
    assert query("other.test").values("A") == [shared_lab.addr("other", 4)]
    cname = query("cname.test")
    assert cname.values("CNAME") == ["allowed.test"]
    assert cname.values("A") == [shared_lab.addr("server", 4)]
    assert query("missing.test").rcode == RCODE_NXDOMAIN


@pytest.mark.parametrize("family", [4, 6])
def test_nats_greets_the_gateway_with_jetstream(shared_lab, family):
    with shared_lab.socket("gw", family) as sock:
        sock.settimeout(2)
        sock.connect((shared_lab.addr("nats", family), 4222))
        banner = sock.recv(4096)
    assert banner.startswith(b"INFO ")
    assert b'"jetstream":true' in banner


def test_exec_runs_inside_the_namespace(shared_lab):
    out = shared_lab.exec("gw", ["ip", "-br", "link"]).stdout
    assert "ingress0" in out and "egress0" in out


# ---- lifecycle ----


def test_up_reuses_down_removes_everything_and_twice_is_fine():
    spec = LabSpec(prefix=unique_prefix(), dns_ttl=7)
    try:
        start = time.monotonic()
        first = Lab.up(spec)
        up_s = time.monotonic() - start
        pids = service_pids(first)
        stray = first.popen("client", ["sleep", "60"])  # down() must catch what tests leave running
        created = (first.state_dir / "state.json").read_text()

        start = time.monotonic()
        again = Lab.up(spec)
        reuse_s = time.monotonic() - start
        assert service_pids(again) == pids
        assert (again.state_dir / "state.json").read_text() == created
        assert {r.ttl for r in again.dns_query("client", "allowed.test").answers} == {7}

        start = time.monotonic()
        again.down()
        down_s = time.monotonic() - start
        stray.wait(timeout=5)
        assert_gone(spec, [*pids, stray.pid])
        again.down()
        print(f"\nlab timings: up {up_s:.3f}s, reuse {reuse_s:.3f}s, down {down_s:.3f}s")
    finally:
        Lab(spec).down()


@pytest.mark.parametrize("damage", ["kill-nats", "delete-peer-ns", "delete-link"])
def test_partial_lab_is_rebuilt(damage):
    with lab() as built:
        old = service_pids(built)
        if damage == "kill-nats":
            os.kill(Lab.status(built.spec.prefix)["processes"]["nats"]["pid"], signal.SIGKILL)
            deadline = time.monotonic() + 10  # it dies once scheduled: not at once under load
            while Lab.status(built.spec.prefix)["healthy"] and time.monotonic() < deadline:
                time.sleep(0.05)
        elif damage == "delete-peer-ns":
            subprocess.run(["ip", "netns", "delete", built.ns("peer")], check=True)
        else:
            subprocess.run(["ip", "-n", built.ns("gw"), "link", "del", "egress0"], check=True)
        st = Lab.status(built.spec.prefix)
        assert not st["healthy"] and st["exists"]

        rebuilt = Lab.up(built.spec)
        st = Lab.status(built.spec.prefix)
        assert st["healthy"], st["problems"]
        assert set(service_pids(rebuilt)).isdisjoint(old)
        assert ping(rebuilt.ns("client"), rebuilt.addr("server", 6)) == 63


def test_changed_spec_rebuilds():
    with lab() as built:
        changed = Lab.up(LabSpec(prefix=built.spec.prefix, dns_ttl=9))
        assert {r.ttl for r in changed.dns_query("client", "allowed.test").answers} == {9}


def test_failed_start_names_the_culprit_and_leaves_nothing():
    spec = LabSpec(prefix=unique_prefix(), nats_server="/bin/false", wait_timeout=2)
    try:
        with pytest.raises(LabError, match="nats-server"):
            Lab.up(spec)
        assert_gone(spec, [])
    finally:
        Lab(spec).down()


def test_cleanup_all_removes_crashed_labs():
    spec = LabSpec(prefix=unique_prefix())
    try:
        pids = service_pids(Lab.up(spec))  # then "crash": nobody calls down()
        assert lab_cleanup_all(spec.prefix) == [spec.prefix]
        assert_gone(spec, pids)
        assert lab_cleanup_all(spec.prefix) == []
    finally:
        Lab(spec).down()


def test_down_of_a_lab_that_never_existed():
    spec = LabSpec(prefix=unique_prefix())
    Lab(spec).down()
    st = Lab.status(spec.prefix)
    assert not st["exists"] and not st["healthy"]
    assert len([p for p in st["problems"] if "namespace" in p]) == len(HOSTS)


# ---- helpers from tests/netlab.py ----


@pytest.mark.parametrize("family", [4, 6])
def test_netns_pair(family):
    with netns_pair() as pair:
        assert ping(pair.a, pair.addr("b", family)) == 64
        assert ping(pair.b, pair.addr("a", family)) == 64
    assert not netns_exists(pair.a) and not netns_exists(pair.b)


def test_netns_pair_is_removed_when_the_body_fails():
    with pytest.raises(RuntimeError), netns_pair() as pair:
        raise RuntimeError("test body failed")
    assert not netns_exists(pair.a) and not netns_exists(pair.b)


def test_cleanup_leftovers_also_removes_pairs():
    prefix = unique_prefix()
    try:
        netns_add(f"{prefix}a")  # what a killed netns_pair() leaves
        assert cleanup_leftovers(prefix) == [f"{prefix}a"]
        assert not netns_exists(f"{prefix}a")
    finally:
        netns_delete(f"{prefix}a")


def test_defer_runs_newest_first_and_honours_cancel():
    done: list[str] = []
    with Defer() as defer:
        defer(done.append, "first")
        defer(done.append, "cancelled").cancel()
        defer(done.append, "last")
        defer(done.append, "early").run()
        assert len(defer) == 2
    assert done == ["early", "last", "first"]


def test_defer_keeps_the_body_error_and_notes_cleanup_failures():
    done: list[str] = []
    with pytest.raises(ValueError) as info, Defer() as defer:
        defer(done.append, "ran anyway")
        defer(Path("/nonexistent/sluice").unlink)
        raise ValueError("body")
    assert done == ["ran anyway"]
    assert any("cleanup also failed" in n for n in info.value.__notes__)
