"""services/sender/smtp_pool.py against a real aiosmtpd server, without a Postbus system: a password
is never sent without TLS unless the account or the operator opted in; a policy-refused host is
never connected to."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from services.common.settings import get_settings
from services.sender.smtp_pool import Connection, InsecureAuthRefused, TargetRefused, make_target
from tests.support.smtp_server import RecordingSmtpServer

MSG = b"From: a@example.test\r\nTo: b@example.test\r\nSubject: hi\r\n\r\nbody\r\n"


@pytest.fixture
def settings_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    for name in ("POSTBUS_SENDER_ALLOW_INSECURE_AUTH", "POSTBUS_ALLOW_PRIVATE_NETWORKS",
                 "POSTBUS_ALLOWED_PRIVATE_NETWORKS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("POSTBUS_ALLOW_PRIVATE_NETWORKS", "1")
    get_settings.cache_clear()
    yield monkeypatch
    get_settings.cache_clear()


def _send(target, recipients: list[str]) -> None:
    async def run() -> None:
        conn = Connection(target)
        try:
            await conn.send("a@example.test", recipients, MSG)
        finally:
            await conn.close()

    asyncio.run(run())


def test_auth_in_clear_needs_the_account_or_the_operator_opt_in(settings_env: pytest.MonkeyPatch) -> None:
    with RecordingSmtpServer(auth=("u", "pw-secret")) as srv:
        refused = make_target("t/a", srv.host, srv.port, "u", "pw-secret", False)
        with pytest.raises(InsecureAuthRefused) as err:
            _send(refused, ["x@example.test"])
        assert "STARTTLS" in str(err.value) and "pw-secret" not in str(err.value) and "pw-secret" not in repr(refused)
        assert srv.auth_attempts == 0 and srv.rcpt_attempts == []
        # the account's opt-in
        _send(make_target("t/a", srv.host, srv.port, "u", "pw-secret", False, allow_insecure_auth=True),
              ["y@example.test"])
        # the operator's opt-in (every account)
        settings_env.setenv("POSTBUS_SENDER_ALLOW_INSECURE_AUTH", "1")
        get_settings.cache_clear()
        _send(make_target("t/a", srv.host, srv.port, "u", "pw-secret", None), ["z@example.test"])
        assert srv.auth_attempts == 2
        assert [m.rcpt_tos for m in srv.messages] == [["y@example.test"], ["z@example.test"]]
        assert all(m.auth_user == "u" for m in srv.messages)


def test_a_refused_host_is_never_connected_to(settings_env: pytest.MonkeyPatch) -> None:
    settings_env.setenv("POSTBUS_ALLOW_PRIVATE_NETWORKS", "false")
    settings_env.setenv("POSTBUS_ALLOWED_PRIVATE_NETWORKS", "127.0.0.2/32")
    get_settings.cache_clear()
    with RecordingSmtpServer(host="0.0.0.0") as srv:
        _send(make_target("t/a", "127.0.0.2", srv.port, None, None, False), ["ok@example.test"])  # control
        for host in ("127.0.0.1", "localhost", "127.1"):
            with pytest.raises(TargetRefused, match="network policy"):
                _send(make_target("t/a", host, srv.port, None, None, False), ["no@example.test"])
        assert [a.rcpt for a in srv.rcpt_attempts] == ["ok@example.test"]
