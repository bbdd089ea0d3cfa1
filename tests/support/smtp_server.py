"""A real SMTP server on loopback for tests (aiosmtpd in its own thread).

    with RecordingSmtpServer(replies={"nobody@example.test": "550 5.1.1 user unknown"}) as smtp:
        ... send to smtp.host:smtp.port ...
        [msg] = smtp.wait_for(1, timeout=10)
        assert msg.message["Subject"] == "Hello"

Replies are scripted per recipient, at RCPT time (``replies``) or after DATA (``data_replies``).
A script is a dict or a callable. Dict keys: the exact address (case-insensitive), ``@domain``, or
``*``; values: an SMTP reply string, None (accept) or a callable ``rcpt -> reply | None`` (see
:class:`FailFirst`). A callable script gets the recipient and answers the same way.
Options: AUTH (``auth=("user", "password")``, PLAIN/LOGIN, allowed without TLS on loopback),
STARTTLS (``starttls=True``) or implicit TLS (``implicit_tls=True``) with a self-signed certificate
made at start, and a ``delay`` before answering DATA.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import email
import email.message
import email.policy
import ipaddress
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

Reply = str | None
ReplyFn = Callable[[str], Reply]
Script = Mapping[str, Reply | ReplyFn] | ReplyFn | None


@dataclass
class ReceivedMessage:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    message: email.message.EmailMessage
    peer: Any = None
    auth_user: str | None = None
    tls: bool = False
    received_at: float = field(default_factory=time.time)

    @property
    def subject(self) -> str | None:
        return self.message["Subject"]

    def body_text(self) -> str:
        """The text/plain part (or the first text part) decoded."""
        part = self.message.get_body(preferencelist=("plain", "html"))
        return part.get_content() if part is not None else ""


@dataclass
class RcptAttempt:
    rcpt: str
    reply: str  # what the server answered


class FailFirst:
    """Answer ``reply`` to the first ``times`` attempts (per recipient), then accept."""

    def __init__(self, times: int, reply: str = "451 4.7.1 try again later") -> None:
        self.times = times
        self.reply = reply
        self.counts: dict[str, int] = {}
        self._lock = threading.Lock()

    def __call__(self, rcpt: str) -> Reply:
        with self._lock:
            n = self.counts.get(rcpt, 0) + 1
            self.counts[rcpt] = n
        return self.reply if n <= self.times else None


def _lookup(script: Script, rcpt: str) -> Reply:
    if script is None:
        return None
    if callable(script):
        return script(rcpt)
    low = rcpt.lower()
    for key in (low, "@" + low.rpartition("@")[2], "*"):
        for k, v in script.items():
            if k.lower() == key:
                return v(rcpt) if callable(v) else v
    return None


def make_self_signed_cert(folder: Path, hostname: str = "localhost") -> tuple[Path, Path]:
    """A self-signed certificate for ``hostname``, localhost and 127.0.0.1: (cert.pem, key.pem)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = dt.datetime.now(dt.UTC)
    sans = [x509.DNSName(hostname), x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class _Handler:
    def __init__(self, owner: RecordingSmtpServer) -> None:
        self.owner = owner

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):  # aiosmtpd hook
        reply = _lookup(self.owner.replies, address)
        self.owner._record_rcpt(address, reply or "250 OK")
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):  # aiosmtpd hook
        if self.owner.delay:
            await asyncio.sleep(self.owner.delay)
        reply = None
        for rcpt in envelope.rcpt_tos:
            reply = _lookup(self.owner.data_replies, rcpt)
            if reply:
                break
        raw = envelope.original_content or envelope.content
        if isinstance(raw, str):
            raw = raw.encode("utf-8", "surrogateescape")
        msg = ReceivedMessage(
            mail_from=envelope.mail_from,
            rcpt_tos=list(envelope.rcpt_tos),
            data=raw,
            message=email.message_from_bytes(raw, policy=email.policy.default),  # type: ignore[arg-type]
            peer=session.peer,
            auth_user=session.auth_data if isinstance(session.auth_data, str) else None,
            tls=session.ssl is not None or self.owner.implicit_tls,
        )
        self.owner._record_data(msg, reply)
        return reply or "250 2.0.0 OK: queued"


class RecordingSmtpServer:
    def __init__(
        self,
        port: int = 0,
        host: str = "127.0.0.1",
        *,
        replies: Script = None,
        data_replies: Script = None,
        auth: tuple[str, str] | None = None,
        auth_required: bool | None = None,
        starttls: bool = False,
        require_starttls: bool = False,
        implicit_tls: bool = False,
        delay: float = 0.0,
        server_hostname: str = "smtp.test",
    ) -> None:
        self.host = host
        self.port = port
        self.replies = replies
        self.data_replies = data_replies
        self.auth = auth
        self.auth_required = bool(auth) if auth_required is None else auth_required
        self.starttls = starttls or require_starttls
        self.require_starttls = require_starttls
        self.implicit_tls = implicit_tls
        self.delay = delay
        self.server_hostname = server_hostname
        self.cert_path: Path | None = None
        self.key_path: Path | None = None
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._controller: Controller | None = None
        self._cond = threading.Condition()
        self._messages: list[ReceivedMessage] = []
        self._rejected: list[tuple[ReceivedMessage, str]] = []
        self._rcpts: list[RcptAttempt] = []
        self.auth_failures = 0
        self.auth_attempts = 0  # every AUTH PLAIN/LOGIN exchange the server saw, right or wrong

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> RecordingSmtpServer:
        ctx = None
        if self.starttls or self.implicit_tls:
            self._tmp = tempfile.TemporaryDirectory(prefix="smtp-test-")
            self.cert_path, self.key_path = make_self_signed_cert(Path(self._tmp.name), self.server_hostname)
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(self.cert_path, self.key_path)
        kwargs: dict[str, Any] = {
            "server_hostname": self.server_hostname,
            "ready_timeout": 10.0,
        }
        if self.auth:
            kwargs.update(
                authenticator=self._authenticate,
                auth_required=self.auth_required,
                # plain-text AUTH is fine on loopback; with STARTTLS offered, AUTH needs it first
                auth_require_tls=self.starttls,
            )
        if self.implicit_tls:
            kwargs["ssl_context"] = ctx
        elif self.starttls:
            kwargs.update(tls_context=ctx, require_starttls=self.require_starttls)
        fixed = self.port != 0
        for attempt in range(5):
            port = self.port if fixed else _free_port(self.host)
            controller = Controller(_Handler(self), hostname=self.host, port=port, **kwargs)
            try:
                controller.start()
            except Exception:
                if fixed or attempt == 4:
                    raise
                continue
            self._controller, self.port = controller, port
            return self
        raise RuntimeError("unreachable")

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> RecordingSmtpServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    def client_tls_context(self) -> ssl.SSLContext:
        """An SSL context that trusts this server's self-signed certificate."""
        if self.cert_path is None:
            raise RuntimeError("server runs without TLS")
        return ssl.create_default_context(cafile=str(self.cert_path))

    # ---------------------------------------------------------------- scripting
    def set_reply(self, rcpt: str, reply: Reply | ReplyFn, *, stage: str = "rcpt") -> None:
        """Script one more recipient (``stage`` "rcpt" or "data"); turns a callable script into a dict."""
        attr = "replies" if stage == "rcpt" else "data_replies"
        current = getattr(self, attr)
        if current is None or callable(current):
            current = {} if current is None else {"*": current}
        current = dict(current)
        current[rcpt] = reply
        setattr(self, attr, current)

    def clear_replies(self) -> None:
        self.replies = None
        self.data_replies = None

    # ---------------------------------------------------------------- records
    def _authenticate(self, server, session, envelope, mechanism, auth_data) -> AuthResult:
        with self._cond:
            self.auth_attempts += 1
        if isinstance(auth_data, LoginPassword) and self.auth is not None:
            user = auth_data.login.decode("utf-8", "replace")
            password = auth_data.password.decode("utf-8", "replace")
            if (user, password) == self.auth:
                return AuthResult(success=True, auth_data=user)
        with self._cond:
            self.auth_failures += 1
        return AuthResult(success=False, handled=False)

    def _record_rcpt(self, rcpt: str, reply: str) -> None:
        with self._cond:
            self._rcpts.append(RcptAttempt(rcpt, reply))
            self._cond.notify_all()

    def _record_data(self, msg: ReceivedMessage, reply: Reply) -> None:
        with self._cond:
            if reply:
                self._rejected.append((msg, reply))
            else:
                self._messages.append(msg)
            self._cond.notify_all()

    @property
    def messages(self) -> list[ReceivedMessage]:
        """Accepted messages, in arrival order (a copy)."""
        with self._cond:
            return list(self._messages)

    @property
    def rejected(self) -> list[tuple[ReceivedMessage, str]]:
        """Messages refused after DATA, with the reply given."""
        with self._cond:
            return list(self._rejected)

    @property
    def rcpt_attempts(self) -> list[RcptAttempt]:
        """Every RCPT TO seen, accepted or not, with the reply given."""
        with self._cond:
            return list(self._rcpts)

    def messages_to(self, rcpt: str) -> list[ReceivedMessage]:
        return [m for m in self.messages if rcpt.lower() in (r.lower() for r in m.rcpt_tos)]

    def reset(self) -> None:
        with self._cond:
            self._messages.clear()
            self._rejected.clear()
            self._rcpts.clear()
            self.auth_failures = 0
            self.auth_attempts = 0

    def wait_for(
        self,
        count: int = 1,
        timeout: float = 10.0,
        predicate: Callable[[ReceivedMessage], bool] | None = None,
    ) -> list[ReceivedMessage]:
        """Block until at least ``count`` accepted messages (matching ``predicate`` when given) are
        there; returns them. Raises TimeoutError with what arrived otherwise."""

        def matching() -> list[ReceivedMessage]:
            return [m for m in self._messages if predicate is None or predicate(m)]

        deadline = time.monotonic() + timeout
        with self._cond:
            while len(found := matching()) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(
                        f"expected {count} message(s) within {timeout}s, got {len(found)} "
                        f"(accepted {len(self._messages)}, refused after DATA {len(self._rejected)}, "
                        f"RCPT attempts {len(self._rcpts)})"
                    )
                self._cond.wait(left)
            return found

    def wait_for_rcpt_attempts(self, count: int, timeout: float = 10.0) -> list[RcptAttempt]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self._rcpts) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"expected {count} RCPT attempt(s) within {timeout}s, got {len(self._rcpts)}")
                self._cond.wait(left)
            return list(self._rcpts)


def addresses(messages: Iterable[ReceivedMessage]) -> list[str]:
    """All recipients of the given messages, flattened."""
    return [r for m in messages for r in m.rcpt_tos]
