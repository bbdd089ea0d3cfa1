"""Headers Postbus writes into every message it sends, read back by the inbound service (DSN, ARF,
SES feedback) to attribute a report to the message and its tenant."""

from __future__ import annotations

CORRELATION_HEADER = "X-Postbus-Message-Id"
TENANT_HEADER = "X-Postbus-Tenant"
