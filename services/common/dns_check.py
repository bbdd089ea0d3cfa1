"""DNS checks of a domain's published verification records (dnspython, configurable resolvers).

Statuses follow the seed's vocabulary: ``Success`` (the expected value is published), ``Pending``
(nothing published yet), ``Failed`` (a record is there with another value), ``TemporaryFailure``
(the resolvers did not answer)."""

from __future__ import annotations

import asyncio

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.resolver

from services.common.dkim_keys import dkim_tags

SUCCESS, PENDING, FAILED, TEMPORARY, NOT_STARTED = "Success", "Pending", "Failed", "TemporaryFailure", "NotStarted"


def parse_resolvers(spec: str) -> list[tuple[str, int]]:
    """``"ip[:port],[v6]:port,..."`` -> [(ip, port)]."""
    out = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        if item.startswith("["):
            host, _, rest = item[1:].partition("]")
            port = int(rest[1:]) if rest.startswith(":") else 53
        elif item.count(":") == 1:
            host, _, p = item.partition(":")
            port = int(p)
        else:
            host, port = item, 53
        out.append((host, port))
    return out


def make_resolver(spec: str, timeout_s: float) -> dns.asyncresolver.Resolver:
    servers = parse_resolvers(spec)
    try:
        resolver = dns.asyncresolver.Resolver(configure=not servers)
    except dns.resolver.NoResolverConfiguration:  # no /etc/resolv.conf: every check is a TemporaryFailure
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = []
    if servers:
        resolver.nameservers = [dns.nameserver.Do53Nameserver(host, port) for host, port in servers]
    resolver.lifetime = timeout_s
    resolver.cache = None  # a check must see what is published now
    return resolver


async def txt_values(resolver: dns.asyncresolver.Resolver, name: str) -> list[str] | None:
    """The TXT records at ``name`` (each one's strings joined); [] if none; None if no answer."""
    try:
        answer = await resolver.resolve(name, "TXT", raise_on_no_answer=False)
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return []
    except dns.exception.DNSException:  # timeouts, SERVFAIL from every resolver, malformed answers
        return None
    if answer.rrset is None:
        return []
    return [b"".join(r.strings).decode(errors="replace") for r in answer.rrset]


async def check_token(resolver: dns.asyncresolver.Resolver, name: str, token: str) -> str:
    values = await txt_values(resolver, name)
    if values is None:
        return TEMPORARY
    if not values:
        return PENDING
    return SUCCESS if token in (v.strip() for v in values) else FAILED


async def check_dkim(resolver: dns.asyncresolver.Resolver, name: str, public_key_b64: str) -> str:
    values = await txt_values(resolver, name)
    if values is None:
        return TEMPORARY
    if not values:
        return PENDING
    for v in values:
        tags = dkim_tags(v)
        if tags.get("p") == public_key_b64 and tags.get("k", "rsa") == "rsa":
            return SUCCESS
    return FAILED


_PRECEDENCE = (FAILED, TEMPORARY, PENDING, NOT_STARTED)


def combined(statuses: list[str]) -> str:
    """One status for several records the client was told to publish (the native backend's three
    DKIM keys): ``Success`` only when every one is; otherwise the first of ``Failed`` (a wrong value
    is published: the client must fix it), ``TemporaryFailure``, ``Pending``, ``NotStarted`` found."""
    if not statuses:
        return NOT_STARTED
    for status in _PRECEDENCE:
        if status in statuses:
            return status
    return SUCCESS


async def check_domain_records(resolver: dns.asyncresolver.Resolver, prefix: str,
                               rec: dict) -> tuple[str, str, list[dict]]:
    """A domain record's published DNS checked: ``(verification status, signing key's DKIM status,
    standby keys each with its own status)`` for the TXT token under ``prefix`` and every DKIM key
    (``combined`` makes one DKIM status of them)."""
    standby = list(rec.get("dkim_standby") or [])
    vstatus, signing, *others = await asyncio.gather(
        check_token(resolver, f"{prefix}.{rec['name']}", rec["verification_token"]),
        check_dkim(resolver, f"{rec['dkim_selector']}._domainkey.{rec['name']}", rec["dkim_public_key"]),
        *(check_dkim(resolver, f"{k['selector']}._domainkey.{rec['name']}", k["public_key"]) for k in standby))
    return vstatus, signing, [{**k, "status": s} for k, s in zip(standby, others, strict=True)]
