"""``python -m services.metrics`` against a real Kafka broker: ingest (plain and transactional
records), dead letters for poison records, idempotent restart, replay, clean SIGTERM.

Runs against the broker at POSTBUS_METRICS_TEST_KAFKA when one answers there; otherwise it starts
a dedicated Apache Kafka broker of its own (infra/kafka/kafka.sh, fresh state, free port), because
this service's consumer group must not share a broker with the session's system.
The service reads the shared ``postbus.events`` topic, so each
run uses fresh tenant ids and asserts per-tenant counts: runs never see each other's data."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from services.common.avro import codec
from services.common.topics import DEADLETTER, EVENTS, ensure_topics
from services.metrics.store import Store

pytestmark = pytest.mark.integration

BOOTSTRAP = os.environ.get("POSTBUS_METRICS_TEST_KAFKA", "127.0.0.1:19192")
INTERNAL_TOKEN = "ingest-test-internal-" + uuid.uuid4().hex
INTERNAL = {"Authorization": f"Bearer {INTERNAL_TOKEN}"}
REPO = Path(__file__).resolve().parents[2]


def _port_open(hostport: str) -> bool:
    host, port = hostport.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=1):
            return True
    except OSError:
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", autouse=True)
def kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    global BOOTSTRAP
    if os.environ.get("POSTBUS_METRICS_TEST_KAFKA") and _port_open(BOOTSTRAP):
        yield BOOTSTRAP
        return
    from infra.supervisor import free_port

    port = free_port(pair=True)
    env = {**os.environ, "POSTBUS_STATE": str(tmp_path_factory.mktemp("mx-kafka")), "KAFKA_PORT": str(port),
           "KAFKA_HEAP": "256m"}
    script = str(REPO / "infra" / "kafka" / "kafka.sh")
    subprocess.run(["bash", script, "start"], env=env, check=True, timeout=180)
    BOOTSTRAP = f"127.0.0.1:{port}"
    try:
        yield BOOTSTRAP
    finally:
        subprocess.run(["bash", script, "stop"], env=env, check=False, timeout=60)


class MetricsProcess:
    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = state_dir / "metrics.log"

    def start(self) -> None:
        env = {
            **os.environ,
            "POSTBUS_STATE_DIR": str(self.state_dir),
            "POSTBUS_KAFKA_BOOTSTRAP": BOOTSTRAP,
            "POSTBUS_METRICS_PORT": str(self.port),
            "POSTBUS_METRICS_BATCH_MS": "100",
            "POSTBUS_INTERNAL_TOKEN": INTERNAL_TOKEN,
            "PYTHONPATH": str(REPO),
        }
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "services.metrics"], cwd=REPO, env=env, stdout=log, stderr=log,
        )

    async def wait_ready(self, within_s: float = 60.0) -> None:
        deadline = time.monotonic() + within_s
        async with httpx.AsyncClient(base_url=self.url, timeout=5) as c:
            while time.monotonic() < deadline:
                assert self.proc is not None and self.proc.poll() is None, self.log_path.read_text()
                try:
                    if (await c.get("/health")).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.2)
        raise AssertionError("metrics service did not start:\n" + self.log_path.read_text())

    def terminate(self, timeout: float = 20.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError("metrics service ignored SIGTERM:\n" + self.log_path.read_text()) from None


@pytest.fixture
def service(tmp_path: Path) -> Iterator[MetricsProcess]:
    svc = MetricsProcess(tmp_path)
    yield svc
    if svc.proc is not None and svc.proc.poll() is None:
        svc.proc.kill()
        svc.proc.wait()


@pytest.fixture
async def producer() -> AsyncIterator[AIOKafkaProducer]:
    await ensure_topics(BOOTSTRAP, 8)
    p = AIOKafkaProducer(bootstrap_servers=BOOTSTRAP, acks="all")
    await p.start()
    yield p
    await p.stop()


def event(tenant: str, message_id: str, type_: str, ts: int, n: int) -> bytes:
    return codec().encode("DeliveryEvent", {
        "event_id": f"{tenant}-{message_id}-{n}", "type": type_, "tenant_id": tenant,
        "account_id": "acc", "message_id": message_id, "pk": None, "ts": ts, "accepted_ts": None,
        "attempt": n, "smtp_code": None, "error": None, "deferred_reason": None, "deferred_until": None,
        "batch_code": None, "sender_domain": None, "recipients": 1,
    })


async def wait_caught_up(client: httpx.AsyncClient, min_rows: int = 0, within_s: float = 60.0) -> dict[str, Any]:
    deadline = time.monotonic() + within_s
    status: dict[str, Any] = {}
    while time.monotonic() < deadline:
        status = (await client.get("/internal/ingest-status")).json()
        if status["caught_up"] and status["rows"] >= min_rows:
            return status
        await asyncio.sleep(0.2)
    raise AssertionError(f"ingest did not catch up: {status}")


async def tenant_metrics(client: httpx.AsyncClient, tenant: str) -> dict[str, int]:
    body = (await client.get(f"/internal/tenants/{tenant}/metrics", params={"window": "24h"})).json()
    return {k: body[k] for k in ("sent", "deferred", "error", "rejected", "delivered")}


async def test_ingest_restart_replay_and_sigterm(
    service: MetricsProcess, producer: AIOKafkaProducer, tmp_path: Path
) -> None:
    tenant, other = f"t-{uuid.uuid4().hex[:8]}", f"t-{uuid.uuid4().hex[:8]}"
    now = int(time.time() * 1000)
    # m0..m99 sent (m0..m9 deferred twice first), m100..m104 errors; the other tenant 7 sent
    for i in range(100):
        if i < 10:
            for n in (1, 2):
                await producer.send(EVENTS, event(tenant, f"m{i}", "deferred", now - 3000, n), key=tenant.encode())
        await producer.send(EVENTS, event(tenant, f"m{i}", "sent", now - 1000, 3), key=tenant.encode())
    for i in range(100, 105):
        await producer.send(EVENTS, event(tenant, f"m{i}", "error", now - 1000, 1), key=tenant.encode())
    for i in range(7):
        await producer.send(EVENTS, event(other, f"m{i}", "sent", now - 1000, 1), key=other.encode())
    # a poison record: must be dead-lettered, never crash the consumer
    poison_key = f"poison-{uuid.uuid4().hex}".encode()
    await producer.send(EVENTS, b"\x00not avro", key=poison_key)
    await producer.flush()
    expected = {"sent": 100, "deferred": 10, "error": 5, "rejected": 0, "delivered": 100}

    service.start()
    await service.wait_ready()
    async with httpx.AsyncClient(base_url=service.url, headers=INTERNAL, timeout=30) as c:
        status = await wait_caught_up(c, min_rows=127)
        assert await tenant_metrics(c, tenant) == expected
        assert (await tenant_metrics(c, other))["sent"] == 7
        sent = (await c.post("/internal/sent-ids", json={"tenant_id": tenant, "ids": ["m1", "m100", "zz"]})).json()
        assert sent == {"sent": ["m1"]}
        rows_first = status["rows"]
        assert sum(status["partitions"].values()) >= rows_first + 1  # every record, poison included

        # more events while running, including a transactional batch (read_committed + markers)
        txp = AIOKafkaProducer(bootstrap_servers=BOOTSTRAP, transactional_id=f"mx-{uuid.uuid4().hex}")
        await txp.start()
        try:
            async with txp.transaction():
                for i in range(200, 210):
                    await txp.send(EVENTS, event(tenant, f"m{i}", "sent", now - 500, 1), key=tenant.encode())
        finally:
            await txp.stop()
        await wait_caught_up(c, min_rows=rows_first + 10)
        assert (await tenant_metrics(c, tenant))["sent"] == 110
        prom = (await c.get("/metrics")).text
        assert 'postbus_metrics_events_ingested_total{type="sent"}' in prom
        assert "postbus_metrics_consumer_lag" in prom
        deadletters = [line for line in prom.splitlines() if line.startswith("postbus_metrics_deadletters_total")]
        assert deadletters and float(deadletters[0].split()[-1]) >= 1.0

    assert service.terminate() == 0
    assert "metrics service stopped" in service.log_path.read_text()

    # restart on the same ClickHouse path: resumes from stored offsets, nothing counted twice
    service.start()
    await service.wait_ready()
    async with httpx.AsyncClient(base_url=service.url, headers=INTERNAL, timeout=30) as c:
        status = await wait_caught_up(c)
        assert await tenant_metrics(c, tenant) == {**expected, "sent": 110, "delivered": 110}

        # replay: drop tables, re-read from offset 0, same answers
        before = {t: await tenant_metrics(c, t) for t in (tenant, other)}
        r = await c.post("/internal/replay")
        assert r.status_code == 202 and r.json() == {"ok": True}
        await wait_caught_up(c, min_rows=status["rows"])
        assert {t: await tenant_metrics(c, t) for t in (tenant, other)} == before
        assert "replay started" in service.log_path.read_text()
        after_replay = await wait_caught_up(c)
    assert service.terminate() == 0

    # tables dropped behind the service's back: the next start rebuilds everything from offset 0
    store = Store(f"chdb://{tmp_path / 'clickhouse'}")
    store.reset()
    store.close()
    service.start()
    await service.wait_ready()
    async with httpx.AsyncClient(base_url=service.url, headers=INTERNAL, timeout=30) as c:
        rebuilt = await wait_caught_up(c, min_rows=after_replay["rows"])
        assert rebuilt["partitions"] == after_replay["partitions"]
        assert {t: await tenant_metrics(c, t) for t in (tenant, other)} == before
    assert service.terminate() == 0

    # the poison record reached the dead-letter topic with its reason
    consumer = AIOKafkaConsumer(bootstrap_servers=BOOTSTRAP, auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    try:
        tp = TopicPartition(DEADLETTER, 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        found = None
        deadline = time.monotonic() + 15
        while found is None and time.monotonic() < deadline:
            for recs in (await consumer.getmany(timeout_ms=500)).values():
                for rec in recs:
                    if rec.key == poison_key:
                        found = codec().decode(rec.value, expect="DeadLetter")[1]
        assert found is not None
        assert found["consumer"] == "postbus-metrics"
        assert found["source_topic"] == EVENTS
        assert "Avro" in found["reason"]
    finally:
        await consumer.stop()
