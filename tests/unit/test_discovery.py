"""Built-in and third-party plugins are discovered the same way: entry points."""

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from sluice.cli import build_cli
from sluice.manager import PluginManager, State

pytestmark = pytest.mark.unit

BUILTIN = {"firewall", "tunnel", "flowmon", "conntrack", "replication"}


def test_builtins_come_from_entry_points():
    m = PluginManager()
    m.discover()
    for name in BUILTIN:
        record = m.records[name]
        assert record.distribution == "sluice"
        assert record.module is not None and record.module.__name__ == f"sluice.plugins.{name}"
        assert record.state is State.INSTALLED


def test_third_party_plugin_is_discovered(with_plugins):
    m = PluginManager()
    m.discover()
    hello = m.records["hello"]
    assert hello.distribution == "sluice-hello" and hello.version == "0.1.0"
    assert hello.module.__name__ == "sluice_hello"


def test_plugin_cli_command_is_mounted(with_plugins):
    m = PluginManager()
    m.discover()
    result = CliRunner().invoke(build_cli(m), ["hello", "--help"])
    assert result.exit_code == 0 and "Packets per IP protocol" in result.output


def test_plugins_list_json(with_plugins, tmp_path):
    m = PluginManager()
    m.discover()
    cfg = tmp_path / "a.toml"
    cfg.write_text(f"[agent]\nplugins = ['flowmon']\nstate_dir = '{tmp_path}'\n")
    result = CliRunner().invoke(build_cli(m), ["-c", str(cfg), "plugins", "list", "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in json.loads(result.output)}
    assert BUILTIN | {"hello"} <= set(rows)
    assert rows["flowmon"]["enabled"] is True and rows["hello"]["enabled"] is False
    for key in ("version", "distribution", "state", "programs", "maps", "attach"):
        assert key in rows["hello"]


def test_broken_plugin_is_reported_not_fatal(tmp_path, monkeypatch):
    # A distribution whose module does not import: the others still load.
    dist = tmp_path / "broken-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[sluice.plugins]\nbroken = sluice_broken_missing\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    m = PluginManager()
    m.discover()
    assert m.records["broken"].state is State.FAILED
    assert "import failed" in m.records["broken"].error
    assert m.records["flowmon"].module is not None


def test_no_top_level_core_or_plugins_module():
    for name in ("core", "plugins"):
        code = f"import importlib.util,sys; sys.exit(0 if importlib.util.find_spec({name!r}) is None else 1)"
        assert subprocess.run([sys.executable, "-c", code], cwd="/").returncode == 0, f"{name} is importable"


def test_cli_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[agent]\nplugins = ['nope']\n")
    for argv in (
        ["-c", str(bad), "plugins", "list"],
        ["maps", "dump", "nothing"],
        ["trace", "--filter", "port x"],
        ["--netns", "no-such-ns-xyz", "hooks"],
    ):
        proc = subprocess.run([sys.executable, "-m", "sluice", *argv], capture_output=True, text=True)
        assert proc.returncode != 0, argv
        assert "Traceback" not in proc.stderr, proc.stderr
        assert proc.stderr.strip().count("\n") == 0, proc.stderr
        assert proc.stderr.startswith("error:"), proc.stderr
