"""``sluice fw``: the firewall's command line.

Reads (sessions, counters, settings) come from the pinned maps and work with the agent down.
Every change (rules, settings) goes through the running agent's API, so the policy the agent
holds, the one it saves for restarts and the one in the maps never disagree.
"""

from __future__ import annotations

import json
import time
import tomllib
from pathlib import Path

import click
import pydantic

from sluice.cli import CLIError, emit, json_option, pass_obj, table

from .api import one_line, session_filter
from .maps import SETTINGS, FirewallMaps
from .policy import Policy


def _pin_dir(obj) -> Path:
    return obj.settings.bpffs / "sluice" / "firewall"


def _maps(obj) -> FirewallMaps:
    pin_dir = _pin_dir(obj)
    if not (pin_dir / "fw_settings").exists():
        raise CLIError(f"{pin_dir} holds no firewall maps: enable the firewall plugin and run the agent")
    return FirewallMaps.from_pins(pin_dir)


def api(obj, method: str, path: str, body=None, *, required: bool = True):
    """Call the agent's /v1/firewall API; None when no agent answers and ``required`` is false."""
    from sluice.client import AgentClient, AgentUnavailable

    try:
        status, data = AgentClient(obj.settings.socket_path).request(method, f"/v1/firewall{path}", body)
    except AgentUnavailable as exc:
        if required:
            raise CLIError(f"{exc}: changes need a running agent") from None
        return None
    if status == 404:
        if required:
            raise CLIError("the agent runs without the firewall plugin")
        return None
    if status >= 400:
        raise CLIError(data.get("error", f"HTTP {status}") if isinstance(data, dict) else f"HTTP {status}")
    return data


@click.group("fw")
def fw_group():
    """The DNS-aware egress firewall."""


# ---- rules -----------------------------------------------------------------------------------


@fw_group.group("rules")
def rules_group():
    """The policy: networks and their ordered rules."""


def _current_policy(obj) -> dict:
    live = api(obj, "GET", "/policy", required=False)
    if live is not None:
        return live["policy"]
    saved = obj.settings.state_dir / "firewall" / "policy.json"
    if saved.exists():
        return json.loads(saved.read_text())["policy"]
    section = obj.cfg.plugins.get("firewall", {})
    return {"networks": section.get("networks", []), "management": section.get("management", [])}


@rules_group.command("list")
@json_option
@pass_obj
def rules_list(obj, as_json):
    """Every rule, numbered per network (the number rules delete takes)."""
    policy = _current_policy(obj)

    def text(p):
        rows = []
        for n in p["networks"]:
            rows.append(
                [n["name"], "-", f"default {n.get('default', 'deny')}", "", "", ",".join(n["sources"])]
            )
            for i, r in enumerate(n.get("rules", []), 1):
                what = r.get("host") or r.get("dst") or "any"
                ports = r.get("ports")
                rows.append(
                    [
                        n["name"],
                        i,
                        r.get("action", "allow"),
                        r.get("proto", "any"),
                        what,
                        "" if ports is None else ports,
                    ]
                )
        mgmt = f"\nmanagement (bypass): {', '.join(p['management'])}" if p.get("management") else ""
        return table(rows, ["NETWORK", "#", "ACTION", "PROTO", "DESTINATION", "PORTS/SOURCES"]) + mgmt

    emit(policy, as_json, text)


@rules_group.command("add")
@click.argument("network")
@click.option("--action", type=click.Choice(["allow", "deny"]), default="allow", show_default=True)
@click.option("--proto", type=click.Choice(["any", "tcp", "udp", "icmp"]), default="any", show_default=True)
@click.option("--dst", help="Destination CIDR or address.")
@click.option("--host", help="Hostname pattern (api.example.com, *.example.com).")
@click.option("--ports", help="Port (443) or range (8000-8080); tcp/udp only.")
@click.option("--position", type=int, help="Insert as rule N (default: last).")
@pass_obj
def rules_add(obj, network, action, proto, dst, host, ports, position):
    """Add a rule to NETWORK."""
    rule = {"action": action, "proto": proto, "dst": dst, "host": host}
    if ports is not None:
        rule["ports"] = int(ports) if ports.isdigit() else ports
    out = api(obj, "POST", "/rules", {"network": network, "rule": rule, "position": position})
    click.echo(f"added rule {out['position']} to {network} (generation {out['generation']})")


@rules_group.command("delete")
@click.argument("network")
@click.argument("index", type=int)
@pass_obj
def rules_delete(obj, network, index):
    """Delete rule INDEX (see rules list) of NETWORK."""
    out = api(obj, "DELETE", f"/rules/{network}/{index}")
    click.echo(f"deleted rule {index} of {network} (generation {out['generation']})")


@rules_group.command("apply")
@click.option(
    "-f", "--file", "path", type=click.Path(path_type=Path), required=True, help="TOML or JSON policy."
)
@pass_obj
def rules_apply(obj, path):
    """Replace the whole policy (networks, management) atomically."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise CLIError(f"{path}: {exc.strerror}") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
        Policy.model_validate(data)
    except (ValueError, pydantic.ValidationError) as exc:
        raise CLIError(f"{path}: {one_line(exc)}") from None
    out = api(obj, "PUT", "/policy", data)
    click.echo(f"applied {out['networks']} networks (generation {out['generation']})")


# ---- settings, counters, sessions -------------------------------------------------------------


@fw_group.group("settings")
def settings_group():
    """Named runtime settings (audit-mode, monitor, timeouts, ...)."""


@settings_group.command("get")
@click.argument("name", required=False)
@json_option
@pass_obj
def settings_get(obj, name, as_json):
    """Print one setting, or all of them."""
    with _maps(obj) as maps:
        try:
            values = {name: maps.get_setting(name)} if name else maps.settings()
        except KeyError as exc:
            raise CLIError(str(exc).strip("'\"")) from None
    emit(
        values,
        as_json,
        lambda v: table([[k, x, SETTINGS[k].help] for k, x in v.items()], ["SETTING", "VALUE", "MEANING"]),
    )


@settings_group.command("set")
@click.argument("name")
@click.argument("value")
@pass_obj
def settings_set(obj, name, value):
    """Set a setting on the running agent (takes effect on the next packet)."""
    if name not in SETTINGS:
        raise CLIError(f"unknown setting {name!r} (settings: {', '.join(SETTINGS)})")
    if not value.isdigit():
        raise CLIError(f"value {value!r} is not a non-negative integer")
    api(obj, "PUT", f"/settings/{name}", {"value": int(value)})
    click.echo(f"{name} = {value}")


@fw_group.command("counters")
@json_option
@pass_obj
def counters(obj, as_json):
    """Packet counters by verdict (from the pinned map)."""
    with _maps(obj) as maps:
        values = maps.counters()
    emit(values, as_json, lambda v: table([[k, x] for k, x in v.items()], ["COUNTER", "VALUE"]))


@fw_group.command("sessions")
@click.option("--src", help="Source address or CIDR.")
@click.option("--dst", help="Destination address or CIDR.")
@click.option("--port", help="Either port.")
@click.option("--proto", help="tcp, udp, icmp, icmp6.")
@json_option
@pass_obj
def sessions(obj, src, dst, port, proto, as_json):
    """Sessions with per-direction packets and bytes (from the pinned map)."""
    try:
        keep = session_filter({"src": src, "dst": dst, "port": port, "proto": proto})
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    with _maps(obj) as maps:
        rows = [s for s in maps.session_rows() if keep(s)]

    def text(rows):
        if not rows:
            return "no sessions"
        return table(
            [
                [s["proto"], f"{s['src']}:{s['sport']}", f"{s['dst']}:{s['dport']}", s["state"],
                 f"{s['packets_out']}/{s['packets_in']}", f"{s['bytes_out']}/{s['bytes_in']}", s["age_s"], s["idle_s"],
                 s["reason"] + (" (audit)" if s["audit"] else "")]
                for s in rows
            ],
            ["PROTO", "SOURCE", "DESTINATION", "STATE", "PKTS OUT/IN", "BYTES OUT/IN", "AGE", "IDLE", "BY"],
        )  # fmt: skip

    emit(rows, as_json, text)


@fw_group.command("dns")
@json_option
@pass_obj
def dns(obj, as_json):
    """Names the DNS proxy learned, their addresses and remaining TTL (needs the agent)."""
    data = api(obj, "GET", "/dns")

    def text(d):
        rows = [[r["network"], r["name"], r["addr"], r["ttl_s"]] for r in d["learned"]]
        stats = " ".join(f"{k}={v}" for k, v in d["stats"].items())
        return (
            table(rows, ["NETWORK", "NAME", "ADDRESS", "TTL"]) if rows else "nothing learned"
        ) + f"\nproxy: {stats}"

    emit(data, as_json, text)


# ---- audit -----------------------------------------------------------------------------------


def _audit_line(e: dict) -> str:
    mode = " (audit mode: passed)" if e["audit_mode"] and e["action"] == "deny" else ""
    return f"{e['action']:<5} {e['reason']:<12} {e['proto']} {e['src']}:{e['sport']} -> {e['dst']}:{e['dport']} rule {e['rule']}{mode}"


@fw_group.command("audit")
@click.option("--follow", "-f", is_flag=True, help="Keep printing new events.")
@click.option("--timeout", type=float, help="With --follow: stop after this many seconds.")
@json_option
@pass_obj
def audit(obj, follow, timeout, as_json):
    """Audit events: blocked packets (every decision while monitor is 1).

    With the agent running they come from its buffer (the agent consumes the ring buffer); with
    the agent down, straight from the pinned ring buffer.
    """
    deadline = None if timeout is None else time.monotonic() + timeout

    def show(events):
        for e in events:
            click.echo(json.dumps(e) if as_json else _audit_line(e))

    def running():
        return follow and (deadline is None or time.monotonic() < deadline)

    first = api(obj, "GET", "/audit?after=0", required=False)
    try:
        if first is not None:
            show(first["events"][-100:])
            last = first["last"]
            while running():
                data = api(obj, "GET", f"/audit?after={last}&wait=1")
                show(data["events"])
                last = data["last"]
            return
        from .audit import AuditReader

        try:
            reader = AuditReader(_pin_dir(obj))
        except (FileNotFoundError, OSError) as exc:
            raise CLIError(str(exc)) from None
        with reader:
            show(reader.poll(100))
            while running():
                show(reader.poll(200))
    except KeyboardInterrupt:
        pass


def commands() -> list[click.Command]:
    return [fw_group]
