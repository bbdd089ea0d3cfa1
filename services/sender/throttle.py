"""Per-destination throttling: messages per minute and transactions at once per MX "site".

A site groups recipient domains that are served by the same mail exchangers: the primary (lowest
preference) MX host without its first label, e.g. ``gmail-smtp-in.l.google.com`` and
``aspmx.l.google.com`` are both ``l.google.com``, and every Microsoft 365 domain is
``mail.protection.outlook.com``. MX answers are cached for ``sender_mx_cache_ttl_s``; a domain
without MX, or when DNS does not answer, is its own site. Reserved names (RFC 2606/6761: ``.test``,
``.example``, ``.invalid``, ``.localhost``) never go to DNS.

Limits: ``sender_site_per_minute`` and ``sender_site_connections`` for every site (0 = none),
with per-site overrides in ``sender_site_overrides_json`` matched on the site, a recipient domain,
or a suffix of them; the built-in overrides raise the limits for the large mailbox providers,
which accept far more than an unknown server. Reserved names get limits only from an explicit
override (tests, local sinks). Over a limit the message is deferred (``destination_throttle``) to
the next minute, or by a second when only the transaction cap is reached. Counts are kept per
sender instance (in memory): a politeness limit, not a contract."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import dns.asyncresolver
import dns.exception
import dns.resolver

from services.common.dns_check import make_resolver
from services.common.settings import get_settings
from services.sender import pipeline
from services.sender.mime import envelope_recipients

log = logging.getLogger("postbus.sender.throttle")

RESERVED_TLDS = ("test", "example", "invalid", "localhost")
# polite but realistic defaults for big providers (messages/min, transactions at once per instance)
PROVIDER_LIMITS: dict[str, dict[str, int]] = {
    "google.com": {"per_minute": 3000, "connections": 40},
    "outlook.com": {"per_minute": 2000, "connections": 30},
    "yahoodns.net": {"per_minute": 1200, "connections": 20},
    "icloud.com": {"per_minute": 1200, "connections": 20},
}


@dataclass(frozen=True)
class SiteLimits:
    per_minute: int  # 0 = no limit
    connections: int  # 0 = no limit


def site_of_mx(hosts: list[tuple[int, str]]) -> str | None:
    """Primary MX host (lowest preference, then name) without its first label."""
    if not hosts:
        return None
    _, host = min((pref, h.lower().rstrip(".")) for pref, h in hosts)
    labels = host.split(".")
    return ".".join(labels[1:]) if len(labels) > 2 else host


def reserved(domain: str) -> bool:
    return domain == "localhost" or domain.rpartition(".")[2] in RESERVED_TLDS


def _matches(name: str, pattern: str) -> bool:
    return name == pattern or name.endswith("." + pattern)


def limits_for(site: str, domains: set[str], overrides: dict[str, dict[str, int]],
               default: SiteLimits) -> SiteLimits:
    names = [site, *sorted(domains)]
    for table in (overrides, PROVIDER_LIMITS):
        for pattern, spec in table.items():
            if any(_matches(n, pattern.lower()) for n in names):
                return SiteLimits(int(spec.get("per_minute", default.per_minute)),
                                  int(spec.get("connections", default.connections)))
    if all(reserved(d) for d in domains) and reserved(site):
        return SiteLimits(0, 0)
    return default


class SiteResolver:
    def __init__(self, enabled: bool, ttl_s: float, resolvers: str = "", timeout_s: float = 2.0) -> None:
        self.enabled = enabled
        self.ttl_s = ttl_s
        self._spec, self._timeout = resolvers, timeout_s
        self._resolver: dns.asyncresolver.Resolver | None = None
        self._cache: dict[str, tuple[float, str]] = {}

    async def site(self, domain: str) -> str:
        domain = domain.lower().rstrip(".")
        if not self.enabled or not domain or reserved(domain):
            return domain
        cached = self._cache.get(domain)
        now = time.monotonic()
        if cached is not None and cached[0] > now:
            return cached[1]
        site, ttl = await self._lookup(domain)
        self._cache[domain] = (now + ttl, site)
        return site

    async def _lookup(self, domain: str) -> tuple[str, float]:
        if self._resolver is None:
            self._resolver = make_resolver(self._spec, self._timeout)
        try:
            answer = await self._resolver.resolve(domain, "MX")
            hosts = [(r.preference, str(r.exchange)) for r in answer]
            return site_of_mx(hosts) or domain, self.ttl_s
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return domain, self.ttl_s  # no MX: the domain's own address (RFC 5321 implicit MX)
        except (dns.exception.DNSException, OSError):
            return domain, min(self.ttl_s, 60.0)  # DNS unavailable: retry the lookup soon


class Throttle:
    def __init__(self, default: SiteLimits, overrides: dict[str, dict[str, int]], minute_ms: int) -> None:
        self.default = default
        self.overrides = {k.lower(): v for k, v in overrides.items()}
        self.minute_ms = minute_ms
        self.windows: dict[str, list[int]] = {}  # site -> [window start, count]
        self.busy: dict[str, int] = {}  # site -> transactions in flight
        self.held: dict[str, list[str]] = {}  # message key -> sites it occupies

    def acquire(self, key: str, sites: dict[str, set[str]], now_ms: int) -> int | None:
        """Count the message on all its sites, or return when to try again (nothing counted)."""
        start = now_ms - now_ms % self.minute_ms
        until: int | None = None
        for site, domains in sites.items():
            lim = limits_for(site, domains, self.overrides, self.default)
            window = self.windows.get(site)
            count = window[1] if window is not None and window[0] == start else 0
            if lim.per_minute and count >= lim.per_minute:
                until = max(until or 0, start + self.minute_ms)
            elif lim.connections and self.busy.get(site, 0) >= lim.connections:
                until = max(until or 0, now_ms + 1000)
        if until is not None:
            return until
        for site in sites:
            window = self.windows.get(site)
            if window is None or window[0] != start:
                self.windows[site] = [start, 1]
            else:
                window[1] += 1
            self.busy[site] = self.busy.get(site, 0) + 1
        self.held[key] = list(sites)
        return None

    def release(self, key: str) -> None:
        for site in self.held.pop(key, ()):
            n = self.busy.get(site, 1) - 1
            if n > 0:
                self.busy[site] = n
            else:
                self.busy.pop(site, None)


def _overrides(raw: str) -> dict[str, dict[str, int]]:
    try:
        data = json.loads(raw or "{}")
        return {str(k): dict(v) for k, v in data.items()} if isinstance(data, dict) else {}
    except (ValueError, TypeError, AttributeError):
        log.error("sender_site_overrides_json is not a JSON object of objects: ignored")
        return {}


_s = get_settings()
resolver = SiteResolver(_s.sender_mx_lookup, _s.sender_mx_cache_ttl_s, _s.dns_resolvers, min(_s.dns_timeout_s, 2.0))
throttle = Throttle(SiteLimits(_s.sender_site_per_minute, _s.sender_site_connections),
                    _overrides(_s.sender_site_overrides_json), int(_s.sender_rate_minute_s * 1000))


def recipient_domains(msg: dict[str, Any]) -> set[str]:
    out = set()
    for addr in envelope_recipients(msg):
        domain = addr.rpartition("@")[2].strip().strip(">").lower()
        if domain:
            out.add(domain)
    return out


async def check(ctx: pipeline.SendContext) -> pipeline.Decision | None:
    sites: dict[str, set[str]] = {}
    for domain in recipient_domains(ctx.message):
        sites.setdefault(await resolver.site(domain), set()).add(domain)
    until = throttle.acquire(ctx.key, sites, ctx.now_ms)
    if until is not None:
        return pipeline.Decision.defer("destination_throttle", until)
    return None


def release(key: str) -> None:
    """The message's transaction is over (whatever its outcome): its sites' slots are free."""
    throttle.release(key)
