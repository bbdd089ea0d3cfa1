"""Encryption of secrets before they go on a topic (Fernet: AES-128-CBC + HMAC-SHA256)."""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken

from services.common.settings import Settings


class SecretBox:
    def __init__(self, key: str | bytes) -> None:
        self._fernet = Fernet(key)

    def encrypt(self, plaintext: str | None) -> str | None:
        if plaintext is None or plaintext == "":
            return None
        return self._fernet.encrypt(plaintext.encode()).decode()

    def decrypt(self, token: str | None) -> str | None:
        if token is None:
            return None
        try:
            return self._fernet.decrypt(token.encode()).decode()
        except InvalidToken as exc:
            raise ValueError("secret cannot be decrypted with the configured POSTBUS_SECRET_KEY") from exc


class MissingSecretKey(RuntimeError):
    pass


def load_secret_box(settings: Settings) -> SecretBox:
    """The key comes from POSTBUS_SECRET_KEY. Only in dev mode is one generated (and kept in the
    state folder, so every local service shares it); elsewhere a missing key stops the service."""
    if settings.secret_key:
        return SecretBox(settings.secret_key)
    if not settings.dev:
        raise MissingSecretKey(
            "POSTBUS_SECRET_KEY is not set. Generate one with "
            "`python -c 'from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())'` "
            "or set POSTBUS_DEV=1 for a local run."
        )
    path = Path(settings.state_dir) / "secret.key"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(Fernet.generate_key())
    return SecretBox(path.read_bytes().strip())
