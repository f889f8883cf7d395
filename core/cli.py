"""The ``sluice`` command line. Built by :func:`build_cli` (never at import), plugins add groups.

Every error is one line on stderr with a non-zero exit, never a traceback; every listing has --json.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import sys
from pathlib import Path

import click

from sluice import __version__, config
from sluice.manager import PluginManager


class CLIError(click.ClickException):
    """An expected failure: printed as ``error: <message>``."""

    def show(self, file=None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)


def emit(data, as_json: bool, text) -> None:
    """Print ``data`` as JSON, or through ``text(data)`` for people."""
    if as_json:
        click.echo(json.dumps(data, indent=2, default=str))
    else:
        out = text(data)
        if out:
            click.echo(out)


def table(rows: list[list], header: list[str]) -> str:
    cells = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells)


json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON.")


class Obj:
    """What every command gets: the config (for paths) and the plugin manager."""

    def __init__(self, config_path: Path | None, manager: PluginManager):
        self.config_path = config_path
        self.manager = manager
        self._cfg = None

    @property
    def cfg(self) -> config.AgentConfig:
        if self._cfg is None:
            from sluice.agent import resolve

            try:
                self._cfg = config.load(self.config_path)
                resolve(self._cfg, self.manager)  # the same checks the agent makes
            except config.ConfigError as exc:
                raise CLIError(str(exc)) from None
        return self._cfg

    @property
    def settings(self) -> config.AgentSettings:
        return self.cfg.agent


pass_obj = click.make_pass_decorator(Obj)


def build_cli(manager: PluginManager | None = None) -> click.Group:
    if manager is None:
        manager = PluginManager()
        manager.discover()

    @click.group(context_settings={"help_option_names": ["-h", "--help"]})
    @click.version_option(__version__, prog_name="sluice")
    @click.option(
        "-c",
        "--config",
        "config_path",
        type=click.Path(path_type=Path),
        envvar="SLUICE_CONFIG",
        help="Agent config (TOML). Default: the embedded default.",
    )
    @click.option("--netns", envvar="SLUICE_NETNS", help="Run in this network namespace (keeps bpffs).")
    @click.pass_context
    def root(ctx, config_path, netns):
        """sluice: a pluggable eBPF network agent."""
        from sluice import log as slog

        slog.configure("warning")  # commands print their results; `agent run` sets its own level
        if netns:
            _enter_netns(netns)
        ctx.obj = Obj(config_path, manager)

    # ---- agent ----------------------------------------------------------------------------
    @root.group()
    def agent():
        """Run the agent."""

    @agent.command("run")
    @click.option(
        "-c", "--config", "config_path", type=click.Path(path_type=Path), help="Agent config (TOML)."
    )
    @pass_obj
    def agent_run(obj: Obj, config_path):
        """Run the agent in the foreground until SIGTERM/SIGINT (SIGHUP reloads the config)."""
        from sluice import log as slog

        if config_path:
            obj.config_path = config_path
        cfg = obj.cfg
        slog.configure(cfg.agent.log_level)
        from sluice.agent import StartupError

        try:
            code = asyncio.run(_run_agent(cfg, obj))
        except (config.ConfigError, StartupError) as exc:
            raise CLIError(str(exc)) from None
        sys.exit(code)

    async def _run_agent(cfg, obj):
        from sluice.agent import Agent

        return await Agent(cfg, obj.manager, obj.config_path).run()

    # ---- doctor ---------------------------------------------------------------------------
    @root.command()
    @json_option
    @pass_obj
    def doctor(obj: Obj, as_json):
        """Check the kernel features sluice and its plugins need (mounting bpffs/tracefs if missing)."""
        from sluice import doctor as doc

        checks = doc.run_doctor(obj.settings.cache_dir)
        emit([c.__dict__ for c in checks], as_json, lambda _: doc.format_table(checks))
        if not all(
            c.ok for c in checks if c.name in ("root", "bpffs", "bpf-syscall", "tc", "kernel-headers")
        ):
            sys.exit(1)

    # ---- plugins --------------------------------------------------------------------------
    @root.group()
    def plugins():
        """Installed plugins."""

    @plugins.command("list")
    @json_option
    @pass_obj
    def plugins_list(obj: Obj, as_json):
        """Every installed plugin: version, distribution, enabled, state, programs, maps, attach points."""
        live = _api_get(obj, "/v1/plugins")
        if live is None:
            from sluice.datapath import AttachmentRecord

            enabled = set(obj.settings.plugins)
            recorded = AttachmentRecord(obj.settings.state_dir).read()
            rows = []
            for name in obj.manager.available():
                r = obj.manager.records[name]
                d = r.as_dict()
                d["enabled"] = name in enabled
                d["state"] = (
                    d["state"] if r.error else ("agent not running" if name in enabled else "installed")
                )
                d["maps"] = _pinned_maps(obj.settings.bpffs, name)
                d["attach"] = [  # the datapath's record: what is attached now, agent or not
                    f"tc/{a.iface}/{a.direction}#{a.prio}:{a.fn}" for a in recorded if a.plugin == name
                ]
                rows.append(d)
            live = rows
        emit(
            live,
            as_json,
            lambda rows: table(
                [
                    [
                        r["name"],
                        r["version"],
                        r["distribution"],
                        "yes" if r["enabled"] else "no",
                        r["state"],
                        ",".join(r["programs"]) or "-",
                        len(r["maps"]),
                        ",".join(r["attach"]) or "-",
                    ]
                    for r in rows
                ],
                ["NAME", "VERSION", "DISTRIBUTION", "ENABLED", "STATE", "PROGRAMS", "MAPS", "ATTACH"],
            ),
        )

    # ---- maps -----------------------------------------------------------------------------
    @root.group()
    def maps():
        """Pinned maps (readable while the agent is down)."""

    @maps.command("list")
    @json_option
    @pass_obj
    def maps_list(obj: Obj, as_json):
        """Every map pinned under <bpffs>/sluice."""
        from sluice.bpf.maps import Map

        rows = []
        root_dir = obj.settings.bpffs / "sluice"
        for path in sorted(root_dir.rglob("*")) if root_dir.is_dir() else []:
            if path.is_dir():
                continue
            with Map.open_pinned(path) as m:
                i = m.info
                entries = m.count() if i.type_name not in ("ringbuf", "perf_event_array") else None
                rows.append(
                    {
                        "plugin": path.parent.name,
                        "map": path.name,
                        "type": i.type_name,
                        "key_size": i.key_size,
                        "value_size": i.value_size,
                        "max_entries": i.max_entries,
                        "entries": entries,
                    }
                )
        emit(
            rows,
            as_json,
            lambda rows: table(
                [
                    [
                        r["plugin"],
                        r["map"],
                        r["type"],
                        r["key_size"],
                        r["value_size"],
                        r["max_entries"],
                        "-" if r["entries"] is None else r["entries"],
                    ]
                    for r in rows
                ],
                ["PLUGIN", "MAP", "TYPE", "KEY", "VALUE", "MAX", "ENTRIES"],
            ),
        )

    @maps.command("dump")
    @click.argument("name")
    @click.option("--limit", type=int, default=100, show_default=True)
    @json_option
    @pass_obj
    def maps_dump(obj: Obj, name, limit, as_json):
        """Dump entries of PLUGIN/MAP as hex key and value."""
        from sluice.bpf.maps import Map

        path = obj.settings.bpffs / "sluice" / name
        if "/" not in name or not path.exists():
            raise CLIError(f"no pinned map {name!r} (expected PLUGIN/MAP, see `sluice maps list`)")
        rows = []
        with Map.open_pinned(path) as m:
            for key, value in m.items():
                if len(rows) >= limit:
                    break
                rows.append({"key": bytes(key).hex(), "value": _hex(value)})
        emit(rows, as_json, lambda rows: "\n".join(f"{r['key']}  {r['value']}" for r in rows))

    # ---- hooks ----------------------------------------------------------------------------
    @root.command()
    @click.option("--iface", help="Only this interface.")
    @json_option
    def hooks(iface, as_json):
        """The program chain on each interface and direction, in the order packets see it."""
        from pyroute2 import IPRoute

        from sluice.bpf import tc

        with IPRoute() as ipr:
            try:
                filters = tc.list_filters(ipr, iface)
            except tc.AttachError as exc:
                raise CLIError(str(exc)) from None
        from sluice.programs import phase_of

        rows = [
            {
                "iface": f.iface,
                "direction": f.direction,
                "phase": phase_of(f.prio)[0] if f.owned else "",
                "order": phase_of(f.prio)[1] if f.owned else f.prio,
                "prio": f.prio,
                "name": f.name,
                "owner": f.plugin or "(not sluice)",
                "prog_id": f.prog_id,
            }
            for f in filters
        ]
        emit(
            rows,
            as_json,
            lambda rows: (
                table(
                    [
                        [
                            r["iface"],
                            r["direction"],
                            r["prio"],
                            r["phase"] or "-",
                            r["order"],
                            r["owner"],
                            r["name"],
                            r["prog_id"],
                        ]
                        for r in rows
                    ],
                    ["IFACE", "DIRECTION", "PRIO", "PHASE", "ORDER", "OWNER", "FILTER", "PROG_ID"],
                )
                if rows
                else "no programs attached"
            ),
        )

    # ---- trace ----------------------------------------------------------------------------
    @root.command()
    @click.option("--iface", help="Only packets on this interface.")
    @click.option("--filter", "expr", default="", help="e.g. 'proto tcp port 80 host 10.0.0.1'.")
    @click.option("--count", type=int, default=0, help="Stop after this many events (0: until Ctrl-C).")
    @click.option("--timeout", type=float, default=None, help="Stop after this many seconds.")
    @json_option
    @pass_obj
    def trace(obj: Obj, iface, expr, count, timeout, as_json):
        """Show, per packet, what each program in the chain decided."""
        from sluice import trace as tr

        try:
            filt = tr.parse_filter(expr)
        except ValueError as exc:
            raise CLIError(str(exc)) from None
        index = _ifindex(iface) if iface else 0

        def interrupted(*_):
            raise KeyboardInterrupt  # so the session switches tracing off on SIGTERM/SIGHUP too

        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, interrupted)
        names = _ifnames()
        seen, last_pkt = 0, None
        try:
            with tr.TraceSession(obj.settings.bpffs, index, **filt) as session:
                for ev in session.follow(timeout_s=timeout):
                    if as_json:
                        click.echo(json.dumps(ev.__dict__))
                    else:
                        if ev.pkt != last_pkt:
                            click.echo(
                                f"{names.get(ev.ifindex, ev.ifindex)} {ev.proto} {ev.src}:{ev.sport} -> "
                                f"{ev.dst}:{ev.dport} len {ev.length}"
                            )
                            last_pkt = ev.pkt
                        click.echo(f"    {ev.plugin}:{ev.fn:<24} {ev.verdict:<9} {ev.reason}")
                    seen += 1
                    if count and seen >= count:
                        break
        except (FileNotFoundError, OSError) as exc:
            raise CLIError(str(exc)) from None
        except KeyboardInterrupt:
            pass

    # ---- cleanup --------------------------------------------------------------------------
    @root.command()
    @click.option("--plugin", "only", metavar="NAME", help="Only this plugin's filters, pins and leftovers.")
    @json_option
    @pass_obj
    def cleanup(obj: Obj, only, as_json):
        """Detach every program sluice attached in this network namespace and remove its pins."""
        from sluice.datapath import CleanupRefused
        from sluice.datapath import cleanup as do_cleanup

        if only is not None and only not in obj.manager.records and only != "core":
            raise CLIError(
                f"--plugin: unknown plugin {only!r} (available: {', '.join(obj.manager.available())})"
            )
        try:
            result = do_cleanup(
                obj.settings.bpffs, obj.settings.state_dir, lambda: _plugin_cleanup(obj, only), plugin=only
            )
        except CleanupRefused as exc:
            raise CLIError(str(exc)) from None
        emit(
            result,
            as_json,
            lambda r: (
                f"removed {r['filters']} filters and {r['pins']} pins"
                + "".join(f"\n{line}" for line in r["other"])
            ),
        )

    # ---- lab ------------------------------------------------------------------------------
    @root.group()
    def lab():
        """The network-namespace lab used by the demo, tests and benchmarks."""

    @lab.command("up")
    @click.option("--prefix", default="sl-", show_default=True)
    @json_option
    def lab_up(prefix, as_json):
        """Build the lab (idempotent)."""
        from sluice.lab import Lab, LabError, LabSpec

        try:
            lb = Lab.up(LabSpec(prefix=prefix))
        except (LabError, ValueError) as exc:
            raise CLIError(f"{str(exc).splitlines()[0]} (logs: /run/sluice/lab/{prefix})") from None
        emit(Lab.status(prefix), as_json, lambda s: f"lab {prefix} is up: {', '.join(lb.namespaces)}")

    @lab.command("down")
    @click.option("--prefix", default="sl-", show_default=True)
    def lab_down(prefix):
        """Remove every namespace, link, process and file the lab made."""
        from sluice.lab import Lab, LabSpec

        Lab(LabSpec(prefix=prefix)).down()
        click.echo(f"lab {prefix} is down")

    @lab.command("status")
    @click.option("--prefix", default="sl-", show_default=True)
    @json_option
    def lab_status(prefix, as_json):
        """What of the lab exists."""
        from sluice.lab import Lab

        emit(Lab.status(prefix), as_json, lambda s: json.dumps(s, indent=2, default=str))

    @lab.command("cleanup")
    @click.option("--glob", "prefix_glob", default="sl*-", show_default=True)
    def lab_cleanup(prefix_glob):
        """Remove labs that crashed runs left behind."""
        from sluice.lab import lab_cleanup_all

        removed = lab_cleanup_all(prefix_glob)
        click.echo(
            f"removed {len(removed)} leftover lab pieces" + (f": {', '.join(removed)}" if removed else "")
        )

    # ---- plugin commands ------------------------------------------------------------------
    taken = {name: "core" for name in root.commands}
    for plugin in manager.available():
        try:
            commands = manager.call(plugin, "sluice_cli_commands") or []
        except Exception as exc:  # one broken plugin must not take the whole CLI (and the agent) down
            click.echo(f"warning: {plugin}: no CLI commands: {type(exc).__name__}: {exc}", err=True)
            continue
        for command in commands:
            if command.name in taken:
                click.echo(
                    f"warning: {plugin}: command {command.name!r} is taken by {taken[command.name]}", err=True
                )
                continue
            taken[command.name] = plugin
            root.add_command(command)
    return root


def _plugin_cleanup(obj: Obj, only: str | None = None) -> list[str]:
    """Every installed plugin's (or only ``only``'s) own leftovers (sluice_cleanup); one plugin
    failing is reported."""
    removed = []
    for name in obj.manager.available() if only is None else [only]:
        try:
            removed += [
                f"{name}: {item}"
                for item in obj.manager.call(name, "sluice_cleanup", settings=obj.settings) or []
            ]
        except Exception as exc:
            removed.append(f"{name}: cleanup failed: {type(exc).__name__}: {exc}")
    return removed


def _hex(value) -> str:
    if isinstance(value, list):
        return " ".join(bytes(v).hex() for v in value)
    return bytes(value).hex()


def _pinned_maps(bpffs: Path, plugin: str) -> list[str]:
    d = bpffs / "sluice" / plugin
    return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


def _ifindex(iface: str) -> int:
    try:
        return socket.if_nametoindex(iface)
    except OSError:
        raise CLIError(f"interface {iface} not found") from None


def _ifnames() -> dict[int, str]:
    return {i: n for i, n in socket.if_nameindex()}


def _enter_netns(name: str) -> None:
    from sluice import netns

    try:
        netns.enter(name)
    except OSError as exc:
        raise CLIError(f"cannot enter network namespace {name}: {exc.strerror}") from None


def _api_get(obj: Obj, path: str):
    """GET ``path`` from the running agent; None when no agent answers."""
    from sluice.client import AgentClient, AgentUnavailable

    try:
        status, body = AgentClient(obj.settings.socket_path, timeout=5).get(path)
    except AgentUnavailable:
        return None
    return body if status == 200 else None


def main() -> None:
    try:
        cli = build_cli()
    except Exception as exc:  # a plugin's CLI hook raised while building
        click.echo(f"error: building the CLI: {type(exc).__name__}: {exc}", err=True)
        sys.exit(1)
    try:
        cli.main(prog_name="sluice", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except config.ConfigError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except PermissionError as exc:
        click.echo(f"error: permission denied: {exc.filename or exc} (run as root)", err=True)
        sys.exit(1)
    except Exception as exc:
        click.echo(f"error: {type(exc).__name__}: {exc}", err=True)
        sys.exit(1)
