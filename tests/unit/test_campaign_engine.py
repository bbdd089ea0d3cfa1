"""The campaign expansion engine (services/sender/campaigns.py) with fakes: no Kafka.

The fake ``commit`` is the Kafka transaction: it either records the step's messages AND its cursor,
or (a crash) nothing of either."""

from __future__ import annotations

import asyncio
import html
from typing import Any

import pytest

from services.sender.campaigns import (
    MAX_SPEED,
    CampaignDeps,
    CampaignEngine,
    TokenBucket,
    campaign_key,
    clamp_speed,
)

T = "acme"


class Clock:
    def __init__(self, t: float = 1_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class World:
    """Topics as the engine sees them: campaigns, committed cursors, members, suppression,
    and the log of committed messages.add commands."""

    def __init__(self, n_members: int = 20, speed: int = MAX_SPEED) -> None:
        self.clock = Clock()
        self.campaigns: dict[str, dict[str, Any]] = {}
        self.cursors: dict[str, dict[str, Any]] = {}  # committed
        self.members: dict[int, dict[str, Any]] = {}
        self.suppressed: set[str] = set()
        self.held: set[str] = set()
        self.committed: list[dict[str, Any]] = []  # messages of committed steps
        self.commits = 0
        self.fail_commit_at: int | None = None  # the n-th commit (1-based) raises: a crash mid-step
        self.owned: set[int] | None = None
        self.acquired: list[int] = []
        self.released: list[int] = []
        self.catch_ups = 0
        self.late_members: list[dict[str, Any]] = []  # become visible only on catch_up
        for i in range(1, n_members + 1):
            self.add_member(i)
        self.campaigns[campaign_key(T, 7)] = {
            "campaign_id": 7, "tenant_id": T, "user_id": 1, "name": "May", "template_id": 1, "mailing_list_id": 3,
            "segment": "all", "begins_ts": int(self.clock.t * 1000) - 1, "subject": "Hi {{ name }}",
            "html_body": "<p>Hello {{ name }} ({{ email }}) {{ city }}</p><a href=\"{{ unsubscribe_url }}\">u</a>",
            "text_body": "Hello {{ name }}", "from_email": "news@acme.test", "from_name": "Acme",
            "reply_email": None, "sender_email": None, "speed": speed, "vmta_id": "main",
            "bounce_email": "bounces@acme.test", "url_domain": None, "paused": False, "created_ts": 1,
            "updated_ts": 1}

    def add_member(self, i: int, status: str = "subscribed", email: str | None = None) -> None:
        self.members[i] = {"member_id": i, "list_id": 3, "tenant_id": T, "email": email or f"m{i}@rcpt.test",
                           "name": f"Member {i}", "fields": {"city": f"C{i}"}, "status": status}

    def members_after(self, tenant: str, list_id: int, after: int, limit: int) -> list[dict[str, Any]]:
        out = sorted((m for m in self.members.values() if m["tenant_id"] == tenant and m["list_id"] == list_id
                      and m["member_id"] > after), key=lambda m: m["member_id"])
        return out[:limit]

    async def commit(self, partition: int, tenant: str, messages: list[dict[str, Any]],
                     cursor: dict[str, Any]) -> None:
        self.commits += 1
        if self.fail_commit_at is not None and self.commits == self.fail_commit_at:
            raise RuntimeError("killed mid-transaction")  # nothing of the step becomes visible
        self.committed.extend(messages)
        self.cursors[campaign_key(tenant, cursor["campaign_id"])] = dict(cursor)

    async def acquire(self, p: int) -> None:
        self.acquired.append(p)

    async def release(self, p: int) -> None:
        self.released.append(p)

    async def catch_up(self) -> None:
        self.catch_ups += 1
        for m in self.late_members:
            self.members[m["member_id"]] = m
        self.late_members.clear()

    def engine(self, **kw: Any) -> CampaignEngine:
        def render_html(src: str, ctx: dict[str, Any]) -> str:  # stands in for common/templating
            out = src
            for k, v in ctx.items():
                out = out.replace("{{ " + k + " }}", html.escape(str(v)))
            if "{{" in out:
                raise ValueError("undefined variable")
            return out

        def render_text(src: str, ctx: dict[str, Any]) -> str:
            out = src
            for k, v in ctx.items():
                out = out.replace("{{ " + k + " }}", str(v))
            return out

        return CampaignEngine(CampaignDeps(
            campaigns=lambda: list(self.campaigns.values()), cursor=self.cursors.get,
            members_after=self.members_after, suppressed=lambda t, a: f"{t}/{a.lower()}" in self.suppressed,
            held=lambda t, b: f"{t}/{b}" in self.held, partition_of=lambda t: 5, owned=lambda: self.owned,
            acquire=self.acquire, release=self.release, commit=self.commit, catch_up_members=self.catch_up,
            render_html=render_html, render_text=render_text,
            unsubscribe_url=lambda t, mid, rcpt, acc: f"https://track.test/u/{mid}",
            clock=self.clock, **kw))

    def ids(self) -> list[str]:
        return [m["id"] for m in self.committed]

    def cursor(self) -> dict[str, Any]:
        return self.cursors[campaign_key(T, 7)]


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def drain(w: World, e: CampaignEngine, ticks: int = 200, dt: float = 1.0) -> None:
    for _ in range(ticks):
        await e.tick()
        if w.cursors.get(campaign_key(T, 7), {}).get("finished"):
            return
        w.clock.t += dt


def test_cursor_expands_every_member_once_in_member_id_order() -> None:
    w = World(n_members=1200)
    e = w.engine(max_step=500)
    run(drain(w, e))
    assert w.ids() == [f"campaign-7-{i}" for i in range(1, 1201)]
    cur = w.cursor()
    assert cur["finished"] and cur["queued"] == 1200 and cur["last_member_id"] == 1200
    assert w.commits >= 3  # 500 per transaction at most
    m = w.committed[41]
    assert m["batch_code"] == "campaign-7" and m["tenant_id"] == T and m["account_id"] == "main"
    assert m["to"] == ["Member 42 <m42@rcpt.test>"] and m["from_addr"] == "Acme <news@acme.test>"
    assert m["return_path"] == "bounces@acme.test" and m["subject"] == "Hi Member 42"
    assert "C42" in m["body_html"] and "https://track.test/u/campaign-7-42" in m["body_html"]
    assert m["headers"]["List-Unsubscribe"] == "<https://track.test/u/campaign-7-42>"
    # a later tick of a finished campaign does nothing
    before = w.commits
    run(e.tick())
    assert w.commits == before


def test_not_due_before_begins_at() -> None:
    w = World(n_members=3)
    w.campaigns[campaign_key(T, 7)]["begins_ts"] = int((w.clock.t + 60) * 1000)
    e = w.engine()
    delay = run(e.tick())
    assert w.commits == 0 and 0 < delay <= 1.0
    w.clock.t += 61
    run(drain(w, e))
    assert len(w.ids()) == 3


def test_speed_is_a_token_bucket_of_messages_per_hour() -> None:
    w = World(n_members=100, speed=7200)  # 2 messages per second
    e = w.engine()
    for _ in range(10):  # 10 s in steps of 0.25 s
        for _ in range(4):
            run(e.tick())
            w.clock.t += 0.25
    # at most 1 + 2/s * 10 s, and the bucket does not fall behind either
    assert 18 <= len(w.ids()) <= 21
    # an hour-long pause of the clock banks at most one second's worth
    w.clock.t += 3600
    n = len(w.ids())
    run(e.tick())
    assert len(w.ids()) - n <= 2


def test_speed_bounds() -> None:
    assert clamp_speed(None) == clamp_speed(0) == clamp_speed("x") == 10_000
    assert clamp_speed(10**12) == MAX_SPEED
    b = TokenBucket(3600, now=0.0)
    assert b.available(0.0) == 1.0 and b.available(100.0) == 1.0  # capacity: one second's worth, at least 1


def test_unsubscribed_and_suppressed_are_skipped_and_counted() -> None:
    w = World(n_members=10)
    w.add_member(3, status="unsubscribed")
    w.add_member(4, status="unsubscribed")
    w.add_member(6, email="Blocked@Rcpt.test")
    w.suppressed.add(f"{T}/blocked@rcpt.test")
    e = w.engine()
    run(drain(w, e))
    assert w.ids() == [f"campaign-7-{i}" for i in (1, 2, 5, 7, 8, 9, 10)]
    cur = w.cursor()
    assert (cur["queued"], cur["skipped_unsubscribed"], cur["skipped_suppressed"]) == (7, 2, 1)
    assert cur["finished"]


def test_skipped_members_take_no_token() -> None:
    w = World(n_members=20, speed=3600)  # one per second
    for i in range(1, 11):
        w.add_member(i, status="unsubscribed")
    e = w.engine()
    run(e.tick())  # one token: ten skipped, the first subscribed member queued
    assert w.ids() == ["campaign-7-11"]
    assert w.cursor()["skipped_unsubscribed"] == 10


def test_pause_holds_the_expansion_and_resume_continues_from_the_cursor() -> None:
    w = World(n_members=30, speed=3600)
    e = w.engine()
    for _ in range(5):
        run(e.tick())
        w.clock.t += 1
    assert len(w.ids()) == 5  # positive control: it expands while not paused
    w.campaigns[campaign_key(T, 7)]["paused"] = True
    for _ in range(10):
        run(e.tick())
        w.clock.t += 1
    assert len(w.ids()) == 5
    # the batch suspended by other means (messages.suspend of its batch code) holds it too
    w.campaigns[campaign_key(T, 7)]["paused"] = False
    w.held.add(f"{T}/campaign-7")
    run(e.tick())
    assert len(w.ids()) == 5
    w.held.clear()
    run(drain(w, e))
    assert w.ids() == [f"campaign-7-{i}" for i in range(1, 31)]


def test_restart_from_the_committed_cursor_neither_skips_nor_repeats() -> None:
    w = World(n_members=50, speed=MAX_SPEED)
    e = w.engine(max_step=7)
    w.fail_commit_at = 4  # the 4th transaction is cut by a kill: none of it is visible
    for _ in range(10):
        run(e.tick())
        w.clock.t += 1
    # a new process (new engine, empty memory) resumes from the committed cursor
    w.fail_commit_at = None
    e2 = w.engine(max_step=7)
    run(drain(w, e2))
    assert w.ids() == [f"campaign-7-{i}" for i in range(1, 51)]
    assert len(set(w.ids())) == 50 and w.cursor()["queued"] == 50


def test_a_failed_commit_reacquires_the_partition_and_reloads_the_cursor() -> None:
    w = World(n_members=10)
    e = w.engine(max_step=3)
    w.fail_commit_at = 2
    run(e.tick())  # commit 1 ok
    w.clock.t += 1
    run(e.tick())  # commit 2 fails: the partition is dropped
    assert w.acquired == [5] and w.commits == 2
    w.clock.t += 1
    run(e.tick())
    assert w.acquired == [5, 5]  # acquired again (the previous producer may be fenced), cursor reloaded
    run(drain(w, e))
    assert w.ids() == [f"campaign-7-{i}" for i in range(1, 11)]


def test_only_the_owner_of_the_tenant_partition_expands() -> None:
    w = World(n_members=5)
    w.owned = {1, 2}
    e = w.engine()
    run(e.tick())
    assert w.commits == 0 and w.acquired == []
    w.owned = {5}
    run(e.tick())
    assert w.acquired == [5] and w.commits == 1
    w.owned = set()  # revoked
    w.add_member(6)
    run(e.tick())
    assert w.released == [5] and w.commits == 1


def test_members_view_behind_is_caught_up_before_finishing() -> None:
    w = World(n_members=2)
    late = {"member_id": 3, "list_id": 3, "tenant_id": T, "email": "late@rcpt.test", "name": None,
            "fields": {"city": "X"}, "status": "subscribed"}
    w.late_members.append(late)
    e = w.engine()
    run(drain(w, e))
    assert w.ids() == ["campaign-7-1", "campaign-7-2", "campaign-7-3"]
    assert w.catch_ups >= 1


def test_a_member_whose_template_does_not_render_is_skipped_and_counted() -> None:
    w = World(n_members=3)
    w.campaigns[campaign_key(T, 7)]["html_body"] = "<p>{{ city }}</p>"
    w.members[2]["fields"] = {}  # no city: the fake renderer refuses the undefined variable
    e = w.engine()
    run(drain(w, e))
    assert w.ids() == ["campaign-7-1", "campaign-7-3"]
    assert w.cursor()["skipped_invalid"] == 1


@pytest.mark.parametrize("name", ["<b>x</b>"])
def test_member_data_is_escaped_in_html(name: str) -> None:
    w = World(n_members=1)
    w.members[1]["name"] = name
    e = w.engine()
    run(drain(w, e))
    assert "<b>x</b>" not in w.committed[0]["body_html"] and "&lt;b&gt;" in w.committed[0]["body_html"]


def test_a_member_name_cannot_break_the_to_header() -> None:
    w = World(n_members=1)
    w.members[1]["name"] = "Eve\r\nBcc: victim@else.test"
    e = w.engine()
    run(drain(w, e))
    (to,) = w.committed[0]["to"]
    assert "\r" not in to and "\n" not in to and to.endswith("<m1@rcpt.test>")
