"""A message the sender resends after a crash (its ``sent`` event was durable, its table record not:
docs/architecture.md "Delivery guarantees") has two ``sent`` events. The outbound ledger counts it
once, as the analytics do (``uniqExact(message_id)``), whichever way it was counted first.

Found by bench/chaos.py: after the sender kills, the ledgers had counted 5, 17 and 24 messages more
than the distinct messages at the sink, while ClickHouse matched the sink exactly."""

from __future__ import annotations

from tests.unit.test_domain_idempotency import T0, Ledger


def test_a_message_resent_after_a_crash_is_counted_once() -> None:
    led = Ledger()
    led.sent(T0, "m1")
    led.sent(T0 + 1, "m2")  # positive control: another message counts
    assert (led.entry["today"], led.entry["msent"]) == (2, 2)
    led.sent(T0 + 5_000, "m1")  # the resend's own sent event (new offset, new event id)
    assert (led.entry["today"], led.entry["msent"]) == (2, 2)


def test_a_resend_after_an_increment_matched_its_first_send_is_not_counted() -> None:
    led = Ledger()
    assert led.increment(T0, message_id="m1") == (True, None, 1, False)  # the client counted it
    led.sent(T0 + 1, "m1")  # its send: matched with the increment, nothing counted
    assert led.entry["today"] == 1
    led.sent(T0 + 2, "m1")  # resent after a crash: still one message
    assert led.entry["today"] == 1
    led.sent(T0 + 3, "m2")  # control
    assert led.entry["today"] == 2


def test_a_resend_of_a_message_the_increment_refused_counts_once() -> None:
    led = Ledger(daily=1, enf="hard")
    led.increment(T0, message_id="m1")
    assert led.increment(T0 + 1, message_id="m2")[:2] == (False, "daily_limit_exceeded")
    led.sent(T0 + 2, "m2")  # it went out anyway: counted by its send
    led.sent(T0 + 3, "m2")  # and again after a crash: not counted twice
    assert led.entry["today"] == 2
