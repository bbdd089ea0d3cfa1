"""Campaign ownership with two sender processes (docs/campaigns.md, "Ownership"): each campaign is
expanded by the owner of its tenant's commands partition; when one sender is SIGKILLed mid-campaign
the other takes its partitions over, fences the dead one's transactional producer and continues
from the committed cursors: every member of every campaign exactly once in the command log and
delivered.

Its own system (its API's system SMTP account and DNS are this module's test servers) plus a second
sender process."""

from __future__ import annotations

import json
import os
import signal
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from aiokafka.partitioner import murmur2

from infra.supervisor import LocalSystem
from tests.conftest import internal_headers, tenant_factory, wait_until
from tests.integration.provider_support import SYSTEM_FROM, ProviderApi
from tests.integration.test_domains import dns_server
from tests.integration.test_provider_campaigns import RESEND_BOUND, Setup, committed_campaign_ids
from tests.support.prometheus import sender_idle
from tests.support.smtp_server import RecordingSmtpServer
from tests.support.two_senders import SecondSender, system_with_two_senders

ADMIN = "campaign-two-senders-" + uuid.uuid4().hex


@pytest.fixture(scope="module")
def world() -> Iterator[tuple[LocalSystem, ProviderApi, RecordingSmtpServer, SecondSender]]:
    with RecordingSmtpServer() as smtp, RecordingSmtpServer() as mailbox, dns_server() as (dns_port, zone), \
            system_with_two_senders("campaign-two-senders", ADMIN, {
                "POSTBUS_SENDER_MX_LOOKUP": "0",
                "POSTBUS_DNS_RESOLVERS": f"127.0.0.1:{dns_port}", "POSTBUS_DNS_TIMEOUT_S": "2",
                "POSTBUS_SYSTEM_SMTP_HOST": mailbox.host, "POSTBUS_SYSTEM_SMTP_PORT": str(mailbox.port),
                "POSTBUS_SYSTEM_SMTP_TLS": "none", "POSTBUS_SYSTEM_SMTP_FROM": SYSTEM_FROM}) as (sys_, second):
        api = ProviderApi(sys_.url("api"), zone, mailbox)
        try:
            yield sys_, api, smtp, second
        finally:
            api.admin.close()


def test_two_senders_one_killed_every_member_exactly_once(world: Any) -> None:
    system, api, smtp, second = world
    n = 20
    with httpx.Client(base_url=system.url("api"), headers={"X-API-Token": ADMIN}, timeout=30) as admin, \
            tenant_factory(system, admin, smtp) as make:
        # six tenants on six different commands partitions: whichever 4 of the 8 partitions each sender
        # owns, both senders own some of these campaigns (a random six once put five on one sender,
        # and the kill came before the other had started its one campaign)
        partitions = int(system.service_env().get("POSTBUS_TOPIC_PARTITIONS", "8"))
        setups = [Setup(api, make(id=tid), n) for tid in tenant_ids_on_distinct_partitions(6, partitions)]
        campaigns = []
        for s in setups:
            r = s.store(speed=18_000)  # 5 per second each: the kill lands mid-campaign
            assert r.status_code == 200, r.text
            campaigns.append(r.json()["data"]["campaign"]["id"])
        wait_until(lambda: sum(len(s.delivered(smtp)) for s in setups) >= 20, timeout=90, interval=0.05,
                   what="deliveries before the kill")
        wait_until(lambda: _acquired(system.logs_dir / second.log), timeout=60, interval=0.05,
                   what="the second sender expanding a campaign before the kill")
        os.killpg(second.proc.pid, signal.SIGKILL)  # the second sender dies; the first takes its partitions
        second.proc.wait()
        at_kill = sum(len(s.delivered(smtp)) for s in setups)
        assert at_kill < 6 * n, "the kill must land mid-campaign"
        taken = _acquired(system.logs_dir / second.log)
        assert taken, "the second sender expanded no campaign: nothing to take over"
        wait_until(lambda: all(len(s.delivered(smtp)) == n for s in setups), timeout=240,
                   what="every member of every campaign delivered")
        # evidence that no resend is still coming: every campaign finished expanding, and the surviving
        # sender (the only one left) has nothing pending and nothing in flight
        for s, cid in zip(setups, campaigns, strict=True):
            wait_until(lambda s=s, cid=cid: s.campaign(cid)["status"] == "finished", timeout=60,
                       what="campaign finished")
        wait_until(lambda: sender_idle(system.url("sender"), internal_headers(system)), timeout=60,
                   what="the surviving sender idle")
        for s, cid in zip(setups, campaigns, strict=True):
            got = s.delivered(smtp)
            assert set(got) == set(s.emails)
            assert sum(v - 1 for v in got.values()) <= RESEND_BOUND  # SMTP in flight at the kill only
            ids = committed_campaign_ids(system.kafka_bootstrap, s.t.id, cid)
            assert len(ids) == n and set(ids.values()) == {1}, (s.t.id, ids.most_common(3))
        # the first sender took the dead one's partitions over (fencing its transactional producer)
        assert taken <= _acquired(system.logs_dir / "sender.log")


def _acquired(log: Any) -> set[int]:
    """Partitions a sender acquired for campaign expansion (its log)."""
    out = set()
    for line in log.read_text(errors="replace").splitlines():
        if '"campaign partition acquired"' in line:
            out.add(json.loads(line)["partition"])
    return out


def tenant_ids_on_distinct_partitions(k: int, partitions: int) -> list[str]:
    """``k`` tenant ids whose commands partitions (the producers' murmur2 partitioner, as
    services/sender/campaign_runtime.py's ``partition_of``) are all different."""
    ids: dict[int, str] = {}
    while len(ids) < k:
        tid = "t" + uuid.uuid4().hex[:10]
        ids.setdefault((murmur2(tid.encode()) & 0x7FFFFFFF) % partitions, tid)
    return list(ids.values())
