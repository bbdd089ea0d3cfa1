"""SMTP connections for one account, reused across messages, health-checked and closed when idle.

TLS: implicit (``use_tls`` true, or port 465 when unset), STARTTLS when offered (unset), or plain
(false). Certificates are verified by default against the system CAs plus the optional
``sender_ca_bundle`` and the account's own ``ca_bundle_pem``; only an account with ``tls_verify``
false, or listed in ``sender_tls_insecure_accounts``, skips verification.

Credentials: AUTH (the account's password) is only sent over TLS. An account with a ``user`` whose
connection is not implicit TLS upgrades with STARTTLS (also when ``use_tls`` is false); a server
that does not offer it (or an attacker who stripped it) fails the message with
:class:`InsecureAuthRefused` before any AUTH, unless the account sets ``allow_insecure_auth`` or
the operator ``sender_allow_insecure_auth``.

Network policy: the account's host is tenant input. It is resolved through
:class:`services.common.netpolicy.NetPolicy` (every address must be allowed) and the session
connects to the checked address, with the configured host name for TLS (SNI and certificate); a
refused target fails the message with :class:`TargetRefused`. Each account has its own
pool of ``max_connections`` sessions (one per sender worker; the setting's default when unset).
Timeouts: connect, each command, and the whole transaction are separate settings. A process-wide
semaphore caps the SMTP transactions running at once (``sender_max_concurrent_smtp``)."""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import ssl
import time
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import aiosmtplib

from services.common.netpolicy import NetPolicy, Refused, Unreachable
from services.common.settings import get_settings

log = logging.getLogger("postbus.sender.smtp")


@dataclass(frozen=True)
class SmtpTarget:
    host: str
    port: int
    user: str | None
    password: str | None
    use_tls: bool | None  # True implicit TLS, False plain, None STARTTLS when offered (implicit on 465)
    timeout_s: float  # each command
    ehlo_name: str | None
    validate_certs: bool = True
    ca_bundle: str | None = None
    ca_pem: str | None = None  # the account's extra CAs (PEM text)
    connect_timeout_s: float = 15.0
    send_timeout_s: float = 300.0
    allow_insecure_auth: bool = False  # the account's (or the operator's) opt-in to AUTH without TLS

    def __repr__(self) -> str:  # never the password, even in a traceback
        return f"SmtpTarget({self.host}:{self.port}, user={self.user!r}, use_tls={self.use_tls})"


class InsecureAuthRefused(Exception):
    """AUTH would go over an unencrypted connection (no TLS, no STARTTLS offered): permanent."""


class TargetRefused(Exception):
    """The network policy refuses the account's SMTP host: permanent."""


def make_target(account_key: str, host: str, port: int, user: str | None, password: str | None,
                use_tls: bool | None, tls_verify: bool = True, ca_pem: str | None = None,
                allow_insecure_auth: bool = False) -> SmtpTarget:
    """The account's target with the process's TLS and timeout settings."""
    s = get_settings()
    return SmtpTarget(host=host, port=port, user=user, password=password, use_tls=use_tls,
                      timeout_s=s.sender_command_timeout_s, ehlo_name=s.sender_ehlo_name,
                      validate_certs=tls_verify and verify_certs(account_key), ca_bundle=s.sender_ca_bundle,
                      ca_pem=ca_pem or None,
                      connect_timeout_s=s.sender_connect_timeout_s, send_timeout_s=s.sender_send_timeout_s,
                      allow_insecure_auth=bool(allow_insecure_auth) or s.sender_allow_insecure_auth)


def verify_certs(account_key: str) -> bool:
    """False only for an account the operator opted out explicitly ("tenant/account")."""
    insecure = {a.strip() for a in get_settings().sender_tls_insecure_accounts.split(",") if a.strip()}
    return account_key not in insecure


def pool_size(account: dict[str, Any] | None) -> int:
    """SMTP sessions (sender workers) for an account, i.e. how many of its messages are in flight at
    once: its ``max_connections`` (else the setting), capped by its ``batch_size`` when that is
    positive (genro-mail-proxy 0.6: at most ``batch_size`` messages of an account per dispatch;
    1 = strict priority + FIFO order)."""
    own = account.get("max_connections") if account else None
    size = int(own) if own else get_settings().sender_connections_per_account
    batch = account.get("batch_size") if account else None
    return min(size, int(batch)) if batch is not None and batch > 0 else size


@lru_cache(maxsize=64)
def tls_context(validate: bool, ca_bundle: str | None, ca_pem: str | None = None) -> ssl.SSLContext:
    if not validate:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    ctx = ssl.create_default_context()  # system CAs, hostname checked
    if ca_bundle:
        ctx.load_verify_locations(cafile=ca_bundle)
    if ca_pem:  # validated by the API; the account's extra CAs join the trusted set
        ctx.load_verify_locations(cadata=ca_pem)
    return ctx


async def open_checked_socket(host: str, port: int, timeout_s: float) -> socket.socket:
    """A TCP socket connected to ``host``'s address as checked by the network policy (every address
    the name resolves to must be allowed; no second resolution)."""
    policy = NetPolicy.from_settings(get_settings())
    try:
        ip = await asyncio.wait_for(policy.resolve(host, port), timeout_s)
    except Refused as exc:
        raise TargetRefused(f"SMTP host refused by the network policy: {exc}") from None
    except Unreachable as exc:
        raise aiosmtplib.SMTPConnectError(f"Error connecting to {host} on port {port}: {exc}") from None
    sock = socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, (ip, port)), timeout_s)
    except TimeoutError:
        sock.close()
        raise aiosmtplib.SMTPConnectTimeoutError(f"Timed out connecting to {host} on port {port}") from None
    except OSError as exc:
        sock.close()
        raise aiosmtplib.SMTPConnectError(f"Error connecting to {host} on port {port}: {exc}") from None
    except BaseException:
        sock.close()
        raise
    return sock


_slots: asyncio.Semaphore | None = None


def _global_slots() -> asyncio.Semaphore:
    global _slots
    if _slots is None:
        _slots = asyncio.Semaphore(get_settings().sender_max_concurrent_smtp)
    return _slots


class Connection:
    """One SMTP session; a worker owns it, so there is no sharing across coroutines."""

    def __init__(self, target: SmtpTarget) -> None:
        s = get_settings()
        self.target = target
        self.client: aiosmtplib.SMTP | None = None
        self.last_used = 0.0
        self.idle_noop_s = s.sender_idle_noop_s
        self.idle_close_s = s.sender_idle_close_s

    async def _connect(self) -> aiosmtplib.SMTP:
        t = self.target
        implicit = t.use_tls is True or (t.use_tls is None and t.port == 465)
        sock = await open_checked_socket(t.host, t.port, t.connect_timeout_s)
        client = aiosmtplib.SMTP(
            hostname=t.host,  # the configured name: TLS SNI and certificate check
            sock=sock,  # connected to the address the network policy checked
            use_tls=implicit,
            start_tls=False,  # decided below, once the server's extensions are known
            timeout=t.timeout_s,
            local_hostname=t.ehlo_name,
            validate_certs=t.validate_certs,
            tls_context=tls_context(t.validate_certs, t.ca_bundle, t.ca_pem),
        )
        try:
            try:
                await asyncio.wait_for(client.connect(), t.connect_timeout_s)
            except BaseException:
                sock.close()
                raise
            encrypted = implicit
            if not implicit:
                # STARTTLS when offered (use_tls unset), and always before a password unless the
                # account opted in to AUTH in clear
                wants_tls = t.use_tls is None or (bool(t.user) and not t.allow_insecure_auth)
                try:
                    await client.ehlo()
                except aiosmtplib.SMTPHeloError:
                    await client.helo()  # an SMTP (not ESMTP) server: no extensions, no STARTTLS
                if wants_tls and client.supports_extension("starttls"):
                    await client.starttls()
                    encrypted = True
            if t.user:
                if not encrypted and not t.allow_insecure_auth:
                    raise InsecureAuthRefused(
                        f"{t.host}:{t.port} offers no STARTTLS (or it was stripped): the account's password "
                        "is never sent over an unencrypted connection; use a TLS port (use_tls true), "
                        "fix the server, or opt in with the account's allow_insecure_auth")
                await client.login(t.user, t.password or "")
        except BaseException:
            client.close()
            raise
        return client

    async def _healthy(self) -> bool:
        """Reuse an idle session only if it still answers (NOOP); a stale one is closed."""
        client = self.client
        if client is None or not client.is_connected:
            return False
        idle = time.monotonic() - self.last_used
        if idle > self.idle_close_s:
            return False
        if idle > self.idle_noop_s:
            try:
                await client.noop()
            except Exception:
                return False
        return True

    async def send(self, sender: str, recipients: list[str], data: bytes) -> None:
        async with _global_slots():
            if self.client is not None and not await self._healthy():
                await self.close()
            if self.client is None:
                self.client = await self._connect()
            try:
                if self.client.supports_extension("pipelining") and sender.isascii() and all(
                        r.isascii() for r in recipients):
                    async with asyncio.timeout(self.target.send_timeout_s):  # no task per send, unlike wait_for
                        await pipelined_sendmail(self.client, sender, recipients, data)
                else:
                    async with asyncio.timeout(self.target.send_timeout_s):
                        await self.client.sendmail(sender, recipients, data)
            except aiosmtplib.SMTPRecipientsRefused:
                await self._reset()
                raise
            except aiosmtplib.SMTPResponseException as exc:
                if exc.code == 421:  # the server is closing the session: reconnect next time
                    await self.close()
                else:
                    await self._reset()
                raise
            except BaseException:
                await self.close()
                raise
            self.last_used = time.monotonic()

    async def _reset(self) -> None:
        try:
            if self.client is not None and self.client.is_connected:
                await self.client.rset()
                self.last_used = time.monotonic()
        except Exception:
            await self.close()

    async def close(self) -> None:
        client, self.client = self.client, None
        if client is not None:
            try:
                if client.is_connected:
                    await asyncio.wait_for(client.quit(), 5.0)
            except Exception:
                client.close()


# --- RFC 2920 PIPELINING ------------------------------------------------------------------------------

_PERIOD = re.compile(rb"(?m)^\.")
_LINE_END = re.compile(rb"\r\n|\n|\r(?!\n)")


def _responses(buf: bytearray) -> list[tuple[int, str]]:
    """The complete replies at the head of ``buf`` (consumed from it): multi-line replies joined."""
    out: list[tuple[int, str]] = []
    lines: list[str] = []
    offset = 0
    while True:
        end = buf.find(b"\n", offset)
        if end == -1:
            break
        line = bytes(buf[offset:end + 1]).rstrip(b"\r\n")
        offset = end + 1
        try:
            code = int(line[:3])
        except ValueError:
            raise aiosmtplib.SMTPResponseException(-1, f"malformed SMTP reply: {line[:80]!r}") from None
        lines.append(line[4:].decode("utf-8", "surrogateescape"))
        if line[3:4] != b"-":
            out.append((code, "\n".join(lines)))
            lines = []
            del buf[:offset]
            offset = 0
    return out


class _ReplyTap(asyncio.Protocol):
    """The session's protocol during a pipelined transaction: received bytes go to the transaction's
    reader; everything else reaches aiosmtplib's protocol as before. Installed with
    ``transport.set_protocol`` (not by overriding ``data_received`` on the instance: uvloop's
    transports keep the bound method they were given)."""

    def __init__(self, inner: asyncio.Protocol, on_data: Any, on_lost: Any) -> None:
        self.inner = inner
        self.on_data = on_data
        self.on_lost = on_lost

    def data_received(self, data: bytes) -> None:
        self.on_data(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self.on_lost(exc)
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


async def pipelined_sendmail(client: aiosmtplib.SMTP, sender: str, recipients: list[str], data: bytes) -> None:
    """One mail transaction with RFC 2920 PIPELINING: ``MAIL FROM``, every ``RCPT TO`` and ``DATA``
    in one write, their replies read together, then the message in a second write: two round trips
    instead of ``3 + recipients``. Raises what ``aiosmtplib.SMTP.sendmail`` raises (sender refused,
    all recipients refused, data error), so the callers classify it the same way; a partial recipient
    refusal sends to the others, as ``sendmail`` does. ``sender`` and ``recipients`` are bare
    addresses, already parsed (not parsed again here: that was 3 % of the sender's CPU).

    The replies are read straight off the session's transport (a :class:`_ReplyTap` is its protocol
    for the duration of the transaction, aiosmtplib's again after), because aiosmtplib reads one
    reply per command written."""
    proto = client.protocol
    if proto is None or proto.transport is None or proto.transport.is_closing():
        raise aiosmtplib.SMTPServerDisconnected("connection lost")
    normalized = _LINE_END.sub(b"\r\n", data)
    body = _PERIOD.sub(b"..", normalized)
    if not body.endswith(b"\r\n"):
        body += b"\r\n"
    mail = f"MAIL FROM:<{sender}>"
    if client.supports_extension("size"):
        mail += f" SIZE={len(normalized)}"  # as aiosmtplib's sendmail counts it (RFC 1870)
    commands = [mail] + [f"RCPT TO:<{r}>" for r in recipients] + ["DATA"]
    for a in (sender, *recipients):  # bare addr-specs (services/sender/addresses.py parsed them once)
        if "\r" in a or "\n" in a or "<" in a or ">" in a:
            raise ValueError("address contains a line break or an angle bracket")
    buf = bytearray()
    replies: list[tuple[int, str]] = []
    arrived = asyncio.Event()
    lost: list[BaseException | None] = []

    def on_data(chunk: bytes) -> None:
        buf.extend(chunk)
        arrived.set()

    def on_lost(exc: Exception | None) -> None:
        lost.append(exc)
        arrived.set()

    async def read(n: int) -> list[tuple[int, str]]:
        while len(replies) < n:
            if lost:
                raise aiosmtplib.SMTPServerDisconnected("connection lost")
            arrived.clear()
            replies.extend(_responses(buf))
            if len(replies) < n:
                await arrived.wait()
        got, replies[:] = replies[:n], replies[n:]
        return got

    # the worker owns the session: no other command runs meanwhile
    transport = proto.transport
    transport.set_protocol(_ReplyTap(proto, on_data, on_lost))
    try:
        transport.write(("\r\n".join(commands) + "\r\n").encode("ascii"))
        got = await read(len(commands))
        (mail_code, mail_msg), rcpts, (data_code, data_msg) = got[0], got[1:-1], got[-1]
        refused = [aiosmtplib.SMTPRecipientRefused(code, msg, r)
                   for r, (code, msg) in zip(recipients, rcpts, strict=True) if code not in (250, 251)]
        if data_code == 354 and (mail_code != 250 or len(refused) == len(recipients)):
            transport.write(b".\r\n")  # an empty message ends the data phase; it is refused below
            await read(1)
        if mail_code != 250:
            raise aiosmtplib.SMTPSenderRefused(mail_code, mail_msg, sender)
        if len(refused) == len(recipients):
            raise aiosmtplib.SMTPRecipientsRefused(refused)
        if data_code != 354:
            raise aiosmtplib.SMTPDataError(data_code, data_msg)
        transport.write(body + b".\r\n")
        (code, msg), = await read(1)
        if code != 250:
            raise aiosmtplib.SMTPDataError(code, msg)
    finally:
        transport.set_protocol(proto)
