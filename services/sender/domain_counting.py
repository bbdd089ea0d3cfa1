"""The outbound ledger's quotas, applied by the sender before each send.

Counting is the ledger's (``domain_ledger.domain_events`` counts every ``sent`` event of a
registered domain exactly once); this check only reads the ledger entry of the message's From
domain, in this same process, and asks what one more message would get:

- hard enforcement over a limit, or a suspended domain (by the API or automatically, whatever the
  enforcement: a suspension stops the sending, it is not a billing matter): the message is
  refused with the documented reason (``outbound_suspended``, ``daily_limit_exceeded``,
  ``monthly_limit_exceeded``);
- soft enforcement: the message goes out and is flagged (``<reason>_soft``: log line, metric and
  ``ctx.extra["domain_quota"]``) for billing.

A message whose From domain is not registered, or registered by another tenant, is not limited
here. The counters lag the sends by the time the ``sent`` event takes to come back, so under
concurrency a hard limit can be passed by the messages in flight (at most one per SMTP worker)."""

from __future__ import annotations

import logging

from prometheus_client import Counter

from services.common import domain_quota as q
from services.sender import pipeline
from services.sender.dkim_core import from_domain
from services.sender.domain_ledger import ledger

log = logging.getLogger("postbus.sender.domains")

QUOTA_DECISIONS = Counter("postbus_sender_domain_quota_total",
                          "Messages refused (hard) or flagged (soft) by their domain's outbound quota", ["reason"])


async def domain_quota_check(ctx: pipeline.SendContext) -> pipeline.Decision | None:
    domain = from_domain(ctx.message)
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


pipeline.checks.append(domain_quota_check)
