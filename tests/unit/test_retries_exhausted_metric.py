"""Retries exhausted are counted for alerting (docs/operations.md "Alerts worth having")."""

from __future__ import annotations

from services.sender.outcomes import RETRIES_EXHAUSTED, gave_up, retry_due_ms


def test_a_message_given_up_is_counted() -> None:
    before = RETRIES_EXHAUSTED._value.get()
    # a retry still due: nothing counted (the engine calls gave_up only when retry_due_ms says None)
    assert retry_due_ms(1, 0, 0, base_s=5, cap_s=60, max_attempts=3, max_age_s=3600) is not None
    assert RETRIES_EXHAUSTED._value.get() == before
    assert retry_due_ms(3, 0, 0, base_s=5, cap_s=60, max_attempts=3, max_age_s=3600) is None
    assert gave_up("451 4.7.1 later", 3) == "451 4.7.1 later (gave up after 3 attempts)"
    assert RETRIES_EXHAUSTED._value.get() == before + 1
