"""Wall-clock aligned send windows (pure logic of services/sender/rate_limits.py)."""

from __future__ import annotations

from typing import Any

# window name -> length in "minutes"
WINDOWS = {"m": 1, "h": 60, "d": 1440}


def window_start(now_ms: int, length_ms: int) -> int:
    return now_ms - now_ms % length_ms


def evaluate(state: dict[str, Any] | None, limits: dict[str, int | None], now_ms: int,
             minute_ms: int) -> tuple[dict[str, Any] | None, int | None]:
    """``(new_state, None)`` with this send counted in every limited window, or ``(None, until_ms)``
    when a window is full: ``until_ms`` is the start of the next window in which every full window
    has rolled over (the latest boundary of the full ones). ``(None, None)``: nothing is limited."""
    active = {w: n for w, n in limits.items() if n is not None and n > 0}  # 0 or negative: no limit (genro 0.6)
    if not active:
        return None, None
    state = state or {}
    new: dict[str, Any] = {}
    until: int | None = None
    for w, limit in active.items():
        length = WINDOWS[w] * minute_ms
        start = window_start(now_ms, length)
        prev_start, count = state.get(w) or (start, 0)
        if prev_start != start:
            count = 0  # a new window
        if count >= limit:
            boundary = start + length
            until = boundary if until is None else max(until, boundary)
        new[w] = [start, count + 1]
    if until is not None:
        return None, until
    return new, None
