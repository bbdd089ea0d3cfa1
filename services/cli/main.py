"""``postbus``: the operators' command line (docs/cli.md). This module only assembles the group; each
command lives in a module named after it (``*_cmd.py``, ``replay_*.py``), shared pieces in
``context.py`` (context, errors, options), ``kafka.py`` (topic reads) and ``history.py`` (timelines).

Talks to the admin API (``--api``, ``--admin-token``) for what the API serves (command-log export,
replays and their verification) and reads Kafka directly (``--bootstrap``) for the rest, with
group-less ``read_committed`` consumers (no service's offsets move). Secrets are redacted as in the
API's command-log export (``services/common/redaction.py``); the admin token is never printed.

Exit codes: 0 success, 1 failure (API error, broker unreachable, a verification that found a
difference, ...), 2 usage error."""

from __future__ import annotations

import contextlib
import logging
import os
import sys

import click

from services.cli.context import Ctx, local_token
from services.cli.dead_letters_cmd import dead_letters
from services.cli.export_cmd import export
from services.cli.lag_cmd import lag
from services.cli.replay_cmd import replay
from services.cli.state_at_cmd import state_at
from services.cli.tail_cmd import tail
from services.cli.topics_cmd import topics
from services.cli.trace_cmd import trace


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--api", envvar="POSTBUS_API_URL", default="http://127.0.0.1:8000", show_default=True,
              help="Base URL of the Postbus API (env POSTBUS_API_URL).")
@click.option("--admin-token", envvar="POSTBUS_ADMIN_TOKEN", default=None, show_default=False,
              help="Admin API token (env POSTBUS_ADMIN_TOKEN; else the local .state/admin.token); never printed.")
@click.option("--bootstrap", envvar="POSTBUS_KAFKA_BOOTSTRAP", default="127.0.0.1:9092", show_default=True,
              help="Kafka bootstrap servers, for the commands that read the topics (env POSTBUS_KAFKA_BOOTSTRAP).")
@click.option("--metrics-url", envvar="POSTBUS_METRICS_URL", default=None,
              help="Metrics service URL: `replay analytics` then follows the rebuild there instead of through "
                   "the admin API (env POSTBUS_METRICS_URL).")
@click.option("--internal-token", envvar="POSTBUS_INTERNAL_TOKEN", default=None,
              help="Internal service credential for --metrics-url (env POSTBUS_INTERNAL_TOKEN; else the local "
                   ".state/internal.token, with --metrics-url defaulting to http://127.0.0.1:8010); never printed.")
@click.pass_context
def cli(ctx: click.Context, api: str, admin_token: str | None, bootstrap: str, metrics_url: str | None,
        internal_token: str | None) -> None:
    """Postbus operator command line: audit export, topic tail, message trace, lag, topics,
    dead letters, verified replays of the projections and a tenant's state at any past time."""
    # aiokafka logs connection failures through the root logger's last resort: the CLI says it once
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    # a local system (`make up`): its tokens are in the state folder
    admin_token = admin_token or local_token("admin.token")
    if not internal_token and (internal_token := local_token("internal.token")):
        metrics_url = metrics_url or "http://127.0.0.1:8010"
    ctx.obj = Ctx(api, admin_token, bootstrap, metrics_url, internal_token)


for command in (export, tail, trace, lag, topics, dead_letters, replay, state_at):
    cli.add_command(command)


def main(argv: list[str] | None = None) -> None:
    """The console script. Click handles usage errors (exit 2) and ClickException (exit 1); an
    unexpected error is one line on stderr and exit 1 (its traceback with POSTBUS_CLI_DEBUG=1); a
    closed stdout (``postbus tail events | head``) ends quietly."""
    try:
        cli.main(args=argv, prog_name="postbus", standalone_mode=True)
    except BrokenPipeError:
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        sys.exit(0)
    except SystemExit:
        raise
    except Exception as exc:
        if os.environ.get("POSTBUS_CLI_DEBUG") == "1":
            raise
        click.echo(f"Error: unexpected {type(exc).__name__}: {exc} (POSTBUS_CLI_DEBUG=1 shows the traceback)",
                   err=True)
        sys.exit(1)
