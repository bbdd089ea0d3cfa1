"""Provider-API campaigns against the running system, as a client of the seed document writes them:
a verified domain and sender, a template, a list with members, then ``smtp-campaign-store`` and the
expansion by the sender into ordinary messages delivered to an aiosmtpd server (the ``smtp``
fixture). docs/campaigns.md describes the engine."""

from __future__ import annotations

import asyncio
import collections
import re
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import httpx
from aiokafka import AIOKafkaConsumer, TopicPartition

from infra.supervisor import LocalSystem
from services.common.avro import codec
from services.common.settings import Settings
from services.common.topics import COMMANDS
from tests.conftest import wait_until
from tests.integration.provider_support import ProviderApi, User, domain_name, login, papi  # noqa: F401
from tests.support.prometheus import sender_metric, tenant_idle_at_sender
from tests.support.smtp_server import RecordingSmtpServer

# tests/integration/test_durability.py: what a sender crash may resend per account (SMTP in flight)
CONNECTIONS_PER_ACCOUNT = 8
UNFLUSHED_PER_WORKER = Settings.model_fields["sender_unflushed_per_worker"].default  # the default
RESEND_BOUND = CONNECTIONS_PER_ACCOUNT * (1 + UNFLUSHED_PER_WORKER)

HTML = ('<html><body><p>Hello {{ name }} from {{ city }}</p>'
        '<p><a href="{{ unsubscribe_url }}">Unsubscribe</a></p></body></html>')


def utc(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")


class Setup:
    """A user with a verified domain + sender, a template and a list of ``n`` members."""

    def __init__(self, papi: ProviderApi, tenant: Any, n: int, tag: str | None = None) -> None:  # noqa: F811
        self.papi, self.t = papi, tenant
        self.u: User = login(papi, tenant)
        self.tag = tag or uuid.uuid4().hex[:8]
        self.domain = domain_name()
        u = self.u
        r = u.post("smtp-domain-add", domain_name=self.domain)
        assert r.status_code == 200, r.text
        view = u.get("smtp-domain-view", domain_name=self.domain).json()["data"]
        papi.publish(view["dns_records"])
        r = u.get("smtp-domain-verify", domain_name=self.domain)
        assert r.status_code == 200 and r.json()["data"]["message"] == "Verified Successfully", r.text
        self.from_email = f"news@{self.domain}"
        r = u.post("smtp-domain-sender-add", domain_name=self.domain, sender_name="News", from_email=self.from_email)
        assert r.status_code == 200, r.text
        self.sender_id = r.json()["data"]["sender"]["id"]
        assert u.post("smtp-domain-sender-verify", from_email=self.from_email).status_code == 200
        mail = wait_until(lambda: next((m for m in papi.mailbox.messages if self.from_email in m.rcpt_tos), None),
                          timeout=30, what="verification mail")
        link = re.search(r"https?://[^\s\"<>]+smtp-sender-confirm\?token=[^\s\"<>]+", mail.body_text())
        assert link, mail.body_text()
        assert httpx.get(link.group(0).replace("&amp;", "&"), timeout=30).status_code == 200
        r = u.post("smtp-template-add", name="Newsletter", html_body=HTML, subject="Hi {{ name }}")
        assert r.status_code == 200, r.text
        self.template_id = r.json()["data"]["template"]["id"]
        r = u.post("smtp-mailing-add", name="Subscribers")
        assert r.status_code == 200, r.text
        self.list_id = r.json()["data"]["mailing"]["id"]
        self.emails = [f"m{i:03d}-{self.tag}@rcpt.example.test" for i in range(n)]
        self.add_members([{"email": e, "name": f"Member {i}", "fields": {"city": f"City{i}"}}
                          for i, e in enumerate(self.emails)])

    def add_list(self, name: str, emails: list[str]) -> int:
        """Another list of the same user (its members: ``emails``); returns its id."""
        r = self.u.post("smtp-mailing-add", name=name)
        assert r.status_code == 200, r.text
        list_id: int = r.json()["data"]["mailing"]["id"]
        self.add_members([{"email": e, "name": e, "fields": {"city": "Elsewhere"}} for e in emails], list_id)
        return list_id

    def add_members(self, members: list[dict[str, Any]], list_id: int | None = None) -> None:
        for start in range(0, len(members), 10_000):
            r = self.u.post("smtp-mailing-members-add", mailing_list_id=list_id or self.list_id,
                            members=members[start:start + 10_000])
            assert r.status_code == 200 and not r.json()["data"]["refused"], r.text

    def store(self, *, begins: float | None = None, speed: int = 36_000, list_id: int | None = None,
              **extra: Any) -> httpx.Response:
        body = {"template_id": self.template_id, "mailing_list_id": list_id or self.list_id,
                "campaign_name": f"May {self.tag}", "begins_at": utc(begins if begins is not None else time.time()),
                "segment": "all",
                "all_request": {"from_email": self.from_email, "from_name": "Demo Team", "speed": speed,
                                "vmta_id": self.t.account_id, "bounce_email_id": self.sender_id,
                                "url_domain_id": 0, **extra}}
        return self.u.post("smtp-campaign-store", body)

    def campaign(self, cid: int) -> dict[str, Any]:
        r = self.u.get("smtp-campaign-edit", campaign_id=cid)
        assert r.status_code == 200, r.text
        return r.json()["data"]["campaign"]  # type: ignore[no-any-return]

    def delivered(self, smtp: RecordingSmtpServer, emails: list[str] | None = None) -> collections.Counter[str]:
        mine = set(self.emails if emails is None else emails)
        return collections.Counter(r for m in smtp.messages for r in m.rcpt_tos if r in mine)

    def sent_by_sender(self, system: LocalSystem) -> float:
        """What the sender counted as sent for the tenant (``gmp_sent_total``)."""
        return sender_metric(system, "gmp_sent_total", tenant_id=self.t.id)


def committed_campaign_ids(bootstrap: str, tenant_id: str, campaign_id: int) -> collections.Counter[str]:
    """Every message id of the campaign in the committed ``messages.add`` commands of the log."""
    prefix = f"campaign-{campaign_id}-"

    async def read() -> collections.Counter[str]:
        consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                    isolation_level="read_committed")
        await consumer.start()
        try:
            parts = (await consumer._client.fetch_all_metadata()).partitions_for_topic(COMMANDS) or set()
            tps = [TopicPartition(COMMANDS, p) for p in parts]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            ends = await consumer.end_offsets(tps)
            out: collections.Counter[str] = collections.Counter()
            deadline = asyncio.get_running_loop().time() + 60
            while any([await consumer.position(tp) < ends[tp] for tp in tps]):
                assert asyncio.get_running_loop().time() < deadline, "could not read the commands log"
                for records in (await consumer.getmany(timeout_ms=500)).values():
                    for rec in records:
                        if rec.key != tenant_id.encode():
                            continue
                        _, env = codec().decode(rec.value, expect="CommandEnvelope")
                        if env["type"] != "messages.add":
                            continue
                        _, payload = codec().decode(env["payload"])
                        out.update(m["id"] for m in payload["messages"] if m["id"].startswith(prefix))
            return out
        finally:
            await consumer.stop()

    return asyncio.run(read())


def test_20_member_campaign_delivered_exactly_once_per_member(papi: ProviderApi, new_tenant: Any,  # noqa: F811
                                                              smtp: RecordingSmtpServer, system: LocalSystem) -> None:
    t = new_tenant()
    s = Setup(papi, t, 20)
    s.add_members([{"email": f"gone-{s.tag}@rcpt.example.test", "status": "unsubscribed"}])
    # a suppressed member: the tenant's suppression list (the mail-proxy API)
    blocked = f"blocked-{s.tag}@rcpt.example.test"
    r = t.http.post("/suppressions", json={"tenant_id": t.id, "addresses": [blocked]})
    assert r.status_code == 200, r.text
    s.add_members([{"email": blocked, "name": "Blocked"}])
    r = s.store(speed=36_000)
    assert r.status_code == 200, r.text
    camp = r.json()["data"]["campaign"]
    cid = camp["id"]
    assert camp["status"] in ("scheduled", "sending") and camp["batch_code"] == f"campaign-{cid}"

    wait_until(lambda: len(s.delivered(smtp)) == 20, timeout=90, what="20 members delivered")
    # evidence that no second delivery is still coming: the campaign has expanded its whole list, the
    # sender has nothing of the tenant's queued, held or in flight, and it counted 20 sends
    wait_until(lambda: s.campaign(cid)["status"] == "finished" and tenant_idle_at_sender(system, t.id),
               timeout=60, what="expansion finished and the tenant idle at the sender")
    assert s.sent_by_sender(system) == 20
    got = s.delivered(smtp)
    assert set(got) == set(s.emails) and set(got.values()) == {1}
    assert not any(r in (blocked, f"gone-{s.tag}@rcpt.example.test") for m in smtp.messages for r in m.rcpt_tos)
    # the message: rendered per member, autoescaped, from the verified sender, in the campaign's batch
    m = next(m for m in smtp.messages if s.emails[7] in m.rcpt_tos)
    assert m.subject == "Hi Member 7" and "City7" in m.message.get_body(("html",)).get_content()
    assert m.message["X-Postbus-Message-Id"].startswith(f"campaign-{cid}-")
    assert s.from_email in m.message["From"] and m.message["List-Unsubscribe"]
    assert m.mail_from == s.from_email or m.mail_from.startswith("bounce+")  # bounce_email_id, or VERP

    def finished() -> dict[str, Any] | None:
        c = s.campaign(cid)
        return c if c["status"] == "finished" and c["stats"]["sent"] == 20 else None

    c = wait_until(finished, timeout=60, what="finished with 20 sent in the counts")
    assert c["stats"]["queued"] == 20 and c["stats"]["delivered"] == 20
    assert c["stats"]["skipped_unsubscribed"] == 1 and c["stats"]["skipped_suppressed"] == 1
    index = s.u.get("smtp-campaign-index").json()["data"]["campaigns"]
    assert [x["id"] for x in index] == [cid] and index[0]["stats"]["sent"] == 20
    # the tenant SMTP metrics per campaign
    r = httpx.get(f"{system.url('api')}/api/v1/tenants/{t.id}/smtp/metrics",
                  params={"window": "24h", "group_by": "campaign"},
                  headers={"Authorization": f"Bearer {t.api_key}"}, timeout=30)
    assert r.status_code == 200, r.text
    groups = r.json()["data"]["campaigns"]
    assert [g["campaign_id"] for g in groups] == [cid] and groups[0]["sent"] == 20
    # exactly once in the command log too
    ids = committed_campaign_ids(system.kafka_bootstrap, t.id, cid)
    assert len(ids) == 20 and set(ids.values()) == {1}


def test_speed_is_respected(papi: ProviderApi, new_tenant: Any, smtp: RecordingSmtpServer) -> None:  # noqa: F811
    t = new_tenant()
    s = Setup(papi, t, 12)
    r = s.store(speed=7_200)  # 2 messages per second
    assert r.status_code == 200, r.text
    wait_until(lambda: len(s.delivered(smtp)) == 12, timeout=90, what="12 members delivered")
    times = sorted(m.received_at for m in smtp.messages if any(r in s.emails for r in m.rcpt_tos))
    # the bucket allows 1 + 2/s * t: 12 messages need at least 5.5 s; an unthrottled run takes < 1 s
    assert times[-1] - times[0] >= 4.5, times
    # and no 2-second window holds more than 1 + 2*2 (+1 for delivery jitter)
    assert max(sum(1 for x in times if a <= x < a + 2.0) for a in times) <= 6


def test_pause_holds_then_resume_completes(papi: ProviderApi, new_tenant: Any,  # noqa: F811
                                           smtp: RecordingSmtpServer, system: LocalSystem) -> None:
    t = new_tenant()
    s = Setup(papi, t, 20)
    # a second campaign of the same tenant, never paused: the evidence that the sender went on past the
    # pause. Its steps are taken by the same expansion loop as the paused one's, and its messages are
    # commands on the same partition, after the pause's suspend command
    others = [f"b{i:03d}-{s.tag}@rcpt.example.test" for i in range(30)]
    other_list = s.add_list("Others", others)
    r = s.store(speed=3_600)  # 1 per second
    cid = r.json()["data"]["campaign"]["id"]
    r = s.store(speed=3_600, list_id=other_list)
    assert r.status_code == 200, r.text
    other_cid = r.json()["data"]["campaign"]["id"]
    # positive control: it is sending
    wait_until(lambda: len(s.delivered(smtp)) >= 3, timeout=60, what="the first deliveries")
    r = s.u.post("smtp-campaign-pause", campaign_id=cid)
    assert r.status_code == 200 and r.json()["data"]["paused"] is True, r.text
    assert s.campaign(cid)["status"] == "paused"
    # two more of the other campaign: at 1/s with at most one queued ahead, the second was expanded after
    # the pause answered, so the sender has processed the suspend command (and sent or held what it had
    # of the paused campaign) before it accepted that message
    mark = len(s.delivered(smtp, others))
    wait_until(lambda: len(s.delivered(smtp, others)) >= mark + 3, timeout=30, what="the other campaign going on")
    held_at, queued_at = len(s.delivered(smtp)), s.campaign(cid)["stats"]["queued"]
    # six more steps of the other campaign's expansion loop: at 1/s the paused one would have had six too
    wait_until(lambda: len(s.delivered(smtp, others)) >= mark + 9, timeout=30, what="six more of the other campaign")
    assert len(s.delivered(smtp)) == held_at < 20
    assert s.campaign(cid)["status"] == "paused" and s.campaign(cid)["stats"]["queued"] == queued_at
    r = s.u.post("smtp-campaign-update", {"campaign_id": other_cid,  # the other one: done quickly
                                          "all_request": {"from_email": s.from_email, "speed": 360_000,
                                                          "vmta_id": t.account_id}})
    assert r.status_code == 200, r.text
    r = s.u.post("smtp-campaign-pause", campaign_id=cid)
    assert r.status_code == 200 and r.json()["data"]["paused"] is False, r.text
    # speed up the rest (update while not finished)
    r = s.u.post("smtp-campaign-update", {"campaign_id": cid, "campaign_name": "Renamed",
                                          "all_request": {"from_email": s.from_email, "speed": 36_000,
                                                          "vmta_id": t.account_id, "subject": "New {{ name }}"}})
    assert r.status_code == 200 and r.json()["data"] == {"campaigns": "update sucessfully"}, r.text
    wait_until(lambda: len(s.delivered(smtp)) == 20 and len(s.delivered(smtp, others)) == 30, timeout=60,
               what="all 20 after resume, and the other campaign's 30")
    # evidence that no second delivery is still coming: both campaigns expanded their whole list, the
    # sender has nothing of the tenant's queued, held or in flight, and it counted one send a member
    c = wait_until(lambda: (c := s.campaign(cid))["status"] == "finished" and c, timeout=30, what="finished")
    wait_until(lambda: s.campaign(other_cid)["status"] == "finished" and tenant_idle_at_sender(system, t.id),
               timeout=60, what="the other campaign finished and the tenant idle at the sender")
    assert s.sent_by_sender(system) == 50
    got = s.delivered(smtp)
    assert set(got.values()) == {1} and set(s.delivered(smtp, others).values()) == {1}
    assert c["campaign_name"] == "Renamed" and c["speed"] == 36_000
    subjects = {m.subject for m in smtp.messages if any(r in s.emails for r in m.rcpt_tos)}
    assert any(x.startswith("New ") for x in subjects)  # the update reached members expanded after it
    # a finished campaign can no longer be changed
    r = s.u.post("smtp-campaign-update", {"campaign_id": cid, "all_request": {"from_email": s.from_email}})
    assert r.status_code == 422 and r.json()["success"] is False, r.text


def test_campaign_errors_and_isolation(papi: ProviderApi, new_tenant: Any) -> None:  # noqa: F811
    t = new_tenant()
    s = Setup(papi, t, 1)
    r = s.store(begins=time.time() + 3600)
    assert r.status_code == 200, r.text
    cid = r.json()["data"]["campaign"]["id"]
    assert s.campaign(cid)["status"] == "scheduled"
    create = s.u.get("smtp-campaign-create").json()["data"]
    assert {"senderDetails", "templates", "url_domains", "vmtas", "bounce_email_id", "speed"} <= set(create)
    assert [v["id"] for v in create["vmtas"]] == [t.account_id]
    edit = s.u.get("smtp-campaign-edit", campaign_id=cid).json()["data"]
    assert {"campaign", "senderDetails", "templates", "url_domains", "vmtas", "bounce_email_id", "speed"} <= set(edit)
    # template that does not compile: refused at store time
    r = s.store(html_body="<p>{{ name </p>")
    assert r.status_code == 422 and r.json()["success"] is False and "not a valid template" in r.json()["data"][0]
    # an unverified sender
    r = s.u.post("smtp-domain-sender-add", domain_name=s.domain, from_email=f"other@{s.domain}")
    assert r.status_code == 200
    r = s.store(from_email=f"other@{s.domain}")
    assert r.status_code == 422 and r.json()["data"] == ["The from email is not verified."]
    # user_id missing / wrong
    r = s.u.http.get("/api/v1/smtp-campaign-index")
    assert r.status_code == 422 and r.json() == {"success": False, "data": ["The user id field is required."]}
    r = s.u.get("smtp-campaign-edit", campaign_id=cid, user_id=s.u.id + 100000)
    assert r.status_code == 403 and r.json() == {"success": False, "data": ["Wrong user id"]}
    # another user of another tenant sees nothing of it and cannot touch it
    other = login(papi, new_tenant())
    assert other.get("smtp-campaign-index").json()["data"]["campaigns"] == []
    for path, call in (("smtp-campaign-edit", lambda: other.get("smtp-campaign-edit", campaign_id=cid)),
                       ("smtp-campaign-pause", lambda: other.post("smtp-campaign-pause", campaign_id=cid)),
                       ("smtp-campaign-update", lambda: other.post("smtp-campaign-update", campaign_id=cid,
                                                                   all_request={"from_email": s.from_email}))):
        r = call()
        assert r.status_code == 404 and r.json() == {"success": False, "data": ["The campaign was not found."]}, path
    assert s.campaign(cid)["status"] == "scheduled" and s.campaign(cid)["campaign_name"] == f"May {s.tag}"


def test_sender_sigkilled_mid_campaign_no_member_missing_or_doubled(papi: ProviderApi, new_tenant: Any,  # noqa: F811
                                                                    smtp: RecordingSmtpServer,
                                                                    system: LocalSystem) -> None:
    t = new_tenant()
    n = 60
    s = Setup(papi, t, n)
    r = s.store(speed=36_000)  # 10 per second: the kill lands mid-expansion
    cid = r.json()["data"]["campaign"]["id"]
    wait_until(lambda: len(s.delivered(smtp)) >= 10, timeout=60, interval=0.05, what="10 deliveries before the kill")
    system.kill_service("sender")
    at_kill = len(s.delivered(smtp))
    assert at_kill < n, "the kill must land mid-campaign"
    system.start_service("sender")
    wait_until(lambda: len(s.delivered(smtp)) == n, timeout=180, what="every member delivered after the restart")
    # evidence that no resend is still coming: the campaign has expanded its whole list and the restarted
    # sender has nothing of the tenant's queued, held or in flight
    wait_until(lambda: s.campaign(cid)["status"] == "finished" and tenant_idle_at_sender(system, t.id),
               timeout=60, what="expansion finished and the tenant idle at the sender")
    got = s.delivered(smtp)
    duplicates = sum(v - 1 for v in got.values())
    print(f"\nkilled at {at_kill}/{n} delivered; SMTP duplicates after restart: {duplicates}")
    assert set(got) == set(s.emails)
    # the expansion: every member exactly once in the committed log (no member skipped or repeated)
    ids = committed_campaign_ids(system.kafka_bootstrap, t.id, cid)
    assert set(ids) == {f"campaign-{cid}-{m}" for m in _member_ids(s)} and set(ids.values()) == {1}
    # delivery: at most what the sender had in flight at the kill may be resent (test_durability's bound)
    assert duplicates <= RESEND_BOUND
    c = wait_until(lambda: (c := s.campaign(cid))["status"] == "finished" and c, timeout=30, what="finished")
    assert c["stats"]["queued"] == n


def _member_ids(s: Setup) -> list[int]:
    r = s.u.get("smtp-mailing-members", mailing_list_id=s.list_id, per_page=1000)
    assert r.status_code == 200, r.text
    return [int(m["id"]) for m in r.json()["data"]["members"]]
