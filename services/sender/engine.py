"""The sender engine: turns accepted messages into SMTP sends and outcome events, without Faust.

:class:`Sender` holds all the sender's state (the :class:`Scheduler` of pending keys per account,
the held (suspended) keys, the keys in flight, the suspensions, the worker tasks) and the worker
loop. Everything outside it is injected (see :class:`Deps`): the message table (read, in-stream
write, background write that returns once the changelog has it), the event emitter, the clock, the
config lookups (accounts, tenants, instance switch), the SMTP connection factory and the send
pipeline (:mod:`services.sender.steps`). Outcomes go through the group commit
(:mod:`services.sender.group_commit`): a worker does not wait for the broker.
``services/sender/service.py`` wires it to Faust; ``tests/unit/test_sender_engine.py`` drives it
with fakes.

Table values (key ``tenant \\x1f id``): ``{"s": "pending", "p": partition, "q": seq, "a": attempts,
"due": ms | None, "m": message}`` while pending, ``{"s": "sent"|"error", "p": partition, "ts": ms}``
once final. An outcome is written as event first, table second (see
:class:`services.sender.group_commit.GroupCommit`): a crash between the two resends the message,
never loses it."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from services.common import suspension
from services.sender import metrics as m
from services.sender import pipeline as pl
from services.sender.group_commit import GroupCommit, Outcome, WriteEvents, WriteTable
from services.sender.mime import envelope_recipients, envelope_sender
from services.sender.outcomes import Failure, classify, gave_up, retry_due_ms
from services.sender.scheduler import Lane, Ownership, Scheduler
from services.sender.smtp_pool import pool_size

log = logging.getLogger("postbus.sender")

SENT_MARKER = {"s": "sent"}
FINAL = ("sent", "error")


def table_key(tenant_id: str, message_id: str) -> str:
    # JSON-serialised table key: tenant and id joined by a separator that ids cannot contain
    return f"{tenant_id}\x1f{message_id}"


class Store(Protocol):
    """The ``messages`` table as the engine sees it (services/sender/message_store.py). ``get``
    may return a fresh copy of a durable value: compare values, not identities."""

    def get(self, key: str) -> dict[str, Any] | None: ...
    def keys(self) -> Iterable[str]: ...
    def items(self) -> Iterable[tuple[str, dict[str, Any]]]:
        """One entry at a time (the table may hold a million queued messages)."""
    def set_local(self, key: str, value: dict[str, Any]) -> None:
        """Not durable yet: its changelog record follows (``append_table``, the group commit)."""
    def set(self, key: str, value: dict[str, Any]) -> None:
        """In-stream write (inside the ingest agent: the changelog partition is the command's)."""
    def delete(self, key: str) -> None:
        """In-stream delete."""


class SmtpConnection(Protocol):
    target: Any

    async def send(self, sender: str, recipients: list[str], data: bytes) -> None: ...
    async def close(self) -> None: ...


# events of one tenant, all acknowledged by the broker on return
EmitFn = Callable[[str, list[dict[str, Any]]], Awaitable[None]]


@dataclass
class Deps:
    store: Store
    emit: EmitFn  # lifecycle commands' events (awaited)
    write_events: WriteEvents  # the group commit's writes
    write_table: WriteTable
    # accepted messages' records: handed to the producer in order; returns the future of their acks
    append_table: Callable[[list[tuple[int, str, dict[str, Any]]]], Awaitable[asyncio.Future[Any]]]
    account: Callable[[str], dict[str, Any] | None]  # "tenant/account" -> Account record
    tenant: Callable[[str], dict[str, Any] | None]
    instance: Callable[[], dict[str, Any] | None]  # the instance record (global switch)
    pipeline: pl.Pipeline
    target: Callable[[str, dict[str, Any]], Any]  # (account key, Account) -> SMTP target
    connect: Callable[[Any], SmtpConnection]  # target -> a (lazily connecting) SMTP session
    ready: Callable[[], Awaitable[None]]  # returns once suspensions, switches and tenants are loaded
    clock: Callable[[], int] = lambda: int(time.time() * 1000)
    verp_domain: str | None = None
    retry_base_s: float = 60.0
    retry_max_delay_s: float = 3600.0
    max_attempts: int = 10
    retry_max_age_s: float = 86400.0
    idle_close_s: float = 30.0  # an idle lane closes its SMTP session after this
    error_pause_s: float = 1.0  # after an unexpected worker error
    unflushed_per_worker: int = 4  # outcomes a worker may have handed over and not yet durable


class Sender:
    def __init__(self, deps: Deps) -> None:
        self.d = deps
        self.store = deps.store
        self.scheduler = Scheduler()
        self.ownership = Ownership()  # partitions this instance may send for (several instances)
        # suspended batches per tenant. Live changes come only from the command stream, in order
        # with the tenant's messages (a release must not overtake a delete queued before it); the
        # compacted config topic gives the state at start-up. The newest record wins.
        self.suspensions: dict[str, dict[str, Any]] = {}
        # pending keys a worker found suspended, per tenant: out of their lane until the tenant's
        # suspension changes, then pushed back with their original priority and sequence
        self.held: dict[str, set[str]] = {}
        # keys a worker is sending right now: a key can sit in a lane twice (a replacement, a
        # retry), but only one worker may hold it at a time
        self.inflight: set[str] = set()
        self.workers: dict[str, list[asyncio.Task[None]]] = {}
        self._accepting: set[asyncio.Task[None]] = set()  # accepted records waiting for their acks
        self.commit = GroupCommit(deps.write_events, deps.write_table)
        self.handlers: dict[str, Callable[[dict[str, Any], dict[str, Any]], Awaitable[None]]] = {
            "messages.suspend": self.suspension_changed,
            "messages.activate": self.suspension_changed,
            "messages.delete": self.delete,
            "messages.cleanup": self.cleanup,
            "messages.reject": self.reject,
            "tenant.delete": self.tenant_deleted,
            "account.delete": self.account_deleted,
        }

    def now(self) -> int:
        return self.d.clock()

    def pending(self) -> int:
        return self.scheduler.pending() + sum(len(keys) for keys in self.held.values())

    # --- accept: commands -> table + scheduler ----------------------------------------------------

    async def accept_all(self, messages: list[dict[str, Any]], partition: int, offset: int) -> None:
        """The messages of one ``messages.add`` command (sequence ``offset * 1000 + i``). Their table
        records go straight to the producer (the command's changelog partition, as an in-stream
        write would) before this returns, so they are on the broker before Faust commits the
        command's offset (it flushes the producer first), never left behind in Faust's send-soon
        buffer (bench/chaos.py lost messages there); and the messages are scheduled only once the
        broker acknowledged them, so no outcome of a message reaches the changelog ahead of its
        ``pending`` record. A message that replaces one whose outcome is not yet durable waits for
        it first."""
        if self.commit.keys and any(table_key(msg["tenant_id"], msg["id"]) in self.commit.keys for msg in messages):
            await self.commit.flush()
        staged = [kv for i, message in enumerate(messages)
                  if (kv := self.stage(message, partition, offset * 1000 + i)) is not None]
        if not staged:
            return
        records = [(partition, key, value) for key, value in staged]
        acks = await self.d.append_table(records)
        task = asyncio.ensure_future(self._schedule_when_durable(acks, records))
        self._accepting.add(task)
        task.add_done_callback(self._accepting.discard)

    async def _schedule_when_durable(self, acks: asyncio.Future[Any],
                                     records: list[tuple[int, str, dict[str, Any]]]) -> None:
        while True:
            try:
                await acks
                break
            except asyncio.CancelledError:
                raise
            except Exception:  # not written (broker trouble beyond the producer's retries): again
                log.exception("accepted messages not written to the table: retrying", extra={"messages": len(records)})
                await asyncio.sleep(self.d.error_pause_s)
                acks = await self.d.append_table(records)
        for _, key, value in records:
            current = self.store.get(key)
            # not replaced (another submission of the id has another sequence) or removed meanwhile
            if current is not None and current.get("s") == "pending" and current.get("q") == value["q"]:
                self.schedule(key, current)

    def stage(self, message: dict[str, Any], partition: int, seq: int) -> tuple[str, dict[str, Any]] | None:
        """The table entry of an accepted message, in the local store; None when there is nothing to
        write (an id already sent, or the same submission read again after a restart)."""
        key = table_key(message["tenant_id"], message["id"])
        current = self.store.get(key)
        if current is not None:
            if current["s"] == "sent":
                m.DUPLICATE_IDS.labels(message["tenant_id"]).inc()
                log.info("ignored already-sent id", extra={"tenant_id": message["tenant_id"], "id": message["id"]})
                return None
            if current["s"] == "pending" and current["m"]["pk"] == message["pk"]:
                return None  # the same submission, re-read after a restart: already in the table and schedule
        value = {"s": "pending", "p": partition, "q": seq, "a": 0, "due": message.get("deferred_ts"), "m": message}
        self.store.set_local(key, value)
        return key, value

    def schedule(self, key: str, value: dict[str, Any]) -> None:
        msg = value["m"]
        account = f"{msg['tenant_id']}/{msg['account_id']}"
        if self.scheduler.push(account, key, msg["priority"], value["q"], value.get("due"), self.now()):
            self.start_workers(account)

    def rebuild(self) -> int:
        """After a table recovery: the schedule again from the pending entries."""
        self.scheduler.clear()
        self.held.clear()
        count = 0
        for key, value in self.store.items():
            if value.get("s") == "pending":
                self.schedule(key, value)
                count += 1
        return count

    # --- suspensions and switches -----------------------------------------------------------------

    def is_held(self, tenant_id: str, batch_code: str | None) -> bool:
        """Suspended batch, suspended tenant, inactive tenant or inactive instance."""
        return (suspension.is_held(self.suspensions.get(tenant_id), batch_code)
                or suspension.switched_off(self.d.instance(), self.d.tenant(tenant_id)) is not None)

    def hold_if_suspended(self, key: str) -> bool:
        value = self.store.get(key)
        if value is None or value.get("s") != "pending":
            return False
        msg = value["m"]
        if not self.is_held(msg["tenant_id"], msg.get("batch_code")):
            return False
        self.held.setdefault(msg["tenant_id"], set()).add(key)
        return True

    def release(self, tenant_id: str) -> None:
        """Push back the held messages the tenant's current suspension and switches no longer cover."""
        held = self.held.get(tenant_id)
        if not held:
            return
        for key in list(held):
            value = self.store.get(key)
            if value is None or value.get("s") != "pending":
                held.discard(key)
            elif not self.is_held(tenant_id, value["m"].get("batch_code")):
                held.discard(key)
                self.schedule(key, value)
        if not held:
            self.held.pop(tenant_id, None)

    def release_all(self) -> None:
        for tenant_id in list(self.held):
            self.release(tenant_id)

    def set_suspension(self, tenant_id: str, value: dict[str, Any] | None) -> None:
        if value is None:
            self.suspensions.pop(tenant_id, None)
        elif suspension.newer(self.suspensions.get(tenant_id), value):
            self.suspensions[tenant_id] = value
        else:
            return
        self.release(tenant_id)

    def account_changed(self, account: str, present: bool) -> None:
        if present and account in self.scheduler.lanes:
            self.start_workers(account)  # a larger pool; a smaller one: workers leave (excess_worker)

    # --- lifecycle commands -----------------------------------------------------------------------

    async def suspension_changed(self, env: dict[str, Any], payload: dict[str, Any]) -> None:
        self.set_suspension(payload["tenant_id"], payload)

    def tenant_keys(self, tenant_id: str) -> list[str]:
        prefix = table_key(tenant_id, "")
        return [key for key in self.store.keys() if key.startswith(prefix)]

    async def delete(self, env: dict[str, Any], payload: dict[str, Any]) -> None:
        """Still-pending messages leave the table (a ``deleted`` event each); sent ones stay sent."""
        await self.commit.flush()  # outcomes handed over before this command are written first
        victims = []
        for mid in payload["ids"]:
            key = table_key(payload["tenant_id"], mid)
            value = self.store.get(key)
            if value is not None and value.get("s") == "pending" and key not in self.inflight:
                victims.append((key, value))
        await self.emit_all([(value["m"], "deleted", value["a"], {}) for _, value in victims])
        for key, _ in victims:
            self.store.delete(key)
            self.held.get(payload["tenant_id"], set()).discard(key)

    async def cleanup(self, env: dict[str, Any], payload: dict[str, Any]) -> None:
        """Fully reported final messages are forgotten, except that a sent id stays known as sent
        (so it is never sent again): its marker shrinks to ``{"s": "sent"}``."""
        await self.commit.flush()  # outcomes handed over before this command are written first
        for mid in payload["ids"]:
            key = table_key(payload["tenant_id"], mid)
            value = self.store.get(key)
            if value is None:
                continue
            if value.get("s") == "sent" and value != SENT_MARKER:
                self.store.set(key, SENT_MARKER)
            elif value.get("s") == "error":
                self.store.delete(key)

    async def reject(self, env: dict[str, Any], payload: dict[str, Any]) -> None:
        """Messages add-messages refused: reported to the tenant as errors (``rejected`` events). An
        id that was already sent keeps its real outcome."""
        tenant_id = payload["tenant_id"]
        out = []
        for item in payload["items"]:
            current = self.store.get(table_key(tenant_id, item["id"]))
            if current is not None and current.get("s") == "sent":
                continue
            out.append(self.event(tenant_id, item.get("account_id"), item["id"], str(uuid.uuid4()), "rejected",
                                  attempt=0, accepted_ts=env["ts"], error=item["reason"]))
        await self.d.emit(tenant_id, out)

    async def tenant_deleted(self, env: dict[str, Any], payload: dict[str, Any]) -> None:
        """Every message of the tenant goes (pending ones with a ``deleted`` event), its lanes stop."""
        await self.commit.flush()  # outcomes handed over before this command are written first
        tenant_id = payload["tenant_id"]
        keys = self.tenant_keys(tenant_id)
        pending = [(key, self.store.get(key)) for key in keys]
        await self.emit_all([(v["m"], "deleted", v["a"], {}) for _, v in pending if v and v.get("s") == "pending"])
        for key in keys:
            self.store.delete(key)
        self.held.pop(tenant_id, None)
        for account in [a for a in self.scheduler.lanes if a.startswith(f"{tenant_id}/")]:
            self.stop_lane(account)
        log.info("tenant deleted: messages dropped", extra={"tenant_id": tenant_id, "messages": len(keys)})

    async def account_deleted(self, env: dict[str, Any], payload: dict[str, Any]) -> None:
        """The account's pending messages can no longer be sent: each ends with an ``error`` event."""
        await self.commit.flush()  # outcomes handed over before this command are written first
        tenant_id = payload["tenant_id"]
        account_id = payload.get("account_id") or payload.get("id")
        if not account_id:
            return
        victims = [(key, v) for key in self.tenant_keys(tenant_id)
                   if (v := self.store.get(key)) and v.get("s") == "pending" and v["m"]["account_id"] == account_id]
        await self.emit_all([(v["m"], "error", v["a"], {"error": "account deleted"}) for _, v in victims])
        for key, v in victims:
            self.store.set(key, {"s": "error", "p": v["p"], "ts": self.now()})
            self.held.get(tenant_id, set()).discard(key)
        self.stop_lane(f"{tenant_id}/{account_id}")

    def stop_lane(self, account: str) -> None:
        self.scheduler.drop(account)
        self.workers.pop(account, None)  # the workers see the closed lane and exit

    # --- SMTP workers -----------------------------------------------------------------------------

    def start_workers(self, account: str) -> None:
        lane = self.scheduler.lane(account)
        tasks = self.workers.setdefault(account, [])
        while len(tasks) < pool_size(self.d.account(account)):
            tasks.append(asyncio.ensure_future(self.worker(account, lane)))

    def excess_worker(self, account: str) -> bool:
        """True (and the calling worker leaves its pool) when the account's pool is above its size."""
        tasks = self.workers.get(account)
        me = asyncio.current_task()
        if tasks is None or me not in tasks or len(tasks) <= pool_size(self.d.account(account)):
            return False
        tasks.remove(me)  # type: ignore[arg-type]
        return True

    async def stop(self) -> None:
        tasks = [t for ts in self.workers.values() for t in ts] + list(self._accepting)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.commit.stop()

    async def revoke(self, partitions: set[int], timeout_s: float) -> int:
        """Partitions leave this instance: no new claim, the sends in flight end, their outcomes
        are written (the new owner recovers their final state)."""
        busy = await self.ownership.revoke(partitions, timeout_s)
        try:
            await asyncio.wait_for(self.commit.flush(), timeout_s)
        except TimeoutError:
            busy += self.commit.unsettled
        return busy

    async def worker(self, account_key: str, lane: Lane) -> None:
        conn: SmtpConnection | None = None
        slots = asyncio.Semaphore(self.d.unflushed_per_worker)  # this worker's outcomes not yet durable
        await self.d.ready()  # never send before knowing what is suspended or switched off
        while not lane.closed and not self.excess_worker(account_key):
            try:
                key = lane.pop(self.now())
                if key is None:
                    lane.wake.clear()
                    due = lane.next_due_ms()
                    timeout = self.d.idle_close_s if due is None else max(0.0, (due - self.now()) / 1000)
                    try:
                        await asyncio.wait_for(lane.wake.wait(), timeout)
                    except TimeoutError:
                        if conn is not None and due is None:
                            await conn.close()  # idle lane: free the SMTP session
                    continue
                if self.hold_if_suspended(key):
                    continue
                account = self.d.account(account_key)
                if account is None:
                    # the account record has not reached this process yet (or was deleted): hold it
                    value = self.store.get(key)
                    if value is not None and value.get("s") == "pending":
                        lane.push(key, value["m"]["priority"], value["q"], self.now() + 1000, self.now())
                    await asyncio.sleep(0.2)
                    continue
                target = self.d.target(account_key, account)
                if conn is None or conn.target != target:
                    if conn is not None:
                        await conn.close()
                    conn = self.d.connect(target)
                await self.send_one(key, conn, lane, slots)
            except asyncio.CancelledError:
                if conn is not None:
                    await conn.close()
                raise
            except Exception:
                log.exception("sender worker error", extra={"account": account_key})
                await asyncio.sleep(self.d.error_pause_s)
        if conn is not None:
            await conn.close()

    async def send_one(self, key: str, conn: SmtpConnection, lane: Lane, slots: asyncio.Semaphore) -> None:
        if key in self.inflight:
            return
        self.inflight.add(key)
        try:
            await self.send_pending(key, conn, lane, slots)
        finally:
            self.inflight.discard(key)
            self.ownership.release(key)
            self.d.pipeline.done(key)

    async def send_pending(self, key: str, conn: SmtpConnection, lane: Lane, slots: asyncio.Semaphore) -> None:
        value = self.store.get(key)
        if value is None or value.get("s") != "pending":
            return  # replaced, sent, or removed since it was scheduled
        if not self.ownership.claim(key, value["p"]):
            return  # its partition moved to another instance (or is recovering): not ours to send
        if value.get("due") and value["due"] > self.now():
            return  # an older lane entry of a message deferred since: its own entry is due later
        msg = value["m"]
        account = self.d.account(f"{msg['tenant_id']}/{msg['account_id']}")
        if account is None:
            return  # the worker holds messages of unknown accounts before they get here
        if value["a"] == 0:  # first attempt: how long it waited in the table and its lane
            ready_ms = max(msg.get("accepted_ts") or 0, value.get("due") or 0)
            if ready_ms:
                m.STAGE_SECONDS.labels("wait").observe(max(0, self.now() - ready_ms) / 1000)
        ctx = pl.SendContext(key=key, message=msg, account=account, tenant=self.d.tenant(msg["tenant_id"]),
                             partition=value["p"], attempt=value["a"] + 1, now_ms=self.now())
        decision = await self.d.pipeline.run_checks(ctx)
        if decision is not None:
            await self.decided(key, value, ctx, decision, lane, slots)
            return
        started = time.perf_counter()
        t_built = started
        try:
            data = await self.d.pipeline.prepare(ctx)
            t_built = time.perf_counter()
            m.STAGE_SECONDS.labels("build").observe(t_built - started)
            await conn.send(envelope_sender(msg, self.d.verp_domain), envelope_recipients(msg), data)
        except pl.PrepareError as exc:
            if exc.temporary:
                await self.failed(key, value, ctx.attempt, Failure(True, None, exc.reason), lane, slots)
            else:
                await self.finish(key, value, "error", ctx.attempt, slots, error=exc.reason)
            return
        except Exception as exc:
            await self.failed(key, value, ctx.attempt, classify(exc), lane, slots)
            return
        finally:
            m.SMTP_SECONDS.observe(time.perf_counter() - started)
        m.STAGE_SECONDS.labels("smtp").observe(time.perf_counter() - t_built)
        # the end-of-data reply: both send paths raise on anything but 250
        await self.finish(key, value, "sent", ctx.attempt, slots, smtp_code=250)
        await self.d.pipeline.sent(ctx)

    async def decided(self, key: str, value: dict[str, Any], ctx: pl.SendContext, decision: pl.Decision,
                      lane: Lane, slots: asyncio.Semaphore) -> None:
        """A check deferred or refused the message before any SMTP work."""
        msg = value["m"]
        if decision.reason.startswith("rate_limit"):
            m.RATE_LIMITED.labels(msg["tenant_id"], msg["account_id"]).inc()
        if decision.kind == "defer":
            due = decision.until_ms or self.now() + 1000
            # a deferral by policy is not a failed attempt: the attempt count stays
            await self.record(slots, key, value, {**value, "due": due}, "deferred", value["a"],
                              deferred_reason=decision.reason, deferred_until=due)
            m.DEFERRED.labels(msg["tenant_id"], msg["account_id"]).inc()
            lane.push(key, msg["priority"], value["q"], due, self.now())
            return
        await self.finish(key, value, decision.event_type, ctx.attempt, slots, error=decision.reason)

    async def failed(self, key: str, value: dict[str, Any], attempt: int, failure: Failure, lane: Lane,
                     slots: asyncio.Semaphore) -> None:
        msg = value["m"]
        due = None
        if failure.temporary:
            first = max(msg.get("accepted_ts") or 0, msg.get("deferred_ts") or 0) or None
            due = retry_due_ms(attempt, self.now(), first, base_s=self.d.retry_base_s,
                               cap_s=self.d.retry_max_delay_s, max_attempts=self.d.max_attempts,
                               max_age_s=self.d.retry_max_age_s)
        if due is not None:
            await self.record(slots, key, value, {**value, "a": attempt, "due": due}, "deferred", attempt,
                              smtp_code=failure.code, deferred_reason=failure.reason, deferred_until=due)
            m.DEFERRED.labels(msg["tenant_id"], msg["account_id"]).inc()
            lane.push(key, msg["priority"], value["q"], due, self.now())
            return
        reason = failure.reason
        if failure.temporary:
            reason = gave_up(reason, attempt)
        await self.finish(key, value, "error", attempt, slots, error=reason, smtp_code=failure.code)

    async def finish(self, key: str, value: dict[str, Any], outcome: str, attempt: int, slots: asyncio.Semaphore,
                     *, error: str | None = None, smtp_code: int | None = None) -> None:
        msg = value["m"]
        # the final state lets the table forget the body
        await self.record(slots, key, value, {"s": outcome, "p": value["p"], "ts": self.now()}, outcome, attempt,
                          error=error, smtp_code=smtp_code)
        (m.SENT if outcome == "sent" else m.ERRORS).labels(msg["tenant_id"], msg["account_id"]).inc()

    async def record(self, slots: asyncio.Semaphore, key: str, value: dict[str, Any], new: dict[str, Any],
                     etype: str, attempt: int, **fields: Any) -> None:
        """Hand an outcome (its event, the table's new value) to the group commit. The local store has
        the new value at once (this process never sends the message again by mistake); the event
        and then the changelog record follow in the next batch. Waits only for a free slot of the
        worker (its bounded window of outcomes not yet durable)."""
        msg = value["m"]
        await slots.acquire()
        self.store.set_local(key, new)
        self.commit.submit(Outcome(msg["tenant_id"], self.message_event(msg, etype, attempt, **fields),
                                   value["p"], key, new, slots.release))

    # --- events -----------------------------------------------------------------------------------

    def event(self, tenant_id: str, account_id: str | None, message_id: str, pk: str | None, etype: str, *,
              attempt: int, accepted_ts: int | None, msg: dict[str, Any] | None = None,
              **fields: Any) -> dict[str, Any]:
        return {
            "event_id": uuid.uuid4().hex,
            "type": etype,
            "tenant_id": tenant_id,
            "account_id": account_id,
            "message_id": message_id,
            "pk": pk,
            "ts": self.now(),
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

    def message_event(self, msg: dict[str, Any], etype: str, attempt: int, **fields: Any) -> dict[str, Any]:
        return self.event(msg["tenant_id"], msg["account_id"], msg["id"], msg["pk"], etype, attempt=attempt,
                          accepted_ts=msg["accepted_ts"], msg=msg, **fields)

    async def emit_all(self, items: list[tuple[dict[str, Any], str, int, dict[str, Any]]]) -> None:
        """Several message events, sent together and all acknowledged on return."""
        by_tenant: dict[str, list[dict[str, Any]]] = {}
        for msg, etype, attempt, fields in items:
            by_tenant.setdefault(msg["tenant_id"], []).append(self.message_event(msg, etype, attempt, **fields))
        for tenant_id, events in by_tenant.items():
            await self.d.emit(tenant_id, events)
