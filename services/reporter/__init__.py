"""Reporter: turns delivery events into per-tenant delivery reports for the tenant's sync endpoint."""
