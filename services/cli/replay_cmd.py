"""``postbus replay PROJECTION``: rebuild a projection from the topics and verify it against the
answers it gave before (``analytics``: the metrics store, with the message listing and the BI
aggregates; ``views``: the API's config views). Exit code 1 when an answer differs."""

from __future__ import annotations

import time

import click

from services.cli import replay_analytics as ra
from services.cli import replay_views as rv
from services.cli import verify
from services.cli.context import (
    Ctx,
    api_call,
    api_failure,
    confirm,
    emit,
    err,
    optional_time,
    require_yes_or_terminal,
    run,
    tenant_ids,
    yes_option,
)

save_option = click.option("--save-answers", "save_path", default=None, metavar="FILE",
                           help="Also write the answers recorded before the rebuild to FILE (JSON, redacted).")
against_option = click.option("--against", "against_path", default=None, metavar="FILE",
                              help="Verify against the answers recorded in FILE (--save-answers of an earlier "
                                   "run) instead of recording them now.")


@click.group()
def replay() -> None:
    """Rebuild projections from the topics and verify them against their previous answers."""


def report(projection: str, same: int, diffs: list[dict[str, object]], extra: dict[str, object]) -> None:
    """The verdict: differences and a summary on stderr, one JSON line on stdout; exit 1 on a difference."""
    for d in diffs:  # plain lines (no wrapping), to be read or grepped
        click.echo(verify.render_difference(d), err=True)
    emit({"ok": not diffs, "projection": projection, "verified": same, "differences": len(diffs), **extra})
    if diffs:
        raise click.ClickException(f"{len(diffs)} answer(s) differ ({same} identical)")
    click.echo(f"verified: {same} answers identical", err=True)


@replay.command("analytics")
@yes_option("Confirm: the analytics tables are dropped and rebuilt.")
@click.option("--from", "from_", default=None, metavar="TIME",
              help="Verify only the answers about TIME on (ISO 8601 or unix seconds): messages accepted from "
                   "TIME, metrics and BI windows starting at TIME. The rebuild is always whole.")
@save_option
@against_option
@click.option("--wait/--no-wait", default=True, show_default=True,
              help="Follow the rebuild and verify it; --no-wait only requests it.")
@click.option("--timeout", type=click.FloatRange(min=1), default=1800, show_default=True,
              help="Seconds to wait for the rebuild (and for the answers after it).")
@click.pass_obj
def replay_analytics(ctx: Ctx, yes: bool, from_: str | None, save_path: str | None, against_path: str | None,
                     wait: bool, timeout: float) -> None:
    """Drop the metrics store (ClickHouse: analytics, BI aggregates, message listing) and rebuild it
    from postbus.events, postbus.commands and postbus.reports through the admin API's
    POST /admin/replay/metrics, with a progress bar; then verify it: the answers recorded before
    (per tenant: SMTP metrics, message listing with histories, BI totals and series; BI across
    tenants) are asked again once the ingest has loaded everything up to the end offsets taken
    before the replay, and compared one by one.

    Example: postbus replay analytics --yes --from 2026-11-27T00:00:00Z"""
    from_ms = optional_time(from_, "--from")
    require_yes_or_terminal(yes, "replay drops and rebuilds every analytics table")
    if against_path:
        doc = verify.load(against_path, "analytics")
        if from_ms is not None and from_ms != doc["params"].get("from_ms"):
            raise click.UsageError("--from differs from the recorded answers' (leave it out with --against)")
        params, before = ra.Params.of(doc["params"]), doc["answers"]
    elif wait:
        with api_call(ctx), ctx.http() as http:
            params = ra.Params(tenant_ids(http), int(time.time() * 1000), from_ms)
        before = ra.record_with_progress(ctx, params, "recording the answers", timeout)
    else:
        params, before = None, {}
    if save_path and params is not None:
        verify.save(save_path, {"projection": "analytics", "params": params.to_json(), "answers": before})
    confirm(yes, "drop and rebuild every analytics table?", "not confirmed: nothing replayed")
    ends = run(ra.end_offsets(ctx)) if wait else {}
    status = ra.IngestStatus(ctx) if wait else None
    rows_before = status.get().get("rows") if status is not None else None
    with api_call(ctx), ctx.http() as http:
        # answered once the tables are dropped and the ingest rewound (``replaying`` is then true)
        r = http.post("/admin/replay/metrics", json={"confirm": True})
        if r.status_code != 202:
            raise api_failure(r)
    err.print("replay requested")
    if status is None or params is None:
        return
    with api_call(ctx):
        last = ra.follow_rebuild(status, ends, timeout)
    after = ra.record_with_progress(ctx, params, "verifying the answers", timeout)
    same, diffs = verify.compare(before, after)
    report("analytics", same, diffs, {"records": sum(o for p in ends.values() for o in p.values()),
                                      "events": sum(ends.get(ra.EVENTS, {}).values()),
                                      "rows": last.get("rows"), "rows_before": rows_before,
                                      "from": params.from_ms, "window": params.window})


@replay.command("views")
@click.option("--from", "from_", default=None, metavar="TIME", hidden=False,
              help="Not accepted: a compacted topic keeps only each key's latest record (use state-at TENANT TIME).")
@save_option
@against_option
@click.pass_obj
def replay_views(ctx: Ctx, from_: str | None, save_path: str | None, against_path: str | None) -> None:
    """Rebuild the API's config views (tenants, accounts, API keys, instance, suspensions, sync
    status, provider users/tokens/senders/templates/lists/members/campaigns, domains, suppressions)
    in this process from their compacted topics, up to the offsets the API's views hold, and
    compare them with the API: a salted digest of every record (GET /admin/views/digest: no record
    leaves the API), the tenant list and each tenant's account list. Nothing is changed.

    With --against FILE the rebuild goes to the end of the topics and is compared with answers saved
    earlier (--save-answers): what changed since.

    Example: postbus replay views --save-answers views.json"""
    if from_ is not None:
        raise click.UsageError("--from has no meaning for views: their topics are compacted (only each key's "
                               "latest record is kept), so they cannot be rebuilt as of an earlier time; "
                               "`postbus state-at TENANT TIME` rebuilds a tenant's configuration at TIME "
                               "from the command log")
    if against_path:
        doc = verify.load(against_path, "views")
        salt, before, held = doc["salt"], doc["answers"], doc["held"]
        with api_call(ctx), ctx.http() as http:
            tenants = tenant_ids(http)
        views = run(rv.rebuild(ctx, held, exact=False))
    else:
        salt = rv.new_salt()
        with api_call(ctx), ctx.http(timeout=120) as http:
            before, held = rv.api_answers(http, salt)
        tenants = before["GET /tenants"]
        views = run(rv.rebuild(ctx, held, exact=True))
    if save_path and not against_path:
        verify.save(save_path, {"projection": "views", "salt": salt, "held": held, "answers": before})
    after = rv.rebuilt_answers(views, salt, tenants)
    same, diffs = verify.compare(before, after)
    report("views", same, diffs, {"views": len(views), "records": sum(len(v) for v in views.values()),
                                  "offsets": {t: h["applied"] for t, h in held.items() if h["applied"]}})
