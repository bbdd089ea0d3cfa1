"""Provider API: senders (being built)."""

from __future__ import annotations

from services.api.provider.envelope import provider_router

router = provider_router(tags=["provider"])
