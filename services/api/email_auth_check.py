"""SPF and DMARC status of a sending domain, for the tenant SMTP API's ``config``: read from DNS
(dnspython, the configured resolvers) and cached for a few minutes per domain, so a dashboard
polling ``config`` does not turn into a DNS load.

- spf: ``verified`` when the domain publishes a ``v=spf1`` TXT record, ``missing`` when not;
- dmarc: ``configured`` when ``_dmarc.<domain>`` publishes ``v=DMARC1``, ``missing`` when not;
- ``unknown`` for either when the resolvers do not answer."""

from __future__ import annotations

import asyncio
import time

from services.common.dns_check import make_resolver, txt_values

CACHE_TTL_S = 300.0
_cache: dict[str, tuple[float, str, str]] = {}


def _status(values: list[str] | None, prefix: str, found: str) -> str:
    if values is None:
        return "unknown"
    return found if any(v.strip().lower().startswith(prefix) for v in values) else "missing"


async def spf_dmarc(domain: str, resolvers: str, timeout_s: float) -> tuple[str, str]:
    hit = _cache.get(domain)
    if hit is not None and hit[0] > time.monotonic():
        return hit[1], hit[2]
    resolver = make_resolver(resolvers, timeout_s)
    spf_txt, dmarc_txt = await asyncio.gather(txt_values(resolver, domain), txt_values(resolver, f"_dmarc.{domain}"))
    spf, dmarc = _status(spf_txt, "v=spf1", "verified"), _status(dmarc_txt, "v=dmarc1", "configured")
    if "unknown" not in (spf, dmarc):  # a resolver hiccup is not remembered
        _cache[domain] = (time.monotonic() + CACHE_TTL_S, spf, dmarc)
    return spf, dmarc
