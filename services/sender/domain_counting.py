"""Who may send From a registered domain, and the outbound ledger's quotas, applied by the sender
before each send.

Ownership first (defence in depth: the API refuses the same messages at add-messages), from the
domain registry (``dkim_sign.domains``, the Domain records) with ``domain_quota.sending_refusal``:
mail From a domain verified by another tenant (or below one) is refused ``sender_domain_not_owned``,
mail From the tenant's own registered but unverified domain ``sender_domain_not_verified`` (the
seed: "Outbound email is blocked until the domain is verified"), both as a ``rejected`` event with
nothing sent. Before refusing, the registry catches up with its topic, so a verification written
just before the message was queued is always seen.

Counting is the ledger's (``domain_ledger.domain_events`` counts every ``sent`` event of a
registered domain exactly once, and together with a client's ``POST /domains/{name}/outbound/increment``
naming the message by its ``X-Postbus-Message-Id`` only once in all: whichever reaches the ledger
first counts it, see ``domain_quota`` "idempotent increments"); this check only reads the ledger
entry of the message's From domain, in this same process, and asks what one more message would get:

- hard enforcement over a limit, or a suspended domain (by the API or automatically, whatever the
  enforcement: a suspension stops the sending, it is not a billing matter): the message is
  refused with the documented reason (``outbound_suspended``, ``daily_limit_exceeded``,
  ``monthly_limit_exceeded``);
- soft enforcement: the message goes out and is flagged (``<reason>_soft``: log line, metric and
  ``ctx.extra["domain_quota"]``) for billing.

A message whose From domain nobody registered, or another tenant registered without verifying it,
is not limited here. The counters lag the sends by the time the ``sent`` event takes to come back, so under
concurrency a hard limit can be passed by the messages in flight (at most 1 + ``sender_unflushed_per_worker``
per SMTP worker: its send and its outcomes not yet durable)."""

from __future__ import annotations

import asyncio
import logging

from prometheus_client import Counter

from services.common import domain_quota as q
from services.sender import pipeline
from services.sender.dkim_core import from_domain
from services.sender.dkim_sign import domains
from services.sender.domain_ledger import ledger

log = logging.getLogger("postbus.sender.domains")

QUOTA_DECISIONS = Counter("postbus_sender_domain_quota_total",
                          "Messages refused (hard) or flagged (soft) by their domain's outbound quota", ["reason"])
OWNERSHIP_REFUSALS = Counter("postbus_sender_domain_ownership_refused_total",
                             "Messages refused for their From domain's ownership or verification", ["reason"])
REGISTRY_WAIT_S = 10.0  # at start-up: how long a check waits for the domain registry to load
REGISTRY_RETRY_MS = 5_000  # ... and when the message is tried again if it is still loading


async def ownership_check(ctx: pipeline.SendContext, domain: str) -> pipeline.Decision | None:
    tenant_id = ctx.message["tenant_id"]
    if not domains.ready.is_set():
        try:
            await asyncio.wait_for(domains.ready.wait(), REGISTRY_WAIT_S)
        except TimeoutError:  # never decide on a half-loaded registry
            return pipeline.Decision.defer("domain_registry_loading", ctx.now_ms + REGISTRY_RETRY_MS)
    code = q.sending_refusal(domains.get, domain, tenant_id)
    if code is None:
        return None
    try:  # a registration or verification written just before the message: decide on it
        await domains.catch_up()
    except Exception as exc:
        log.warning("domain registry could not catch up", extra={"error": type(exc).__name__})
    code = q.sending_refusal(domains.get, domain, tenant_id)
    if code is None:
        return None
    OWNERSHIP_REFUSALS.labels(code).inc()
    log.info("message refused for its From domain", extra={"domain": domain, "reason": code, "tenant_id": tenant_id})
    return pipeline.Decision.reject(q.refusal_text(code, domain), event_type="rejected")


async def domain_quota_check(ctx: pipeline.SendContext) -> pipeline.Decision | None:
    domain = from_domain(ctx.message)
    if domain:
        refused = await ownership_check(ctx, domain)
        if refused is not None:
            return refused
    entry = ledger.data.get(domain) if domain else None
    if entry is None or entry["tenant"] != ctx.message["tenant_id"]:
        return None
    allowed, reason = q.check(entry, ctx.now_ms)
    if entry["status"] == "suspended":
        allowed, reason = False, "outbound_suspended"  # suspended is a stop, whatever the enforcement
    if reason is None:
        return None
    QUOTA_DECISIONS.labels(reason).inc()
    if not allowed:
        log.info("message refused by its domain's quota", extra={"domain": domain, "reason": reason,
                                                                 "tenant_id": ctx.message["tenant_id"]})
        return pipeline.Decision.reject(reason)
    ctx.extra["domain_quota"] = reason
    log.info("message over its domain's soft quota", extra={"domain": domain, "reason": reason,
                                                            "tenant_id": ctx.message["tenant_id"]})
    return None
