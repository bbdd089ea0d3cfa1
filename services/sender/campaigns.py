"""Campaign expansion: a stored provider-API campaign's mailing list -> ordinary ``messages.add``
commands, at the campaign's speed, from a durable cursor. No Kafka here: everything is injected
(:class:`CampaignDeps`); ``services/sender/campaign_runtime.py`` wires it to the broker and
``tests/unit/test_campaign_engine.py`` drives it with fakes.

One **step** of a campaign: take the members after the cursor in ``member_id`` order, skip (and
count) the unsubscribed and suppressed ones, render one message per remaining member (id
``campaign-<id>-<member_id>``, ``batch_code`` ``campaign-<id>``), and hand the messages and the new
cursor to ``commit``, which writes them in ONE Kafka transaction. The local cursor moves only once
that commit succeeded: a crash before it leaves the committed cursor where it was and the next
owner expands the same members again (the aborted transaction's commands are invisible to
read_committed consumers; the message ids and ``pk`` are deterministic, so even a reader of
uncommitted data would only see an id again, which the sender ignores); a crash after it leaves
both the messages and the cursor committed. Nothing is skipped, nothing repeated.

**Ownership** (several sender processes): a campaign belongs to the sender that owns its tenant's
``postbus.commands`` partition (the partition its ``messages.add`` commands land on). Before its
first step on a partition the owner calls ``acquire(partition)``: the runtime starts the
partition's transactional producer (``postbus-sender-campaigns-p<N>``), which fences the previous
owner's producer and aborts its open transaction, then catches the cursor view up to the end of
the topic. A commit that fails (fenced, broker error) drops the partition: the next tick acquires
it again and reloads the cursors.

**Speed**: a token bucket per campaign, ``speed`` messages per hour, holding at most one second's
worth (at least one message) and starting with one token: over any interval ``t`` at most
``1 + speed * t / 3600`` messages of a campaign are queued (the pipeline's own rate limits apply
on top). Skipped members take no token.

**Pause**: a paused campaign (its record) or a suspended batch (``messages.suspend`` of its
batch code, which the pause route writes in the same transaction) takes no step; the sender holds
its queued messages through the ordinary suspension. Resume lets the next tick continue from the
cursor."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from email.utils import formataddr
from typing import Any

log = logging.getLogger("postbus.sender.campaigns")

DEFAULT_SPEED = 10_000  # messages per hour when a campaign names none
MAX_SPEED = 3_600_000  # 1,000 messages per second: the upper bound the API accepts
MAX_STEP = 500  # messages in one transaction (one step)
MAX_SCAN = 5_000  # members looked at in one step (skipped members take no token)
CAMPAIGN_PRIORITY = 3  # bulk: behind transactional mail of the same account

_PK_NS = uuid.UUID("6f0c3c52-5a53-4f0e-9d3f-3b0c2f0d9a11")


def campaign_key(tenant_id: str, campaign_id: int) -> str:
    return f"{tenant_id}/{campaign_id}"


def message_id(campaign_id: int, member_id: int) -> str:
    return f"campaign-{campaign_id}-{member_id}"


def batch_code(campaign_id: int) -> str:
    return f"campaign-{campaign_id}"


def message_pk(tenant_id: str, campaign_id: int, member_id: int) -> str:
    """Deterministic: the same member of the same campaign is always the same submission."""
    return str(uuid.uuid5(_PK_NS, f"{tenant_id}/{campaign_id}/{member_id}"))


def new_cursor(tenant_id: str, campaign_id: int, now_ms: int) -> dict[str, Any]:
    return {"campaign_id": campaign_id, "tenant_id": tenant_id, "last_member_id": 0, "queued": 0,
            "skipped_unsubscribed": 0, "skipped_suppressed": 0, "skipped_invalid": 0, "finished": False,
            "started_ts": None, "finished_ts": None, "updated_ts": now_ms}


def clamp_speed(speed: Any) -> int:
    try:
        value = int(speed)
    except (TypeError, ValueError):
        return DEFAULT_SPEED
    if value <= 0:
        return DEFAULT_SPEED
    return min(value, MAX_SPEED)


class TokenBucket:
    """``per_hour`` tokens an hour, at most one second's worth (and at least one) banked."""

    def __init__(self, per_hour: int, now: float) -> None:
        self.rate = clamp_speed(per_hour) / 3600.0
        self.capacity = max(1.0, self.rate)
        self.tokens = 1.0
        self.ts = now

    def set_speed(self, per_hour: int) -> None:
        self.rate = clamp_speed(per_hour) / 3600.0
        self.capacity = max(1.0, self.rate)
        self.tokens = min(self.tokens, self.capacity)

    def available(self, now: float) -> float:
        if now > self.ts:
            self.tokens = min(self.capacity, self.tokens + (now - self.ts) * self.rate)
            self.ts = now
        return self.tokens

    def take(self, n: int) -> None:
        self.tokens -= n

    def wait_s(self) -> float:
        """Seconds until one whole token is available."""
        return max(0.0, (1.0 - self.tokens) / self.rate) if self.rate > 0 else 1.0


class RenderError(Exception):
    """A member's message could not be rendered: the member is skipped and counted as invalid."""


@dataclass
class CampaignDeps:
    campaigns: Callable[[], list[dict[str, Any]]]  # every ProviderCampaign record
    cursor: Callable[[str], dict[str, Any] | None]  # committed CampaignCursor by key (the view)
    # (tenant, list_id, after member_id, limit) -> ProviderMember records with a larger id, in id order
    members_after: Callable[[str, int, int, int], list[dict[str, Any]]]
    suppressed: Callable[[str, str], bool]  # (tenant, address) on the tenant's suppression list
    held: Callable[[str, str], bool]  # (tenant, batch_code): suspended batch / tenant / instance switched off
    partition_of: Callable[[str], int]  # tenant -> its postbus.commands partition
    owned: Callable[[], set[int] | None]  # partitions this process owns now (None: all, single process)
    acquire: Callable[[int], Awaitable[None]]  # fence the partition's previous owner, catch the cursors up
    release: Callable[[int], Awaitable[None]]
    # (partition, tenant, messages, cursor): the messages.add command(s) and the cursor in ONE transaction
    commit: Callable[[int, str, list[dict[str, Any]], dict[str, Any]], Awaitable[None]]
    catch_up_members: Callable[[], Awaitable[None]]  # the members view holds every committed member
    render_html: Callable[[str, dict[str, Any]], str]
    render_text: Callable[[str, dict[str, Any]], str]
    unsubscribe_url: Callable[[str, str, str, str], str]  # (tenant, message id, recipient, account)
    clock: Callable[[], float] = time.time  # seconds
    max_step: int = MAX_STEP
    max_scan: int = MAX_SCAN


@dataclass
class StepResult:
    queued: int = 0
    skipped: int = 0
    finished: bool = False


@dataclass
class Stats:
    steps: int = 0
    queued: int = 0
    skipped: int = 0
    commit_failures: int = 0
    render_s: float = 0.0  # time spent rendering (for the benchmark)
    rendered: int = 0
    per_campaign: dict[str, int] = field(default_factory=dict)


class CampaignEngine:
    def __init__(self, deps: CampaignDeps) -> None:
        self.d = deps
        self.acquired: set[int] = set()
        self.cursors: dict[str, dict[str, Any]] = {}  # authoritative for acquired partitions
        self.buckets: dict[str, TokenBucket] = {}
        self.stats = Stats()

    # --- ownership ----------------------------------------------------------------------------------

    def _forget(self, partition: int) -> None:
        self.acquired.discard(partition)
        for key in [k for k, c in self.cursors.items() if self.d.partition_of(c["tenant_id"]) == partition]:
            del self.cursors[key]

    async def _sync_ownership(self) -> set[int] | None:
        owned = self.d.owned()
        if owned is not None:
            for p in sorted(self.acquired - owned):
                self._forget(p)
                await self.d.release(p)
        return owned

    def cursor_of(self, key: str, tenant_id: str, campaign_id: int) -> dict[str, Any]:
        cur = self.cursors.get(key)
        if cur is None:
            committed = self.d.cursor(key)
            cur = dict(committed) if committed else new_cursor(tenant_id, campaign_id, int(self.d.clock() * 1000))
            self.cursors[key] = cur
        return cur

    # --- the loop's body ------------------------------------------------------------------------------

    async def tick(self) -> float:
        """One step of every due campaign this process owns. Returns a suggested delay (seconds)
        before the next tick: short while some campaign has work and tokens, longer when idle."""
        owned = await self._sync_ownership()
        now = self.d.clock()
        delay = 1.0
        for c in self.d.campaigns():
            tenant = c["tenant_id"]
            p = self.d.partition_of(tenant)
            if owned is not None and p not in owned:
                continue
            if c["begins_ts"] > now * 1000:
                delay = min(delay, max(0.05, c["begins_ts"] / 1000 - now))
                continue
            key = campaign_key(tenant, c["campaign_id"])
            if key in self.cursors and self.cursors[key]["finished"]:
                continue
            if p not in self.acquired:
                try:
                    await self.d.acquire(p)
                except Exception as exc:  # broker trouble: try again on the next tick
                    log.warning("campaign partition not acquired", extra={"partition": p, "error": repr(exc)})
                    delay = min(delay, 1.0)
                    continue
                self._forget(p)
                self.acquired.add(p)
            try:
                res = await self.step(p, c)
            except Exception as exc:
                self.stats.commit_failures += 1
                log.warning("campaign step failed; the partition is acquired again",
                            extra={"campaign": key, "error": repr(exc)})
                self._forget(p)
                delay = min(delay, 0.5)
                continue
            if res is None or res.finished:
                continue
            bucket = self.buckets.get(key)
            delay = min(delay, bucket.wait_s() if bucket else 0.05)
        return max(0.01, delay)

    def paused(self, c: dict[str, Any]) -> bool:
        return bool(c.get("paused")) or self.d.held(c["tenant_id"], batch_code(c["campaign_id"]))

    async def step(self, partition: int, c: dict[str, Any]) -> StepResult | None:
        """One step of one campaign (its partition acquired). None: nothing to do now."""
        tenant, cid = c["tenant_id"], int(c["campaign_id"])
        key = campaign_key(tenant, cid)
        cur = self.cursor_of(key, tenant, cid)
        if cur["finished"] or self.paused(c):
            return None
        now = self.d.clock()
        bucket = self.buckets.get(key)
        if bucket is None:
            bucket = self.buckets[key] = TokenBucket(int(c.get("speed") or 0), now)
        else:
            bucket.set_speed(int(c.get("speed") or 0))
        allowance = min(int(bucket.available(now)), self.d.max_step)
        if allowance < 1:
            return StepResult()
        members = self.d.members_after(tenant, int(c["mailing_list_id"]), int(cur["last_member_id"]),
                                       self.d.max_scan)
        messages: list[dict[str, Any]] = []
        last = int(cur["last_member_id"])
        unsub = supp = invalid = 0
        consumed = 0
        for mem in members:
            if len(messages) >= allowance:
                break
            consumed += 1
            last = int(mem["member_id"])
            if mem.get("status") != "subscribed":
                unsub += 1
                continue
            if self.d.suppressed(tenant, mem["email"]):
                supp += 1
                continue
            try:
                messages.append(self.build(c, mem, now))
            except RenderError as exc:
                invalid += 1
                log.warning("campaign member skipped: template did not render",
                            extra={"campaign": key, "member_id": mem["member_id"], "error": str(exc)})
        finished = consumed == len(members) and len(members) < self.d.max_scan
        if finished:
            # before calling the list done, make sure the view is not just behind the API's writes
            await self.d.catch_up_members()
            finished = not self.d.members_after(tenant, int(c["mailing_list_id"]), last, 1)
        if last == int(cur["last_member_id"]) and not finished:
            return StepResult()
        now_ms = int(now * 1000)
        new = {**cur, "last_member_id": last, "queued": int(cur["queued"]) + len(messages),
               "skipped_unsubscribed": int(cur["skipped_unsubscribed"]) + unsub,
               "skipped_suppressed": int(cur["skipped_suppressed"]) + supp,
               "skipped_invalid": int(cur.get("skipped_invalid") or 0) + invalid,
               "finished": finished, "started_ts": cur.get("started_ts") or now_ms,
               "finished_ts": now_ms if finished else None, "updated_ts": now_ms}
        await self.d.commit(partition, tenant, messages, new)
        self.cursors[key] = new
        bucket.take(len(messages))
        self.stats.steps += 1
        self.stats.queued += len(messages)
        self.stats.skipped += unsub + supp + invalid
        self.stats.per_campaign[key] = self.stats.per_campaign.get(key, 0) + len(messages)
        if finished:
            self.buckets.pop(key, None)
            log.info("campaign expanded", extra={"campaign": key, "queued": new["queued"],
                                                 "skipped_unsubscribed": new["skipped_unsubscribed"],
                                                 "skipped_suppressed": new["skipped_suppressed"]})
        return StepResult(queued=len(messages), skipped=unsub + supp + invalid, finished=finished)

    # --- one member's message -----------------------------------------------------------------------

    def build(self, c: dict[str, Any], mem: dict[str, Any], now: float) -> dict[str, Any]:
        tenant, cid, member_id = c["tenant_id"], int(c["campaign_id"]), int(mem["member_id"])
        mid = message_id(cid, member_id)
        email = mem["email"]
        account = c["vmta_id"]
        unsubscribe = self.d.unsubscribe_url(tenant, mid, email, account)
        fields = dict(mem.get("fields") or {})
        ctx = {**fields, "fields": fields, "email": email, "name": mem.get("name") or "",
               "unsubscribe_url": unsubscribe, "campaign_name": c.get("name") or ""}
        t0 = time.perf_counter()
        try:
            html = self.d.render_html(c["html_body"], ctx)
            subject = self.d.render_text(c["subject"], ctx).replace("\r", " ").replace("\n", " ").strip()
            text = self.d.render_text(c["text_body"], ctx) if c.get("text_body") else None
        except Exception as exc:  # a sandbox violation or an undefined attribute of one member's data
            raise RenderError(str(exc)[:200]) from None
        finally:
            self.stats.render_s += time.perf_counter() - t0
            self.stats.rendered += 1
        from_addr = formataddr((c["from_name"], c["from_email"])) if c.get("from_name") else c["from_email"]
        name = " ".join(str(mem.get("name") or "").split())  # no line breaks into a header
        to = formataddr((name, email)) if name else email
        return {
            "id": mid, "pk": message_pk(tenant, cid, member_id), "tenant_id": tenant, "account_id": account,
            "from_addr": from_addr, "to": [to], "cc": [], "bcc": [],
            "reply_to": c.get("reply_email") or None, "return_path": c.get("bounce_email") or None,
            "subject": subject or "(no subject)", "body_text": text, "body_html": html,
            "headers": {"List-Unsubscribe": f"<{unsubscribe}>",
                        "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
                        "X-Postbus-Campaign": str(cid)},
            "message_id": None, "attachments": [], "priority": CAMPAIGN_PRIORITY, "deferred_ts": None,
            "batch_code": batch_code(cid), "accepted_ts": int(now * 1000), "track_opens": None,
            "track_clicks": None,
        }
