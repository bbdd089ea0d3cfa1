from prometheus_client.parser import text_string_to_metric_families

from services.api.gmp_metrics import render


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_every_configured_account_present_at_zero_and_counts_filled() -> None:
    accounts = [{"tenant_id": "a", "id": "main"}, {"tenant_id": "b", "id": "x"}]
    counters = {"accounts": [{"tenant_id": "a", "account_id": "main", "sent": 3, "errors": 1, "deferred": 2,
                              "rate_limited": 1}], "pending": 7}
    s = _samples(render(counters, accounts))
    assert s[("gmp_sent_total", (("account_id", "main"), ("tenant_id", "a")))] == 3
    assert s[("gmp_errors_total", (("account_id", "main"), ("tenant_id", "a")))] == 1
    assert s[("gmp_deferred_total", (("account_id", "main"), ("tenant_id", "a")))] == 2
    assert s[("gmp_rate_limited_total", (("account_id", "main"), ("tenant_id", "a")))] == 1
    for name in ("gmp_sent_total", "gmp_errors_total", "gmp_deferred_total", "gmp_rate_limited_total"):
        assert s[(name, (("account_id", "x"), ("tenant_id", "b")))] == 0
    assert s[("gmp_pending_messages", ())] == 7
    assert s[("postbus_api_delivery_counters_up", ())] == 1


def test_backend_down_still_lists_accounts_and_says_so() -> None:
    s = _samples(render(None, [{"tenant_id": 'we"ird', "id": "m"}]))
    assert s[("gmp_sent_total", (("account_id", "m"), ("tenant_id", 'we"ird')))] == 0
    assert s[("postbus_api_delivery_counters_up", ())] == 0
