"""Faust helpers shared by the sender and the reporter."""

from __future__ import annotations

from typing import Any

import faust


async def table_put(table: Any, partition: int, key: Any, value: Any) -> None:
    """Write a table key from a background task (outside stream iteration) and wait until the
    changelog record is on the broker.

    Faust only allows table writes while processing an event, because it takes the changelog
    partition from that event. Our background tasks (SMTP workers, report flushers) know the
    partition of the tenant the key belongs to, so they write the store and the changelog with that
    explicit partition: the same record an in-stream write would have produced. The record goes
    straight to the producer (``Topic.send``), not through Faust's send-soon buffer, which adds
    tens of milliseconds under load."""
    table.data[key] = value
    fut = await table.changelog_topic.send(
        key=key, value=value, partition=partition,
        key_serializer=table.key_serializer, value_serializer=table.value_serializer, force=True,
    )
    await fut


async def table_delete(table: Any, partition: int, key: Any) -> None:
    table.data.pop(key, None)
    fut = await table.changelog_topic.send(
        key=key, value=None, partition=partition, key_serializer=table.key_serializer,
        value_serializer="raw", force=True,
    )
    await fut


def make_app(name: str, bootstrap: str, datadir: str, partitions: int, **extra: Any) -> faust.App:
    return faust.App(
        name,
        broker=f"kafka://{bootstrap}",
        store="memory://",
        web_enabled=False,
        autodiscover=False,
        datadir=datadir,
        topic_partitions=partitions,
        topic_replication_factor=1,
        table_standby_replicas=0,
        broker_commit_interval=1.0,
        producer_acks=-1,
        producer_linger=0.005,
        consumer_auto_offset_reset="earliest",
        # a SIGKILLed worker holds its partitions until its session expires: keep that short
        broker_session_timeout=10.0,
        broker_heartbeat_interval=2.0,
        **extra,
    )


def run_worker(app: faust.App, service: str, level: str) -> None:
    from faust import Worker

    from services.common.logs import logging_dict_config

    worker = Worker(app, loglevel=level, quiet=True, logging_config=logging_dict_config(service, level))
    worker.execute_from_commandline()
