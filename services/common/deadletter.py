"""Poison records never crash a consumer: they go to the dead-letter topic with the reason."""

from __future__ import annotations

import logging
import time
from typing import Any

from aiokafka import AIOKafkaProducer

from services.common.avro import codec
from services.common.topics import DEADLETTER

log = logging.getLogger("postbus.deadletter")


class DeadLetterWriter:
    def __init__(self, producer: AIOKafkaProducer) -> None:
        self.producer = producer

    async def send(self, rec: Any, consumer: str, reason: str) -> None:
        """Append the record with its reason; returns once the broker has it, so the caller may
        then move its offset past the poison record."""
        value = encode_dead_letter(
            rec.topic, rec.partition, rec.offset, consumer, reason, rec.key, rec.value
        )
        log.warning(
            "dead-lettered record",
            extra={"topic": rec.topic, "partition": rec.partition, "offset": rec.offset, "reason": reason},
        )
        await self.producer.send_and_wait(DEADLETTER, value=value, key=rec.key)


def encode_dead_letter(
    topic: str, partition: int, offset: int, consumer: str, reason: str,
    key: bytes | None, value: bytes | None,
) -> bytes:
    return codec().encode(
        "DeadLetter",
        {
            "source_topic": topic,
            "source_partition": partition,
            "source_offset": offset,
            "consumer": consumer,
            "reason": reason[:2000],
            "ts": int(time.time() * 1000),
            "key": key,
            "value": value,
        },
    )
