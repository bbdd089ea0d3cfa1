"""The CLI's exit codes and error lines without a system: 2 for usage errors (checked before any
connection), 1 for failures, and the tokens never in what it prints."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from services.cli import main as cli_main
from services.cli import topics_cmd
from services.cli.context import Ctx

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
                         (("replay", "analytics", "--yes", "--from", "last week"), "is not a time"),
                         (("replay", "views", "--from", "2026-11-01"), "has no meaning for views"),
                         (("no-such-command",), "No such command")):
        r = invoke(*args, env={"POSTBUS_KAFKA_BOOTSTRAP": "127.0.0.1:1", "POSTBUS_API_URL": "http://127.0.0.1:1"})
        assert r.exit_code == 2, (args, r.output)
        assert needle in r.output, (args, r.output)


def test_missing_admin_token_is_a_usage_error(tmp_path: Path) -> None:
    r = CliRunner().invoke(cli_main.cli, ["export", "command-log"],
                           env={"POSTBUS_ADMIN_TOKEN": "", "POSTBUS_STATE_DIR": str(tmp_path)})
    assert r.exit_code == 2 and "admin token" in r.output


def test_local_state_tokens_are_the_fallback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Next to `make up`, the tokens in its state folder are used (and never printed)."""
    (tmp_path / "admin.token").write_text(TOKEN + "\n")
    (tmp_path / "internal.token").write_text("internal-xyz\n")
    seen: dict[str, object] = {}

    @cli_main.cli.command("probe-ctx")
    @click.pass_obj
    def probe(ctx: Ctx) -> None:
        seen.update(vars(ctx))

    try:
        r = CliRunner().invoke(cli_main.cli, ["probe-ctx"], env={"POSTBUS_ADMIN_TOKEN": "",
                                                                 "POSTBUS_INTERNAL_TOKEN": "",
                                                                 "POSTBUS_METRICS_URL": "",
                                                                 "POSTBUS_STATE_DIR": str(tmp_path)})
        assert r.exit_code == 0, r.output
        assert seen["admin_token"] == TOKEN and seen["internal_token"] == "internal-xyz"
        assert seen["metrics_url"] == "http://127.0.0.1:8010"
        # an explicit token wins over the file
        r = CliRunner().invoke(cli_main.cli, ["--admin-token", "explicit", "probe-ctx"],
                               env={"POSTBUS_STATE_DIR": str(tmp_path)})
        assert r.exit_code == 0 and seen["admin_token"] == "explicit"
        r = invoke("--api", "http://127.0.0.1:1", "export", "command-log",
                   env={"POSTBUS_ADMIN_TOKEN": "", "POSTBUS_STATE_DIR": str(tmp_path)})
        assert r.exit_code == 1 and "did not answer" in r.output and TOKEN not in r.output
    finally:
        cli_main.cli.commands.pop("probe-ctx", None)


def test_unreachable_api_and_broker_fail_with_exit_1_and_no_token() -> None:
    r = invoke("--api", "http://127.0.0.1:1", "export", "command-log")
    assert r.exit_code == 1 and "did not answer" in r.output and TOKEN not in r.output
    r = invoke("--api", "http://127.0.0.1:1", "replay", "analytics", "--yes")
    assert r.exit_code == 1 and "did not answer" in r.output and TOKEN not in r.output
    r = invoke("--api", "http://ops:pa55word@127.0.0.1:1", "export", "command-log")
    assert r.exit_code == 1 and "http://127.0.0.1:1" in r.output and "pa55word" not in r.output
    r = invoke("--bootstrap", "127.0.0.1:1", "lag")
    assert r.exit_code == 1 and "did not answer" in r.output


def test_unexpected_error_is_one_line_exit_1(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    async def boom(*_a, **_k):
        raise ValueError("something odd")

    monkeypatch.setattr(topics_cmd, "collect_topics", boom)
    with pytest.raises(SystemExit) as exc:
        cli_main.main(["topics"])
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert "Error: unexpected ValueError: something odd" in err and "Traceback" not in err


def test_help_of_every_command() -> None:
    for args in ((), ("export", "command-log"), ("tail",), ("trace",), ("lag",), ("topics",), ("dead-letters",),
                 ("replay",), ("replay", "analytics"), ("replay", "views"), ("state-at",)):
        r = invoke(*args, "--help")
        assert r.exit_code == 0 and "Usage:" in r.output, args


def test_module_entry_point() -> None:
    r = subprocess.run([sys.executable, "-m", "services.cli", "--help"], cwd=REPO, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and "Usage: postbus" in r.stdout
