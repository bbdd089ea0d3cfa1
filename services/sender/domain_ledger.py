"""The outbound ledger: exact per-domain counters, decided in command order.

A second agent on ``postbus.commands`` (next to the sender's ingest) applies the ``domain.*``
commands. They are keyed by the domain's tenant, so all commands of a domain are serialised on one
partition and the check-and-count of ``domain.increment`` needs no lock. State lives in the
changelog-backed table ``domain_ledger`` (key = domain name, written on the command's partition).
Each change is published as a ``DomainStatus`` snapshot (compacted, read by the API) and each
request is answered with a ``DomainResult`` the API is waiting for. An entry remembers the offset
of the last command applied to it, so a command re-read after a crash is answered again but never
counted twice. Resets are appended once per partition and touch the domains of that partition.

Ownership: an entry belongs to one tenant; another tenant's commands for it are ignored, except a
``domain.update`` naming ``replaces_tenant`` = the entry's tenant (the API released that tenant's
unverified claim: expired, or out-proved in DNS). The entry then passes to the new tenant with
fresh counters (the old tenant's month goes to billing), unless the ledger knows the domain as
verified (``ver``, from the ``verified`` flag every domain command of the owner carries): a verified
domain never changes hands here, whatever a command says.

Idempotent increments (``domain_quota`` "idempotent increments"): a ``domain.increment`` naming an
idempotency key or a message id leaves a mark in the table ``domain_marks`` (key: tenant, domain,
kind, value; changelog partition = the command's, which is the tenant's events partition too). A
later increment naming the same mark within ``POSTBUS_DOMAIN_IDEMPOTENCY_WINDOW_S`` (measured
between the commands' times) counts nothing and is answered with the first answer (``replayed``):
a client that got a 503 after the ledger had applied its increment retries safely. Every counted
``sent`` event marks its message id, and an increment naming that id (its ``X-Postbus-Message-Id``)
counts nothing; an increment naming it first counts the message, and its ``sent`` event then does
not. Marks are purged by the timer once the window has passed since they were written."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from services.common import domain_quota as q
from services.common.avro import DecodeError, codec
from services.common.faust_guard import guarded
from services.common.topics import BILLING, DOMAIN_RESULTS, STATUS_DOMAINS
from services.sender.app import app, commands_topic, events_topic, settings

log = logging.getLogger("postbus.sender.domains")

ledger = app.Table("domain_ledger", partitions=settings.topic_partitions)
# idempotency keys and message ids of increments and counted sends (domain_quota.new_mark)
marks = app.Table("domain_marks", partitions=settings.topic_partitions)
WINDOW_MS = settings.domain_idempotency_window_s * 1000
results_topic = app.topic(DOMAIN_RESULTS, key_serializer="raw", value_serializer="raw", internal=False)
status_topic = app.topic(STATUS_DOMAINS, key_serializer="raw", value_serializer="raw", internal=False)
billing_topic = app.topic(BILLING, key_serializer="raw", value_serializer="raw", internal=False)

ROLLOVER_INTERVAL_S = 60.0
# the commands agent, the events agent and the timer each read-modify-write entries across awaits
_lock = asyncio.Lock()
# bounce/complaint events the ledger counts itself; SES feedback arrives as domain.feedback commands
FEEDBACK_EVENTS = frozenset({"bounce", "complaint"})
COMMAND_FED_SOURCES = frozenset({"ses"})
# the domain commands that change counters or limits (others, e.g. verification, are config only)
LEDGER_COMMANDS = frozenset({"domain.update", "domain.increment", "domain.feedback", "domain.reset_daily",
                             "domain.reset_monthly"})
# config-only commands: the ledger takes just their ``verified`` flag (ownership), nobody awaits an answer
VERIFY_COMMANDS = frozenset({"domain.verify", "domain.verification", "domain.dkim_rotate"})


@app.agent(commands_topic)
async def domain_commands(stream: Any) -> None:
    async for event in guarded(stream, "domain_commands"):  # no command skipped (issue 12 §1)
        kind = codec().peek_type(event.value, "CommandEnvelope")
        if kind is not None and kind not in LEDGER_COMMANDS and kind not in VERIFY_COMMANDS:
            continue  # not decoded (messages.add above all)
        try:
            _, env = codec().decode(event.value, expect="CommandEnvelope")
            if env["type"] not in LEDGER_COMMANDS and env["type"] not in VERIFY_COMMANDS:
                continue
            _, cmd = codec().decode(env["payload"], expect="DomainCommand")
        except DecodeError:
            continue  # the ingest agent dead-letters undecodable commands
        try:
            async with _lock:
                await _apply(env, cmd, event.message.partition, event.message.offset)
        except Exception:
            log.exception("domain command failed", extra={"type": env["type"], "offset": event.message.offset})


async def _apply(env: dict[str, Any], cmd: dict[str, Any], partition: int, offset: int) -> None:
    ctype, ts = env["type"], int(env["ts"])
    if ctype in ("domain.reset_daily", "domain.reset_monthly"):
        await _reset(cmd, ctype == "domain.reset_monthly", partition, offset, ts)
        return
    name, tenant_id = cmd["name"], cmd["tenant_id"] or env.get("tenant_id") or ""
    current = ledger.data.get(name)
    if ctype in VERIFY_COMMANDS:
        await _note_verified(current, cmd, tenant_id)
        return
    released = None
    if current is not None and current["tenant"] != tenant_id:
        if not (ctype == "domain.update" and cmd.get("replaces_tenant") == current["tenant"]
                and not current.get("ver")):
            log.warning("domain command for another tenant's domain ignored", extra={"domain": name})
            await _answer(cmd, tenant_id, found=False)
            return
        released = q.released(current, tenant_id, partition, ts)  # the API released the unverified claim
        log.info("unverified domain claim passed to another tenant", extra={"domain": name, "tenant_id": tenant_id})
    if current is None and ctype != "domain.update":
        await _answer(cmd, tenant_id, found=False)
        return
    if released is not None:
        entry, billing = released
    else:
        entry = dict(current) if current is not None else q.new_entry(name, tenant_id, partition, ts)
        billing = q.roll(entry, ts)
    if cmd.get("verified") is not None:
        entry["ver"] = bool(cmd["verified"])
    fresh = offset > entry["off"]
    new_marks: list[tuple[str, dict[str, Any]]] = []
    if ctype == "domain.update":
        for field, key in (("status", "status"), ("daily_limit", "daily"), ("monthly_limit", "monthly"),
                           ("enforcement", "enf")):
            if cmd.get(field) is not None:
                entry[key] = cmd[field]
        if entry["status"] == "active":
            entry.pop("ev", None)  # re-activated: the evidence of an automatic suspension is history
    elif ctype == "domain.increment" and fresh:
        mark_key = q.increment_mark(cmd, tenant_id, name)
        mark = q.live_mark(marks.data.get(mark_key), ts, WINDOW_MS) if mark_key else None
        replay, new_mark = q.increment_once(entry, mark, mark_key is not None, ts, partition)
        if replay is not None:  # a retry, or a message already counted from its send: nothing counted
            await _answer(cmd, tenant_id, allowed=replay["res"][0], reason=replay["res"][1],
                          sent_today=replay["today"], sent_month=replay["month"],
                          status_offset=replay.get("so", -1), replayed=True)
            return
        if mark_key and new_mark is not None:
            new_marks.append((mark_key, new_mark))
    elif ctype == "domain.feedback" and fresh:
        entry["bounce"] += cmd["bounces"]
        entry["compl"] += cmd["complaints"]
        _maybe_suspend(entry, ts)
    entry["off"] = max(entry["off"], offset)
    status_offset = await _write([(entry, billing)], ts, new_marks)
    allowed, reason = entry["res"] if ctype == "domain.increment" else (True, None)
    await _answer(cmd, tenant_id, allowed=allowed, reason=reason, sent_today=entry["today"],
                  sent_month=entry["msent"], status_offset=status_offset)


async def _note_verified(current: dict[str, Any] | None, cmd: dict[str, Any], tenant_id: str) -> None:
    """The owner's verification state, kept for the ownership rule (a verified domain never changes
    hands). Counters and limits are untouched: these commands carry the config record's limits,
    which may predate an automatic suspension."""
    if current is None or current["tenant"] != tenant_id or cmd.get("verified") is None:
        return
    if bool(current.get("ver")) == bool(cmd["verified"]):
        return
    entry = dict(current)
    entry["ver"] = bool(cmd["verified"])
    await _write([(entry, None)], q.now_ms())


async def _reset(cmd: dict[str, Any], monthly: bool, partition: int, offset: int, ts: int) -> None:
    """Every domain of this partition: the daily (or monthly) counters go to zero; the monthly
    reset freezes the month's counters into a billing record first."""
    changes: list[tuple[dict[str, Any], dict[str, Any] | None]] = []
    frozen: list[dict[str, Any]] = []
    for name, current in list(ledger.data.items()):
        if current.get("cp", current.get("p")) != partition:  # the owner's command partition
            continue
        entry = dict(current)
        billing = q.roll(entry, ts)
        if offset > entry["off"]:  # not already reset by this very command (replay)
            if monthly:
                record = q.frozen(entry, "reset", ts)
                frozen.append(record)
                if billing is None:
                    billing = record
                else:  # the rollover froze the ended month; the reset freezes the (empty) new one
                    changes.append((dict(entry), billing))
                    billing = record
                q.reset_month(entry, entry["month"])
            else:
                entry["today"] = 0
            entry["off"] = offset
        changes.append((entry, billing))
        log.debug("domain reset", extra={"domain": name, "monthly": monthly})
    status_offset = await _write(changes, ts)
    await _answer(cmd, cmd.get("tenant_id") or "", reset_count=len({e["name"] for e, _ in changes}),
                  frozen=frozen, status_offset=status_offset)


async def _write(changes: list[tuple[dict[str, Any], dict[str, Any] | None]], ts: int,
                 new_marks: list[tuple[str, dict[str, Any]]] | None = None) -> int:
    """Table (changelog), marks, status snapshots and billing records, all acknowledged on return.
    Returns the offset of the last status snapshot (-1 if none). The marks are written in the
    table at once (a command right behind this one sees them) and to the changelog with the rest,
    each with the status offset a replayed answer waits for."""
    c = codec()
    futures = []
    status_futures = []
    mark_values = []
    for key, mark in new_marks or ():
        marks.data[key] = mark
        mark_values.append((key, mark))
    for entry, billing in changes:
        name = entry["name"]
        ledger.data[name] = entry
        futures.append(await ledger.changelog_topic.send(
            key=name, value=entry, partition=entry["p"], key_serializer=ledger.key_serializer,
            value_serializer=ledger.value_serializer, force=True))
        status_futures.append(await status_topic.send(
            key=name.encode(), value=c.encode("DomainStatus", q.status_record(entry, ts))))
        if billing is not None:
            futures.append(await billing_topic.send(key=name.encode(), value=c.encode("BillingRecord", billing)))
    metas = await asyncio.gather(*status_futures)
    status_offset = max((md.offset for md in metas), default=-1)
    for key, mark in mark_values:
        mark["so"] = status_offset
        futures.append(await marks.changelog_topic.send(
            key=key, value=mark, partition=mark["p"], key_serializer=marks.key_serializer,
            value_serializer=marks.value_serializer, force=True))
    await asyncio.gather(*futures)
    return status_offset


async def _answer(cmd: dict[str, Any], tenant_id: str, *, found: bool = True, allowed: bool = False,
                  reason: str | None = None, sent_today: int = 0, sent_month: int = 0, reset_count: int = 0,
                  frozen: list[dict[str, Any]] | None = None, status_offset: int = -1,
                  replayed: bool = False) -> None:
    result = {"request_id": cmd["request_id"], "name": cmd.get("name"), "found": found, "allowed": allowed,
              "reason": reason, "sent_today": sent_today, "sent_month": sent_month, "reset_count": reset_count,
              "frozen": frozen or [], "status_offset": status_offset, "replayed": replayed}
    fut = await results_topic.send(key=tenant_id.encode(), value=codec().encode("DomainResult", result))
    await fut


def _maybe_suspend(entry: dict[str, Any], ts: int) -> None:
    if q.auto_suspend(entry, settings.domain_suspend_bounce_rate, settings.domain_suspend_min_sent, ts):
        log.warning("domain suspended automatically", extra={"domain": entry["name"], **entry["ev"]})


@app.agent(events_topic)
async def domain_events(stream: Any) -> None:
    """Counts the domain's own traffic from ``postbus.events``: every ``sent`` event of a message
    whose From domain is a registered domain of the same tenant, and DSN/ARF bounces and complaints.
    Events of a tenant share one partition, so the entry remembers the last events offset it applied
    (``eoff``): a re-read event (restart, rebalance) is never counted twice. Iterated through the
    offset guard like the command agents: an event Faust drops around a rebalance would never be
    counted (bench/chaos.py: ledgers one short of the sink after the kill sequence)."""
    async for event in guarded(stream, "domain_events"):
        kind = codec().peek_type(event.value, "DeliveryEvent")
        if kind is not None and kind != "sent" and kind not in FEEDBACK_EVENTS:
            continue  # deferred, opened, ...: not decoded
        try:
            _, ev = codec().decode(event.value, expect="DeliveryEvent")
        except DecodeError:
            continue
        etype = ev["type"]
        if etype != "sent" and (etype not in FEEDBACK_EVENTS or ev.get("source") in COMMAND_FED_SOURCES):
            continue
        name = ev.get("sender_domain")
        if not name:
            continue
        try:
            async with _lock:
                await _apply_event(name.lower(), ev, event.message.partition, event.message.offset)
        except Exception:
            log.exception("domain event failed", extra={"type": etype, "offset": event.message.offset})


async def _apply_event(name: str, ev: dict[str, Any], partition: int, offset: int) -> None:
    current = ledger.data.get(name)
    if current is None or current["tenant"] != ev["tenant_id"]:
        return
    if offset <= current.get("eoff", -1):
        await _restore_mark(name, current, ev, partition)
        return
    if int(ev["ts"]) < current.get("since", 0):
        return  # the tenant's mail from before the domain passed to it
    ts = q.now_ms()
    entry = dict(current)
    billing = q.roll(entry, ts)
    entry["eoff"] = offset
    new_marks: list[tuple[str, dict[str, Any]]] = []
    if ev["type"] == "sent":
        # counted once with the client's increments that name this message (X-Postbus-Message-Id)
        mark_key = q.mark_key(ev["tenant_id"], name, q.MARK_MESSAGE, ev["message_id"])
        mark = q.live_mark(marks.data.get(mark_key), int(ev["ts"]), WINDOW_MS)
        if mark is not None and mark.get("eo") == [partition, offset]:
            # this very event counted the message before a crash, and its mark reached the marks
            # changelog while the entry carrying the count did not (another topic: the broker, or
            # the sender, died between the two; the entry's eoff says the event is not in it):
            # the count is counted again, from the mark as it was before the event
            mark = None if mark["src"] == "sent" else {**mark, "c": False, "m": False}
            log.warning("domain ledger: the count of a re-read event was lost with its entry: counted again",
                        extra={"domain": name, "partition": partition, "offset": offset})
        counted = q.send_counts(mark)
        new_mark = q.send_once(entry, mark, int(ev["ts"]), partition)
        if counted:
            new_mark["eo"] = [partition, offset]  # the event whose count this entry holds
        new_marks.append((mark_key, new_mark))
    elif q.period(int(ev["ts"]))[1] == entry["month"]:
        entry["bounce" if ev["type"] == "bounce" else "compl"] += 1
        _maybe_suspend(entry, ts)
    await _write_nowait(entry, billing, ts, new_marks)


async def _restore_mark(name: str, entry: dict[str, Any], ev: dict[str, Any], partition: int) -> None:
    """An event applied already (re-read after a crash): its entry was on the broker, its mark may
    not have been (another changelog partition); without the mark a resend of the message would be
    counted again (bench/chaos.py: ledgers 3 over the sink). Restores it, counting nothing."""
    if ev["type"] != "sent":
        return
    key = q.mark_key(ev["tenant_id"], name, q.MARK_MESSAGE, ev["message_id"])
    if q.live_mark(marks.data.get(key), int(ev["ts"]), WINDOW_MS) is not None:
        return
    mark = q.new_mark(entry, "sent", True, None, True, int(ev["ts"]), partition)
    marks.data[key] = mark
    await marks.changelog_topic.send(key=key, value=mark, partition=partition, key_serializer=marks.key_serializer,
                                     value_serializer=marks.value_serializer, force=True)


# marks of counted events waiting for their status snapshot's offset (written by _mark_writer)
_unsettled: list[tuple[list[Any], list[tuple[str, dict[str, Any]]]]] = []
_unsettled_wake = asyncio.Event()


async def _write_nowait(entry: dict[str, Any], billing: dict[str, Any] | None, ts: int,
                        new_marks: list[tuple[str, dict[str, Any]]]) -> None:
    """``_write`` for the events path, without waiting for the broker per event: the entry, its
    status snapshot and billing record are handed to the app's producer, which Faust flushes before
    it commits the events' offsets (so an event's offset is never committed before its writes are
    on the broker, and a crash re-reads it: ``eoff`` keeps it from counting twice). The marks follow
    once the snapshot's offset is known (``so``, what a replayed increment waits for), written by
    ``_mark_writer``. Waiting for two broker round trips per event held the ledger to a few dozen
    events a second: under load it fell minutes behind the sends (found by bench/chaos.py)."""
    c = codec()
    name = entry["name"]
    ledger.data[name] = entry
    await ledger.changelog_topic.send(key=name, value=entry, partition=entry["p"],
                                      key_serializer=ledger.key_serializer,
                                      value_serializer=ledger.value_serializer, force=True)
    for key, mark in new_marks:  # at once (flushed with the entry before the event's offset is
        marks.data[key] = mark   # committed); written again with its ``so`` by _mark_writer
        await marks.changelog_topic.send(key=key, value=dict(mark), partition=mark["p"],
                                         key_serializer=marks.key_serializer,
                                         value_serializer=marks.value_serializer, force=True)
    status = await status_topic.send(key=name.encode(), value=c.encode("DomainStatus", q.status_record(entry, ts)))
    if billing is not None:
        await billing_topic.send(key=name.encode(), value=c.encode("BillingRecord", billing))
    if new_marks:
        _unsettled.append(([status], new_marks))
        _unsettled_wake.set()


@app.task
async def _mark_writer() -> None:
    """Writes the marks of counted events to their changelog once their status snapshot is on the
    broker (its offset is the mark's ``so``)."""
    while True:
        await _unsettled_wake.wait()
        _unsettled_wake.clear()
        batch = _unsettled[:]
        del _unsettled[:len(batch)]
        for futures, new_marks in batch:
            try:
                metas = await asyncio.gather(*futures)
            except Exception:
                log.exception("status snapshot not written: its marks stay in memory only")
                continue
            status_offset = max(md.offset for md in metas)
            for key, mark in new_marks:
                mark["so"] = status_offset
                await marks.changelog_topic.send(key=key, value=mark, partition=mark["p"],
                                                 key_serializer=marks.key_serializer,
                                                 value_serializer=marks.value_serializer, force=True)


@app.timer(ROLLOVER_INTERVAL_S)
async def _rollover() -> None:
    """Day and month roll over at UTC midnight even for a domain that sends nothing: the ended
    month's counters go to billing, the snapshots the API reads go to zero. Idempotent (state-based)."""
    async with _lock:
        ts = q.now_ms()
        day, month = q.period(ts)
        stale = [dict(e) for e in list(ledger.data.values()) if e["day"] < day or e["month"] < month]
        changes = [(entry, q.roll(entry, ts)) for entry in stale]
        if changes:
            await _write(changes, ts)
            log.info("outbound counters rolled over", extra={"domains": len(changes), "day": day})
        expired = q.purge_before(marks.data, ts, WINDOW_MS)
        futures = []
        for key in expired:  # tombstones, without waiting for each one
            mark = marks.data.pop(key)
            futures.append(await marks.changelog_topic.send(
                key=key, value=None, partition=mark["p"], key_serializer=marks.key_serializer,
                value_serializer="raw", force=True))
        await asyncio.gather(*futures)
        if expired:
            log.info("idempotency marks expired", extra={"marks": len(expired)})
