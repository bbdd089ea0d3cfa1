"""``postbus export command-log``: the audit log as JSON lines, through the admin API's export."""

from __future__ import annotations

import sys
from typing import Any

import click
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from services.cli.context import Ctx, api_call, api_failure, err, parse_time, since_option, tenant_option


@click.group()
def export() -> None:
    """Export audit data."""


@export.command("command-log")
@tenant_option("Only this tenant's commands.")
@since_option("From this time (ISO 8601 or unix seconds).")
@click.option("--until", default=None, help="Up to this time (ISO 8601 or unix seconds).")
@click.option("--route", default=None, help='Only commands of this route, e.g. "POST /tenant".')
@click.option("--type", "ctype", default=None, help="Only commands of this type, e.g. tenant.create.")
@click.pass_obj
def export_command_log(ctx: Ctx, tenant_id: str | None, since: str | None, until: str | None,
                       route: str | None, ctype: str | None) -> None:
    """The command log (every accepted state-changing command, secrets redacted) as JSON lines on
    stdout, through the admin API's export; progress on stderr.

    Example: postbus export command-log --tenant acme --since 2026-11-01 > acme.ndjson"""
    params: dict[str, Any] = {}
    if tenant_id:
        params["tenant_id"] = tenant_id
    if since:
        params["since"] = parse_time(since, "--since") / 1000
    if until:
        params["until"] = parse_time(until, "--until") / 1000
    if route:
        params["route"] = route
    if ctype:
        params["type"] = ctype
    lines = 0
    size = 0
    out = sys.stdout.buffer
    with api_call(ctx), ctx.http(timeout=120) as http, http.stream("GET", "/command-log/export", params=params) as r:
        if r.status_code != 200:
            r.read()
            raise api_failure(r)
        with Progress(SpinnerColumn(), TextColumn("[bold]exporting[/bold] {task.completed} commands"),
                      TimeElapsedColumn(), console=err, transient=True) as bar:
            task = bar.add_task("export", total=None)
            for line in r.iter_lines():
                if not line:
                    continue
                data = (line + "\n").encode()
                out.write(data)
                lines += 1
                size += len(data)
                bar.update(task, completed=lines)
    out.flush()
    err.print(f"exported {lines} commands ({size} bytes)")
