"""Consumer lag in Prometheus (issue 12 §5, services/common/lag.py): every service's Prometheus
endpoint shows ``postbus_consumer_lag{group, topic, partition}`` for its readers, and it rises with a
backlog and falls back to 0 once the backlog is processed.

A backlog that no reader can process until the test says so: records in a Kafka transaction left
open. The ``read_committed`` readers (every config view of the api, sender, reporter and inbound;
the metrics ingest) stop at the transaction's first record, so their lag is exactly the number of
records in it; when the transaction is aborted they move past it (nothing of it is ever applied)
and the lag is 0 again. The Faust groups (sender, reporter) read uncommitted: their lag is shown
rising under a burst of commands none of them acts on, and back at 0 after it."""

from __future__ import annotations

import asyncio
import re
import threading
import time
import uuid

import httpx
import pytest
from aiokafka import AIOKafkaProducer

from infra.supervisor import LocalSystem
from services.common.avro import codec
from services.common.topics import COMMANDS, CONFIG_INSTANCE, REPORTS
from tests.conftest import internal_headers, wait_until

pytestmark = pytest.mark.integration
PARTITION = 0  # the config topics have one partition
OPEN_RECORDS = 7
LINE = re.compile(r'^postbus_consumer_lag\{([^}]*)\} ([0-9.e+]+)$')
LABEL = re.compile(r'(\w+)="([^"]*)"')

# (service, group label, topic): every service's readers that must show the open transaction
VIEW_READERS = [
    ("api", "api:view:" + CONFIG_INSTANCE, CONFIG_INSTANCE),
    ("sender", "sender:view:" + CONFIG_INSTANCE, CONFIG_INSTANCE),
    ("reporter", "reporter:view:" + CONFIG_INSTANCE, CONFIG_INSTANCE),
    ("inbound", "inbound:view:" + CONFIG_INSTANCE, CONFIG_INSTANCE),
    ("metrics", "postbus-metrics", REPORTS),
]


def lags(system: LocalSystem, service: str) -> dict[tuple[str, str, int], float]:
    r = httpx.get(f"{system.url(service)}/metrics", headers=internal_headers(system), timeout=10)
    assert r.status_code == 200, (service, r.status_code)
    out = {}
    for line in r.text.splitlines():
        m = LINE.match(line)
        if m:
            labels = dict(LABEL.findall(m.group(1)))
            out[(labels["group"], labels["topic"], int(labels["partition"]))] = float(m.group(2))
    return out


def lag_of(system: LocalSystem, service: str, group: str, topic: str) -> float | None:
    return lags(system, service).get((group, topic, PARTITION))


async def _open_transaction(bootstrap: str, opened: threading.Event, release: threading.Event) -> None:
    """Writes OPEN_RECORDS records on PARTITION of the config topic and of postbus.reports in one
    transaction, holds it open until ``release``, then aborts it."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, transactional_id=f"lag-test-{uuid.uuid4().hex}",
                                enable_idempotence=True)
    await producer.start()
    try:
        await producer.begin_transaction()
        for i in range(OPEN_RECORDS):
            key = f"lag-probe-{uuid.uuid4().hex}-{i}".encode()
            await producer.send_and_wait(CONFIG_INSTANCE, key=key, value=None, partition=PARTITION)
            await producer.send_and_wait(REPORTS, key=key, value=b"never read", partition=PARTITION)
        opened.set()
        await asyncio.to_thread(release.wait, 120)
        await producer.abort_transaction()
    finally:
        await producer.stop()


def test_lag_of_every_reader_rises_with_a_backlog_and_falls_to_zero(system: LocalSystem) -> None:
    # every reader reports its partitions, at 0 while caught up (positive control of "falls to 0")
    for service, group, topic in VIEW_READERS:
        wait_until(lambda s=service, g=group, t=topic: lag_of(system, s, g, t) == 0, timeout=60,
                   what=f"{service} {group} at 0")

    opened, release = threading.Event(), threading.Event()
    holder = threading.Thread(target=lambda: asyncio.run(_open_transaction(system.kafka_bootstrap, opened, release)),
                              daemon=True)
    holder.start()
    try:
        assert opened.wait(30), "transaction not opened"
        # the backlog: exactly the records of the open transaction, in every service
        for service, group, topic in VIEW_READERS:
            seen: list[float | None] = []

            def at_backlog(s: str = service, g: str = group, t: str = topic, seen: list = seen) -> bool:
                seen.append(lag_of(system, s, g, t))
                return seen[-1] == OPEN_RECORDS

            try:
                wait_until(at_backlog, timeout=30, what=f"{service} {group} at {OPEN_RECORDS}")
            except AssertionError:
                raise AssertionError(f"{service} {group}: lag seen {sorted(set(map(str, seen)))}") from None
    finally:
        release.set()
        holder.join(30)
    # aborted: every reader moves past it, nothing of it applied
    for service, group, topic in VIEW_READERS:
        wait_until(lambda s=service, g=group, t=topic: lag_of(system, s, g, t) == 0, timeout=30,
                   what=f"{service} {group} back at 0")


async def _burst(bootstrap: str, n: int) -> None:
    """``n`` commands of a type no service acts on, on one partition of postbus.commands."""
    c = codec()
    tenant = f"lag-probe-{uuid.uuid4().hex[:8]}"
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, max_batch_size=1 << 20)
    await producer.start()
    try:
        futures = []
        for i in range(n):
            env = {"command_id": f"{tenant}-{i}", "type": "lag.probe", "tenant_id": tenant, "actor": "test",
                   "ts": int(time.time() * 1000), "payload_schema": "BounceReload",
                   "payload": c.encode("BounceReload", {"requested_ts": 0}), "route": None}
            futures.append(await producer.send(COMMANDS, key=tenant.encode(), partition=PARTITION,
                                               value=c.encode("CommandEnvelope", env)))
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


def test_lag_of_the_faust_groups_rises_under_a_burst_and_falls_to_zero(system: LocalSystem) -> None:
    groups = [("sender", "postbus-sender"), ("reporter", "postbus-reporter")]
    for service, group in groups:
        wait_until(lambda s=service, g=group: lag_of(system, s, g, COMMANDS) == 0, timeout=60,
                   what=f"{service} {group} at 0")
    peaks = {service: 0.0 for service, _ in groups}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            for service, group in groups:
                with_lag = lag_of(system, service, group, COMMANDS) or 0.0
                peaks[service] = max(peaks[service], with_lag)
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        asyncio.run(_burst(system.kafka_bootstrap, 30_000))
        for service, group in groups:
            wait_until(lambda s=service, g=group: lag_of(system, s, g, COMMANDS) == 0, timeout=120,
                       what=f"{service} {group} back at 0")
    finally:
        done.set()
        sampler.join(10)
    assert all(peak > 0 for peak in peaks.values()), f"lag never seen rising: {peaks}"
