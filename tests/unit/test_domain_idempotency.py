"""The outbound ledger's dedupe of increments (domain_quota "idempotent increments"), driven the way
sender/domain_ledger.py drives it: a marks dict, live_mark within the window, increment_once for a
``domain.increment``, send_once for a ``sent`` event of the domain."""

from __future__ import annotations

from typing import Any

from services.common import domain_quota as q
from services.common.dns_check import combined

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z
WINDOW = 3_600_000


class Ledger:
    """One domain's entry and its marks, applied like the ledger agent does."""

    def __init__(self, **limits: Any) -> None:
        self.entry = q.new_entry("shop.example", "t1", 0, T0)
        self.entry.update(limits)
        self.marks: dict[str, dict[str, Any]] = {}

    def increment(self, ts: int, key: str | None = None, message_id: str | None = None) -> tuple[Any, ...]:
        cmd = {"idempotency_key": key, "message_id": message_id}
        mark_key = q.increment_mark(cmd, "t1", "shop.example")
        mark = q.live_mark(self.marks.get(mark_key), ts, WINDOW) if mark_key else None
        replay, new = q.increment_once(self.entry, mark, mark_key is not None, ts, 0)
        if replay is not None:
            return replay["res"][0], replay["res"][1], replay["today"], True
        if mark_key and new is not None:
            self.marks[mark_key] = new
        return self.entry["res"][0], self.entry["res"][1], self.entry["today"], False

    def sent(self, ts: int, message_id: str) -> None:
        mark_key = q.mark_key("t1", "shop.example", q.MARK_MESSAGE, message_id)
        self.marks[mark_key] = q.send_once(self.entry, q.live_mark(self.marks.get(mark_key), ts, WINDOW), ts, 0)


def test_a_retried_key_counts_once_and_gets_the_first_answer() -> None:
    led = Ledger()
    assert led.increment(T0, key="k1") == (True, None, 1, False)
    assert led.increment(T0 + 10, key="k1") == (True, None, 1, True)  # retry: nothing counted
    assert led.increment(T0 + 20, key="k2") == (True, None, 2, False)  # another key counts (control)
    assert led.increment(T0 + 30) == (True, None, 3, False)  # no key: every call counts
    assert led.increment(T0 + 40) == (True, None, 4, False)
    assert led.increment(T0 + 50, key="k1") == (True, None, 1, True)  # the first answer, not today's count
    assert (led.entry["today"], led.entry["msent"]) == (4, 4)


def test_a_key_is_remembered_for_the_window_only() -> None:
    led = Ledger()
    led.increment(T0, key="k1")
    assert led.increment(T0 + WINDOW - 1, key="k1")[3] is True
    assert led.increment(T0 + WINDOW, key="k1") == (True, None, 2, False)  # past the window: a new increment
    # the purge takes marks written more than a window ago (wall clock of the write)
    written = led.marks[q.mark_key("t1", "shop.example", q.MARK_KEY, "k1")]["w"]
    assert q.purge_before(led.marks, written + WINDOW - 1, WINDOW) == []
    assert q.purge_before(led.marks, written + WINDOW, WINDOW) == [q.mark_key("t1", "shop.example", "k", "k1")]


def test_a_hard_refusal_is_replayed_as_a_refusal() -> None:
    led = Ledger(daily=1, enf="hard")
    assert led.increment(T0, key="a") == (True, None, 1, False)
    assert led.increment(T0 + 1, key="b") == (False, "daily_limit_exceeded", 1, False)
    assert led.increment(T0 + 2, key="b") == (False, "daily_limit_exceeded", 1, True)
    assert led.entry["today"] == 1


def test_keys_are_scoped_to_tenant_domain_and_kind() -> None:
    keys = {q.mark_key("t1", "a.example", "k", "x"), q.mark_key("t2", "a.example", "k", "x"),
            q.mark_key("t1", "b.example", "k", "x"), q.mark_key("t1", "a.example", "m", "x")}
    assert len(keys) == 4
    # a message id wins over an idempotency key given with it
    assert q.increment_mark({"idempotency_key": "x", "message_id": "m1"}, "t1", "a.example") == \
        q.mark_key("t1", "a.example", "m", "m1")
    assert q.increment_mark({"idempotency_key": None, "message_id": None}, "t1", "a.example") is None


def test_a_message_postbus_sent_is_counted_once_whichever_comes_first() -> None:
    # the send first, then the client's increment naming the message: the increment counts nothing
    led = Ledger()
    led.sent(T0, "m1")
    assert led.entry["today"] == 1
    assert led.increment(T0 + 5, message_id="m1") == (True, None, 1, True)
    assert led.increment(T0 + 6, message_id="m2") == (True, None, 2, False)  # another message counts (control)
    # the increment first (the policy daemon sees the mail before Postbus hears the 250), then the send
    led.sent(T0 + 7, "m2")
    assert led.entry["today"] == 2
    # an increment's retry after the send was matched: still the first answer
    assert led.increment(T0 + 8, message_id="m2") == (True, None, 2, True)
    # a send of a message nobody incremented counts as before
    led.sent(T0 + 9, "m3")
    assert (led.entry["today"], led.entry["msent"]) == (3, 3)


def test_a_send_the_increment_refused_is_still_counted_once() -> None:
    led = Ledger(daily=1, enf="hard")
    led.increment(T0, message_id="m1")
    assert led.increment(T0 + 1, message_id="m2") == (False, "daily_limit_exceeded", 1, False)
    led.sent(T0 + 2, "m2")  # it went out anyway: counted by its send
    assert led.entry["today"] == 2
    led.sent(T0 + 3, "m1")  # counted by its increment already
    assert led.entry["today"] == 2


def test_a_soft_domain_over_its_limit_answers_the_soft_reason_for_a_sent_message() -> None:
    led = Ledger(daily=1, enf="soft")
    led.sent(T0, "m1")
    led.sent(T0 + 1, "m2")
    assert led.increment(T0 + 2, message_id="m2") == (True, "daily_limit_exceeded_soft", 2, True)
    assert led.entry["today"] == 2


def test_keys_must_be_printable_and_bounded() -> None:
    assert q.valid_key("order-42/retry")
    assert not q.valid_key("") and not q.valid_key("a\nb") and not q.valid_key("x" * 256)
    assert q.valid_key("x" * 255)


def test_dkim_status_of_three_records() -> None:
    assert combined(["Success"] * 3) == "Success"
    assert combined(["Success", "Pending", "Success"]) == "Pending"
    assert combined(["Success", "Pending", "Failed"]) == "Failed"
    assert combined(["TemporaryFailure", "Pending", "Success"]) == "TemporaryFailure"
    assert combined([]) == "NotStarted"
