"""The sender: a Faust worker that turns ``messages.add`` commands into SMTP sends.

State: the changelog-backed table ``messages`` (key ``[tenant, id]``) holds every pending message
with its attempt count and due time, and a small marker for every final one (so an id that was sent
is never sent again). The in-memory :class:`Scheduler` orders pending keys per account and is
rebuilt from the table after each recovery. SMTP workers (one connection each, per account) take
keys from it, send, append the outcome event to ``postbus.events`` and, once the broker has that
event, update the table. A crash can therefore only resend what was in flight."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any

from services.common import suspension
from services.common.avro import DecodeError, codec
from services.common.config_view import ConfigView
from services.common.crypto import load_secret_box
from services.common.deadletter import encode_dead_letter
from services.common.faust_support import make_app, table_put
from services.common.http_server import set_readiness, start_metrics_server
from services.common.settings import get_settings
from services.common.topics import (
    COMMANDS,
    CONFIG_ACCOUNTS,
    CONFIG_INSTANCE,
    CONFIG_SUSPENSIONS,
    CONFIG_TENANTS,
    DEADLETTER,
    EVENTS,
    SENDER_APP,
)
from services.sender import metrics as m
from services.sender import pipeline, prepare_mime, throttle  # noqa: F401  (prepare_mime registers the builder)
from services.sender.mime import envelope_recipients, envelope_sender
from services.sender.outcomes import Failure, classify, gave_up, retry_due_ms
from services.sender.scheduler import Lane, Ownership, Scheduler
from services.sender.smtp_pool import Connection, SmtpTarget, make_target, pool_size

log = logging.getLogger("postbus.sender")
settings = get_settings()
box = load_secret_box(settings)

app = make_app(SENDER_APP, settings.kafka_bootstrap, str(settings.state_dir / "sender"),
               settings.topic_partitions)
commands_topic = app.topic(COMMANDS, key_serializer="raw", value_serializer="raw", internal=False)
events_topic = app.topic(EVENTS, key_serializer="raw", value_serializer="raw", internal=False)
deadletter_topic = app.topic(DEADLETTER, key_serializer="raw", value_serializer="raw", internal=False)
# keys and values are JSON (faust's default for untyped tables)
messages = app.Table("messages", partitions=settings.topic_partitions)

scheduler = Scheduler()
ownership = Ownership()  # partitions this instance may send for (several sender instances)
# suspended batches per tenant. Live changes come only from the command stream, in order with the
# tenant's messages (a release must not overtake a delete queued before it); the compacted config
# topic gives the state at start-up, before the stream has caught up. The newest record wins.
_suspensions: dict[str, dict[str, Any]] = {}
# pending keys a worker found suspended, per tenant: out of their lane until the tenant's
# suspension changes, then pushed back with their original priority and sequence
_held: dict[str, set[str]] = {}


def _on_account(key: str, value: dict[str, Any] | None) -> None:
    tenant_id, _, account_id = key.partition("/")
    m.init_account(tenant_id, account_id, present=value is not None)
    if value is not None and key in scheduler.lanes:
        _start_workers(key)  # a larger max_connections; a smaller one: workers leave (_excess_worker)


def _on_suspension_record(key: str, value: dict[str, Any] | None) -> None:
    """From the config topic: used for the initial load only (see above)."""
    if suspensions_view.ready.is_set():
        return
    _on_suspension(key, value)


def _on_suspension(key: str, value: dict[str, Any] | None) -> None:
    if value is None:
        _suspensions.pop(key, None)
    elif suspension.newer(_suspensions.get(key), value):
        _suspensions[key] = value
    else:
        return
    _release(key)


def _on_tenant(key: str, value: dict[str, Any] | None) -> None:
    _release(key)  # an inactive tenant switched on again


def _on_instance(key: str, value: dict[str, Any] | None) -> None:
    for tenant_id in list(_held):
        _release(tenant_id)  # the instance switched on again


accounts = ConfigView(settings.kafka_bootstrap, CONFIG_ACCOUNTS, "Account", on_change=_on_account)
tenants = ConfigView(settings.kafka_bootstrap, CONFIG_TENANTS, "Tenant", on_change=_on_tenant)
instance_view = ConfigView(settings.kafka_bootstrap, CONFIG_INSTANCE, "Instance", on_change=_on_instance)
suspensions_view = ConfigView(settings.kafka_bootstrap, CONFIG_SUSPENSIONS, "Suspension",
                              on_change=_on_suspension_record)
m.PENDING.set_function(lambda: scheduler.pending() + sum(len(keys) for keys in _held.values()))
_workers: dict[str, list[asyncio.Task[None]]] = {}
# keys a worker is sending right now: a key can sit in a lane twice (a replacement, a retry), but
# only one worker may hold it at a time
_inflight: set[str] = set()
FINAL = ("sent", "error")


def now_ms() -> int:
    return int(time.time() * 1000)


def _account_key(tenant_id: str, account_id: str) -> str:
    return f"{tenant_id}/{account_id}"


# --- ingest: commands -> table + scheduler -------------------------------------------------------

@app.agent(commands_topic)
async def ingest(stream: Any) -> None:
    async for event in stream.events():
        msg = event.message
        try:
            _, env = codec().decode(event.value, expect="CommandEnvelope")
            handler = _HANDLERS.get(env["type"])
            if handler is None:
                continue  # other config commands reach the sender through the compacted config topics
            schema, payload = codec().decode(env["payload"])
            if env["type"] == "messages.add" and schema != "AddMessages":
                raise DecodeError(f"messages.add carries a {schema} payload")
        except DecodeError as exc:
            m.DEADLETTERS.inc()
            log.error("dead-lettered command", extra={"partition": msg.partition, "offset": msg.offset,
                                                      "reason": str(exc)})
            await deadletter_topic.send(key=event.key, value=encode_dead_letter(
                msg.topic, msg.partition, msg.offset, "sender", str(exc), event.key, event.value))
            continue
        if handler is _add:
            for i, message in enumerate(payload["messages"]):
                _accept(message, msg.partition, msg.offset * 1000 + i)
            continue
        try:
            await handler(env, payload)
        except (KeyError, TypeError, ValueError) as exc:  # a payload of an unexpected shape
            m.DEADLETTERS.inc()
            log.error("dead-lettered command", extra={"type": env["type"], "offset": msg.offset, "reason": repr(exc)})
            await deadletter_topic.send(key=event.key, value=encode_dead_letter(
                msg.topic, msg.partition, msg.offset, "sender", f"bad {env['type']} payload: {exc!r}",
                event.key, event.value))


def _accept(message: dict[str, Any], partition: int, seq: int) -> None:
    key = _k([message["tenant_id"], message["id"]])
    current = messages.get(key)
    if current is not None:
        if current["s"] == "sent":
            m.DUPLICATE_IDS.labels(message["tenant_id"]).inc()
            log.info("ignored already-sent id", extra={"tenant_id": message["tenant_id"], "id": message["id"]})
            return
        if current["s"] == "pending" and current["m"]["pk"] == message["pk"]:
            return  # the same submission, re-read after a restart: already in the table and schedule
    value = {"s": "pending", "p": partition, "q": seq, "a": 0, "due": message.get("deferred_ts"), "m": message}
    messages[key] = value  # in-stream write: changelog partition = this command's partition
    _schedule(key, value)


def _k(key: list[str]) -> str:
    # JSON-serialised table key: tenant and id joined by a separator that ids cannot contain
    return f"{key[0]}\x1f{key[1]}"


def _schedule(key: str, value: dict[str, Any]) -> None:
    msg = value["m"]
    account = _account_key(msg["tenant_id"], msg["account_id"])
    if scheduler.push(account, key, msg["priority"], value["q"], value.get("due"), now_ms()):
        _start_workers(account)


@messages.on_recover
async def _rebuild_schedule() -> None:
    scheduler.clear()
    _held.clear()
    count = 0
    for key, value in list(messages.data.items()):
        if value.get("s") == "pending":
            _schedule(key, value)
            count += 1
    log.info("schedule rebuilt from table", extra={"pending": count})


# --- lifecycle commands: suspend/activate, delete, cleanup, reject, tenant/account deletion ----------

def _is_held(tenant_id: str, batch_code: str | None) -> bool:
    """Suspended batch, suspended tenant, inactive tenant or inactive instance."""
    return (suspension.is_held(_suspensions.get(tenant_id), batch_code)
            or suspension.switched_off(instance_view.get(suspension.INSTANCE_KEY), tenants.get(tenant_id)) is not None)


def _hold_if_suspended(key: str) -> bool:
    value = messages.data.get(key)
    if value is None or value.get("s") != "pending":
        return False
    msg = value["m"]
    if not _is_held(msg["tenant_id"], msg.get("batch_code")):
        return False
    _held.setdefault(msg["tenant_id"], set()).add(key)
    return True


def _release(tenant_id: str) -> None:
    """Push back the held messages the tenant's current suspension and switches no longer cover."""
    held = _held.get(tenant_id)
    if not held:
        return
    for key in list(held):
        value = messages.data.get(key)
        if value is None or value.get("s") != "pending":
            held.discard(key)
        elif not _is_held(tenant_id, value["m"].get("batch_code")):
            held.discard(key)
            _schedule(key, value)
    if not held:
        _held.pop(tenant_id, None)


async def _add(env: dict[str, Any], payload: dict[str, Any]) -> None:
    raise AssertionError("messages.add is handled inline")  # marker in _HANDLERS


async def _suspension_changed(env: dict[str, Any], payload: dict[str, Any]) -> None:
    _on_suspension(payload["tenant_id"], payload)


def _tenant_keys(tenant_id: str) -> list[str]:
    prefix = _k([tenant_id, ""])
    return [key for key in list(messages.data.keys()) if key.startswith(prefix)]


async def _delete(env: dict[str, Any], payload: dict[str, Any]) -> None:
    """Still-pending messages leave the table (a ``deleted`` event each); sent ones stay sent."""
    victims = []
    for mid in payload["ids"]:
        key = _k([payload["tenant_id"], mid])
        value = messages.get(key)
        if value is not None and value.get("s") == "pending" and key not in _inflight:
            victims.append((key, value))
    await _emit_all([(value["m"], "deleted", value["a"], {}) for _, value in victims])
    for key, _ in victims:
        del messages[key]
        _held.get(payload["tenant_id"], set()).discard(key)


async def _cleanup(env: dict[str, Any], payload: dict[str, Any]) -> None:
    """Fully reported final messages are forgotten, except that a sent id stays known as sent (so it
    is never sent again): its marker shrinks to ``{"s": "sent"}``."""
    for mid in payload["ids"]:
        key = _k([payload["tenant_id"], mid])
        value = messages.get(key)
        if value is None:
            continue
        if value.get("s") == "sent" and value != SENT_MARKER:
            messages[key] = SENT_MARKER
        elif value.get("s") == "error":
            del messages[key]


async def _reject(env: dict[str, Any], payload: dict[str, Any]) -> None:
    """Messages add-messages refused: reported to the tenant as errors (``rejected`` events). An id
    that was already sent keeps its real outcome."""
    tenant_id = payload["tenant_id"]
    out = []
    for item in payload["items"]:
        current = messages.get(_k([tenant_id, item["id"]]))
        if current is not None and current.get("s") == "sent":
            continue
        out.append(_event(tenant_id, item.get("account_id"), item["id"], str(uuid.uuid4()), "rejected",
                          attempt=0, accepted_ts=env["ts"], error=item["reason"]))
    await _send_events(tenant_id, out)


async def _tenant_deleted(env: dict[str, Any], payload: dict[str, Any]) -> None:
    """Every message of the tenant goes (pending ones with a ``deleted`` event), its lanes stop."""
    tenant_id = payload["tenant_id"]
    keys = _tenant_keys(tenant_id)
    pending = [(key, messages.data.get(key)) for key in keys]
    await _emit_all([(v["m"], "deleted", v["a"], {}) for _, v in pending if v and v.get("s") == "pending"])
    for key in keys:
        del messages[key]
    _held.pop(tenant_id, None)
    for account in [a for a in scheduler.lanes if a.startswith(f"{tenant_id}/")]:
        _stop_lane(account)
    log.info("tenant deleted: messages dropped", extra={"tenant_id": tenant_id, "messages": len(keys)})


async def _account_deleted(env: dict[str, Any], payload: dict[str, Any]) -> None:
    """The account's pending messages can no longer be sent: each ends with an ``error`` event."""
    tenant_id = payload["tenant_id"]
    account_id = payload.get("account_id") or payload.get("id")
    if not account_id:
        return
    victims = [(key, v) for key in _tenant_keys(tenant_id)
               if (v := messages.data.get(key)) and v.get("s") == "pending" and v["m"]["account_id"] == account_id]
    await _emit_all([(v["m"], "error", v["a"], {"error": "account deleted"}) for _, v in victims])
    for key, v in victims:
        messages[key] = {"s": "error", "p": v["p"], "ts": now_ms()}
        _held.get(tenant_id, set()).discard(key)
    _stop_lane(_account_key(tenant_id, account_id))


def _stop_lane(account: str) -> None:
    scheduler.drop(account)
    _workers.pop(account, None)  # the workers see the closed lane and exit


_HANDLERS = {
    "messages.add": _add,
    "messages.suspend": _suspension_changed,
    "messages.activate": _suspension_changed,
    "messages.delete": _delete,
    "messages.cleanup": _cleanup,
    "messages.reject": _reject,
    "tenant.delete": _tenant_deleted,
    "account.delete": _account_deleted,
}
SENT_MARKER = {"s": "sent"}


# --- SMTP workers ---------------------------------------------------------------------------------

def _start_workers(account: str) -> None:
    lane = scheduler.lane(account)
    tasks = _workers.setdefault(account, [])
    while len(tasks) < pool_size(accounts.get(account)):
        tasks.append(asyncio.ensure_future(_worker(account, lane)))


def _excess_worker(account: str) -> bool:
    """True (and the calling worker leaves its pool) when the account's pool is above its size."""
    tasks = _workers.get(account)
    me = asyncio.current_task()
    if tasks is None or me not in tasks or len(tasks) <= pool_size(accounts.get(account)):
        return False
    tasks.remove(me)  # type: ignore[arg-type]
    return True


_targets: dict[str, tuple[int, SmtpTarget]] = {}


def _target(account_key: str, account: dict[str, Any]) -> SmtpTarget:
    """The account's SMTP target, decrypted once per account version (not once per message)."""
    cached = _targets.get(account_key)
    if cached is not None and cached[0] == account["updated_ts"]:
        return cached[1]
    target = make_target(account_key, account["host"], account["port"], account.get("user"),
                         box.decrypt(account.get("password_enc")), account.get("use_tls"),
                         account.get("tls_verify", True) is not False, account.get("ca_bundle_pem"),
                         allow_insecure_auth=account.get("allow_insecure_auth") is True)
    _targets[account_key] = (account["updated_ts"], target)
    return target


async def _worker(account_key: str, lane: Lane) -> None:
    conn: Connection | None = None
    # never send before knowing what is suspended or switched off
    await asyncio.gather(suspensions_view.ready.wait(), instance_view.ready.wait(), tenants.ready.wait())
    while not lane.closed and not _excess_worker(account_key):
        try:
            key = lane.pop(now_ms())
            if key is None:
                lane.wake.clear()
                due = lane.next_due_ms()
                timeout = 30.0 if due is None else max(0.0, (due - now_ms()) / 1000)
                try:
                    await asyncio.wait_for(lane.wake.wait(), timeout)
                except TimeoutError:
                    if conn is not None and due is None:
                        await conn.close()  # idle lane: free the SMTP session
                continue
            if _hold_if_suspended(key):
                continue
            account = accounts.get(account_key)
            if account is None:
                # the account record has not reached this process yet (or was deleted): hold the message
                value = messages.data.get(key)
                if value is not None and value.get("s") == "pending":
                    lane.push(key, value["m"]["priority"], value["q"], now_ms() + 1000, now_ms())
                await asyncio.sleep(0.2)
                continue
            target = _target(account_key, account)
            if conn is None or conn.target != target:
                if conn is not None:
                    await conn.close()
                conn = Connection(target)
            await _send_one(key, conn, lane)
        except asyncio.CancelledError:
            if conn is not None:
                await conn.close()
            raise
        except Exception:
            log.exception("sender worker error", extra={"account": account_key})
            await asyncio.sleep(1.0)
    if conn is not None:
        await conn.close()


async def _send_one(key: str, conn: Connection, lane: Lane) -> None:
    if key in _inflight:
        return
    _inflight.add(key)
    try:
        await _send_pending(key, conn, lane)
    finally:
        _inflight.discard(key)
        ownership.release(key)
        throttle.release(key)


async def _send_pending(key: str, conn: Connection, lane: Lane) -> None:
    value = messages.data.get(key)
    if value is None or value.get("s") != "pending":
        return  # replaced, sent, or removed since it was scheduled
    if not ownership.claim(key, value["p"]):
        return  # its partition moved to another instance (or is recovering): not ours to send
    if value.get("due") and value["due"] > now_ms():
        return  # an older lane entry of a message that was deferred since: its own entry is due later
    msg = value["m"]
    account = accounts.get(_account_key(msg["tenant_id"], msg["account_id"]))
    if account is None:
        return  # the worker holds messages of unknown accounts before they get here
    ctx = pipeline.SendContext(key=key, message=msg, account=account, tenant=tenants.get(msg["tenant_id"]),
                               partition=value["p"], attempt=value["a"] + 1, now_ms=now_ms())
    decision = await pipeline.run_checks(ctx)
    if decision is not None:
        await _decided(key, value, ctx, decision, lane)
        return
    started = time.perf_counter()
    t_built = started
    try:
        data = await pipeline.prepare(ctx)
        t_built = time.perf_counter()
        m.STAGE_SECONDS.labels("build").observe(t_built - started)
        await conn.send(envelope_sender(msg, settings.sender_verp_domain), envelope_recipients(msg), data)
    except pipeline.PrepareError as exc:
        if exc.temporary:
            await _failed(key, value, ctx.attempt, Failure(True, None, exc.reason), lane)
        else:
            await _finish(key, value, "error", ctx.attempt, error=exc.reason)
        return
    except Exception as exc:
        failure = classify(exc)
        await _failed(key, value, ctx.attempt, failure, lane)
        return
    finally:
        m.SMTP_SECONDS.observe(time.perf_counter() - started)
    m.STAGE_SECONDS.labels("smtp").observe(time.perf_counter() - t_built)
    await _finish(key, value, "sent", ctx.attempt)
    await pipeline.sent(ctx)


async def _decided(key: str, value: dict[str, Any], ctx: pipeline.SendContext, decision: pipeline.Decision,
                   lane: Lane) -> None:
    """A check deferred or refused the message before any SMTP work."""
    msg = value["m"]
    limited = decision.reason.startswith("rate_limit")
    if limited:
        m.RATE_LIMITED.labels(msg["tenant_id"], msg["account_id"]).inc()
    if decision.kind == "defer":
        due = decision.until_ms or now_ms() + 1000
        await _emit(msg, "deferred", value["a"], deferred_reason=decision.reason, deferred_until=due)
        m.DEFERRED.labels(msg["tenant_id"], msg["account_id"]).inc()
        # a deferral by policy is not a failed attempt: the attempt count stays
        await table_put(messages, value["p"], key, {**value, "due": due})
        lane.push(key, msg["priority"], value["q"], due, now_ms())
        return
    await _finish(key, value, decision.event_type, ctx.attempt, error=decision.reason)


async def _failed(key: str, value: dict[str, Any], attempt: int, failure: Failure, lane: Lane) -> None:
    msg = value["m"]
    due = None
    if failure.temporary:
        first = max(msg.get("accepted_ts") or 0, msg.get("deferred_ts") or 0) or None
        due = retry_due_ms(attempt, now_ms(), first, base_s=settings.sender_retry_base_s,
                           cap_s=settings.sender_retry_max_delay_s, max_attempts=settings.sender_max_attempts,
                           max_age_s=settings.sender_retry_max_age_s)
    if due is not None:
        await _emit(msg, "deferred", attempt, smtp_code=failure.code, deferred_reason=failure.reason,
                    deferred_until=due)
        m.DEFERRED.labels(msg["tenant_id"], msg["account_id"]).inc()
        new = {**value, "a": attempt, "due": due}
        await table_put(messages, value["p"], key, new)
        lane.push(key, msg["priority"], value["q"], due, now_ms())
        return
    reason = failure.reason
    if failure.temporary:
        reason = gave_up(reason, attempt)
    await _finish(key, value, "error", attempt, error=reason, smtp_code=failure.code)


async def _finish(key: str, value: dict[str, Any], outcome: str, attempt: int, *,
                  error: str | None = None, smtp_code: int | None = None) -> None:
    msg = value["m"]
    t0 = time.perf_counter()
    await _emit(msg, outcome, attempt, error=error, smtp_code=smtp_code)
    t1 = time.perf_counter()
    m.STAGE_SECONDS.labels("event_ack").observe(t1 - t0)
    (m.SENT if outcome == "sent" else m.ERRORS).labels(msg["tenant_id"], msg["account_id"]).inc()
    # the event is on the broker: now the table may forget the body (kept: the final state). The
    # worker waits for the changelog write, so a crash can resend at most the one message each
    # worker has in flight.
    await table_put(messages, value["p"], key, {"s": outcome, "p": value["p"], "ts": now_ms()})
    m.STAGE_SECONDS.labels("state_ack").observe(time.perf_counter() - t1)


def _event(tenant_id: str, account_id: str | None, message_id: str, pk: str | None, etype: str, *,
           attempt: int, accepted_ts: int | None, msg: dict[str, Any] | None = None, **fields: Any) -> dict[str, Any]:
    return {
        "event_id": uuid.uuid4().hex,
        "type": etype,
        "tenant_id": tenant_id,
        "account_id": account_id,
        "message_id": message_id,
        "pk": pk,
        "ts": now_ms(),
        "accepted_ts": accepted_ts,
        "attempt": attempt,
        "smtp_code": fields.get("smtp_code"),
        "error": fields.get("error"),
        "deferred_reason": fields.get("deferred_reason"),
        "deferred_until": fields.get("deferred_until"),
        "batch_code": msg.get("batch_code") if msg else None,
        "sender_domain": (msg["from_addr"].rpartition("@")[2].rstrip(">").lower() or None) if msg else None,
        "recipients": len(msg["to"]) + len(msg["cc"]) + len(msg["bcc"]) if msg else 0,
        # the primary recipient (first To): the analytics group messages by its mailbox provider
        "recipient": fields.get("recipient") or ((msg["to"] or [None])[0] if msg else None),
    }


def _message_event(msg: dict[str, Any], etype: str, attempt: int, **fields: Any) -> dict[str, Any]:
    return _event(msg["tenant_id"], msg["account_id"], msg["id"], msg["pk"], etype, attempt=attempt,
                  accepted_ts=msg["accepted_ts"], msg=msg, **fields)


async def _emit(msg: dict[str, Any], etype: str, attempt: int, **fields: Any) -> None:
    event = _message_event(msg, etype, attempt, **fields)
    fut = await events_topic.send(key=msg["tenant_id"].encode(), value=codec().encode("DeliveryEvent", event))
    await fut  # acknowledged by the broker (acks=all) before the table moves on


async def _emit_all(items: list[tuple[dict[str, Any], str, int, dict[str, Any]]]) -> None:
    """Several message events, sent together and all acknowledged on return."""
    by_tenant: dict[str, list[dict[str, Any]]] = {}
    for msg, etype, attempt, fields in items:
        by_tenant.setdefault(msg["tenant_id"], []).append(_message_event(msg, etype, attempt, **fields))
    for tenant_id, events in by_tenant.items():
        await _send_events(tenant_id, events)


async def _send_events(tenant_id: str, events: list[dict[str, Any]]) -> None:
    futures = [await events_topic.send(key=tenant_id.encode(), value=codec().encode("DeliveryEvent", e))
               for e in events]
    await asyncio.gather(*futures)


# --- lifecycle ------------------------------------------------------------------------------------

@app.task
async def _start_views() -> None:
    await asyncio.gather(accounts.start(), tenants.start(), suspensions_view.start(), instance_view.start())


_ready = False  # read by the /ready probe's thread; computed in the event loop (Faust is not thread-safe)


@app.timer(0.5)
async def _readiness() -> None:
    """Ready = recovered and consuming: table recovered, no rebalance running, config views loaded."""
    global _ready
    _ready = (app.tables.recovery.completed.is_set() and not getattr(app, "rebalancing", False)
              and all(v.ready.is_set() for v in (accounts, tenants, suspensions_view, instance_view)))


@app.on_before_shutdown.connect  # type: ignore[misc]
async def _shutdown(app: Any, **kwargs: Any) -> None:
    for tasks in _workers.values():
        for task in tasks:
            task.cancel()
    await asyncio.gather(*(t for ts in _workers.values() for t in ts), return_exceptions=True)
    await asyncio.gather(accounts.stop(), tenants.stop(), suspensions_view.stop(), instance_view.stop(),
                         return_exceptions=True)


def main() -> None:
    from services.common.faust_support import run_worker

    set_readiness(lambda: _ready)
    start_metrics_server(settings, settings.sender_metrics_port)  # /metrics needs the internal token
    run_worker(app, "sender", settings.log_level)

from services.sender import dkim_sign as _dkim_sign  # noqa: E402, F401  DKIM transform (needs `app`: imported last)
from services.sender import domain_counting as _domain_counting  # noqa: E402, F401  domain quota check
from services.sender import domain_ledger as _domain_ledger  # noqa: E402, F401  registers the outbound ledger agent
from services.sender import engagement as _engagement  # noqa: E402, F401  tracking, suppression list, feedback
from services.sender import rate_limits as _rate_limits  # noqa: E402, F401  rate-limit check (needs `app`)
