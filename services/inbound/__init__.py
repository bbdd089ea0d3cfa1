"""Inbound mail: bounces (RFC 3464 DSNs and heuristics), ARF complaints (RFC 5965) and PEC receipts,
received by an SMTP listener on the bounce return-path domain and by an IMAP poller, correlated to the
message they are about and emitted as delivery events. ``python -m services.inbound`` runs it."""
