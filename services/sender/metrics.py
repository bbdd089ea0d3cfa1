"""Prometheus metrics of the sender (names from the mail-proxy seed: gmp_*)."""

from prometheus_client import Counter, Gauge, Histogram

SENT = Counter("gmp_sent_total", "Messages sent", ["tenant_id", "account_id"])
ERRORS = Counter("gmp_errors_total", "Messages failed permanently", ["tenant_id", "account_id"])
DEFERRED = Counter("gmp_deferred_total", "Send attempts deferred for retry", ["tenant_id", "account_id"])
RATE_LIMITED = Counter("gmp_rate_limited_total", "Rate-limit enforcements", ["tenant_id", "account_id"])
PENDING = Gauge("gmp_pending_messages", "Messages waiting to be sent")
DUPLICATE_IDS = Counter("postbus_sender_already_sent_total", "Submissions of already-sent ids ignored", ["tenant_id"])
SMTP_SECONDS = Histogram("postbus_sender_smtp_seconds", "Time of one SMTP transaction",
                         buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
DEADLETTERS = Counter("postbus_sender_deadletters_total", "Undecodable command records dead-lettered")
STAGE_SECONDS = Histogram("postbus_sender_stage_seconds", "Time per stage of one send: ingest (add-messages "
                          "command on the broker -> read by the sender), wait (accepted, or due, -> its first "
                          "send attempt starts), build (MIME), smtp, event_ack (outcome event on the broker), "
                          "state_ack (table changelog on the broker)",
                          ["stage"], buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5))

PER_ACCOUNT = (SENT, ERRORS, DEFERRED, RATE_LIMITED)


def init_account(tenant_id: str, account_id: str, *, present: bool) -> None:
    """Every configured account shows in every gmp_* counter, at zero until something happens;
    a deleted account's series go away."""
    for counter in PER_ACCOUNT:
        if present:
            counter.labels(tenant_id, account_id)
        else:
            try:
                counter.remove(tenant_id, account_id)
            except KeyError:
                pass
