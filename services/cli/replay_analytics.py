"""``postbus replay analytics``: drop and rebuild the metrics store (ClickHouse: analytics, BI
aggregates and the message listing) from the topics, then verify the rebuild against the answers
recorded before it.

The answers, per tenant listed by ``GET /tenants``: its SMTP metrics (``GET
/api/v1/tenants/{t}/smtp/metrics``), its message listing (``GET /messages``, each message with its
history, and their count), its BI totals and daily series (``GET /api/v1/bi/metrics?tenant_id=``);
and across tenants the BI totals, series and top groups per domain, provider, account and campaign.
The BI answers have fixed bounds (up to the time the answers were recorded); the SMTP metrics window
is rolling (the API has no other), so an event within the replay's duration of its start may leave
it. ``--from TIME`` restricts the answers to TIME on (see docs/cli.md); the rebuild is always whole."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from typing import Any

import click
import httpx
from aiokafka import TopicPartition
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from services.cli import verify
from services.cli.context import Ctx, api_call, api_failure, err, get_json
from services.cli.kafka import consumer, partitions_of
from services.common.topics import COMMANDS, EVENTS, REPORTS

INGESTED = (EVENTS, COMMANDS, REPORTS)  # what the metrics store is built from
MAX_WINDOW_H = 8760  # the tenant SMTP metrics' longest window
BI_MAX_WINDOW_S = 400 * 86400
BI_DIMENSIONS = ("domain", "provider", "account", "campaign")
PAGE = 10_000  # messages per listing request
GONE = "(tenant not found)"


class Params:
    """What the answers are asked for; the same before and after (saved with them)."""

    def __init__(self, tenants: list[str], to_ms: int, from_ms: int | None) -> None:
        self.tenants, self.to_ms, self.from_ms = tenants, to_ms, from_ms
        hours = MAX_WINDOW_H if from_ms is None else math.ceil(max(1, to_ms - from_ms) / 3_600_000)
        self.window = f"{min(max(hours, 1), MAX_WINDOW_H)}h"
        self.bi_to = to_ms // 1000
        self.bi_from = max(0, self.bi_to - BI_MAX_WINDOW_S) if from_ms is None else from_ms // 1000

    def to_json(self) -> dict[str, Any]:
        return {"tenants": self.tenants, "to_ms": self.to_ms, "from_ms": self.from_ms}

    @classmethod
    def of(cls, doc: dict[str, Any]) -> Params:
        return cls(list(doc["tenants"]), int(doc["to_ms"]), doc.get("from_ms"))


def bi_answers(out: dict[str, Any], name: str, data: dict[str, Any]) -> None:
    """A BI answer as its totals and one answer per day that counted anything (the API fills the
    other days with zeros), so that a difference names the day."""
    out[f"{name} totals"] = verify.answer(data["totals"])
    for bucket in data["series"]:
        if any(v for k, v in bucket.items() if k != "ts"):
            day = time.strftime("%Y-%m-%d", time.gmtime(int(bucket["ts"])))
            out[f"{name} day {day}"] = verify.answer(bucket)


def listing(http: httpx.Client, tenant_id: str, deadline: float) -> list[dict[str, Any]]:
    """Every message of the tenant (with its history), page by page."""
    out: list[dict[str, Any]] = []
    while True:
        page = get_json(http, "/messages", {"tenant_id": tenant_id, "include_history": "true",
                                            "limit": PAGE, "offset": len(out)}, deadline)
        out.extend(page["messages"])
        if not page["messages"] or len(out) >= int(page.get("total", 0)):
            return out


def _message_from(m: dict[str, Any]) -> float | None:
    """When a message entered the system: accepted, or (an id known from its events only) its first event."""
    if m.get("accepted_ts") is not None:
        return float(m["accepted_ts"])
    stamps = [h["ts"] for h in m.get("history") or () if h.get("ts") is not None]
    return min(stamps) if stamps else None


def record(http: httpx.Client, p: Params, timeout: float, step: Callable[[], None] = lambda: None
           ) -> dict[str, Any]:
    """Every answer (name -> redacted value)."""
    deadline = time.monotonic() + timeout
    out: dict[str, Any] = {}
    from_s = p.from_ms / 1000 if p.from_ms is not None else None
    bi = {"from_ts": p.bi_from, "to_ts": p.bi_to, "bucket": "day"}
    for t in p.tenants:
        data = get_json(http, f"/api/v1/tenants/{t}/smtp/metrics", {"window": p.window}, deadline, missing=None)
        if data is None:  # deleted since the answers were recorded: one answer says so
            out[f"tenant {t}"] = GONE
            step()
            continue
        out[f"metrics {t} window={p.window}"] = verify.answer(data["data"])
        msgs = [m for m in listing(http, t, deadline) if from_s is None or (_message_from(m) or 0) >= from_s]
        out[f"messages {t} count"] = len(msgs)
        for m in msgs:
            out[f"message {t}/{m['id']}"] = verify.answer(m)
        bi_answers(out, f"bi {t}", get_json(http, "/api/v1/bi/metrics", {**bi, "tenant_id": t}, deadline)["data"])
        step()
    bi_answers(out, "bi all", get_json(http, "/api/v1/bi/metrics", bi, deadline)["data"])
    for dim in BI_DIMENSIONS:
        data = get_json(http, "/api/v1/bi/metrics", {**bi, "group_by": dim, "top": 100}, deadline)["data"]
        for g in data["groups"]:
            out[f"bi by {dim} {g['key'] or '(none)'}"] = verify.answer(g)
    step()
    return out


def record_with_progress(ctx: Ctx, p: Params, what: str, timeout: float) -> dict[str, Any]:
    with api_call(ctx), ctx.http(timeout=60) as http, \
            Progress(SpinnerColumn(), TextColumn(f"[bold]{what}[/bold]"), BarColumn(),
                     TextColumn("{task.completed}/{task.total} tenants"), TimeElapsedColumn(),
                     console=err, transient=True) as bar:
        task = bar.add_task(what, total=len(p.tenants) + 1)
        return record(http, p, timeout, lambda: bar.advance(task))


async def end_offsets(ctx: Ctx) -> dict[str, dict[str, int]]:
    """topic -> partition -> end offset (committed reads) of what the store is built from."""
    out: dict[str, dict[str, int]] = {}
    async with consumer(ctx.bootstrap) as c:
        for topic in INGESTED:
            tps = [TopicPartition(topic, p) for p in await partitions_of(c, topic)]
            out[topic] = {str(tp.partition): o for tp, o in (await c.end_offsets(tps)).items()}
    return out


class IngestStatus:
    """The metrics ingest's progress: through the admin API (``GET /admin/replay/metrics``), or
    straight from the metrics service with --metrics-url and --internal-token."""

    def __init__(self, ctx: Ctx) -> None:
        if ctx.metrics_url and ctx.internal_token:
            self.http = httpx.Client(base_url=ctx.metrics_url.rstrip("/"), timeout=30,
                                     headers={"Authorization": f"Bearer {ctx.internal_token}"})
            self.path = "/internal/ingest-status"
        else:
            self.http = ctx.http()
            self.path = "/admin/replay/metrics"

    def get(self) -> dict[str, Any]:
        try:
            r = self.http.get(self.path)
        except httpx.HTTPError as exc:
            raise click.ClickException(f"the ingest status did not answer ({type(exc).__name__})") from None
        if r.status_code != 200:
            raise api_failure(r)
        return r.json()  # type: ignore[no-any-return]

    def close(self) -> None:
        self.http.close()


def loaded(status: dict[str, Any], ends: dict[str, dict[str, int]]) -> int:
    topics = status.get("topics") or {}
    return sum(min(int((topics.get(t) or {}).get(p, 0)), o) for t, parts in ends.items() for p, o in parts.items())


def follow_rebuild(status: IngestStatus, ends: dict[str, dict[str, int]], timeout: float) -> dict[str, Any]:
    """Wait until the ingest has loaded every record up to ``ends`` (taken before the replay) and
    is no longer replaying; the last status."""
    total = sum(o for parts in ends.values() for o in parts.values())
    deadline = time.monotonic() + timeout
    with contextlib.closing(status), \
            Progress(SpinnerColumn(), TextColumn("[bold]rebuilding analytics[/bold]"), BarColumn(),
                     TextColumn("{task.completed}/{task.total} records, {task.fields[rows]} rows"),
                     TimeElapsedColumn(), console=err, transient=True) as bar:
        task = bar.add_task("replay", total=total, rows=0)
        while True:
            s = status.get()
            done = loaded(s, ends)
            bar.update(task, completed=done, rows=s.get("rows") or 0)
            if not s.get("replaying") and done >= total:
                return s
            if time.monotonic() > deadline:
                raise click.ClickException(
                    f"the rebuild had not caught up after {timeout:.0f}s ({done}/{total} records)")
            time.sleep(0.5)
