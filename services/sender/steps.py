"""The order of a send, in one place: the checks before SMTP, the builder, the transforms of the
bytes. Nothing registers itself anywhere; this list is the whole story.

Checks (the first decision wins):
1. suppression: a suppressed recipient is dropped (or the message refused) before anything counts it;
2. destination throttle: a slot per receiving site (released when the attempt ends, whatever its outcome);
3. domain ownership and quota: From a domain of another tenant, unverified, over a hard limit, suspended;
4. rate limits: last, because they *count* the attempt (a message deferred by an earlier check
   consumes nothing).

Then the MIME builder (attachments fetched), and the transforms: tracking (links, pixel,
List-Unsubscribe), then DKIM, always last (any later rewrite would break the signature)."""

from __future__ import annotations

from typing import Any

from services.common.settings import Settings
from services.sender import dkim_sign, domain_counting, prepare_mime, suppression, throttle, tracking
from services.sender.pipeline import Pipeline
from services.sender.rate_limits import RateLimits


def build(rate_table: Any, settings: Settings) -> Pipeline:
    return Pipeline(
        checks=[
            suppression.check,
            throttle.check,
            domain_counting.domain_quota_check,
            RateLimits(rate_table, settings).check,
        ],
        builder=prepare_mime.build,
        transforms=[tracking.transform, dkim_sign.dkim_transform],
        on_sent=[],
        on_done=[throttle.release],
    )
