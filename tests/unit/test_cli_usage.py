"""The CLI's exit codes and error lines without a system: 2 for usage errors (checked before any
connection), 1 for failures, and the tokens never in what it prints."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from services.cli import main as cli_main

REPO = Path(__file__).resolve().parents[2]
TOKEN = "admin-token-never-printed-0123456789"


def invoke(*args: str, env: dict[str, str] | None = None):
    return CliRunner().invoke(cli_main.cli, list(args), env={"POSTBUS_ADMIN_TOKEN": TOKEN, **(env or {})})


def test_usage_errors_exit_2() -> None:
    for args, needle in ((("tail", "nope"), "Invalid value"),
                         (("tail", "events", "--limit", "0"), "Invalid value"),
                         (("state-at", "t1", "tomorrow"), "is not a time"),
                         (("export", "command-log", "--since", "soon"), "is not a time"),
                         (("dead-letters", "--replay"), "--yes"),
                         (("replay", "analytics"), "--yes"),
                         (("no-such-command",), "No such command")):
        r = invoke(*args, env={"POSTBUS_KAFKA_BOOTSTRAP": "127.0.0.1:1", "POSTBUS_API_URL": "http://127.0.0.1:1"})
        assert r.exit_code == 2, (args, r.output)
        assert needle in r.output, (args, r.output)


def test_missing_admin_token_is_a_usage_error() -> None:
    r = CliRunner().invoke(cli_main.cli, ["export", "command-log"], env={"POSTBUS_ADMIN_TOKEN": ""})
    assert r.exit_code == 2 and "admin token" in r.output


def test_unreachable_api_and_broker_fail_with_exit_1_and_no_token() -> None:
    r = invoke("--api", "http://127.0.0.1:1", "export", "command-log")
    assert r.exit_code == 1 and "did not answer" in r.output and TOKEN not in r.output
    r = invoke("--api", "http://127.0.0.1:1", "replay", "analytics", "--yes")
    assert r.exit_code == 1 and "did not answer" in r.output and TOKEN not in r.output
    r = invoke("--bootstrap", "127.0.0.1:1", "lag")
    assert r.exit_code == 1 and "did not answer" in r.output


def test_unexpected_error_is_one_line_exit_1(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    async def boom(*_a, **_k):
        raise ValueError("something odd")

    monkeypatch.setattr(cli_main, "collect_topics", boom)
    with pytest.raises(SystemExit) as exc:
        cli_main.main(["topics"])
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert "Error: unexpected ValueError: something odd" in err and "Traceback" not in err


def test_help_of_every_command() -> None:
    for args in ((), ("export", "command-log"), ("tail",), ("trace",), ("lag",), ("topics",), ("dead-letters",),
                 ("replay", "analytics"), ("state-at",)):
        r = invoke(*args, "--help")
        assert r.exit_code == 0 and "Usage:" in r.output, args


def test_module_entry_point() -> None:
    r = subprocess.run([sys.executable, "-m", "services.cli", "--help"], cwd=REPO, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and "Usage: postbus" in r.stdout
