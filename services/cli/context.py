"""What every ``postbus`` command shares: the context (API URL, tokens, bootstrap), running a
coroutine with the CLI's error mapping, JSON output, API error messages without the token, times
on the command line, progress bars, confirmation of destructive commands, and the options several
commands take (one definition each).

Exit codes: 0 success, 1 failure (``click.ClickException``), 2 usage error (``click.UsageError``)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import click
import httpx
from aiokafka.errors import KafkaError
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from services.cli.kafka import KafkaUnavailable

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])
err = Console(stderr=True, highlight=False)


def local_token(name: str) -> str | None:
    """A token ``make up`` left in the local state folder (``$POSTBUS_STATE_DIR``, default
    ``.state``): ``admin.token``, ``internal.token``; None when there is none."""
    path = Path(os.environ.get("POSTBUS_STATE_DIR") or ".state") / name
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


@dataclass
class Ctx:
    api: str
    admin_token: str | None
    bootstrap: str
    metrics_url: str | None
    internal_token: str | None

    def http(self, timeout: float = 30.0) -> httpx.Client:
        if not self.admin_token:
            raise click.UsageError("this command needs the admin token: --admin-token or POSTBUS_ADMIN_TOKEN")
        return httpx.Client(base_url=self.api.rstrip("/"), headers={"X-API-Token": self.admin_token},
                            timeout=timeout)


def run(coro: Awaitable[T]) -> T:
    try:
        return asyncio.run(coro)  # type: ignore[arg-type]
    except KafkaUnavailable as exc:
        raise click.ClickException(str(exc)) from None
    except KafkaError as exc:
        raise click.ClickException(f"Kafka error: {type(exc).__name__}: {exc}") from None


def emit(obj: Any) -> None:
    click.echo(json.dumps(obj, separators=(",", ":"), ensure_ascii=False, default=str))


def api_failure(r: httpx.Response) -> click.ClickException:
    """The API's error envelope as a message (never the request, so never the token)."""
    try:
        body = r.json()
        e = body.get("error") if isinstance(body, dict) else None
        if isinstance(e, dict):
            return click.ClickException(f"the API answered {r.status_code} {e.get('code')}: {e.get('message')}")
        if isinstance(body, dict) and "detail" in body:
            return click.ClickException(f"the API answered {r.status_code}: {body['detail']}")
    except ValueError:
        pass
    return click.ClickException(f"the API answered {r.status_code}")


@contextlib.contextmanager
def api_call(ctx: Ctx) -> Iterator[None]:
    try:
        yield
    except httpx.HTTPError as exc:
        raise click.ClickException(f"the API at {safe_url(ctx.api)} did not answer ({type(exc).__name__})") from None


def safe_url(url: str) -> str:
    """A URL without credentials, for messages."""
    try:
        return str(httpx.URL(url).copy_with(username=None, password=None))
    except (httpx.InvalidURL, TypeError, ValueError):
        return "(the given URL)"


def parse_time(value: str, param: str) -> int:
    """ISO 8601 (naive = UTC), or unix seconds (values above 1e11 are milliseconds): epoch ms."""
    v = value.strip()
    try:
        num = float(v)
    except ValueError:
        pass
    else:
        if num < 0 or num != num or num in (float("inf"), float("-inf")):
            raise click.BadParameter("must be a time after 1970", param_hint=param)
        return int(num) if num > 1e11 else int(num * 1000)
    try:
        dt = datetime.fromisoformat(v.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a time: give ISO 8601 (2026-11-28T10:00:00Z) or unix seconds",
                                 param_hint=param) from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return int(dt.timestamp() * 1000)


def optional_time(value: str | None, param: str) -> int | None:
    return parse_time(value, param) if value else None


def progress_bar(what: str, unit: str = "records") -> Progress:
    return Progress(SpinnerColumn(), TextColumn(f"[bold]{what}[/bold]"), BarColumn(),
                    TextColumn(f"{{task.completed}}/{{task.total}} {unit}"), TimeElapsedColumn(),
                    console=err, transient=True)


RETRY_S = 0.5  # an answer refused while a projection rebuilds (503) is asked again


def get_json(http: httpx.Client, path: str, params: dict[str, Any], deadline: float, *,
             missing: Any = ...) -> Any:
    """An answer of the API; a 503 (a projection rebuilding or behind) is asked again until the
    deadline. A 404 is ``missing`` when given (e.g. a tenant deleted meanwhile), else a failure."""
    while True:
        r = http.get(path, params=params)
        if r.status_code == 200:
            return r.json()
        if r.status_code == 404 and missing is not ...:
            return missing
        if r.status_code != 503 or time.monotonic() > deadline:
            raise api_failure(r)
        time.sleep(RETRY_S)


def tenant_ids(http: httpx.Client) -> list[str]:
    r = http.get("/tenants")
    if r.status_code != 200:
        raise api_failure(r)
    return sorted(t["id"] for t in r.json()["tenants"])



# -- destructive commands ------------------------------------------------------------------------
def require_yes_or_terminal(yes: bool, what: str) -> None:
    """Without --yes a destructive command asks; without a terminal to ask it is a usage error
    (exit 2), checked before anything is read or changed."""
    if not yes and not sys.stdin.isatty():
        raise click.UsageError(f"{what}: add --yes to confirm")


def confirm(yes: bool, question: str, refused: str) -> None:
    if not yes and not click.confirm(question, err=True):
        raise click.ClickException(refused)


# -- output --------------------------------------------------------------------------------------
def print_rows(rows: Sequence[dict[str, Any]], as_json: bool, header: str, line: Callable[[dict[str, Any]], str]
               ) -> None:
    """Rows as JSON lines (``--json``) or as a table: ``header`` then ``line(row)`` each."""
    if as_json:
        for r in rows:
            emit(r)
        return
    click.echo(header)
    for r in rows:
        click.echo(line(r))


# -- options several commands take ---------------------------------------------------------------
def json_option(what: str = "JSON lines instead of a table.") -> Callable[[F], F]:
    return click.option("--json", "as_json", is_flag=True, help=what)


def tenant_option(what: str) -> Callable[[F], F]:
    return click.option("--tenant", "tenant_id", default=None, help=what)


def since_option(what: str) -> Callable[[F], F]:
    return click.option("--since", default=None, help=what)


def yes_option(what: str) -> Callable[[F], F]:
    return click.option("--yes", is_flag=True, help=what)
