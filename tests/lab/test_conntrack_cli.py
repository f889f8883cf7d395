"""`sluice ct` against real tables filled by real traffic, and the host commands' error lines."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from sluice.plugins.conntrack import Config
from sluice.plugins.conntrack.cli import ct
from tests.lab.test_conntrack_helpers import conntrack_on_pair, udp_flow

pytestmark = pytest.mark.lab
SLUICE = Path(__file__).resolve().parents[2] / ".venv" / "bin" / "sluice"


@pytest.fixture(scope="module")
def filled(kernel_ready, tmp_path_factory):
    config = Config(interfaces=["veth0"], tcp_table_size=1024, any_table_size=1024, host={"enabled": False})
    with conntrack_on_pair(tmp_path_factory.mktemp("state"), config) as (pair, pin, _):
        yield pair, pin.parent.parent


def run(*args, ok=True):
    result = CliRunner().invoke(ct, [str(a) for a in args])
    assert (result.exit_code == 0) == ok, result.output
    return result


def test_list_count_delete_flush(filled):
    pair, root = filled
    sport, dport = udp_flow(pair)
    udp_flow(pair, 6)
    rows = json.loads(run("list", "--bpffs", root, "--proto", "udp", "--port", dport, "--json").output)
    assert len(rows) == 1
    r = rows[0]
    assert (r["src"], r["dst"], r["sport"], r["dport"]) == (pair.addr("a"), pair.addr("b"), sport, dport)
    assert r["packets"] == {"original": 1, "reply": 0} and 55 <= r["remaining_s"] <= 60
    text = run("list", "--bpffs", root, "--ip", pair.addr("b", 6)).output
    assert pair.addr("b", 6) in text and "expires_in=" in text and pair.addr("b") + ":" not in text

    counts = json.loads(run("count", "--bpffs", root, "--json").output)
    assert {(c["tenant"], c["table"]) for c in counts} == {(0, "tcp"), (0, "any")}
    assert next(c for c in counts if c["table"] == "any")["entries"] >= 2

    assert "would delete 0" in run("gc", "--bpffs", root, "--dry-run").output
    out = json.loads(run("delete", "--bpffs", root, "--ip", pair.addr("b", 6), "--json").output)
    assert out["deleted"] >= 1 and all(e["dst"] == pair.addr("b", 6) for e in out["entries"])
    assert "flushed" in run("flush", "--bpffs", root).output
    assert json.loads(run("list", "--bpffs", root, "--json").output) == []

    assert "created" in run("tenant", "add", "--bpffs", root, 42).output
    assert run("tenant", "list", "--bpffs", root).output.split() == ["0", "42"]
    assert "removed" in run("tenant", "remove", "--bpffs", root, 42).output


def test_bad_input_is_one_line(filled, tmp_path):
    _, root = filled
    for args in (
        ("list", "--bpffs", tmp_path),  # plugin never ran here
        ("delete", "--bpffs", root, "--ip", "not-an-ip"),
        ("tenant", "remove", "--bpffs", root, 9999),
        ("nat", "udp 10.0.0.1:1"),
        ("host", "get", "bogus 1.2.3.4:1 5.6.7.8:2"),
    ):
        result = run(*args, ok=False)
        assert result.output.strip().count("\n") == 0 and "Error" in result.output, result.output
    missing = f"sluicect-missing-{tmp_path.name[-8:]}"
    for args in (("host", "list"), ("host", "get"), ("nat",)):  # not created on the way
        flow = ("udp 10.0.0.1:1 10.0.0.2:2",) if args != ("host", "list") else ()
        result = run(*args, "--netns", missing, *flow, ok=False)
        assert f"network namespace {missing!r} not found" in result.output, result.output
        assert not Path(f"/run/netns/{missing}").exists()


def test_host_commands_without_cap_net_admin_say_so(filled):
    pair, _ = filled
    result = subprocess.run(
        ["setpriv", "--bounding-set=-net_admin", "--inh-caps=-net_admin", str(SLUICE), "ct", "host", "list"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "CAP_NET_ADMIN" in lines[0], result.stderr


def test_host_list_reads_like_conntrack(filled):
    pair, _ = filled
    subprocess.run(["ip", "netns", "exec", pair.b, "nft", "add", "table", "inet", "sluicectcli"], check=True)
    subprocess.run(["ip", "netns", "exec", pair.b, "nft", "add", "chain", "inet", "sluicectcli", "in",
                    "{ type filter hook input priority 0; ct state new accept; }"], check=True)  # fmt: skip
    sport, dport = udp_flow(pair)
    out = run("host", "list", "--netns", pair.b).output
    line = next(ln for ln in out.splitlines() if f"sport={sport}" in ln)
    assert line.startswith("udp      17 ")
    assert f"src={pair.addr('a')} dst={pair.addr('b')} sport={sport} dport={dport} [UNREPLIED]" in line
    got = run(
        "host", "get", "--netns", pair.b, f"udp {pair.addr('a')}:{sport} {pair.addr('b')}:{dport}"
    ).output
    assert f"sport={sport}" in got
    everywhere = run("host", "list", "--all-netns").output
    assert any(ln.startswith(f"[{pair.b}] udp") and f"sport={sport}" in ln for ln in everywhere.splitlines())


def test_host_events_print_new_connections(filled):
    pair, _ = filled
    subprocess.run(["ip", "netns", "exec", pair.b, "nft", "add", "table", "inet", "sluicectcli"], check=True)
    subprocess.run(["ip", "netns", "exec", pair.b, "nft", "add", "chain", "inet", "sluicectcli", "in",
                    "{ type filter hook input priority 0; ct state new accept; }"], check=True)  # fmt: skip
    result = {}
    listener = threading.Thread(
        target=lambda: result.update(out=run("host", "events", "--netns", pair.b, "--seconds", "2", "--json"))
    )
    listener.start()
    # New flows until it has listened its 2 s: when it subscribes (slow under load) is not known,
    # and the flows sent before that are simply not reported.
    flows, deadline = set(), time.monotonic() + 60
    while listener.is_alive() and time.monotonic() < deadline:
        flows.add(udp_flow(pair))
        time.sleep(0.1)
    listener.join(timeout=10)
    assert not listener.is_alive() and "out" in result
    events = [json.loads(ln) for ln in result["out"].output.splitlines() if ln.startswith("{")]
    mine = [e for e in events if (e["orig"]["sport"], e["orig"]["dport"]) in flows]
    assert mine and mine[0]["event"] == "new" and mine[0]["orig"]["src"] == pair.addr("a")
