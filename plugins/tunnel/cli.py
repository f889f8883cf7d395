"""`sluice tunnel`: routes, lookup, health, trace, devices. Reads pins and the plugin's status file,
so listings work while the agent is down; changes go through the agent's API (one writer)."""

from __future__ import annotations

import ipaddress
import json
import socket

import click
import pydantic

from sluice.bpf.maps import Map
from sluice.client import AgentClient, AgentUnavailable
from sluice.plugins.tunnel import devices
from sluice.plugins.tunnel.engine import lookup, nexthop_ident, trie_dump
from sluice.plugins.tunnel.model import Nexthop, decode_value, one_line
from sluice.plugins.tunnel.trace import decode_detail, format_detail

PLUGIN = "tunnel"


class TunnelCLIError(click.ClickException):
    def show(self, file=None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)


def _settings(obj):
    return obj.settings


def _trie(obj) -> Map:
    pin = _settings(obj).bpffs / "sluice" / PLUGIN / "tunnel_routes"
    if not pin.exists():
        raise TunnelCLIError(f"{pin} not found: enable the tunnel plugin and run the agent")
    return Map.open_pinned(pin)


def _status(obj) -> dict:
    path = _settings(obj).state_dir / PLUGIN / "status.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {"peers": {}, "nexthop_peers": {}, "sources": {}, "unusable": {}}


def _api(obj, method: str, path: str, body: dict | None = None) -> dict:
    """Call the running agent's API; one-line errors for no agent and for refusals."""
    client = AgentClient(_settings(obj).socket_path)
    try:
        return client.call(method, f"/v1/{PLUGIN}{path}", body)
    except AgentUnavailable as exc:
        raise TunnelCLIError(f"{exc}: changes go through the running agent") from None
    except ValueError as exc:
        raise TunnelCLIError(str(exc)) from None


def _ifname(index: int) -> str:
    try:
        return socket.if_indextoname(index)
    except OSError:
        return f"if{index}"


def route_rows(obj, family: int | None = None) -> list[dict]:
    """Kernel routes (with peer names and health) plus the unusable ones, sorted like `ip route`."""
    status = _status(obj)
    names = status.get("nexthop_peers", {})
    rows = []
    with _trie(obj) as trie:
        for value in trie_dump(trie):
            row = decode_value(value)
            for nh in row["nexthops"]:
                nh["peer"] = names.get(nexthop_ident(nh["underlay"], nh["vni"], nh["protocol"]), "?")
                nh["dev"] = _ifname(nh.pop("ifindex"))
            row["source"] = status.get("sources", {}).get(row["dst"], "?")
            row["unusable"] = status.get("unusable", {}).get(row["dst"], {})
            rows.append(row)
    in_kernel = {r["dst"] for r in rows}
    for dst, reasons in status.get("unusable", {}).items():
        if dst not in in_kernel:
            rows.append(
                {"dst": dst, "nexthops": [], "source": status["sources"].get(dst, "?"), "unusable": reasons}
            )
    if family:
        rows = [r for r in rows if ipaddress.ip_network(r["dst"]).version == family]
    return sorted(rows, key=lambda r: _sort_key(r["dst"]))


def _sort_key(dst: str):
    net = ipaddress.ip_network(dst)
    return (net.version, net.network_address.packed, net.prefixlen)


def _nh_text(nh: dict) -> str:
    vni = f" vni {nh['vni']}" if nh["protocol"] in ("vxlan", "geneve", "ipip") else ""
    state = "" if nh["healthy"] else " withdrawn"
    return f"via {nh['underlay']} peer {nh['peer']} {nh['protocol']}{vni} dev {nh['dev']}{state}"


def format_routes(rows: list[dict]) -> str:
    lines = []
    for r in rows:
        usable, bad = r["nexthops"], r["unusable"]
        if len(usable) == 1 and not bad:
            lines.append(f"{r['dst']} {_nh_text(usable[0])}")
            continue
        lines.append(f"{r['dst']}{'' if usable else ' unusable'}")
        lines += [f"\tnexthop {_nh_text(nh)}" for nh in usable]
        lines += [f"\tnexthop {nh} unusable: {why}" for nh, why in bad.items()]
    return "\n".join(lines) or "no routes"


@click.group(PLUGIN)
def tunnel_group():
    """The tunnel plugin: overlay routes, ECMP nexthops, peer health, per-packet trace."""


json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON.")


@tunnel_group.group("routes", invoke_without_command=True)
@click.option("-4", "family", flag_value=4, help="IPv4 routes only.")
@click.option("-6", "family", flag_value=6, help="IPv6 routes only.")
@json_option
@click.pass_context
def routes_cmd(click_ctx, family, as_json):
    """Routes as the datapath holds them (ECMP as nexthop lines), and those that cannot be used."""
    if click_ctx.invoked_subcommand:
        return
    rows = route_rows(click_ctx.obj, family)
    click.echo(json.dumps(rows, indent=2) if as_json else format_routes(rows))


def _parse_nexthop(text: str) -> dict:
    """``peer=b,underlay=10.0.0.2,vni=100[,protocol=vxlan][,device=X]``"""
    fields = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise TunnelCLIError(
                f"nexthop {text!r}: expected key=value pairs (peer=,underlay=,vni=,protocol=,device=)"
            )
        fields[key.strip()] = value.strip()
    try:
        return Nexthop.model_validate(fields).model_dump(mode="json")
    except pydantic.ValidationError as exc:
        raise TunnelCLIError(f"nexthop {text!r}: {one_line(exc)}") from None


@routes_cmd.command("add")
@click.argument("dst")
@click.argument("nexthops", nargs=-1, required=True)
@click.pass_obj
def routes_add(obj, dst, nexthops):
    """Add or replace an API route: DST then 1-4 NEXTHOPs as peer=B,underlay=ADDR,vni=N[,protocol=P]."""
    result = _api(obj, "PUT", "/routes", {"dst": dst, "nexthops": [_parse_nexthop(n) for n in nexthops]})
    click.echo(_reconcile_text(result))


@routes_cmd.command("del")
@click.argument("dst")
@click.pass_obj
def routes_del(obj, dst):
    """Delete an API route."""
    click.echo(_reconcile_text(_api(obj, "DELETE", f"/routes?dst={dst}")))


def _reconcile_text(r: dict) -> str:
    text = f"added {r['added']} changed {r['changed']} removed {r['removed']} unchanged {r['unchanged']}"
    for dst, reasons in r.get("unusable", {}).items():
        text += "".join(f"\nunusable: {dst} {nh}: {why}" for nh, why in reasons.items())
    return text


@tunnel_group.command("lookup")
@click.argument("address")
@json_option
@click.pass_obj
def lookup_cmd(obj, address, as_json):
    """The route a packet to ADDRESS takes (longest prefix match in the datapath's trie)."""
    try:
        ipaddress.ip_address(address)
    except ValueError:
        raise TunnelCLIError(f"{address!r} is not an IP address") from None
    with _trie(obj) as trie:
        value = lookup(trie, address)
    if value is None:
        if as_json:
            click.echo("null")
            return
        raise TunnelCLIError(f"no route for {address}: the kernel routes it")
    dst = decode_value(value)["dst"]
    row = next(r for r in route_rows(obj) if r["dst"] == dst)
    click.echo(json.dumps(row, indent=2) if as_json else format_routes([row]))


@tunnel_group.group("health", invoke_without_command=True)
@json_option
@click.pass_context
def health_cmd(click_ctx, as_json):
    """Peer health (withdrawn peers' nexthops are skipped while others are healthy)."""
    if click_ctx.invoked_subcommand:
        return
    peers = _status(click_ctx.obj).get("peers", {})
    if as_json:
        click.echo(json.dumps(peers, indent=2))
    else:
        click.echo("\n".join(f"{p:<20} {'up' if up else 'down'}" for p, up in peers.items()) or "no peers")


@health_cmd.command("set")
@click.argument("peer")
@click.argument("state", type=click.Choice(["up", "down"]))
@click.pass_obj
def health_set(obj, peer, state):
    """Withdraw (down) or restore (up) every nexthop of PEER, through the running agent."""
    result = _api(obj, "POST", "/health", {"peer": peer, "state": state})
    click.echo(f"{peer} {state}: {result['changed']} routes changed")


@tunnel_group.command("trace")
@click.option("--filter", "expr", default="", help="e.g. 'proto tcp port 80 host 10.0.0.1'.")
@click.option("--iface", help="Only packets on this interface.")
@click.option("--count", type=int, default=0, help="Stop after this many events (0: until Ctrl-C).")
@click.option("--timeout", type=float, default=None, help="Stop after this many seconds.")
@json_option
@click.pass_obj
def trace_cmd(obj, expr, iface, count, timeout, as_json):
    """Per packet: the matched route, candidates, the chosen nexthop and why, set-key, redirect."""
    from sluice import trace as tr

    try:
        filt = tr.parse_filter(expr)
    except ValueError as exc:
        raise TunnelCLIError(str(exc)) from None
    index = 0
    if iface:
        try:
            index = socket.if_nametoindex(iface)
        except OSError:
            raise TunnelCLIError(f"interface {iface} not found") from None
    seen = 0
    try:
        with tr.TraceSession(_settings(obj).bpffs, index, **filt) as session:
            for ev in session.follow(timeout_s=timeout):
                if ev.plugin != PLUGIN:
                    continue
                detail = decode_detail(ev.detail, ev.reason)
                if as_json:
                    click.echo(json.dumps(ev.__dict__ | {"tunnel": detail}))
                else:
                    click.echo(
                        f"{ev.proto} {ev.src}:{ev.sport} -> {ev.dst}:{ev.dport} len {ev.length} "
                        f"{ev.verdict} {ev.reason} {format_detail(detail)}".rstrip()
                    )
                seen += 1
                if count and seen >= count:
                    break
    except OSError as exc:
        raise TunnelCLIError(str(exc)) from None
    except KeyboardInterrupt:
        pass


@tunnel_group.command("devices")
@json_option
def devices_cmd(as_json):
    """The shared external-mode tunnel devices the plugin created."""
    rows = devices.describe()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    lines = [
        f"{d['name']:<14} {d['kind']:<7} ifindex {d['ifindex']} mtu {d['mtu']} mac {d['mac']} "
        f"{'external' if d['external'] else 'NOT external'} port {d['port']} {d['state']}"
        for d in rows
    ]
    click.echo("\n".join(lines) or "no tunnel devices")


@tunnel_group.command("cleanup")
def cleanup_cmd():
    """Remove the plugin's tunnel devices (run after `sluice cleanup` detached the program)."""
    removed = devices.remove_all()
    click.echo(f"removed {len(removed)} devices{': ' + ', '.join(removed) if removed else ''}")
