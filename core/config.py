"""The agent's TOML config, validated into typed objects.

The ``[agent]`` table is the core's; each ``[plugins.<name>]`` table is validated against the
schema that plugin declares through ``sluice_config_schema``. Every problem is reported as one
line naming the file, the key and what was expected.
"""

from __future__ import annotations

import tomllib
from importlib import resources
from pathlib import Path
from typing import Any

import pydantic


class ConfigError(Exception):
    """One or more config problems; ``str()`` is one line per problem."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


class AgentSettings(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")

    plugins: list[str] = pydantic.Field(default_factory=list, description="enabled plugins, in start order")
    bpffs: Path = Path("/sys/fs/bpf")
    state_dir: Path = Path("/run/sluice")
    cache_dir: Path = Path("/var/cache/sluice")
    socket: Path | None = None  # default: <state_dir>/sluice.sock
    metrics_address: str = "127.0.0.1:9475"
    log_level: str = pydantic.Field("info", pattern="^(debug|info|warning|error)$")
    cflags: list[str] = pydantic.Field(default_factory=list)
    detach_on_stop: bool = False
    keep_removed_state: bool = False  # a plugin removed from `plugins` keeps its pinned maps
    stop_timeout: float = pydantic.Field(10.0, gt=0)

    @pydantic.field_validator("metrics_address")
    @classmethod
    def _host_port(cls, value: str) -> str:
        if value:
            host, sep, port = value.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
                raise ValueError('expected HOST:PORT (or "" to disable)')
        return value

    @property
    def socket_path(self) -> Path:
        return self.socket or self.state_dir / "sluice.sock"


class AgentConfig(pydantic.BaseModel):
    """The whole file. ``plugins`` holds the raw per-plugin tables until the plugin schemas check them."""

    model_config = pydantic.ConfigDict(extra="forbid")

    agent: AgentSettings = pydantic.Field(default_factory=AgentSettings)
    plugins: dict[str, dict[str, Any]] = pydantic.Field(default_factory=dict)
    source: str = pydantic.Field("<embedded default>", exclude=True)


def _where(loc: tuple) -> str:
    return ".".join(str(p) for p in loc) or "(top level)"


def format_errors(source: str, prefix: tuple, exc: pydantic.ValidationError) -> list[str]:
    lines = []
    for err in exc.errors():
        key = _where(prefix + tuple(err["loc"]))
        if err["type"] == "extra_forbidden":
            lines.append(f"{source}: {key}: unknown key")
        elif err["type"] == "missing":
            lines.append(f"{source}: {key}: required key is missing")
        else:
            got = err.get("input")
            shown = repr(got) if not isinstance(got, dict | list) else type(got).__name__
            lines.append(f"{source}: {key}: {err['msg'].lower()} (got {shown})")
    return lines


def parse(text: str, source: str) -> AgentConfig:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{source}: invalid TOML: {exc}"]) from None
    try:
        cfg = AgentConfig.model_validate(data)
    except pydantic.ValidationError as exc:
        raise ConfigError(format_errors(source, (), exc)) from None
    return cfg.model_copy(update={"source": source})


def load(path: Path | None) -> AgentConfig:
    """Read ``path``, or the embedded default config when ``path`` is None."""
    if path is None:
        return parse(default_text(), "<embedded default>")
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from None
    return parse(text, str(path))


def default_text() -> str:
    return resources.files("sluice").joinpath("default.toml").read_text()


def validate_plugin_section(
    cfg: AgentConfig, name: str, schema: type[pydantic.BaseModel] | None
) -> pydantic.BaseModel | None:
    raw = cfg.plugins.get(name, {})
    if schema is None:
        if raw:
            raise ConfigError([f"{cfg.source}: plugins.{name}: this plugin takes no settings"])
        return None
    try:
        return schema.model_validate(raw)
    except pydantic.ValidationError as exc:
        raise ConfigError(format_errors(cfg.source, ("plugins", name), exc)) from None
