"""Config validation: every problem is one line naming the file, the key and what was expected."""

import pydantic
import pytest

from sluice import config
from sluice.agent import resolve
from sluice.manager import PluginManager

pytestmark = pytest.mark.unit


def load_text(tmp_path, text):
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path, config.load(path)


def problems(tmp_path, text, manager=None):
    path = tmp_path / "agent.toml"
    path.write_text(text)
    with pytest.raises(config.ConfigError) as info:
        cfg = config.load(path)
        resolve(cfg, manager or discovered())
    for line in info.value.problems:
        assert "\n" not in line
        assert line.startswith(str(path))
    return info.value.problems


def discovered():
    m = PluginManager()
    m.discover()
    return m


def test_embedded_default_is_valid():
    cfg = config.load(None)
    assert set(cfg.agent.plugins) == {"firewall", "tunnel", "flowmon", "conntrack", "replication"}
    resolve(cfg, discovered())


def test_broken_toml(tmp_path):
    (line,) = problems(tmp_path, "[agent\nplugins = []\n")
    assert "invalid TOML" in line and "line 1" in line


def test_unknown_key(tmp_path):
    (line,) = problems(tmp_path, "[agent]\nplugins = []\nbpfs = '/x'\n")
    assert "agent.bpfs: unknown key" in line


def test_wrong_type(tmp_path):
    (line,) = problems(tmp_path, "[agent]\nplugins = []\nstop_timeout = 'soon'\n")
    assert "agent.stop_timeout" in line and "number" in line and "'soon'" in line


def test_unknown_plugin_lists_available(tmp_path):
    (line,) = problems(tmp_path, "[agent]\nplugins = ['firewal']\n")
    assert "unknown plugin 'firewal'" in line
    assert "available: " in line and "firewall" in line and "flowmon" in line


def test_section_for_disabled_plugin(tmp_path):
    (line,) = problems(tmp_path, "[agent]\nplugins = []\n[plugins.tunnel]\n")
    assert "plugins.tunnel" in line and "not enabled" in line


def test_plugin_schema_errors_name_the_key(tmp_path):
    class Schema(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(extra="forbid")
        interval: int = 5

    module = type("M", (), {})
    from sluice import hookimpl

    module.sluice_config_schema = staticmethod(hookimpl(lambda: Schema))
    m = PluginManager()
    m.register(module, "probe")
    lines = problems(
        tmp_path, "[agent]\nplugins = ['probe']\n[plugins.probe]\ninterval = 'x'\nextra = 1\n", m
    )
    assert any("plugins.probe.interval" in ln and "integer" in ln for ln in lines)
    assert any("plugins.probe.extra: unknown key" in ln for ln in lines)


def test_valid_config_round_trip(tmp_path):
    _, cfg = load_text(tmp_path, "[agent]\nplugins = ['flowmon']\nstop_timeout = 3\n")
    assert cfg.agent.plugins == ["flowmon"]
    assert cfg.agent.stop_timeout == 3.0
    assert cfg.agent.socket_path == cfg.agent.state_dir / "sluice.sock"


def test_unreadable_file(tmp_path):
    with pytest.raises(config.ConfigError) as info:
        config.load(tmp_path / "missing.toml")
    assert "missing.toml: cannot read" in str(info.value)
