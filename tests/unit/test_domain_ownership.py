"""Domain ownership as a projection of the Domain records (services/common/domain_quota.py): who may
register a name (with an injected clock for the claim expiry), who may send From it, and what the
ledger keeps when an unverified claim passes to another tenant."""

from __future__ import annotations

from typing import Any

import pytest

from services.common import domain_quota as q

HOUR = 3_600_000
EXPIRY = 72 * HOUR
T0 = 1_700_000_000_000


def record(name: str, tenant: str, verified: bool = False, created: int = T0) -> dict[str, Any]:
    return {"name": name, "tenant_id": tenant, "verified": verified, "created_ts": created, "updated_ts": created}


def registry(*recs: dict[str, Any]) -> Any:
    by_name = {r["name"]: r for r in recs}
    return by_name.get


def test_a_free_name_and_the_owners_own_record() -> None:
    assert q.claim_state(None, "b", T0, EXPIRY) == q.FREE
    assert q.claim_state(record("x.example", "a"), "a", T0 + 10 * EXPIRY, EXPIRY) == q.OWN


def test_a_verified_domain_is_never_claimable_by_another_tenant() -> None:
    rec = record("x.example", "a", verified=True)
    for now in (T0, T0 + EXPIRY, T0 + 1000 * EXPIRY):
        assert q.claim_state(rec, "b", now, EXPIRY) == q.VERIFIED_OTHER


def test_an_unverified_claim_expires_at_its_creation_plus_the_expiry() -> None:
    rec = record("x.example", "a")
    assert q.claim_expires_ms(rec, EXPIRY) == T0 + EXPIRY
    assert q.claim_state(rec, "b", T0, EXPIRY) == q.PENDING_OTHER
    assert q.claim_state(rec, "b", T0 + EXPIRY - 1, EXPIRY) == q.PENDING_OTHER
    assert q.claim_state(rec, "b", T0 + EXPIRY, EXPIRY) == q.EXPIRED_OTHER
    # the expiry is the setting's: a shorter one releases the same claim earlier
    assert q.claim_state(rec, "b", T0 + 2 * HOUR, 1 * HOUR) == q.EXPIRED_OTHER


def test_updates_do_not_renew_a_claim() -> None:
    """The squatter may update its record as often as it likes: the claim counts from created_ts."""
    rec = record("x.example", "a")
    rec["updated_ts"] = T0 + EXPIRY - 1
    assert q.claim_state(rec, "b", T0 + EXPIRY, EXPIRY) == q.EXPIRED_OTHER


@pytest.mark.parametrize(("sender", "expected"), [("a", None), ("b", q.NOT_OWNED)])
def test_mail_from_a_verified_domain_only_from_its_tenant(sender: str, expected: str | None) -> None:
    lookup = registry(record("x.example", "a", verified=True))
    assert q.sending_refusal(lookup, "x.example", sender) == expected


def test_mail_from_the_tenants_own_unverified_domain_is_blocked() -> None:
    lookup = registry(record("x.example", "a"))
    assert q.sending_refusal(lookup, "x.example", "a") == q.NOT_VERIFIED
    # another tenant's unverified claim blocks nobody: a squatter cannot stop the real owner's mail
    assert q.sending_refusal(lookup, "x.example", "b") is None


def test_subdomains_of_a_verified_domain_belong_to_its_tenant() -> None:
    lookup = registry(record("x.example", "a", verified=True))
    assert q.sending_refusal(lookup, "news.x.example", "b") == q.NOT_OWNED
    assert q.sending_refusal(lookup, "deep.news.x.example", "b") == q.NOT_OWNED
    assert q.sending_refusal(lookup, "news.x.example", "a") is None
    assert q.sending_refusal(lookup, "other.example", "b") is None  # a sibling is not covered
    assert q.sending_refusal(lookup, "", "b") is None


def test_the_nearest_verified_name_decides() -> None:
    # b proved control of news.x.example (e.g. a delegated zone): its mail from there goes
    lookup = registry(record("x.example", "a", verified=True), record("news.x.example", "b", verified=True))
    assert q.sending_refusal(lookup, "news.x.example", "b") is None
    assert q.sending_refusal(lookup, "news.x.example", "a") == q.NOT_OWNED
    # b's own but unverified subdomain under a's verified domain: still blocked until verified
    lookup = registry(record("x.example", "a", verified=True), record("news.x.example", "b"))
    assert q.sending_refusal(lookup, "news.x.example", "b") == q.NOT_VERIFIED
    assert q.sending_refusal(lookup, "news.x.example", "c") == q.NOT_OWNED


@pytest.mark.parametrize(("addr", "domain"), [
    ("app@X.Example", "x.example"), ("News <news@x.example>", "x.example"), ('"a@b.c" <n@x.example>', "x.example"),
    ("x.example", ""), ("", ""), (None, ""),
])
def test_from_domain(addr: str | None, domain: str) -> None:
    assert q.from_domain(addr) == domain


def test_refusal_text_starts_with_the_stable_code() -> None:
    assert q.refusal_text(q.NOT_OWNED, "x.example").startswith("sender_domain_not_owned: ")
    text = q.refusal_text(q.NOT_VERIFIED, "x.example")
    assert text.startswith("sender_domain_not_verified: ") and "blocked until the domain is verified" in text


def test_a_released_entry_starts_fresh_for_the_new_tenant_and_bills_the_old_month() -> None:
    old = q.new_entry("x.example", "a", 3, T0)
    old.update(msent=4, today=4, bounce=1, off=900, eoff=77, daily=10, enf="hard", ver=False)
    new, billing = q.released(old, "b", 7, T0 + HOUR)
    assert new["tenant"] == "b" and new["p"] == 3  # the key stays on its changelog partition
    assert new["cp"] == 7 and new["since"] == T0 + HOUR and new["ver"] is False
    assert (new["msent"], new["today"], new["bounce"], new["off"], new.get("eoff", -1)) == (0, 0, 0, -1, -1)
    assert (new["daily"], new["enf"]) == (0, "soft")  # the old tenant's limits do not follow the name
    assert billing is not None and billing["partner_ref"] == "a" and billing["cause"] == "released"
    assert billing["outbound_sent_month"] == 4
    assert old["tenant"] == "a" and old["msent"] == 4  # not mutated
    quiet = q.new_entry("y.example", "a", 3, T0)
    assert q.released(quiet, "b", 7, T0)[1] is None  # nothing counted: nothing to bill
