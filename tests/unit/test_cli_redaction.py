"""The CLI redacts exactly like the API's command-log export (services/common/redaction.py is the
same rule as services/api/command_log.py, which the CLI may not import)."""

from __future__ import annotations

import tomllib
from pathlib import Path

from services.api import command_log
from services.common import redaction

SAMPLE = {
    "id": "main", "user": "u", "password_enc": "gAAAA-cipher", "client_auth_secret_enc": None,
    "headers": {"Authorization": "Bearer abc", "X-Trace": "1"}, "api_key": "k", "key_hash": "h",
    "attachments": [{"filename": "a.pdf", "auth": {"method": "bearer", "secret_enc": "gAAAA"}}],
    "raw": b"\x00\x01", "nested": [{"refresh_token": "t"}, ("tuple", {"imap_password": "p"})],
}


def test_same_markers_and_output_as_the_api_export() -> None:
    assert redaction.SECRET_MARKERS == command_log.SECRET_MARKERS
    assert redaction.REDACTED == command_log.REDACTED
    assert redaction.redact(SAMPLE) == command_log.redact(SAMPLE)
    names = ["password", "imap_password", "client_auth_secret_enc", "token", "api_key", "key_hash",
             "Authorization", "user", "host", "subject", "headers", "id", "tokens_used"]
    for name in names:  # never less than the API's export
        assert redaction.is_secret(name) or not command_log.is_secret(name), name


def test_header_spellings_are_secrets_too() -> None:
    """A message's header map may carry ``X-API-Key``: the name has a hyphen, not the marker's
    underscore; the CLI redacts it (stricter than the API's export, which shows it)."""
    headers = {"X-API-Key": "k1", "X-Apikey": "k2", "X-Client-Secret": "s", "X-Trace": "t"}
    assert redaction.redact(headers) == {"X-API-Key": "***", "X-Apikey": "***", "X-Client-Secret": "***",
                                         "X-Trace": "t"}


def test_secrets_hidden_null_kept_bytes_base64() -> None:
    out = redaction.redact(SAMPLE)
    assert out["password_enc"] == "***" and out["client_auth_secret_enc"] is None
    assert out["headers"] == {"Authorization": "***", "X-Trace": "1"}
    assert out["api_key"] == "***" and out["key_hash"] == "***"
    assert out["attachments"][0]["auth"] == {"method": "bearer", "secret_enc": "***"}
    assert out["raw"] == "AAE="
    assert out["nested"] == [{"refresh_token": "***"}, ["tuple", {"imap_password": "***"}]]
    assert out["id"] == "main" and out["user"] == "u"


def test_console_script_entry_point() -> None:
    """pyproject.toml installs ``postbus`` as services.cli.main:main (what `make install` puts on PATH)."""
    data = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    target = data["project"]["scripts"]["postbus"]
    module, func = target.split(":")
    mod = __import__(module, fromlist=[func])
    assert callable(getattr(mod, func))
    deps = " ".join(data["project"]["dependencies"])
    assert "click" in deps and "rich" in deps
