"""The campaign expansion engine (services/sender/campaigns.py) wired to Kafka inside the sender.

- views (whole topics, read_committed): ``postbus.config.provider-campaigns``,
  ``postbus.state.campaign-cursors``, ``postbus.config.provider-members`` (indexed per list in
  ``member_id`` order), the suppression list of services/sender/suppression.py;
- one transactional producer per owned ``postbus.commands`` partition, transactional id
  ``postbus-sender-campaigns-p<N>``: a new owner's producer fences the previous owner's and aborts
  its open transaction; a step = the ``messages.add`` command(s) + the cursor in one transaction;
- a loop task that ticks the engine once the sender owns its first assignment.

``install_read_committed`` makes the sender's Faust consumer read ``postbus.commands``
read_committed, so an aborted expansion step (a kill mid-transaction, a fenced zombie) is never
seen by the sender at all."""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import json
import logging
import threading
import time
import uuid
from collections import OrderedDict
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import murmur2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from services.common import templating
from services.common import track_tokens as tt
from services.common.avro import codec
from services.common.config_view import ConfigView
from services.common.settings import Settings
from services.common.topics import (
    COMMANDS,
    CONFIG_PROVIDER_CAMPAIGNS,
    CONFIG_PROVIDER_MEMBERS,
    STATE_CAMPAIGN_CURSORS,
)
from services.sender import suppression
from services.sender.campaigns import CampaignDeps, CampaignEngine, campaign_key
from services.sender.tracking import base_url

log = logging.getLogger("postbus.sender.campaigns")

TX_PREFIX = "postbus-sender-campaigns"
MAX_COMMAND_BYTES = 512 * 1024  # one messages.add command stays well under the broker's 1 MiB record limit


def install_read_committed() -> None:
    """The sender's Faust consumer reads read_committed (Faust only does so with exactly-once)."""
    from faust.transport.drivers import aiokafka as faust_aiokafka

    cls = faust_aiokafka.AIOKafkaConsumerThread
    if getattr(cls, "_postbus_read_committed", False):
        return
    original = cls._create_worker_consumer

    def create(self: Any, transport: Any) -> Any:
        consumer = original(self, transport)
        consumer._isolation_level = "read_committed"  # read by AIOKafkaConsumer.start() (aiokafka 0.14)
        return consumer

    cls._create_worker_consumer = create
    cls._postbus_read_committed = True


# --- rendering ------------------------------------------------------------------------------------

_text_env = ImmutableSandboxedEnvironment(autoescape=False, auto_reload=False)
_text_cache: OrderedDict[str, Any] = OrderedDict()
_text_lock = threading.Lock()


def render_text(source: str, context: dict[str, Any]) -> str:
    """Subject and text part: the same sandbox without HTML escaping (a subject is not HTML)."""
    with _text_lock:
        tpl = _text_cache.get(source)
    if tpl is None:
        tpl = _text_env.from_string(source)
        with _text_lock:
            _text_cache[source] = tpl
            while len(_text_cache) > 256:
                _text_cache.popitem(last=False)
    return str(tpl.render(context))


# --- members in member_id order ---------------------------------------------------------------------

class MemberIndex:
    """``postbus.config.provider-members`` per (tenant, list): records and their sorted ids."""

    def __init__(self) -> None:
        self.records: dict[tuple[str, int], dict[int, dict[str, Any]]] = {}
        self.order: dict[tuple[str, int], list[int]] = {}

    def changed(self, key: str, value: dict[str, Any] | None) -> None:
        parts = key.split("/")
        if len(parts) < 3:
            return
        try:
            lk, mid = ("/".join(parts[:-2]), int(parts[-2])), int(parts[-1])
        except ValueError:
            return
        recs = self.records.setdefault(lk, {})
        ids = self.order.setdefault(lk, [])
        if value is None:
            if recs.pop(mid, None) is not None:
                i = bisect.bisect_left(ids, mid)
                if i < len(ids) and ids[i] == mid:
                    del ids[i]
            return
        if mid not in recs:
            if not ids or ids[-1] < mid:
                ids.append(mid)
            else:
                bisect.insort(ids, mid)
        try:
            fields = json.loads(value.get("fields_json") or "{}")
        except ValueError:
            fields = {}
        recs[mid] = {**value, "fields": fields if isinstance(fields, dict) else {}}

    def after(self, tenant: str, list_id: int, after: int, limit: int) -> list[dict[str, Any]]:
        lk = (tenant, list_id)
        ids = self.order.get(lk)
        if not ids:
            return []
        recs = self.records[lk]
        i = bisect.bisect_right(ids, after)
        return [recs[m] for m in ids[i:i + limit]]


# --- the runtime ------------------------------------------------------------------------------------

class CampaignRuntime:
    def __init__(self, settings: Settings, sender: Any, tenants: Any) -> None:
        self.settings = settings
        self.sender = sender
        self.tenants = tenants  # the sender's tenants view (tracking domain of the unsubscribe link)
        bootstrap = settings.kafka_bootstrap
        self.members = MemberIndex()
        self.campaigns = ConfigView(bootstrap, CONFIG_PROVIDER_CAMPAIGNS, "ProviderCampaign")
        self.cursors = ConfigView(bootstrap, STATE_CAMPAIGN_CURSORS, "CampaignCursor")
        self.members_view = ConfigView(bootstrap, CONFIG_PROVIDER_MEMBERS, "ProviderMember",
                                       on_change=self.members.changed)
        self.views = (self.campaigns, self.cursors, self.members_view)
        self.producers: dict[int, AIOKafkaProducer] = {}
        self._track_key: bytes | None = None
        self._task: asyncio.Task[None] | None = None
        self.engine = CampaignEngine(CampaignDeps(
            campaigns=lambda: list(self.campaigns.items.values()),
            cursor=self.cursors.get,
            members_after=self.members.after,
            suppressed=lambda t, a: suppression.view.get(suppression.entry_key(t, a)) is not None,
            # a deleted tenant's campaigns stop too (its accounts are gone)
            held=lambda t, b: self.tenants.get(t) is None or bool(self.sender.is_held(t, b)),
            partition_of=self.partition_of,
            owned=lambda: self.sender.ownership.owned,
            acquire=self.acquire,
            release=self.release,
            commit=self.commit,
            catch_up_members=lambda: self.members_view.catch_up(timeout=10.0),
            render_html=templating.render,
            render_text=render_text,
            unsubscribe_url=self.unsubscribe_url,
        ))

    def partition_of(self, tenant_id: str) -> int:
        # the producers' default partitioner (aiokafka's, Faust's, the API's): the tenant's commands partition
        return (murmur2(tenant_id.encode()) & 0x7FFFFFFF) % self.settings.topic_partitions

    def unsubscribe_url(self, tenant_id: str, mid: str, rcpt: str, account: str) -> str:
        if self._track_key is None:
            self._track_key = tt.key_from_settings(self.settings)
        token = tt.mint(self._track_key, "u", tenant_id, mid, rcpt.lower(), account_id=account,
                        ttl_s=self.settings.tracking_token_ttl_days * 86400)
        return f"{base_url(self.settings, self.tenants.get(tenant_id))}/u/{token}"

    # --- partitions: fencing producers ---------------------------------------------------------------

    async def acquire(self, partition: int) -> None:
        await self.release(partition)
        producer = AIOKafkaProducer(bootstrap_servers=self.settings.kafka_bootstrap, acks="all",
                                    transactional_id=f"{TX_PREFIX}-p{partition}", request_timeout_ms=15000,
                                    max_request_size=4 * 1024 * 1024)
        try:
            await asyncio.wait_for(producer.start(), 30)  # InitProducerId: fences the previous owner
        except BaseException:
            with contextlib.suppress(Exception):
                await producer.stop()
            raise
        self.producers[partition] = producer
        # every cursor the previous owner committed (its open transaction, if any, is aborted now)
        await self.cursors.catch_up(timeout=30.0)
        log.info("campaign partition acquired", extra={"partition": partition})

    async def release(self, partition: int) -> None:
        producer = self.producers.pop(partition, None)
        if producer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(producer.stop(), 5)

    async def commit(self, partition: int, tenant_id: str, messages: list[dict[str, Any]],
                     cursor: dict[str, Any]) -> None:
        producer = self.producers.get(partition)
        if producer is None:
            raise RuntimeError(f"partition {partition} not acquired")
        c = codec()
        commands = [self._command(tenant_id, cursor["campaign_id"], chunk) for chunk in _chunks(messages)]
        futures: list[Any] = []
        try:
            async with asyncio.timeout(30):
                async with producer.transaction():
                    for value in commands:
                        futures.append(await producer.send(COMMANDS, value=value, key=tenant_id.encode(),
                                                           partition=partition))
                    futures.append(await producer.send(
                        STATE_CAMPAIGN_CURSORS, key=campaign_key(tenant_id, cursor["campaign_id"]).encode(),
                        value=c.encode("CampaignCursor", cursor)))
        except BaseException:
            for fut in futures:
                fut.add_done_callback(lambda f: f.cancelled() or f.exception())
            await self.release(partition)
            raise

    def _command(self, tenant_id: str, campaign_id: int, messages: list[dict[str, Any]]) -> bytes:
        c = codec()
        return c.encode("CommandEnvelope", {
            "command_id": uuid.uuid4().hex, "type": "messages.add", "tenant_id": tenant_id,
            "actor": f"sender:campaign-{campaign_id}", "ts": int(time.time() * 1000),
            "payload_schema": "AddMessages", "payload": c.encode("AddMessages", {"messages": messages}),
            "route": "campaign expansion"})

    # --- lifecycle --------------------------------------------------------------------------------------

    async def run(self, ready: Any) -> None:
        await asyncio.gather(*(v.start() for v in self.views))
        await ready()  # the sender's suspensions, switches and tenants
        await suppression.view.ready.wait()
        while self.sender.ownership.owned is None:  # noqa: ASYNC110  (set by the rebalance callback)
            await asyncio.sleep(0.2)
        log.info("campaign expansion running")
        while True:
            try:
                delay = await self.engine.tick()
            except Exception:
                log.exception("campaign tick failed")
                delay = 1.0
            await asyncio.sleep(min(delay, 0.5))

    async def stop(self) -> None:
        for p in list(self.producers):
            await self.release(p)
        await asyncio.gather(*(v.stop() for v in self.views), return_exceptions=True)


def _chunks(messages: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """messages.add commands of at most ~MAX_COMMAND_BYTES each (an estimate from the bodies)."""
    out: list[list[dict[str, Any]]] = []
    cur: list[dict[str, Any]] = []
    size = 0
    for m in messages:
        n = 600 + sum(len((m.get(f) or "").encode()) for f in ("body_html", "body_text", "subject"))
        if cur and size + n > MAX_COMMAND_BYTES:
            out.append(cur)
            cur, size = [], 0
        cur.append(m)
        size += n
    if cur:
        out.append(cur)
    return out
