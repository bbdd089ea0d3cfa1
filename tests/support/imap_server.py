"""A real IMAP server for tests: Debian's dovecot on loopback with a throwaway configuration in a
temporary directory (plain auth allowed on loopback, one passwd-file user, maildir storage).
``tls=True``: STARTTLS offered with a self-signed certificate for 127.0.0.1/localhost made at start
(``cert_path``: the PEM a client must trust); plaintext LOGIN stays allowed by the server, so a
client's refusal to use it is its own.

    with DovecotServer() as imap:
        imap.append(b"From: ...")   # into INBOX of imap.user
        ... poll imap.host:imap.port with imap.user / imap.password ...

``DovecotServer.available()`` is False where dovecot is not installed (apt-get install dovecot-imapd)."""

from __future__ import annotations

import imaplib
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

CONF = """
base_dir = {d}/run
state_dir = {d}/state
log_path = {d}/dovecot.log
protocols = imap
listen = 127.0.0.1
{ssl}
disable_plaintext_auth = no
auth_mechanisms = plain login
mail_location = maildir:{d}/mail/%u
default_login_user = dovenull
default_internal_user = dovecot
default_internal_group = dovecot
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {d}/passwd
}}
userdb {{
  driver = static
  args = uid=nobody gid=nogroup home={d}/mail/%u
}}
service imap-login {{
  chroot =
  inet_listener imap {{
    address = 127.0.0.1
    port = {port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
service anvil {{
  chroot =
}}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class DovecotServer:
    def __init__(self, user: str = "bounces", password: str = "imap-secret", *, tls: bool = False) -> None:
        self.tls = tls
        self.cert_path: Path | None = None
        self.host = "127.0.0.1"
        self.port = _free_port()
        self.user = user
        self.password = password
        self._dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def available() -> bool:
        return shutil.which("dovecot") is not None

    def start(self) -> DovecotServer:
        d = Path(tempfile.mkdtemp(prefix="postbus-dovecot-"))
        d.chmod(0o755)  # the unprivileged login/mail processes walk this path
        (d / "mail").mkdir()
        shutil.chown(d / "mail", "nobody", "nogroup")
        (d / "passwd").write_text(f"{self.user}:{{PLAIN}}{self.password}\n")
        ssl_conf = "ssl = no"
        if self.tls:
            from tests.support.smtp_server import make_self_signed_cert

            (d / "tls").mkdir()
            self.cert_path, key_path = make_self_signed_cert(d / "tls", "imap.test")
            ssl_conf = f"ssl = yes\nssl_cert = <{self.cert_path}\nssl_key = <{key_path}"
        (d / "dovecot.conf").write_text(CONF.format(d=d, port=self.port, ssl=ssl_conf))
        self._dir = d
        self._proc = subprocess.Popen(["dovecot", "-F", "-c", str(d / "dovecot.conf")], stdin=subprocess.DEVNULL,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 20
        while True:
            try:
                with imaplib.IMAP4(self.host, self.port, timeout=2) as m:
                    m.login(self.user, self.password)
                return self
            except (OSError, imaplib.IMAP4.error):
                if time.monotonic() > deadline or self._proc.poll() is not None:
                    self.stop()
                    raise RuntimeError("dovecot did not start") from None
                time.sleep(0.2)

    def append(self, raw: bytes, mailbox: str = "INBOX") -> None:
        with imaplib.IMAP4(self.host, self.port, timeout=10) as m:
            m.login(self.user, self.password)
            typ, data = m.append(mailbox, None, None, raw)
            assert typ == "OK", data

    def log_text(self) -> str:
        """dovecot's log so far (``imap-login: Login: user=<...>`` for every successful LOGIN)."""
        try:
            return (self._dir / "dovecot.log").read_text(errors="replace") if self._dir else ""
        except OSError:
            return ""

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> DovecotServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
