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

from prometheus_client import start_http_server

from services.common.avro import DecodeError, codec
from services.common.config_view import ConfigView
from services.common.crypto import load_secret_box
from services.common.deadletter import encode_dead_letter
from services.common.faust_support import make_app, table_put
from services.common.settings import get_settings
from services.common.topics import COMMANDS, CONFIG_ACCOUNTS, DEADLETTER, EVENTS, SENDER_APP
from services.sender import metrics as m
from services.sender.mime import build_message, decode_base64_attachment, envelope_recipients, envelope_sender
from services.sender.outcomes import Failure, classify, retry_delay_s
from services.sender.scheduler import Lane, Scheduler
from services.sender.smtp_pool import Connection, SmtpTarget

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

accounts = ConfigView(settings.kafka_bootstrap, CONFIG_ACCOUNTS, "Account")
scheduler = Scheduler()
m.PENDING.set_function(scheduler.pending)
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
            if env["type"] != "messages.add":
                continue  # config commands reach the sender through the compacted config topics
            _, payload = codec().decode(env["payload"], expect="AddMessages")
        except DecodeError as exc:
            m.DEADLETTERS.inc()
            log.error("dead-lettered command", extra={"partition": msg.partition, "offset": msg.offset,
                                                      "reason": str(exc)})
            await deadletter_topic.send(key=event.key, value=encode_dead_letter(
                msg.topic, msg.partition, msg.offset, "sender", str(exc), event.key, event.value))
            continue
        for i, message in enumerate(payload["messages"]):
            _accept(message, msg.partition, msg.offset * 1000 + i)


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
    count = 0
    for key, value in list(messages.data.items()):
        if value.get("s") == "pending":
            _schedule(key, value)
            count += 1
    log.info("schedule rebuilt from table", extra={"pending": count})


# --- SMTP workers ---------------------------------------------------------------------------------

def _start_workers(account: str) -> None:
    lane = scheduler.lane(account)
    tasks = _workers.setdefault(account, [])
    while len(tasks) < settings.sender_connections_per_account:
        tasks.append(asyncio.ensure_future(_worker(account, lane)))


_targets: dict[str, tuple[int, SmtpTarget]] = {}


def _target(account_key: str, account: dict[str, Any]) -> SmtpTarget:
    """The account's SMTP target, decrypted once per account version (not once per message)."""
    cached = _targets.get(account_key)
    if cached is not None and cached[0] == account["updated_ts"]:
        return cached[1]
    target = SmtpTarget(
        host=account["host"],
        port=account["port"],
        user=account.get("user"),
        password=box.decrypt(account.get("password_enc")),
        use_tls=account.get("use_tls"),
        timeout_s=settings.sender_smtp_timeout_s,
        ehlo_name=settings.sender_ehlo_name,
    )
    _targets[account_key] = (account["updated_ts"], target)
    return target


async def _worker(account_key: str, lane: Lane) -> None:
    conn: Connection | None = None
    while True:
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
            account = accounts.get(account_key)
            if account is None:
                # the account record has not reached this process yet (or was deleted): hold the message
                value = messages.data.get(key)
                if value is not None:
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


async def _send_one(key: str, conn: Connection, lane: Lane) -> None:
    if key in _inflight:
        return
    _inflight.add(key)
    try:
        await _send_pending(key, conn, lane)
    finally:
        _inflight.discard(key)


async def _send_pending(key: str, conn: Connection, lane: Lane) -> None:
    value = messages.data.get(key)
    if value is None or value.get("s") != "pending":
        return  # replaced, sent, or removed since it was scheduled
    if value.get("due") and value["due"] > now_ms():
        return  # an older lane entry of a message that was deferred since: its own entry is due later
    msg = value["m"]
    attempt = value["a"] + 1
    started = time.perf_counter()
    try:
        attachments = [(att, _fetch_attachment(att)) for att in msg.get("attachments") or []]
        data = build_message(msg, attachments)
        t_built = time.perf_counter()
        m.STAGE_SECONDS.labels("build").observe(t_built - started)
        await conn.send(envelope_sender(msg), envelope_recipients(msg), data)
    except _AttachmentError as exc:
        await _finish(key, value, "error", attempt, error=str(exc))
        return
    except Exception as exc:
        failure = classify(exc)
        await _failed(key, value, attempt, failure, lane)
        return
    finally:
        m.SMTP_SECONDS.observe(time.perf_counter() - started)
    m.STAGE_SECONDS.labels("smtp").observe(time.perf_counter() - t_built)
    await _finish(key, value, "sent", attempt)


class _AttachmentError(Exception):
    pass


def _fetch_attachment(att: dict[str, Any]) -> bytes:
    if att["fetch_mode"] != "base64":
        raise _AttachmentError(f"attachment fetch_mode {att['fetch_mode']!r} is not supported by this sender yet")
    try:
        return decode_base64_attachment(att)
    except ValueError as exc:
        raise _AttachmentError(str(exc)) from exc


async def _failed(key: str, value: dict[str, Any], attempt: int, failure: Failure, lane: Lane) -> None:
    msg = value["m"]
    if failure.temporary and attempt < settings.sender_max_attempts:
        due = now_ms() + int(retry_delay_s(attempt, settings.sender_retry_base_s) * 1000)
        await _emit(msg, "deferred", attempt, smtp_code=failure.code, deferred_reason=failure.reason,
                    deferred_until=due)
        m.DEFERRED.labels(msg["tenant_id"], msg["account_id"]).inc()
        new = {**value, "a": attempt, "due": due}
        await table_put(messages, value["p"], key, new)
        lane.push(key, msg["priority"], value["q"], due, now_ms())
        return
    reason = failure.reason
    if failure.temporary:
        reason = f"{reason} (gave up after {attempt} attempts)"
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


async def _emit(msg: dict[str, Any], etype: str, attempt: int, **fields: Any) -> None:
    event = {
        "event_id": uuid.uuid4().hex,
        "type": etype,
        "tenant_id": msg["tenant_id"],
        "account_id": msg["account_id"],
        "message_id": msg["id"],
        "pk": msg["pk"],
        "ts": now_ms(),
        "accepted_ts": msg["accepted_ts"],
        "attempt": attempt,
        "smtp_code": fields.get("smtp_code"),
        "error": fields.get("error"),
        "deferred_reason": fields.get("deferred_reason"),
        "deferred_until": fields.get("deferred_until"),
        "batch_code": msg.get("batch_code"),
        "sender_domain": msg["from_addr"].rpartition("@")[2].rstrip(">").lower() or None,
        "recipients": len(msg["to"]) + len(msg["cc"]) + len(msg["bcc"]),
    }
    fut = await events_topic.send(key=msg["tenant_id"].encode(), value=codec().encode("DeliveryEvent", event))
    await fut  # acknowledged by the broker (acks=all) before the table moves on


# --- lifecycle ------------------------------------------------------------------------------------

@app.task
async def _start_views() -> None:
    await accounts.start()


@app.on_before_shutdown.connect  # type: ignore[misc]
async def _shutdown(app: Any, **kwargs: Any) -> None:
    for tasks in _workers.values():
        for task in tasks:
            task.cancel()
    await asyncio.gather(*(t for ts in _workers.values() for t in ts), return_exceptions=True)
    await accounts.stop()


def main() -> None:
    from services.common.faust_support import run_worker

    start_http_server(settings.sender_metrics_port, addr="127.0.0.1")
    run_worker(app, "sender", settings.log_level)
