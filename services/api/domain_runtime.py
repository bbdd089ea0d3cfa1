"""What the outbound domain routes hold: the domains config view, the ledger's status view, a
follower of the ledger's results topic that hands each answer to the request waiting for it, and
the From-domain check of add-messages (who may send From which registered domain)."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from services.common import domain_quota as q
from services.common.avro import DecodeError, codec
from services.common.config_view import ConfigView
from services.common.settings import Settings
from services.common.topics import CONFIG_DOMAINS, DOMAIN_RESULTS, STATUS_DOMAINS, topic_partitions

log = logging.getLogger("postbus.api.domains")


@dataclass
class _Wait:
    expected: int
    results: list[dict[str, Any]] = field(default_factory=list)
    done: asyncio.Event = field(default_factory=asyncio.Event)


class ResultFollower:
    """Reads ``postbus.domain.results`` from its end at start-up (no consumer group: every API
    process sees every result); a request registers its id before appending its command."""

    def __init__(self, bootstrap: str) -> None:
        self.bootstrap = bootstrap
        self._waiting: dict[str, _Wait] = {}
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False,
                                          auto_offset_reset="latest",
                                          fetch_max_wait_ms=500)  # long poll: answers when a result arrives
        await self._consumer.start()
        tps = [TopicPartition(DOMAIN_RESULTS, p) for p in await topic_partitions(self._consumer, DOMAIN_RESULTS, 100)]
        self._consumer.assign(tps)
        await self._consumer.seek_to_end(*tps)
        for tp in tps:  # resolve the (lazy) seek now: results appended after start-up are all seen
            await self._consumer.position(tp)
        self._task = asyncio.create_task(self._run(), name="domain-results")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._consumer:
            await self._consumer.stop()

    async def _run(self) -> None:
        assert self._consumer is not None
        while True:
            batches = await self._consumer.getmany(timeout_ms=500, max_records=1000)
            for records in batches.values():
                for rec in records:
                    try:
                        _, result = codec().decode(rec.value, expect="DomainResult")
                    except DecodeError:
                        continue
                    wait = self._waiting.get(result["request_id"])
                    if wait is not None:
                        wait.results.append(result)
                        if len(wait.results) >= wait.expected:
                            wait.done.set()

    def expect(self, request_id: str, count: int = 1) -> _Wait:
        wait = _Wait(count)
        self._waiting[request_id] = wait
        return wait

    def forget(self, request_id: str) -> None:
        self._waiting.pop(request_id, None)


@dataclass
class DomainRuntime:
    domains: ConfigView
    status: ConfigView
    results: ResultFollower
    # registration and takeover decide on the view and write the record: one at a time here, so
    # two requests of this process never both see a name as free (or as expired)
    claims: asyncio.Lock = field(default_factory=asyncio.Lock)

    @classmethod
    def build(cls, settings: Settings) -> DomainRuntime:
        bootstrap = settings.kafka_bootstrap
        return cls(ConfigView(bootstrap, CONFIG_DOMAINS, "Domain"),
                   ConfigView(bootstrap, STATUS_DOMAINS, "DomainStatus"), ResultFollower(bootstrap))

    async def start(self) -> None:
        await asyncio.gather(self.domains.start(), self.status.start(), self.results.start())

    async def stop(self) -> None:
        await asyncio.gather(self.domains.stop(), self.status.stop(), self.results.stop(), return_exceptions=True)


class FromDomainCheck:
    """add-messages: refuses a message whose From domain is verified by another tenant
    (``sender_domain_not_owned``) or is the tenant's own registered but unverified domain
    (``sender_domain_not_verified``), with ``q.sending_refusal``. Before refusing, the view catches
    up with the log (once per request): a client that just registered or verified the domain,
    through this process or another, is judged on its own write."""

    def __init__(self, runtime: DomainRuntime | None) -> None:
        self.runtime = runtime
        self._caught_up = False

    async def refusal(self, msg: dict[str, Any]) -> str | None:
        rt = self.runtime
        domain = q.from_domain(msg.get("from_addr"))
        if rt is None or not domain:
            return None
        code = q.sending_refusal(rt.domains.get, domain, msg["tenant_id"])
        if code is not None and not self._caught_up:
            self._caught_up = True
            try:
                await rt.domains.catch_up()
            except Exception as exc:  # the view as it is: the sender checks again before sending
                log.warning("domains view could not catch up", extra={"error": type(exc).__name__})
            code = q.sending_refusal(rt.domains.get, domain, msg["tenant_id"])
        return q.refusal_text(code, domain) if code else None
