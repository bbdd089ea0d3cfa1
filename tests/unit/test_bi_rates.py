"""BI API (services/api/routes_bi.py): rates and reputation bands (services/api/reputation.py)."""

from __future__ import annotations

import pytest

from services.api.errors import ApiError
from services.api.reputation import Thresholds
from services.api.routes_bi import band, distinct_rates, figures, rates, validate


def test_rates_over_sent_and_delivered() -> None:
    r = rates({"sent": 200, "delivered": 190, "bounced": 10, "complained": 1, "opened": 95, "clicked": 19})
    assert r == {"delivery_rate": 0.95, "bounce_rate": 0.05, "complaint_rate": 0.005, "open_rate": 0.5,
                 "click_rate": 0.1}
    assert rates({}) == {"delivery_rate": 0.0, "bounce_rate": 0.0, "complaint_rate": 0.0, "open_rate": 0.0,
                         "click_rate": 0.0}


def test_distinct_rates_over_distinct_messages() -> None:
    c = {"sent": 210, "delivered": 200, "opened": 300, "clicked": 40,
         "messages_sent": 200, "messages_delivered": 190, "messages_bounced": 10, "messages_complained": 1,
         "unique_opens": 95, "unique_clicks": 19}
    assert distinct_rates(c) == {"message_delivery_rate": 0.95, "message_bounce_rate": 0.05,
                                 "message_complaint_rate": 0.005, "unique_open_rate": 0.5, "unique_click_rate": 0.1}
    assert set(distinct_rates({}).values()) == {0.0}
    full = figures(c, distinct=True)
    # the event fields keep their meaning (opens per delivered message: 1.5), the distinct ones are added
    assert full["open_rate"] == 1.5 and full["unique_open_rate"] == 0.5 and full["unique_opens"] == 95
    lean = figures(c, distinct=False)
    assert "unique_opens" not in lean and "unique_open_rate" not in lean and lean["opened"] == 300
    bucket = figures(c, distinct=True, with_rates=False)
    assert bucket["messages_sent"] == 200 and "open_rate" not in bucket and "unique_open_rate" not in bucket


@pytest.mark.parametrize(("counts", "expected"), [
    ({"sent": 1000, "bounced": 10, "complained": 0}, "healthy"),
    ({"sent": 1000, "bounced": 25, "complained": 0}, "watch"),
    ({"sent": 1000, "bounced": 40, "complained": 0}, "at_risk"),
    ({"sent": 1000, "bounced": 70, "complained": 0}, "critical"),  # > 2 x the 3 % at-risk threshold
    ({"sent": 1000, "bounced": 0, "complained": 7}, "critical"),  # > 2 x 0.3 %
    ({"sent": 50, "bounced": 40, "complained": 10}, "healthy"),  # below min_volume: not assessed
])
def test_bands(counts: dict[str, int], expected: str) -> None:
    assert band(counts, Thresholds()) == expected


@pytest.mark.parametrize("args", [
    (1000, 2000, "week", None, 10), (1000, 2000, "hour", "country", 10), (1000, 2000, "day", None, 0),
    (1000, 2000, "day", None, 101), (2000, 1000, "day", None, 10), (0, 401 * 86400, "day", None, 10),
])
def test_validation_is_422(args: tuple) -> None:
    with pytest.raises(ApiError) as exc:
        validate(*args)
    assert exc.value.status == 422 and exc.value.code == "validation_error"
    validate(1000, 2000, "day", "tenant", 100)  # the legitimate request passes
