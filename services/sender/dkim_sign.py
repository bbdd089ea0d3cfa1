"""DKIM signature (RFC 6376, dkimpy) of outgoing mail from a verified sending domain.

The domain registry (``postbus.config.domains``) holds each domain's current selector and its
SecretBox-encrypted RSA key; after a rotation switched selectors the record names the new one, so
mail is always signed with the selector whose DNS record is verified. A message is signed when its
From domain is registered by the message's own tenant and its DKIM record verified (``dkim_status``
``Success``); anything else goes out unsigned. Canonicalisation is relaxed/relaxed.

The transform is the last of the transforms (services/sender/steps.py), because any later rewrite
of a signed header or of the body would break the signature. :func:`register` starts and stops the
registry view with the Faust app."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from services.common.config_view import ConfigView
from services.common.crypto import load_secret_box
from services.common.settings import get_settings
from services.common.topics import CONFIG_DOMAINS
from services.sender import pipeline
from services.sender.dkim_core import from_domain, sign

log = logging.getLogger("postbus.sender.dkim")

VERIFIED = "Success"

settings = get_settings()
box = load_secret_box(settings)
domains = ConfigView(settings.kafka_bootstrap, CONFIG_DOMAINS, "Domain")
# (domain, selector, updated_ts) -> private key PEM: decrypted once per record version
_keys: dict[tuple[str, str, int], bytes] = {}


def signing_key(rec: dict[str, Any] | None, tenant_id: str) -> tuple[str, bytes] | None:
    """(selector, private key PEM) when mail of ``tenant_id`` from this domain is to be signed."""
    if rec is None or rec.get("tenant_id") != tenant_id or rec.get("dkim_status") != VERIFIED:
        return None
    selector, enc = rec.get("dkim_selector"), rec.get("dkim_private_key_enc")
    if not selector or not enc:
        return None
    cache_key = (rec["name"], selector, int(rec.get("updated_ts") or 0))
    pem = _keys.get(cache_key)
    if pem is None:
        pem = (box.decrypt(enc) or "").encode()
        _keys[cache_key] = pem
    return selector, pem


async def dkim_transform(ctx: pipeline.SendContext, data: bytes) -> bytes:
    if not domains.ready.is_set():
        try:  # at start-up: wait a little for the registry rather than sending unsigned
            await asyncio.wait_for(domains.ready.wait(), 10.0)
        except TimeoutError:
            return data
    domain = from_domain(ctx.message)
    key = signing_key(domains.get(domain), ctx.message["tenant_id"]) if domain else None
    if key is None:
        return data
    try:
        signed = await asyncio.to_thread(sign, data, domain, key[0], key[1])
    except Exception as exc:  # a bad key must not stop the mail: it goes out unsigned, loudly
        log.error("DKIM signing failed", extra={"domain": domain, "error": type(exc).__name__})
        return data
    ctx.extra["dkim_selector"] = key[0]
    return signed


def register(app: Any) -> None:
    @app.task
    async def _start_domains_view() -> None:
        await domains.start()

    @app.on_before_shutdown.connect  # type: ignore[misc]
    async def _stop_domains_view(app: Any, **kwargs: Any) -> None:
        await domains.stop()
