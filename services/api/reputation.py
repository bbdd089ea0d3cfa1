"""Reputation band and recommendations from a tenant's window counts (seed: tenant SMTP API).

Thresholds (rates over messages sent in the window), each applied only when at least
``min_volume`` messages were sent, because a handful of bounces in a tiny sample says nothing:

| signal     | healthy | watch        | at_risk |
|------------|---------|--------------|---------|
| bounces    | < 2 %   | 2 % to 3 %   | > 3 %   |
| complaints | < 0.1 % | 0.1 % to 0.3 % | > 0.3 % |
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

BANDS = ("healthy", "watch", "at_risk", "suspended")


@dataclass(frozen=True)
class Thresholds:
    bounce_watch: float = 0.02
    bounce_at_risk: float = 0.03
    complaint_watch: float = 0.001
    complaint_at_risk: float = 0.003
    min_volume: int = 100


def thresholds_from(settings: Any) -> Thresholds:
    """The configured thresholds (POSTBUS_REPUTATION_* settings)."""
    return Thresholds(
        bounce_watch=settings.reputation_bounce_watch,
        bounce_at_risk=settings.reputation_bounce_at_risk,
        complaint_watch=settings.reputation_complaint_watch,
        complaint_at_risk=settings.reputation_complaint_at_risk,
        min_volume=settings.reputation_min_volume,
    )


def _band(rate: float, watch: float, at_risk: float) -> str:
    if rate > at_risk:
        return "at_risk"
    if rate >= watch:
        return "watch"
    return "healthy"


def assess(counts: dict[str, Any], t: Thresholds = Thresholds()) -> tuple[str, list[dict[str, str]], float, float]:
    """Returns (band, recommendations, bounce_rate, complaint_rate)."""
    sent = int(counts.get("sent", 0))
    bounce_rate = counts.get("bounced", 0) / sent if sent else 0.0
    complaint_rate = counts.get("complaints", 0) / sent if sent else 0.0
    recs: list[dict[str, str]] = []
    if sent < t.min_volume:
        return "healthy", [{"code": "LOW_VOLUME", "severity": "info",
                            "message": f"Fewer than {t.min_volume} messages in the window; rates are not assessed."}], \
            bounce_rate, complaint_rate
    bounce_band = _band(bounce_rate, t.bounce_watch, t.bounce_at_risk)
    complaint_band = _band(complaint_rate, t.complaint_watch, t.complaint_at_risk)
    if bounce_band != "healthy":
        recs.append({"code": "HIGH_BOUNCE_RATE", "severity": "high" if bounce_band == "at_risk" else "medium",
                     "message": "Bounce rate exceeds recommended threshold; review list hygiene."})
    if complaint_band != "healthy":
        recs.append({"code": "HIGH_COMPLAINT_RATE", "severity": "high" if complaint_band == "at_risk" else "medium",
                     "message": "Complaint rate exceeds recommended threshold; review consent and content."})
    band = max(bounce_band, complaint_band, key=BANDS.index)
    return band, recs, bounce_rate, complaint_rate
