from services.api.reputation import Thresholds, assess, thresholds_from
from services.common.settings import Settings


def test_low_volume_is_not_assessed() -> None:
    band, recs, rate, _ = assess({"sent": 10, "bounced": 5})
    assert band == "healthy" and rate == 0.5 and [r["code"] for r in recs] == ["LOW_VOLUME"]


def test_bounce_bands() -> None:
    assert assess({"sent": 1000, "bounced": 19})[0] == "healthy"
    band, recs, rate, _ = assess({"sent": 1000, "bounced": 25})
    assert rate == 0.025
    assert band == "watch" and recs[0]["code"] == "HIGH_BOUNCE_RATE" and recs[0]["severity"] == "medium"
    band, recs, _, _ = assess({"sent": 1000, "bounced": 31})
    assert band == "at_risk" and recs[0]["severity"] == "high"


def test_complaints_and_worst_band_wins() -> None:
    band, recs, _, crate = assess({"sent": 10000, "bounced": 250, "complaints": 40})
    assert band == "at_risk" and crate == 0.004
    assert {r["code"] for r in recs} == {"HIGH_BOUNCE_RATE", "HIGH_COMPLAINT_RATE"}


def test_thresholds_are_configurable() -> None:
    assert assess({"sent": 40, "bounced": 1}, Thresholds(min_volume=10))[0] == "watch"
    assert assess({"sent": 40, "bounced": 1})[0] == "healthy"  # below the default minimum volume


def test_thresholds_come_from_settings() -> None:
    t = thresholds_from(Settings(reputation_bounce_watch=0.05, reputation_bounce_at_risk=0.1, reputation_min_volume=1))
    assert assess({"sent": 100, "bounced": 4}, t)[0] == "healthy"
    assert assess({"sent": 100, "bounced": 6}, t)[0] == "watch"
    assert assess({"sent": 100, "bounced": 11}, t)[0] == "at_risk"
