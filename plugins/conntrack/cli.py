"""``sluice ct``: the BPF tables (read from the pins, agent up or down) and the host's conntrack."""

from __future__ import annotations

import contextlib
import json
import socket
import time
from pathlib import Path

import click

from sluice.plugins.conntrack.gc import Collector, GcFilter, GcSettings
from sluice.plugins.conntrack.table import KINDS, PROTO_NUMBERS, Tables, addr_bytes, monotonic_s


def _pin_dir(bpffs: Path | None) -> Path:
    if bpffs is None:
        obj = click.get_current_context().find_root().obj
        try:
            bpffs = obj.settings.bpffs
        except Exception:  # no agent config readable: the usual mount point
            bpffs = Path("/sys/fs/bpf")
    return bpffs / "sluice" / "conntrack"


@contextlib.contextmanager
def _errors():
    """Every expected failure as one line and a non-zero exit."""
    try:
        yield
    except (FileNotFoundError, PermissionError, ValueError, OSError) as e:
        raise click.ClickException(str(e).splitlines()[0] if str(e) else type(e).__name__) from None


def _tables(bpffs) -> Tables:
    return Tables(_pin_dir(bpffs))


def _ips(values) -> set[bytes]:
    try:
        return {addr_bytes(v) for v in values}
    except ValueError as e:
        raise click.ClickException(f"--ip: {e}") from None


bpffs_option = click.option(
    "--bpffs", type=click.Path(path_type=Path), help="bpffs mount (default: the agent's)."
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON.")


@click.group("ct")
def ct():
    """Connection tracking: the BPF tables and the host's netfilter conntrack."""


@ct.command("list")
@bpffs_option
@click.option("--tenant", type=int, help="Only this tenant.")
@click.option("--proto", type=click.Choice(sorted(PROTO_NUMBERS)), help="Only this protocol.")
@click.option("--ip", "ips", multiple=True, help="Either address is this one (repeatable).")
@click.option("--port", type=click.IntRange(0, 65535), help="Either port is this one.")
@click.option(
    "--state", help="Only entries in this state (syn, established, closing, closed, open, related)."
)
@click.option("--limit", type=click.IntRange(1), default=None, help="At most this many entries.")
@json_option
def list_cmd(bpffs, tenant, proto, ips, port, state, limit, as_json):
    """BPF conntrack entries with counters, state and remaining lifetime."""
    wanted_ips = _ips(ips)
    with _errors(), _tables(bpffs) as tables:
        now = monotonic_s()
        rows = tables.select(tenant, proto, wanted_ips, port, state, limit)
        if as_json:
            click.echo(json.dumps([c.as_dict(now) for c in rows], indent=1))
        else:
            for c in rows:
                click.echo(c.line(now))


@ct.command("count")
@bpffs_option
@json_option
def count_cmd(bpffs, as_json):
    """Entries per tenant and table, with each table's capacity."""
    with _errors(), _tables(bpffs) as tables:
        counts = [
            {"tenant": t, "table": kind, "entries": m.count(), "max_entries": m.info.max_entries}
            for t, kind, m in tables.each()
        ]
    if as_json:
        click.echo(json.dumps(counts, indent=1))
        return
    for c in counts:
        click.echo(f"tenant={c['tenant']} {c['table']:<4} {c['entries']}/{c['max_entries']}")
    click.echo(f"total {sum(c['entries'] for c in counts)}")


def _run_gc(bpffs, flt: GcFilter, dry_run: bool):
    with _errors():
        pin = _pin_dir(bpffs)
        Tables(pin).close()  # a clear error when the plugin never ran
        return Collector(lambda: Tables(pin), GcSettings()).run(flt, dry_run=dry_run)


def _report(stats, as_json: bool, verb: str) -> None:
    if as_json:
        now = monotonic_s()
        out = {"scanned": stats.scanned, verb: stats.deleted, "kept_refreshed": stats.refreshed,
               "dry_run": stats.dry_run, "duration_s": round(stats.duration_s, 6),
               "entries": [c.as_dict(now) for c in stats.deleted_entries]}  # fmt: skip
        click.echo(json.dumps(out, indent=1))
        return
    what = f"would delete {stats.deleted}" if stats.dry_run else f"{verb} {stats.deleted}"
    click.echo(
        f"scanned {stats.scanned}, {what}, kept {stats.refreshed} refreshed meanwhile ({stats.duration_s * 1000:.1f} ms)"
    )


@ct.command("gc")
@bpffs_option
@click.option("--dry-run", is_flag=True, help="Only say what would be deleted.")
@json_option
def gc_cmd(bpffs, dry_run, as_json):
    """Remove expired entries now (the agent also does this on its adaptive interval)."""
    _report(_run_gc(bpffs, GcFilter(), dry_run), as_json, "deleted")


@ct.command("flush")
@bpffs_option
@click.option("--tenant", type=int, help="Only this tenant's tables.")
def flush_cmd(bpffs, tenant):
    """Delete every entry."""
    with _errors(), _tables(bpffs) as tables:
        n = sum(m.clear() for _, _, m in tables.each(tenant))
    click.echo(f"flushed {n}")


@ct.command("delete")
@bpffs_option
@click.option(
    "--ip", "ips", multiple=True, required=True, help="Delete entries with this address (repeatable)."
)
@json_option
def delete_cmd(bpffs, ips, as_json):
    """Delete the entries of some addresses."""
    _report(_run_gc(bpffs, GcFilter(expired=False, match_ips=_ips(ips)), False), as_json, "deleted")


@ct.group("tenant")
def tenant_group():
    """Per-tenant tables (created and removed at run time)."""


@tenant_group.command("list")
@bpffs_option
def tenant_list(bpffs):
    with _errors(), _tables(bpffs) as tables:
        for t in tables.tenants():
            click.echo(t)


@tenant_group.command("add")
@bpffs_option
@click.argument("tenant", type=click.IntRange(0, 2**32 - 1))
def tenant_add(bpffs, tenant):
    """Create TENANT's tables, sized like tenant 0's."""
    with _errors(), _tables(bpffs) as tables:
        sizes = {}
        for kind in KINDS:
            ref = tables.table(kind, 0)
            if ref is None:
                raise click.ClickException("tenant 0 has no tables: is the conntrack plugin running?")
            with ref:
                sizes[kind] = ref.info.max_entries
        created = tables.add_tenant(tenant, sizes)
    click.echo(f"tenant {tenant}: {'created' if created else 'exists already'}")


@tenant_group.command("remove")
@bpffs_option
@click.argument("tenant", type=click.IntRange(0, 2**32 - 1))
def tenant_remove(bpffs, tenant):
    with _errors(), _tables(bpffs) as tables:
        removed = tables.remove_tenant(tenant)
    if not removed:
        raise click.ClickException(f"tenant {tenant} has no tables")
    click.echo(f"tenant {tenant}: removed")


# --- the host's netfilter conntrack --------------------------------------------------------------


def _host(netns):
    from sluice.plugins.conntrack.host import HostConntrack

    return HostConntrack(netns=netns)


def _tuple(text: str):
    from sluice.plugins.conntrack.host import parse_tuple

    try:
        return parse_tuple(text)
    except ValueError as e:
        raise click.ClickException(str(e)) from None


netns_option = click.option("--netns", "host_netns", help="Another network namespace (by name).")


@ct.group("host")
def host_group():
    """The host's netfilter conntrack, over netlink."""


@host_group.command("list")
@netns_option
@click.option("--all-netns", is_flag=True, help="This namespace and every named one.")
@json_option
def host_list(host_netns, all_netns, as_json):
    """Entries like `conntrack -L`."""
    from sluice.plugins.conntrack.host import dump_namespaces, named_netns

    others = [n for n in named_netns() if n != host_netns] if all_netns else []
    if host_netns and host_netns not in named_netns():  # dump_namespaces skips vanished ones
        raise click.ClickException(f"network namespace {host_netns!r} not found")
    with _errors():
        out = dump_namespaces([host_netns, *others])
    if as_json:
        click.echo(json.dumps([{"netns": ns, **c.as_dict()} for ns, c in out], indent=1))
        return
    for ns, c in out:
        click.echo((f"[{ns or 'self'}] " if all_netns else "") + c.line())
    click.echo(f"conntrack: {len(out)} flow entries have been shown.", err=True)


@host_group.command("get")
@netns_option
@click.argument("flow")
@json_option
def host_get(host_netns, flow, as_json):
    """One entry by its original tuple: 'udp 10.0.0.1:5000 10.0.0.2:53'."""
    with _errors():
        conn = _host(host_netns).get(_tuple(flow))
    if conn is None:
        raise click.ClickException(f"no conntrack entry for {flow!r}")
    click.echo(json.dumps(conn.as_dict(), indent=1) if as_json else conn.line())


@host_group.command("events")
@netns_option
@click.option("--follow", is_flag=True, help="Keep printing until interrupted.")
@click.option(
    "--seconds", type=float, default=5.0, show_default=True, help="Without --follow: listen this long."
)
@click.option("--rate-limit", type=float, default=500.0, show_default=True, help="Events/s before sampling.")
@click.option("--all-netns", is_flag=True, help="Also every namespace with an id here (shown as nsid=N).")
@json_option
def host_events(host_netns, follow, seconds, rate_limit, all_netns, as_json):
    """NEW and DESTROY events as they happen."""
    from sluice.plugins.conntrack.config import HostConfig

    with _errors():
        from sluice.plugins.conntrack.host import HostConntrack

        host = HostConntrack(HostConfig(event_rate_limit=rate_limit, all_netns=all_netns), netns=host_netns)

        def show(kind, conn):
            if as_json:
                click.echo(json.dumps({"event": kind, **conn.as_dict()}))
            else:
                click.echo(f"[{kind.upper():<7}] {conn.line()}")

        host.observers.append(show)
        host.open_events(1.0)
        end = None if follow else time.monotonic() + seconds
        next_tick = time.monotonic() + 1
        try:
            while end is None or time.monotonic() < end:
                host.poll(0.2)
                if time.monotonic() >= next_tick:
                    host.tick()
                    next_tick += 1
                    if host.breaker.rate < 1:
                        click.echo(f"# sampling {host.breaker.rate * 100:.1f}% of events", err=True)
        except KeyboardInterrupt:
            pass
        finally:
            host.stop()


@ct.command("nat")
@netns_option
@click.argument("flow")
@json_option
def nat_cmd(host_netns, flow, as_json):
    """How FLOW is translated by the host's NAT ('tcp 10.0.0.1:40000 10.0.0.9:80').

    FLOW may be the original tuple or the tuple as seen after NAT (the reversed reply)."""
    from sluice.plugins.conntrack.host import NatCache, flow_dict

    want = _tuple(flow)
    with _errors():
        host = _host(host_netns)
        cache = NatCache()
        conn = host.get(want)
        for c in (
            [conn]
            if conn is not None
            else host.dump([socket.AF_INET if want.src.version == 4 else socket.AF_INET6])
        ):
            cache.add(c)
        t = cache.lookup(want)
    if t is None:
        raise click.ClickException(f"no NAT translation for {flow!r}")
    if as_json:
        click.echo(json.dumps({"original": flow_dict(t.original), "reply": flow_dict(t.reply)}, indent=1))
    else:
        o, r = t.original, t.reply
        click.echo(
            f"original {o.src}:{o.sport} -> {o.dst}:{o.dport}  reply {r.src}:{r.sport} -> {r.dst}:{r.dport}"
        )
