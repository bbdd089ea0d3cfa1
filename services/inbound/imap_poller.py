"""The IMAP bounce poller: reads new messages of the configured mailbox (instance config ``bounce``:
imap_host, imap_port, imap_user, imap_password, mailbox, poll_interval_seconds; ``bounce_enabled``)
with the stdlib ``imaplib`` in a worker thread, hands each to :class:`Inbound`, and remembers its
position durably: UIDVALIDITY + last UID per mailbox as a compacted record on
``postbus.inbound.imap-position``, written after each message is processed. Messages are fetched
with ``BODY.PEEK[]`` (the mailbox is not modified). A ``bounce.reload`` command or a change of the
instance config makes it reconnect with the new settings at once.

TLS: port 993 is implicit TLS; any other port upgrades with STARTTLS when the server offers it.
Certificates are always verified (system CAs plus ``inbound_imap_ca_file``, host name checked). The
password never goes over an unencrypted connection: a server without STARTTLS is refused before
LOGIN (:class:`PlaintextLoginRefused`) unless the operator sets
``inbound_imap_allow_plaintext_login``."""

from __future__ import annotations

import asyncio
import contextlib
import imaplib
import logging
import re
import ssl
import time
from dataclasses import dataclass
from typing import Any

from services.common.avro import codec
from services.common.config_view import ConfigView
from services.common.crypto import SecretBox
from services.common.settings import get_settings
from services.common.topics import IMAP_POSITION
from services.inbound.service import Inbound

log = logging.getLogger("postbus.inbound.imap")

BATCH = 100
_UIDVALIDITY = re.compile(rb"UIDVALIDITY (\d+)")


@dataclass(frozen=True)
class ImapConfig:
    host: str
    port: int
    user: str
    password: str | None
    mailbox: str
    interval_s: float
    ca_file: str | None = None  # extra CA certificates (PEM file) trusted on top of the system's
    allow_plaintext_login: bool = False  # the operator's explicit opt-in to LOGIN without TLS

    def __repr__(self) -> str:  # never the password, even in a traceback
        return f"ImapConfig({self.key})"

    @property
    def key(self) -> str:
        return f"{self.host}:{self.port}/{self.user}/{self.mailbox}"


def config_from(instance: dict[str, Any] | None, box: SecretBox) -> ImapConfig | None:
    if not instance or not instance.get("bounce_enabled") or not instance.get("bounce_imap_host"):
        return None
    settings = get_settings()
    return ImapConfig(
        host=instance["bounce_imap_host"],
        port=int(instance.get("bounce_imap_port") or 993),
        user=instance.get("bounce_imap_user") or "",
        password=box.decrypt(instance.get("bounce_imap_password_enc")),
        mailbox=instance.get("bounce_mailbox") or "INBOX",
        interval_s=float(max(1, instance.get("bounce_poll_interval_seconds") or 60)),
        ca_file=settings.inbound_imap_ca_file or None,
        allow_plaintext_login=settings.inbound_imap_allow_plaintext_login,
    )


class PlaintextLoginRefused(RuntimeError):
    """The IMAP server offers no TLS: the password is not sent."""


def tls_context(cfg: ImapConfig) -> ssl.SSLContext:
    """A verifying context: system CAs plus the configured CA file, host name checked."""
    ctx = ssl.create_default_context()
    if cfg.ca_file:
        ctx.load_verify_locations(cafile=cfg.ca_file)
    return ctx


def connect(cfg: ImapConfig, timeout_s: float = 30.0) -> imaplib.IMAP4:
    """An IMAP session ready for LOGIN: TLS (implicit on 993, else STARTTLS), verified; without TLS
    only when nothing secret will be sent or the operator allowed plaintext login."""
    ctx = tls_context(cfg)
    if cfg.port == 993:
        return imaplib.IMAP4_SSL(cfg.host, cfg.port, ssl_context=ctx, timeout=timeout_s)
    imap = imaplib.IMAP4(cfg.host, cfg.port, timeout=timeout_s)
    try:
        if "STARTTLS" in imap.capabilities:
            imap.starttls(ssl_context=ctx)
        elif cfg.user and not cfg.allow_plaintext_login:
            raise PlaintextLoginRefused(
                f"IMAP server {cfg.host}:{cfg.port} offers no STARTTLS (or it was stripped): the password "
                "is never sent over an unencrypted connection; use port 993 (implicit TLS) or enable "
                "STARTTLS on the server (operator opt-out: POSTBUS_INBOUND_IMAP_ALLOW_PLAINTEXT_LOGIN)")
    except BaseException:
        with contextlib.suppress(Exception):
            imap.shutdown()
        raise
    return imap


def start_uid(position: dict[str, Any] | None, uidvalidity: int) -> int:
    """The last UID already processed; 0 when the mailbox is new or its UIDVALIDITY changed (the UIDs
    were renumbered: everything is read again; event ids are deterministic, so nothing counts twice)."""
    if not position or int(position.get("uidvalidity", -1)) != uidvalidity:
        return 0
    return int(position.get("last_uid", 0))


def new_uids(search_data: list[bytes | None], last_uid: int) -> list[int]:
    """UIDs from a ``UID SEARCH UID n:*`` answer above ``last_uid`` (``n:*`` always matches the newest
    message even when its UID is below n), ascending, at most BATCH."""
    uids = sorted({int(x) for chunk in search_data if chunk for x in chunk.split() if x.isdigit()})
    return [u for u in uids if u > last_uid][:BATCH]


def fetch_new(cfg: ImapConfig, position: dict[str, Any] | None, timeout_s: float = 30.0
              ) -> tuple[int, list[tuple[int, bytes]]]:
    """Blocking: connect, select read-only, return (uidvalidity, [(uid, raw message)]) after the position."""
    imap = connect(cfg, timeout_s)
    try:
        if cfg.user:
            imap.login(cfg.user, cfg.password or "")
        typ, _ = imap.select(_quote(cfg.mailbox), readonly=True)
        if typ != "OK":
            raise RuntimeError(f"cannot select mailbox {cfg.mailbox!r}")
        _, status = imap.status(_quote(cfg.mailbox), "(UIDVALIDITY)")
        m = _UIDVALIDITY.search(status[0] or b"") if status and isinstance(status[0], bytes) else None
        uidvalidity = int(m.group(1)) if m else 0
        last = start_uid(position, uidvalidity)
        _, data = imap.uid("SEARCH", None, f"UID {last + 1}:*")
        out: list[tuple[int, bytes]] = []
        for uid in new_uids(data, last):
            _, parts = imap.uid("FETCH", str(uid), "(BODY.PEEK[])")
            raw = next((p[1] for p in parts if isinstance(p, tuple) and len(p) > 1), None)
            if raw is not None:
                out.append((uid, bytes(raw)))
        return uidvalidity, out
    finally:
        with contextlib.suppress(Exception):
            imap.logout()


def _quote(mailbox: str) -> str:
    return '"' + mailbox.replace("\\", "\\\\").replace('"', '\\"') + '"'


class ImapPoller:
    def __init__(self, inbound: Inbound, instance: ConfigView, positions: ConfigView, box: SecretBox) -> None:
        self.inbound = inbound
        self.instance = instance
        self.positions = positions
        self.box = box
        self.wake = asyncio.Event()
        self.last_error: str | None = None
        self.polls = 0

    def reload(self) -> None:
        self.wake.set()

    async def run(self) -> None:
        while True:
            # cleared before the poll, so a reload (new config) arriving during a slow poll wakes the
            # next round at once instead of being lost
            self.wake.clear()
            cfg = config_from(self.instance.get("instance"), self.box)
            interval = 30.0
            if cfg is not None:
                interval = cfg.interval_s
                try:
                    await self.poll_once(cfg)
                    self.last_error = None
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    self.last_error = str(exc)
                    log.warning("IMAP poll failed", extra={"mailbox": cfg.key, "error": str(exc)})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), interval)

    async def poll_once(self, cfg: ImapConfig) -> int:
        while True:
            position = self.positions.get(cfg.key)
            uidvalidity, messages = await asyncio.to_thread(fetch_new, cfg, position)
            self.polls += 1
            for uid, data in messages:
                await self.inbound.handle(data, "imap")
                await self._save(cfg.key, uidvalidity, uid)
            if len(messages) < BATCH:
                return len(messages)

    async def _save(self, key: str, uidvalidity: int, uid: int) -> None:
        rec = {"mailbox": key, "uidvalidity": uidvalidity, "last_uid": uid, "updated_ts": int(time.time() * 1000)}
        fut = await self.inbound.producer.send(IMAP_POSITION, key=key.encode(),
                                               value=codec().encode("ImapPosition", rec))
        meta = await fut
        await self.positions.wait_for({meta.partition: meta.offset}, timeout=30)
