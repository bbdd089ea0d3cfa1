"""services/metrics/inbound_lookup.resolve against the real embedded ClickHouse engine: the message
an inbound report is about, with the recipients feedback may be attributed to."""

from __future__ import annotations

from services.metrics import inbound_lookup
from services.metrics import messages as mp
from services.metrics.store import Store

BASE = {"tenant_id": "acme", "account_id": "main", "from_addr": "App <app@acme.test>", "subject": "s",
        "priority": 2, "deferred_ts": None, "batch_code": None, "accepted_ts": 1_700_000_000_000}


def test_resolve_returns_every_envelope_recipient(store: Store) -> None:
    m = {**BASE, "id": "m-1", "pk": "pk-1", "to": ["Bob <Bob@Example.test>"], "cc": ["carol@example.test"],
         "bcc": ["dave@example.test"]}
    store.insert_rows("messages", mp.message_rows({"messages": [m]}, 5), mp.MESSAGE_COLUMNS)
    want = ["bob@example.test", "carol@example.test", "dave@example.test"]
    found = inbound_lookup.resolve(store, "acme", "m-1", None)
    assert found is not None and found["recipients"] == want and found["pk"] == "pk-1"
    assert inbound_lookup.resolve(store, None, None, "pk-1")["recipients"] == want  # type: ignore[index]
    # another tenant's id, or nothing to look up by: unknown
    assert inbound_lookup.resolve(store, "evil", "m-1", None) is None
    assert inbound_lookup.resolve(store, None, None, None) is None


def test_resubmitted_id_keeps_the_recipients_of_every_submission(store: Store) -> None:
    first = {**BASE, "id": "m-2", "pk": "pk-a", "to": ["a@example.test"]}
    second = {**BASE, "id": "m-2", "pk": "pk-b", "to": ["b@example.test"]}
    store.insert_rows("messages", mp.message_rows({"messages": [first]}, 1), mp.MESSAGE_COLUMNS)
    store.insert_rows("messages", mp.message_rows({"messages": [second]}, 2), mp.MESSAGE_COLUMNS)
    found = inbound_lookup.resolve(store, "acme", "m-2", None)
    assert found is not None and found["pk"] == "pk-b"
    assert found["recipients"] == ["a@example.test", "b@example.test"]
    assert inbound_lookup.resolve(store, None, None, "pk-a")["recipients"] == ["a@example.test"]  # type: ignore[index]


def test_rows_older_than_the_recipient_column_fall_back_to_to() -> None:
    assert inbound_lookup.recipients_of([], ["Bob <BOB@x.test>", "c@x.test"]) == ["bob@x.test", "c@x.test"]
    assert inbound_lookup.recipients_of(["bob@x.test"], ["Bob <bob@x.test>"]) == ["bob@x.test"]
