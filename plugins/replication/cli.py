"""``sluice repl``: status, sync, flush, list, through the running agent's API socket."""

from __future__ import annotations

import json
import time
from urllib.parse import quote

import click

from sluice.cli import CLIError, Obj, emit, json_option, pass_obj, table
from sluice.client import AgentClient, AgentUnavailable


def call(obj: Obj, method: str, path: str, timeout: float = 60.0):
    """``method path`` under /v1/replication on the running agent; the decoded JSON answer."""
    client = AgentClient(obj.settings.socket_path, timeout=timeout)
    try:
        status, answer = client.request(method, "/v1/replication" + path)
    except AgentUnavailable as exc:
        raise CLIError(f"agent not running: {exc}") from None
    if status == 404:
        raise CLIError("the agent does not run the replication plugin")
    if status != 200:
        raise CLIError(
            answer.get("error", f"HTTP {status}") if isinstance(answer, dict) else f"HTTP {status}"
        )
    return answer


def _ago(ts) -> str:
    return "never" if not ts else f"{time.time() - ts:.1f}s ago"


def _ms(v) -> str:
    return "-" if v is None else f"{v * 1000:.1f} ms"


def format_status(s: dict) -> str:
    lag = s.get("write_lag_seconds") or {}
    boot = s.get("boot") or {}
    lines = [
        f"node          {s['node_id']}  state {s['state']}  bucket {s['bucket']}",
        f"servers       {', '.join(s['servers']) or '-'}",
        f"local         {s['local']}",
        f"bucket        {s.get('bucket_count', '-') if s.get('bucket_count') is not None else 'unknown (not connected)'}",
    ]
    if s.get("bucket_count") is not None:
        lines.append(
            f"in both       {s['in_both']}  only local {s['only_local']}  only in bucket {s['only_bucket']}"
        )
    lines += [
        f"queue         {s['queue']}  overflow {s['overflow']}  lag {s['lag_seconds']:.3f}s",
        f"write lag     p50 {_ms(lag.get('p50'))}  p99 {_ms(lag.get('p99'))}",
        f"last sync     {_ago(s.get('last_sync'))}",
        f"boot load     {boot.get('state')}  records {boot.get('records', '-')}  in {boot.get('seconds', '-')}s",
    ]
    if s.get("last_error"):
        lines.append(f"last error    {s['last_error']}")
    return "\n".join(lines)


@click.group("repl")
def repl():
    """Session replication to NATS JetStream KV."""


@repl.command("status")
@json_option
@pass_obj
def status(obj: Obj, as_json):
    """Local sessions against the bucket: counts, in both, only local, only in the bucket, lag."""
    emit(call(obj, "GET", "/status"), as_json, format_status)


@repl.command("sync")
@json_option
@pass_obj
def sync(obj: Obj, as_json):
    """Run a full sync now (repairs drift both ways)."""
    emit(
        call(obj, "POST", "/sync"),
        as_json,
        lambda r: (
            f"bucket {r['bucket']}  local {r['local']}  repaired: {r['put']} written, {r['delete']} deleted"
        ),
    )


@repl.command("flush")
@json_option
@pass_obj
def flush(obj: Obj, as_json):
    """Write every queued change now, without waiting for the debounce window."""
    emit(
        call(obj, "POST", "/flush"), as_json, lambda r: f"written {r['written']}, still queued {r['queued']}"
    )


@repl.command("list")
@click.option("--limit", type=click.IntRange(1, 100_000), default=100, show_default=True)
@click.option("--owner", help="Only records of this owner plugin.")
@json_option
@pass_obj
def list_records(obj: Obj, limit, owner, as_json):
    """Records in the bucket (key, owner, writing node, age, held locally)."""
    path = f"/list?limit={limit}" + (f"&owner={quote(owner)}" if owner else "")
    rows = call(obj, "GET", path)
    emit(
        rows,
        as_json,
        lambda rows: (
            table(
                [
                    [
                        r["key"],
                        r["owner"],
                        r["node_id"],
                        _ago(r["written"]),
                        "yes" if r["local"] else "no",
                        json.dumps(r["attrs"], separators=(",", ":"))[:80],
                    ]
                    for r in rows
                ],
                ["KEY", "OWNER", "NODE", "WRITTEN", "LOCAL", "ATTRS"],
            )
            if rows
            else "bucket is empty"
        ),
    )
