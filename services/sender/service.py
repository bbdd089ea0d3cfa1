"""The sender's Faust wiring: the :class:`Sender` engine (services/sender/engine.py) on the app,
topics and tables of services/sender/app.py. Agents call the engine; nothing here holds state of
its own beyond the objects it wires.

- ``ingest`` (``postbus.commands``): ``messages.add`` -> :meth:`Sender.accept` (in-stream table
  write), the lifecycle commands -> the engine's handlers; undecodable commands are dead-lettered.
- the table's recovery rebuilds the schedule; partition revocation / rebalance drive the engine's
  :class:`Ownership` (several sender instances).
- config views (accounts, tenants, instance switch, suspensions at start-up) feed the engine.
- the other agents of the process: engagement and auto-suppression (engagement.py), the domain
  ledger (domain_ledger.py), the domain registry view (dkim_sign.py)."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from services.common.avro import DecodeError, codec
from services.common.config_view import ConfigView
from services.common.deadletter import encode_dead_letter
from services.common.faust_guard import guarded
from services.common.faust_support import hand_over_many, produce_many
from services.common.http_server import set_readiness, start_metrics_server
from services.common.suspension import INSTANCE_KEY
from services.common.topics import (
    COMMANDS,
    CONFIG_ACCOUNTS,
    CONFIG_INSTANCE,
    CONFIG_SUSPENSIONS,
    CONFIG_TENANTS,
    EVENTS,
)
from services.sender import dkim_sign, domain_ledger, engagement, steps  # noqa: F401  (domain_ledger: its agents)
from services.sender import metrics as m
from services.sender.app import app, box, commands_topic, deadletter_topic, events_topic, messages, rate_table, settings
from services.sender.campaign_runtime import CampaignRuntime, install_read_committed
from services.sender.engine import Deps, Sender
from services.sender.held_metric import register as register_held_metric
from services.sender.message_store import MessageStore
from services.sender.smtp_pool import Connection, SmtpTarget, make_target
from services.sender.system_mail import SystemMailer

log = logging.getLogger("postbus.sender")


async def _hand_over_changelog(records: list[tuple[int, bytes, bytes]]) -> asyncio.Future[Any]:
    return await hand_over_many(app, messages.changelog_topic.get_topic_name(), records)


message_store = MessageStore(messages, _hand_over_changelog)


async def emit(tenant_id: str, events: list[dict[str, Any]]) -> None:
    """The tenant's events on ``postbus.events``, all acknowledged (acks=all) on return."""
    c = codec()
    key = tenant_id.encode()
    await produce_many(app, EVENTS, [(None, key, c.encode("DeliveryEvent", e)) for e in events])


async def write_events(events: list[tuple[str, dict[str, Any]]]) -> None:
    """The group commit's events, one producer batch per partition, all acknowledged on return."""
    c = codec()
    await produce_many(app, EVENTS, [(None, tenant_id.encode(), c.encode("DeliveryEvent", e))
                                     for tenant_id, e in events])


async def write_table(records: list[tuple[int, str, dict[str, Any]]]) -> None:
    """The group commit's changelog records, on the broker and in the database on return."""
    await (await message_store.append(records))


_targets: dict[str, tuple[int, SmtpTarget]] = {}


def target(account_key: str, account: dict[str, Any]) -> SmtpTarget:
    """The account's SMTP target, decrypted once per account version (not once per message)."""
    cached = _targets.get(account_key)
    if cached is not None and cached[0] == account["updated_ts"]:
        return cached[1]
    t = make_target(account_key, account["host"], account["port"], account.get("user"),
                    box.decrypt(account.get("password_enc")), account.get("use_tls"),
                    account.get("tls_verify", True) is not False, account.get("ca_bundle_pem"),
                    allow_insecure_auth=account.get("allow_insecure_auth") is True)
    _targets[account_key] = (account["updated_ts"], t)
    return t


# --- config views -> engine -------------------------------------------------------------------------

def _on_account(key: str, value: dict[str, Any] | None) -> None:
    tenant_id, _, account_id = key.partition("/")
    m.init_account(tenant_id, account_id, present=value is not None)
    sender.account_changed(key, value is not None)


def _on_suspension_record(key: str, value: dict[str, Any] | None) -> None:
    """From the compacted config topic: the initial load only. Live changes come in order with the
    tenant's messages on the command stream (``messages.suspend`` / ``messages.activate``)."""
    if not suspensions_view.ready.is_set():
        sender.set_suspension(key, value)


accounts = ConfigView(settings.kafka_bootstrap, CONFIG_ACCOUNTS, "Account", on_change=_on_account)
tenants = ConfigView(settings.kafka_bootstrap, CONFIG_TENANTS, "Tenant",
                     on_change=lambda key, value: sender.release(key))  # an inactive tenant switched on again
instance_view = ConfigView(settings.kafka_bootstrap, CONFIG_INSTANCE, "Instance",
                           on_change=lambda key, value: sender.release_all())  # the instance switched on again
suspensions_view = ConfigView(settings.kafka_bootstrap, CONFIG_SUSPENSIONS, "Suspension",
                              on_change=_on_suspension_record)
VIEWS = (accounts, tenants, suspensions_view, instance_view)


async def _views_ready() -> None:
    await asyncio.gather(suspensions_view.ready.wait(), instance_view.ready.wait(), tenants.ready.wait())


sender = Sender(Deps(
    store=message_store,
    emit=emit,
    write_events=write_events,
    write_table=write_table,
    append_table=message_store.append,
    account=accounts.get,
    tenant=tenants.get,
    instance=lambda: instance_view.get(INSTANCE_KEY),
    pipeline=steps.build(rate_table, settings),
    target=target,
    connect=Connection,
    ready=_views_ready,
    verp_domain=settings.sender_verp_domain,
    retry_base_s=settings.sender_retry_base_s,
    retry_max_delay_s=settings.sender_retry_max_delay_s,
    max_attempts=settings.sender_max_attempts,
    retry_max_age_s=settings.sender_retry_max_age_s,
    unflushed_per_worker=settings.sender_unflushed_per_worker,
))
m.PENDING.set_function(sender.pending)
register_held_metric(sender)  # postbus_sender_{queued,held,inflight}_messages{tenant_id}
engagement.register(app, commands_topic, events_topic)
dkim_sign.register(app)
# provider sender verification and welcome mail through the operator's system SMTP account
system_mailer = SystemMailer(settings, box)
sender.handlers["system_mail.send"] = system_mailer.handle
# provider-API campaigns: expansion into messages.add (services/sender/campaigns.py); the ingest
# consumer reads read_committed, so an aborted expansion step is never seen
install_read_committed()
campaigns = CampaignRuntime(settings, sender, tenants)


# --- agents -------------------------------------------------------------------------------------------

async def _dead_letter(event: Any, reason: str) -> None:
    msg = event.message
    m.DEADLETTERS.inc()
    await deadletter_topic.send(key=event.key, value=encode_dead_letter(
        msg.topic, msg.partition, msg.offset, "sender", reason, event.key, event.value))


@app.agent(commands_topic)
async def ingest(stream: Any) -> None:
    async for event in guarded(stream, "ingest"):  # no record skipped (issue 12 §1)
        msg = event.message
        kind = codec().peek_type(event.value, "CommandEnvelope")
        if kind is not None and kind != "messages.add" and kind not in sender.handlers:
            continue  # config commands reach the sender through the compacted config topics
        try:
            _, env = codec().decode(event.value, expect="CommandEnvelope")
            kind = env["type"]
            if kind != "messages.add" and kind not in sender.handlers:
                continue  # other config commands reach the sender through the compacted config topics
            schema, payload = codec().decode(env["payload"])
            if kind == "messages.add" and schema != "AddMessages":
                raise DecodeError(f"messages.add carries a {schema} payload")
        except DecodeError as exc:
            log.error("dead-lettered command", extra={"partition": msg.partition, "offset": msg.offset,
                                                      "reason": str(exc)})
            await _dead_letter(event, str(exc))
            continue
        if kind == "messages.add":
            m.STAGE_SECONDS.labels("ingest").observe(max(0.0, time.time() - msg.timestamp))
            await sender.accept_all(payload["messages"], msg.partition, msg.offset)
            continue
        try:
            await sender.handlers[kind](env, payload)
        except (KeyError, TypeError, ValueError) as exc:  # a payload of an unexpected shape
            log.error("dead-lettered command", extra={"type": kind, "offset": msg.offset, "reason": repr(exc)})
            await _dead_letter(event, f"bad {kind} payload: {exc!r}")


@messages.on_recover
async def _rebuild_schedule() -> None:
    count = sender.rebuild()
    log.info("schedule rebuilt from table", extra={"pending": count})


@app.on_partitions_revoked.connect  # type: ignore[misc]
async def _on_revoked(_: Any, revoked: set[Any], **kwargs: Any) -> None:
    partitions = {tp.partition for tp in revoked if tp.topic == COMMANDS}
    busy = await sender.revoke(partitions, timeout_s=8.0)
    message_store.forget(partitions)
    if busy:
        log.warning("partitions revoked with sends still in flight", extra={"in_flight": busy})


@app.on_rebalance_complete.connect  # type: ignore[misc]
async def _on_recovered(_: Any, **kwargs: Any) -> None:
    # tables recovered for the new assignment: sends of its partitions may go on (eager rebalances
    # revoke everything first, so nothing is sent between a revocation and this point)
    sender.ownership.recovered({tp.partition for tp in app.consumer.assignment() if tp.topic == COMMANDS})


# --- lifecycle ----------------------------------------------------------------------------------------

@app.task
async def _start_views() -> None:
    await asyncio.gather(*(v.start() for v in VIEWS))


@app.task
async def _campaigns() -> None:
    await campaigns.run(_views_ready)


_ready = [False]  # read by the /ready probe's thread; computed in the event loop (Faust is not thread-safe)


@app.timer(0.5)
async def _readiness() -> None:
    """Ready = recovered and consuming: table recovered, no rebalance running, config views loaded."""
    _ready[0] = (app.tables.recovery.completed.is_set() and not getattr(app, "rebalancing", False)
                 and all(v.ready.is_set() for v in VIEWS))


@app.on_before_shutdown.connect  # type: ignore[misc]
async def _shutdown(_: Any, **kwargs: Any) -> None:
    await sender.stop()
    await system_mailer.stop()
    await campaigns.stop()
    await asyncio.gather(*(v.stop() for v in VIEWS), return_exceptions=True)


def main() -> None:
    from services.common.faust_support import run_worker

    set_readiness(lambda: _ready[0])
    start_metrics_server(settings, settings.sender_metrics_port)  # /metrics needs the internal token
    run_worker(app, "sender", settings.log_level, settings.event_loop)
