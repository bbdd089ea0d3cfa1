"""Prometheus metrics of the reporter (served by prometheus_client on reporter_metrics_port)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

REPORTS_SENT = Counter(
    "postbus_reporter_reports_sent_total", "Delivery reports acknowledged by the client", ["tenant_id"]
)
SYNC_CALLS = Counter(
    "postbus_reporter_sync_calls_total", "Sync calls to client endpoints", ["tenant_id", "outcome"]
)
SYNC_SECONDS = Histogram(
    "postbus_reporter_sync_seconds",
    "Duration of one sync call",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
PENDING = Gauge("postbus_reporter_pending_reports", "Reports waiting for acknowledgement")
EVENTS_IN = Counter("postbus_reporter_events_total", "Events consumed", ["type"])
