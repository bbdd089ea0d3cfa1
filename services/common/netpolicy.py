"""The one network policy for every outbound connection a tenant can influence.

Attachments (``http_url``, ``endpoint``, remote ``storage`` roots), the reporter's sync calls and any
other tenant-aimed fetch go through here:

- every address a host name resolves to must be allowed (a name with one public and one loopback
  address is refused: the attacker picks which one a client library would use);
- the connection goes to the checked address (pinned: no second resolution a DNS rebinding could
  change), with the original ``Host`` header and TLS SNI/certificate name;
- every redirect hop is checked the same way; credentials never follow a redirect to another origin.

Allowed: global unicast addresses. Loopback, private, link-local (cloud metadata), shared (CGNAT),
reserved, IPv4-mapped/compatible forms of them: only when the operator sets
``POSTBUS_ALLOW_PRIVATE_NETWORKS`` (a local trial) or lists the network in
``POSTBUS_ALLOWED_PRIVATE_NETWORKS`` (an internal callback receiver, say). Unspecified and multicast
addresses never.

Errors: :class:`Refused` (the policy said no: permanent) and :class:`Unreachable` (resolution or
connection failed: worth a retry). Callers map them onto their own error types."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urljoin, urlsplit, urlunsplit

import httpx

MAX_REDIRECTS = 5
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str, int], Awaitable[list[str]]]


async def system_resolver(host: str, port: int) -> list[str]:
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise Unreachable(f"cannot resolve {host}: {getattr(exc, 'strerror', None) or exc}") from None
    return [str(info[4][0]) for info in infos]


class Refused(Exception):
    """The network policy refuses this target (permanent)."""


class Unreachable(Exception):
    """The target could not be resolved or reached (temporary)."""

    def __init__(self, message: str, *, timeout: bool = False) -> None:
        super().__init__(message)
        self.timeout = timeout


def _parse_networks(spec: str | Iterable[str]) -> tuple[Network, ...]:
    items = spec.split(",") if isinstance(spec, str) else spec
    return tuple(ipaddress.ip_network(s.strip(), strict=False) for s in items if s and s.strip())


def _canonical(ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return addr.ipv4_mapped  # ::ffff:127.0.0.1 is loopback
        if addr.sixtofour is not None:
            return addr.sixtofour  # 2002:7f00:1::/48 embeds 127.0.0.1
        packed = addr.packed
        if packed[:12] == b"\x00" * 12 and addr not in (ipaddress.IPv6Address("::"), ipaddress.IPv6Address("::1")):
            return ipaddress.IPv4Address(packed[12:])  # deprecated IPv4-compatible ::127.0.0.1
    return addr


@dataclass(frozen=True)
class NetPolicy:
    allow_private: bool = False
    allowed_networks: tuple[Network, ...] = field(default_factory=tuple)
    resolver: Resolver = system_resolver  # injectable for unit tests; production uses the system's

    @classmethod
    def from_settings(cls, settings: Any) -> NetPolicy:
        return cls(bool(settings.allow_private_networks), _parse_networks(settings.allowed_private_networks))

    def address_allowed(self, ip: str) -> bool:
        addr = _canonical(ip)
        if addr is None or addr.is_unspecified or addr.is_multicast:
            return False
        if self.allow_private or addr.is_global:
            return True
        return any(addr.version == net.version and addr in net for net in self.allowed_networks)

    def literal_refusal(self, url: str) -> str | None:
        """Why the API must refuse ``url`` without resolving anything (None: acceptable as far as can be
        told before resolution). Used for a clear 422 on tenant input; the connection is checked again."""
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 - raises on a bad port
        except ValueError:
            return "not a valid URL"
        if parts.scheme not in ("http", "https"):
            return "must be an http(s) URL"
        if not parts.hostname:
            return "has no host"
        if "@" in parts.netloc:
            return "must not carry credentials (user:password@); use client_auth"
        host = parts.hostname.rstrip(".").lower()
        if _canonical(host) is not None:
            if not self.address_allowed(host):
                return f"points to a non-public address ({host})"
            return None
        try:
            as_int = ipaddress.ip_address(int(host, 0))  # 2130706433, 0x7f000001: libraries accept them
        except ValueError:
            as_int = None
        if as_int is not None and not self.address_allowed(str(as_int)):
            return f"points to a non-public address ({host})"
        if (host == "localhost" or host.endswith(".localhost")) and not self.address_allowed("127.0.0.1"):
            return "points to the server itself (localhost)"
        return None

    def host_refusal(self, host: str) -> str | None:
        """:meth:`literal_refusal` for a bare host name or address (an SMTP account's ``host``, IPv6
        with or without brackets); None: acceptable before resolution (the connection is checked again)."""
        h = host.strip()
        if h.startswith("[") and h.endswith("]"):
            h = h[1:-1]
        if not h or any(c in h for c in "/?#@[] "):
            return "is not a valid host name"
        why = self.literal_refusal(f"http://[{h}]/" if ":" in h else f"http://{h}/")
        return "is not a valid host name" if why in ("not a valid URL", "has no host") else why

    async def resolve(self, host: str, port: int) -> str:
        """The address to connect to; every address the name resolves to must be allowed."""
        addresses = await self.resolver(host, port)
        if not addresses:
            raise Unreachable(f"cannot resolve {host}")
        refused = [a for a in addresses if not self.address_allowed(a)]
        if refused:
            raise Refused(f"{host} resolves to a non-public address ({refused[0]}); "
                          "connections to private networks are not allowed")
        return addresses[0]

    @asynccontextmanager
    async def stream(self, client: httpx.AsyncClient, method: str, url: str, *,
                     headers: dict[str, str] | None = None, auth: httpx.Auth | None = None,
                     json_body: Any = None, follow: bool = True) -> AsyncIterator[httpx.Response]:
        """One HTTP request with the address check on every hop, connected to the checked address.
        ``client`` must be created with ``follow_redirects=False`` and ``trust_env=False`` (an
        environment proxy would bypass the check). Yields the final response, not yet read."""
        for _ in range(MAX_REDIRECTS + 1):
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise Refused(f"URL must be http(s): {safe_url(url)!r}")
            if "@" in parts.netloc:
                raise Refused("URL must not carry credentials")
            try:
                port = parts.port or (443 if parts.scheme == "https" else 80)
            except ValueError:
                raise Refused(f"invalid port in {safe_url(url)!r}") from None
            ip = await self.resolve(parts.hostname, port)
            host_ip = f"[{ip}]" if ":" in ip else ip
            pinned = urlunsplit((parts.scheme, f"{host_ip}:{port}", parts.path or "/", parts.query, ""))
            hdrs = {**(headers or {}), "Host": parts.netloc}
            extensions = {"sni_hostname": parts.hostname} if parts.scheme == "https" else {}
            try:
                async with client.stream(method, pinned, headers=hdrs, auth=auth or httpx.USE_CLIENT_DEFAULT,
                                         json=json_body, extensions=extensions) as resp:
                    if resp.is_redirect and follow:
                        nxt = urljoin(url, resp.headers.get("location", ""))
                        if urlsplit(nxt)[:2] != parts[:2]:
                            headers, auth = None, None  # credentials never follow to another origin
                        if resp.status_code in (301, 302, 303) and method != "HEAD":
                            method, json_body = "GET", None
                        url = nxt
                        continue
                    yield resp
                    return
            except httpx.TimeoutException:
                raise Unreachable(f"timed out: {safe_url(url)}", timeout=True) from None
            except httpx.TransportError as exc:
                raise Unreachable(f"connection failed: {safe_url(url)}: {type(exc).__name__}") from None
        raise Refused(f"too many redirects: {safe_url(url)}")


def safe_url(url: str) -> str:
    """A URL for logs and error messages: without userinfo and query (they may carry credentials)."""
    try:
        p = urlsplit(url)
        return urlunsplit((p.scheme, p.netloc.rpartition("@")[2], p.path, "", ""))[:200]
    except ValueError:
        return "<invalid URL>"


def client(timeout: float, **kwargs: Any) -> httpx.AsyncClient:
    """An HTTP client fit for :meth:`NetPolicy.stream`: no redirects of its own, no environment proxy."""
    return httpx.AsyncClient(trust_env=False, follow_redirects=False, timeout=httpx.Timeout(timeout), **kwargs)
