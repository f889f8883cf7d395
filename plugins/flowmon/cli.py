"""`sluice flows`: what flowmon saw, from the pinned maps and the agent's recent-flows file.

Works with the agent down: the live map holds what the datapath aggregated since the last
eviction, ``<state_dir>/flowmon/flows.json`` the last evicted flows.
"""

from __future__ import annotations

import ipaddress
import json
import time
from pathlib import Path

import click

from sluice.cli import CLIError, emit, json_option, pass_obj, table
from sluice.plugins.flowmon import drops
from sluice.plugins.flowmon.records import DNS_RCODES, PROTOCOL_NUMBERS, PROTOCOLS

NAME = "flowmon"


def _pin_dir(obj) -> Path:
    d = obj.settings.bpffs / "sluice" / NAME
    if not (d / "flowmon_flows").exists():
        raise CLIError(f"{d}/flowmon_flows not found: enable the flowmon plugin and run the agent")
    return d


def _live(obj) -> list[dict]:
    from sluice.plugins.flowmon.monitor import FlowMonitor
    from sluice.plugins.flowmon.runtime import ifnames

    try:
        mon = FlowMonitor(_pin_dir(obj), drops.kernel_reasons())
    except (OSError, ValueError) as exc:
        raise CLIError(f"cannot open flowmon maps: {exc}") from None
    try:
        names = ifnames()
        return [dict(f.as_dict(names), live=True) for f in mon.peek()]
    finally:
        mon.close()


def _recent(obj) -> list[dict]:
    path = obj.settings.state_dir / NAME / "flows.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as exc:
        raise CLIError(f"{path}: unreadable ({exc})") from None


def _all(obj) -> list[dict]:
    """Evicted flows (oldest first), then the live ones."""
    return _recent(obj) + _live(obj)


def _proto(value: str | None) -> int | None:
    if value is None:
        return None
    if value.isdigit():
        return int(value)
    if value not in PROTOCOL_NUMBERS:
        raise CLIError(f"--proto: unknown protocol {value!r} (tcp, udp, icmp, icmp6 or a number)")
    return PROTOCOL_NUMBERS[value]


def _net(value: str | None):
    if value is None:
        return None
    try:
        return ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise CLIError(f"not an address or CIDR: {value!r}") from None


def _match(f: dict, src, dst, host, port, proto, iface) -> bool:
    s, d = ipaddress.ip_address(f["src"]), ipaddress.ip_address(f["dst"])
    if src is not None and s not in src:
        return False
    if dst is not None and d not in dst:
        return False
    if host is not None and s not in host and d not in host:
        return False
    if port is not None and port not in (f["sport"], f["dport"]):
        return False
    if proto is not None and f["proto"] != proto:
        return False
    return iface is None or f["interface"] == iface


def _endpoint(f: dict, side: str) -> str:
    addr, port = f[side], f["sport" if side == "src" else "dport"]
    if f["proto"] in (1, 58):
        return addr
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


def _row(f: dict) -> list:
    extra = ",".join(f.get("tcp_flags_names") or [])
    if f["proto"] in (1, 58):
        extra = f"type={f['sport']} code={f['dport']}"
    return [
        PROTOCOLS.get(f["proto"], str(f["proto"])),
        _endpoint(f, "src"),
        _endpoint(f, "dst"),
        f["packets"],
        f["bytes"],
        f"{f['interface']}/{f['direction']}",
        extra,
    ]


HEADER = ["PROTO", "SRC", "DST", "PKTS", "BYTES", "IFACE", "FLAGS/ICMP"]


@click.group("flows")
def flows():
    """Flows seen by the flowmon plugin."""


@flows.command("list")
@click.option("--src", help="Source address or CIDR.")
@click.option("--dst", help="Destination address or CIDR.")
@click.option("--host", help="Either end in this address or CIDR.")
@click.option("--port", type=click.IntRange(0, 65535), help="Either port.")
@click.option("--proto", help="tcp, udp, icmp, icmp6 or a number.")
@click.option("--iface", help="Interface that counted the flow.")
@click.option("--limit", type=click.IntRange(1), default=100, show_default=True)
@json_option
@pass_obj
def list_flows(obj, src, dst, host, port, proto, iface, limit, as_json):
    """Recent evicted flows and the ones the datapath aggregates now."""
    nets = (_net(src), _net(dst), _net(host))
    found = [f for f in _all(obj) if _match(f, *nets, port, _proto(proto), iface)][-limit:]
    emit(found, as_json, lambda fs: table([_row(f) for f in fs], HEADER))


def _totals(obj) -> dict[tuple, dict]:
    out: dict[tuple, dict] = {}
    for f in _all(obj):
        k = (f["src"], f["dst"], f["sport"], f["dport"], f["proto"])
        t = out.setdefault(k, dict(f, packets=0, bytes=0))
        t["packets"] += f["packets"]
        t["bytes"] += f["bytes"]
    return out


@flows.command("top")
@click.option("--interval", type=click.FloatRange(0.1), default=2.0, show_default=True)
@click.option("--count", type=click.IntRange(0), default=0, help="Refreshes; 0: until interrupted.")
@click.option("--limit", type=click.IntRange(1), default=20, show_default=True)
@pass_obj
def top(obj, interval, count, limit):
    """A live table of the busiest flows (by bytes per second), refreshed every --interval."""
    prev, n = _totals(obj), 0
    while count == 0 or n < count:
        time.sleep(interval)
        cur = _totals(obj)
        rates = []
        for k, f in cur.items():
            before = prev.get(k, {"bytes": 0, "packets": 0})
            db, dp = f["bytes"] - before["bytes"], f["packets"] - before["packets"]
            rates.append((db / interval, dp / interval, f))
        rates.sort(key=lambda r: (r[0], r[2]["bytes"]), reverse=True)
        rows = [
            [*_row(f)[:3], f"{bps * 8 / 1000:.1f}", f"{pps:.1f}", f["bytes"]] for bps, pps, f in rates[:limit]
        ]
        if count != 1:
            click.clear()
        click.echo(f"flowmon top: {len(cur)} flows, refreshed every {interval}s (ctrl-c to stop)")
        click.echo(table(rows, ["PROTO", "SRC", "DST", "KBIT/S", "PKT/S", "BYTES"]))
        prev, n = cur, n + 1


def _drop_rows(recent: list[dict]) -> list[dict]:
    """One row per (flow, reason): each eviction period exports its own record of a drop."""
    rows: dict[tuple, dict] = {}
    for f in recent:
        if not f.get("drop_packets"):
            continue
        k = (f["src"], f["dst"], f["sport"], f["dport"], f["proto"], f["drop_reason"])
        if k in rows:
            rows[k]["drop_packets"] += f["drop_packets"]
            rows[k]["drop_bytes"] += f["drop_bytes"]
            rows[k] = dict(rows.pop(k))  # moved last: ordered by the latest drop
        else:
            rows[k] = dict(f)
    return list(rows.values())


@flows.command("drops")
@click.option("--limit", type=click.IntRange(1), default=50, show_default=True)
@json_option
@pass_obj
def drops_cmd(obj, limit, as_json):
    """Kernel drops on the monitored interfaces by reason, and the flows they hit (one row per
    flow and reason, summed over the recent records)."""
    from sluice.plugins.flowmon.monitor import FlowMonitor

    try:
        mon = FlowMonitor(_pin_dir(obj), drops.kernel_reasons())
    except (OSError, ValueError) as exc:
        raise CLIError(f"cannot open flowmon maps: {exc}") from None
    try:
        reasons = mon.reason_counts()
    finally:
        mon.close()
    hit = _drop_rows(_recent(obj))[-limit:]
    data = {"reasons": reasons, "flows": hit}

    def text(d):
        out = table(
            sorted(([r, n] for r, n in d["reasons"].items()), key=lambda x: -x[1]), ["REASON", "DROPS"]
        )
        rows = [[*_row(f)[:3], f["drop_packets"], f["drop_reason"]] for f in d["flows"]]
        return out + "\n\n" + table(rows, ["PROTO", "SRC", "DST", "DROPPED", "REASON"])

    emit(data, as_json, text)


@flows.command("dns")
@click.option("--limit", type=click.IntRange(1), default=50, show_default=True)
@json_option
@pass_obj
def dns(obj, limit, as_json):
    """DNS responses seen: query name, response code, latency from the query."""
    found = [
        {
            "client": f["dst"],
            "server": f["src"],
            "qname": f["dns_qname"],
            "id": f["dns_id"],
            "rcode": DNS_RCODES.get(f["dns_flags"] & 0xF, str(f["dns_flags"] & 0xF)),
            "latency_ms": round(f["dns_latency_ns"] / 1e6, 3),
            "interface": f["interface"],
        }
        for f in _all(obj)
        if f["dns_flags"] & 0x8000
    ][-limit:]
    rows = [[d["client"], d["server"], d["qname"], d["rcode"], d["latency_ms"]] for d in found]
    emit(found, as_json, lambda _: table(rows, ["CLIENT", "SERVER", "QNAME", "RCODE", "LATENCY MS"]))
