"""The firewall's runtime against its real maps and programs: session events for replication,
session restore, DNS learning across policy swaps, and runtime policy persistence."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import pytest
import structlog

from sluice.bpf import loader
from sluice.bpf.testrun import test_run
from sluice.plugins.firewall import frames
from sluice.plugins.firewall.config import Config
from sluice.plugins.firewall.maps import SessionValue, Tunnel
from sluice.plugins.firewall.policy import Rule
from sluice.plugins.firewall.runtime import Firewall
from sluice.programs import Program
from sluice.sessions import Session

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(os.geteuid() != 0, reason="loading BPF programs needs root (CAP_BPF, CAP_NET_ADMIN)"),
]

NEXT, DROP = -1, 2
SRC = Path(__file__).resolve().parents[2] / "plugins" / "firewall" / "firewall.bpf.c"
CLIENT, SERVER = "10.1.0.5", "10.2.0.7"
CONFIG = {
    "map_preset": "test",
    "dns": {"enabled": False, "min_ttl": 0, "grace": 0},
    "session_update_interval": 0,
    "networks": [
        {
            "name": "clients",
            "sources": ["10.1.0.0/16"],
            "rules": [
                {"proto": "tcp", "dst": "10.2.0.0/16", "ports": 80},
                {"proto": "tcp", "host": "*.example.test", "ports": 443},
            ],
        }
    ],
}


class Hook:
    def __init__(self):
        self.events = []

    def sluice_session_event(self, event):
        self.events.append(event)


class Ctx:
    name = "firewall"

    def __init__(self, root: Path, state: Path, config: Config):
        self.pin_dir = root / "sluice" / "firewall"
        self.state_dir = state
        self.config = config
        self.log = structlog.get_logger("test")
        self.hook = Hook()


@pytest.fixture(scope="module")
def loaded(kernel_ready):
    root = Path("/sys/fs/bpf") / f"sluice-test-{uuid.uuid4().hex[:8]}"
    root.mkdir()
    bpf = None
    try:
        bpf = loader.compile_program("firewall", Program("firewall", SRC), bpffs=root)
        yield (
            root,
            loader.load_tc(bpf, "firewall", "fw_ingress"),
            loader.load_tc(bpf, "firewall", "fw_egress"),
        )
    finally:
        if bpf is not None:
            bpf.cleanup()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def fw(loaded, tmp_path):
    root, _, _ = loaded
    ctx = Ctx(root, tmp_path, Config.model_validate(CONFIG))
    f = Firewall(ctx)
    f.maps.map("fw_sessions").clear()
    f.maps.map("fw_settings").clear()
    f.start()
    yield f
    f.stop()


def out(loaded, frame) -> int:
    return test_run(loaded[1], frame, data_size_out=0).retval


def back(loaded, frame) -> int:
    return test_run(loaded[2], frame, data_size_out=0).retval


def syn():
    return frames.packet(CLIENT, SERVER, 6, 40000, 80, "S")


def syn_ack():
    return frames.packet(SERVER, CLIENT, 6, 80, 40000, "SA")


def kinds(fw) -> list[str]:
    events = fw.ctx.hook.events
    fw.ctx.hook.events = []
    return [e.kind for e in events]


def test_session_events_created_updated_deleted(fw, loaded):
    assert out(loaded, syn()) == NEXT
    fw.publish(fw.gc_once())
    [created] = fw.ctx.hook.events
    assert created.kind == "created" and created.owner == "firewall"
    assert len(created.session.key) == 40 and len(created.session.value) == 64
    attrs = created.session.attrs
    assert (attrs["src"], attrs["dst"], attrs["sport"], attrs["dport"], attrs["proto"]) == (
        CLIENT,
        SERVER,
        40000,
        80,
        "tcp",
    )
    kinds(fw)
    assert back(loaded, syn_ack()) == NEXT
    fw.publish(fw.gc_once())
    assert kinds(fw) == ["updated"]
    fw.publish(fw.gc_once())
    assert kinds(fw) == []  # nothing moved: no event
    fw.maps.set_setting("tcp-established-timeout", 0)
    fw.publish(fw.gc_once())
    assert kinds(fw) == ["deleted"]
    assert fw.maps.map("fw_sessions").count() == 0


def test_restore_writes_sessions_back(fw, loaded):
    assert out(loaded, syn()) == NEXT
    assert back(loaded, syn_ack()) == NEXT
    fw.publish(fw.gc_once())
    [event] = [e for e in fw.ctx.hook.events if e.kind == "created"]
    saved = event.session
    fw.maps.map("fw_sessions").clear()
    assert back(loaded, syn_ack()) == DROP  # this node forgot the flow
    broken = Session(owner="firewall", key=b"\0" * 7, value=b"")
    assert fw.restore([saved, broken]) == 1
    assert back(loaded, frames.packet(SERVER, CLIENT, 6, 80, 40000, "A")) == NEXT
    [(_, value)] = list(fw.maps.sessions())
    assert value.flags & 0x2 and isinstance(value, SessionValue)


def test_learned_allow_follows_policy_swaps(fw, loaded):
    target = frames.packet(CLIENT, "10.7.7.7", 6, 40001, 443)
    assert out(loaded, target) == DROP
    verdict = fw.decide(CLIENT, "api.example.test")
    assert verdict.forward and verdict.learn
    assert not fw.decide(CLIENT, "api.other.test").forward  # default deny: refused
    fw.learn(CLIENT, "api.example.test", {"10.7.7.7": 30})
    assert out(loaded, target) == NEXT
    # a swap that moves the hostname rule keeps the learned allow (re-derived for the new order)
    network = fw.policy.networks[0]
    moved = fw.policy.model_copy(
        update={"networks": [network.model_copy(update={"rules": [network.rules[1], network.rules[0]]})]}
    )
    fw.apply(moved)
    assert out(loaded, frames.packet(CLIENT, "10.7.7.7", 6, 40002, 443)) == NEXT
    # a swap without it removes it
    gone = fw.policy.model_copy(
        update={"networks": [network.model_copy(update={"rules": [network.rules[0]]})]}
    )
    fw.apply(gone)
    assert out(loaded, frames.packet(CLIENT, "10.7.7.7", 6, 40003, 443)) == DROP


def test_learned_allow_expires(fw, loaded):
    fw.learn(CLIENT, "a.example.test", {"10.7.7.8": 0})  # min_ttl 0, grace 0: already expired
    assert out(loaded, frames.packet(CLIENT, "10.7.7.8", 6, 40004, 443)) == DROP
    fw.expire_learned()
    assert fw.learned_view() == []


def test_runtime_policy_survives_restart_until_the_config_changes(fw, loaded, tmp_path):
    extra = Rule(proto="tcp", dst="10.9.9.9", ports=22)
    network = fw.policy.networks[0]
    fw.apply(
        fw.policy.model_copy(
            update={"networks": [network.model_copy(update={"rules": [*network.rules, extra]})]}
        )
    )
    again = Firewall(fw.ctx)
    again.start()
    assert again.policy.networks[0].rules[-1] == extra
    changed = dict(CONFIG, networks=[dict(CONFIG["networks"][0], default="allow")])
    fw.ctx.config = Config.model_validate(changed)
    third = Firewall(fw.ctx)
    third.start()
    assert extra not in third.policy.networks[0].rules and third.policy.networks[0].default == "allow"
    again.stop()
    third.stop()


def test_bad_policy_changes_nothing(fw, loaded):
    generation = fw.generation
    network = fw.policy.networks[0]
    many = [Rule(proto="tcp", dst="10.2.0.0/16", ports=p) for p in range(1, 30)]
    with pytest.raises(ValueError, match="at most 16 may overlap"):
        fw.apply(fw.policy.model_copy(update={"networks": [network.model_copy(update={"rules": many})]}))
    assert fw.generation == generation == fw.maps.active()
    assert out(loaded, frames.packet(CLIENT, SERVER, 6, 40005, 80)) == NEXT


def test_policy_too_big_for_the_maps_is_a_value_error_and_changes_nothing(fw, loaded):
    generation = fw.generation
    management = [f"192.168.{i // 250}.{i % 250}/32" for i in range(300)]  # fw_bypass holds 256
    with pytest.raises(ValueError, match="does not fit"):
        fw.apply(fw.policy.model_copy(update={"management": management}))
    assert fw.generation == generation == fw.maps.active() and fw.policy.management == []
    assert not fw.policy_file.exists()
    assert out(loaded, frames.packet(CLIENT, SERVER, 6, 40008, 80)) == NEXT


def test_reload_with_a_policy_that_does_not_compile_changes_nothing(fw, loaded):
    network = fw.policy.networks[0]
    fw.apply(
        fw.policy.model_copy(update={"networks": [network.model_copy(update={"rules": network.rules[:1]})]})
    )
    saved = fw.policy_file.read_text()
    many = [{"proto": "tcp", "dst": "10.2.0.0/16", "ports": p} for p in range(1, 30)]
    bad = Config.model_validate(
        dict(CONFIG, settings={"audit-mode": 1}, networks=[dict(CONFIG["networks"][0], rules=many)])
    )
    config, policy = fw.cfg, fw.policy
    with pytest.raises(ValueError, match="at most 16 may overlap"):
        fw.reload(bad)
    assert fw.cfg is config and fw.policy == policy and fw.policy_file.read_text() == saved
    assert fw.maps.get_setting("audit-mode") == 0


def test_geneve_metadata_travels_with_the_session(fw, loaded):
    assert out(loaded, syn()) == NEXT
    [(key, _)] = list(fw.maps.sessions())
    flows = fw.maps.map("fw_geneve_flows")
    flows.set(key, Tunnel(type=1, vni=77, outer_sport=6081, outer_dport=6081))
    fw.publish(fw.gc_once())
    [event] = fw.ctx.hook.events
    assert event.session.attrs["vni"] == 77 and len(event.session.value) == 64 + 80
    fw.maps.map("fw_sessions").clear()
    fw.publish(fw.gc_once())  # the session is gone: its tunnel metadata goes with it
    assert flows.count() == 0
    assert fw.restore([event.session]) == 1
    assert flows.get(key).vni == 77


def test_dns_proxy_that_cannot_listen_is_reported_not_fatal(fw, loaded):
    import asyncio

    fw.ctx.config = Config.model_validate(dict(CONFIG, dns={"listen": ["192.0.2.123"], "port": 53}))
    fw.cfg = fw.ctx.config
    asyncio.run(fw.start_dns())
    assert fw.proxy is None and "192.0.2.123" in fw.dns_error and "\n" not in fw.dns_error
    assert out(loaded, frames.packet(CLIENT, SERVER, 6, 40006, 80)) == NEXT  # the policy still holds
    assert out(loaded, frames.packet(CLIENT, SERVER, 6, 40007, 81)) == DROP
