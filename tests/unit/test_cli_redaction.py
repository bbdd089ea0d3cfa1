"""One redaction rule (services/common/redaction.py) for everything shown to an operator: the API's
command-log export and the CLI."""

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


def test_the_api_export_uses_the_same_rule() -> None:
    assert command_log.redact is redaction.redact


def test_header_spellings_are_secrets_too() -> None:
    """A message's header map may carry ``X-API-Key``: the name has a hyphen, not the marker's
    underscore; the CLI and the API's command-log export both redact it."""
    headers = {"X-API-Key": "k1", "X-Apikey": "k2", "X-Client-Secret": "s", "X-Trace": "t"}
    expected = {"X-API-Key": "***", "X-Apikey": "***", "X-Client-Secret": "***", "X-Trace": "t"}
    assert redaction.redact(headers) == expected
    entry = command_log.redact({"messages": [{"headers": headers}]})
    assert entry == {"messages": [{"headers": expected}]}


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
