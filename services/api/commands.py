"""The API's only way to change state: append a command to ``postbus.commands``.

Config commands (tenant, account, API key) are written in one Kafka transaction together with
the resulting record on their compacted config topic, so the audit log and the config projection
can never disagree. Message commands use the idempotent (non-transactional) producer: they are
the hot path and need no second record."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaProducer

from services.common.avro import codec
from services.common.topics import COMMANDS


@dataclass(frozen=True)
class Actor:
    kind: str  # "admin" | "tenant" | "support"
    tenant_id: str | None = None
    key_id: str | None = None  # the API key id; for "support", the principal's name

    @property
    def label(self) -> str:
        if self.kind == "admin":
            return "admin"
        if self.kind == "support":
            return f"support:{self.key_id}"
        return f"tenant:{self.tenant_id}/key:{self.key_id}"


@dataclass(frozen=True)
class ConfigRecord:
    topic: str
    key: str
    schema: str | None  # None = tombstone
    value: dict[str, Any] | None


class CommandWriter:
    def __init__(self, bootstrap: str, transactional_id: str) -> None:
        common = {"bootstrap_servers": bootstrap, "acks": "all", "request_timeout_ms": 15000}
        self.producer = AIOKafkaProducer(enable_idempotence=True, linger_ms=2,
                                         max_request_size=8 * 1024 * 1024, **common)
        self.tx_producer = AIOKafkaProducer(transactional_id=transactional_id, **common)
        self._tx_lock = asyncio.Lock()  # one open transaction per transactional producer

    async def start(self) -> None:
        await self.producer.start()
        await self.tx_producer.start()

    async def stop(self) -> None:
        await self.producer.stop()
        await self.tx_producer.stop()

    @staticmethod
    def envelope(ctype: str, tenant_id: str | None, actor: Actor, route: str,
                 payload_schema: str, payload: dict[str, Any]) -> tuple[str, bytes]:
        c = codec()
        command_id = uuid.uuid4().hex
        return command_id, c.encode(
            "CommandEnvelope",
            {
                "command_id": command_id,
                "type": ctype,
                "tenant_id": tenant_id,
                "actor": actor.label,
                "ts": int(time.time() * 1000),
                "payload_schema": payload_schema,
                "payload": c.encode(payload_schema, payload),
                "route": route,
            },
        )

    async def append(self, ctype: str, tenant_id: str | None, actor: Actor, route: str,
                     payload_schema: str, payload: dict[str, Any]) -> str:
        command_id, value = self.envelope(ctype, tenant_id, actor, route, payload_schema, payload)
        key = (tenant_id or "").encode()
        await self.producer.send_and_wait(COMMANDS, value=value, key=key)
        return command_id

    async def append_many(self, items: list[tuple[str, str | None, Actor, str, str, dict[str, Any]]]) -> None:
        """Several commands, sent concurrently (batched by the producer), all acknowledged on return."""
        futures = []
        for ctype, tenant_id, actor, route, schema, payload in items:
            _, value = self.envelope(ctype, tenant_id, actor, route, schema, payload)
            futures.append(await self.producer.send(COMMANDS, value=value, key=(tenant_id or "").encode()))
        await asyncio.gather(*futures)

    async def append_config(self, ctype: str, tenant_id: str | None, actor: Actor, route: str,
                            payload_schema: str, payload: dict[str, Any],
                            records: list[ConfigRecord]) -> dict[str, dict[int, int]]:
        """Command + config records atomically. Returns {topic: {partition: offset}} of the records."""
        _, value = self.envelope(ctype, tenant_id, actor, route, payload_schema, payload)
        c = codec()
        async with self._tx_lock, self.tx_producer.transaction():
            await self.tx_producer.send(COMMANDS, value=value, key=(tenant_id or "").encode())
            futures = []
            for rec in records:
                data = c.encode(rec.schema, rec.value) if rec.schema and rec.value is not None else None
                futures.append((rec.topic, await self.tx_producer.send(rec.topic, value=data, key=rec.key.encode())))
        offsets: dict[str, dict[int, int]] = {}
        for topic, fut in futures:
            md = await fut
            offsets.setdefault(topic, {})[md.partition] = max(offsets.get(topic, {}).get(md.partition, -1),
                                                              md.offset)
        return offsets
