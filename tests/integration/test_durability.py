"""Crash safety, replay, and secrets at rest on the topics."""

from __future__ import annotations

import asyncio
import collections

import httpx
from aiokafka import AIOKafkaConsumer, TopicPartition

from infra.supervisor import LocalSystem
from services.common.settings import Settings
from tests.conftest import ADMIN_TOKEN, Tenant, internal_headers, wait_until
from tests.support.prometheus import tenant_idle_at_sender
from tests.support.smtp_server import RecordingSmtpServer

CONNECTIONS_PER_ACCOUNT = 8  # services.common.settings default: SMTP workers per account
# the group commit (services/sender/group_commit.py): besides its one send in flight, each worker may
# have this many outcomes handed over and not yet durable (sender_unflushed_per_worker)
UNFLUSHED_PER_WORKER = Settings.model_fields["sender_unflushed_per_worker"].default  # the default
RESEND_BOUND = CONNECTIONS_PER_ACCOUNT * (1 + UNFLUSHED_PER_WORKER)  # what a crash may resend per account


def test_sigkill_sender_while_sending_1000_loses_nothing(system: LocalSystem, new_tenant) -> None:
    t: Tenant = new_tenant()
    total = 1000
    # a dedicated SMTP server that answers a little slowly, so the kill lands mid-stream
    with RecordingSmtpServer(delay=0.01) as sink:
        r = t.http.post("/account", json={"id": "slow", "host": sink.host, "port": sink.port, "use_tls": False})
        assert r.status_code == 200
        for start in (0, 500):
            msgs = [t.message(f"c-{i}", account_id="slow") for i in range(start, start + 500)]
            r = t.http.post("/commands/add-messages", json={"messages": msgs})
            assert r.json()["queued"] == 500, r.text
        wait_until(lambda: len(sink.messages) >= 200, timeout=60, interval=0.02, what="200 mails before the kill")
        system.kill_service("sender")
        at_kill = len(sink.messages)
        assert at_kill < total, "the kill must land while sending"
        system.start_service("sender")

        def delivered_ids() -> collections.Counter[str]:
            return collections.Counter(m.message["X-Postbus-Message-Id"] for m in sink.messages)

        wait_until(lambda: len(delivered_ids()) == total, timeout=120, what="every message delivered")
        # evidence that no straggling resend is still coming: the restarted sender has nothing of the
        # tenant's queued, held or in flight
        wait_until(lambda: tenant_idle_at_sender(system, t.id), timeout=60, what="the tenant idle at the sender")
        counts = delivered_ids()
        duplicates = sum(n - 1 for n in counts.values())
        print(f"\nkilled at {at_kill}/{total} delivered; duplicates after restart: {duplicates}")
        assert set(counts) == {f"c-{i}" for i in range(total)}
        assert duplicates <= RESEND_BOUND, f"{duplicates} duplicates exceed the in-flight window"

    # every message gets its sent report at the client (duplicates may add reports, never remove)
    def sent_reported() -> set[str]:
        return {r["id"] for r in t.client.reports() if "sent_ts" in r}

    wait_until(lambda: len(sent_reported()) == total, timeout=90, what="1000 sent reports")


def test_replay_rebuilds_identical_metrics(system: LocalSystem, new_tenant) -> None:
    t: Tenant = new_tenant()
    msgs = [t.message(f"p-{i}") for i in range(5)] + [t.message("p-bad", to=["reject@example.test"])]
    assert t.http.post("/commands/add-messages", json={"messages": msgs}).json()["queued"] == 6
    metrics = httpx.Client(base_url=system.url("metrics"), headers=internal_headers(system), timeout=30)

    def snapshot() -> dict[str, dict]:
        out = {}
        for window in ("24h", "7d", "30d"):
            body = metrics.get(f"/internal/tenants/{t.id}/metrics", params={"window": window}).json()
            out[window] = {k: v for k, v in body.items() if k not in ("from_ts", "to_ts")}
        return out

    before = wait_until(lambda: (s := snapshot())["24h"]["sent"] == 5 and s["24h"]["error"] == 1 and s,
                        what="metrics before replay")
    # operators replay through the API's admin route, which calls the metrics service's internal one
    r = httpx.post(system.url("api") + "/admin/replay/metrics", json={"confirm": True},
                   headers={"X-API-Token": ADMIN_TOKEN}, timeout=30)
    assert r.status_code == 202, r.text
    empty = snapshot()["24h"]
    assert empty["sent"] <= 5  # tables were dropped: counting starts again from offset 0

    def caught_up() -> bool:
        status = metrics.get("/internal/ingest-status").json()
        return status["caught_up"] and not status["replaying"]

    wait_until(caught_up, timeout=60, what="replay to catch up")
    assert snapshot() == before
    api = t.http.get(f"/api/v1/tenants/{t.id}/smtp/metrics", headers={"Authorization": f"Bearer {t.api_key}"})
    assert api.json()["data"]["sent"] == 5 and api.json()["data"]["errors"] == 1


def _all_topic_bytes(bootstrap: str) -> bytes:
    async def read() -> bytes:
        consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
        await consumer.start()
        try:
            cluster = await consumer._client.fetch_all_metadata()
            topics = [x for x in cluster.topics() if not x.startswith("__")]
            tps = [TopicPartition(tp, p) for tp in topics for p in cluster.partitions_for_topic(tp) or ()]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            ends = await consumer.end_offsets(tps)
            chunks: list[bytes] = []
            deadline = asyncio.get_running_loop().time() + 30
            async def behind() -> bool:
                return any([await consumer.position(tp) < ends[tp] for tp in tps])

            while await behind():
                if asyncio.get_running_loop().time() > deadline:
                    raise AssertionError("could not read the topics to their end")
                for records in (await consumer.getmany(timeout_ms=500)).values():
                    for rec in records:
                        chunks.append((rec.key or b"") + (rec.value or b""))
            return b"".join(chunks)
        finally:
            await consumer.stop()

    return asyncio.run(read())


def test_secrets_never_on_topics_or_in_logs(system: LocalSystem, admin: httpx.Client) -> None:
    token, smtp_password = "BEARER-SECRET-7f3a", "SMTP-PASSWORD-91c2"
    r = admin.post("/tenant", json={"id": "vault", "client_base_url": "http://127.0.0.1:9",
                                    "client_auth": {"method": "bearer", "token": token}})
    api_key = r.json()["api_key"]
    r = httpx.post(f"{admin.base_url}/account", headers={"X-API-Token": api_key},
                   json={"id": "acc", "host": "127.0.0.1", "port": 2525, "user": "u", "password": smtp_password})
    assert r.status_code == 200 and smtp_password not in r.text
    data = _all_topic_bytes(system.kafka_bootstrap)
    assert b"vault" in data  # the records are there...
    for secret in (token, smtp_password, api_key, api_key.split("_", 2)[2]):
        assert secret.encode() not in data  # ...but no secret in plaintext
    for name in ("api", "sender", "reporter", "metrics"):
        text = system.log_path(name).read_text(errors="replace")
        assert token not in text and smtp_password not in text and api_key not in text


def test_every_service_stops_cleanly_on_sigterm_and_resumes(system: LocalSystem, new_tenant,
                                                            smtp: RecordingSmtpServer) -> None:
    for name in ("reporter", "metrics", "api", "sender"):
        code = system.stop_service(name, timeout=30)
        assert code == 0, f"{name} exited with {code} on SIGTERM:\n{system.log_tail(name)}"
        system.start_service(name)
    # and the pipeline still works end to end after the restarts
    t: Tenant = new_tenant()
    assert t.http.post("/commands/add-messages", json={"messages": [t.message("after-restart")]}).json()["queued"] == 1
    wait_until(lambda: any(m.message["X-Postbus-Tenant"] == t.id for m in smtp.messages), timeout=60,
               what="mail after restarts")
    wait_until(lambda: any(r["id"] == "after-restart" and "sent_ts" in r for r in t.client.reports()), timeout=60,
               what="report after restarts")
