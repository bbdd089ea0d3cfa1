"""Answers before and after a rebuild, compared answer by answer (``postbus replay``), and the
answer files of ``--save-answers`` / ``--against``. Pure functions (unit-tested without a system).

An answer is a name (what was asked, e.g. ``metrics acme window=8760h``) and the value the system
answered, already redacted (``services/common/redaction.py``) so that neither the file nor a printed
difference can hold a secret."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from services.common.redaction import redact

FORMAT = 1
MISSING = "(absent)"
SHOWN_CHARS = 300  # a difference shows at most this much of each value


def answer(value: Any) -> Any:
    """What is recorded and compared: the value redacted, through JSON (tuples and lists alike)."""
    return json.loads(json.dumps(redact(value), default=str))


def compare(before: dict[str, Any], after: dict[str, Any]) -> tuple[int, list[dict[str, Any]]]:
    """(answers identical, the differences: ``{"answer", "before", "after"}``; a side without the
    answer shows ``"(no answer)"``)."""
    same = 0
    diffs: list[dict[str, Any]] = []
    for name in sorted(before.keys() | after.keys()):
        if name in before and name in after and before[name] == after[name]:
            same += 1
            continue
        diffs.append({"answer": name, "before": before.get(name, "(no answer)"),
                      "after": after.get(name, "(no answer)")})
    return same, diffs


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS] + f"... ({len(text)} chars)"


def render_difference(d: dict[str, Any]) -> str:
    """The answer's name, then its values before and after; of two objects, only the fields that differ."""
    before, after = d["before"], d["after"]
    if isinstance(before, dict) and isinstance(after, dict):
        fields = sorted(k for k in before.keys() | after.keys() if before.get(k, MISSING) != after.get(k, MISSING))
        before = {k: before.get(k, MISSING) for k in fields}
        after = {k: after.get(k, MISSING) for k in fields}
    return f"differs: {d['answer']}\n  before: {_short(before)}\n  after:  {_short(after)}"


def save(path: str, doc: dict[str, Any]) -> None:
    Path(path).write_text(json.dumps({"format": FORMAT, **doc}, sort_keys=True, indent=1, ensure_ascii=False) + "\n")


def load(path: str, projection: str) -> dict[str, Any]:
    """A file written by ``--save-answers`` for this projection (a usage error otherwise)."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise click.BadParameter(f"cannot read recorded answers from {path!r}: {type(exc).__name__}",
                                 param_hint="--against") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("answers"), dict):
        raise click.BadParameter(f"{path!r} is not a file of recorded answers (--save-answers)",
                                 param_hint="--against")
    if doc.get("projection") != projection:
        raise click.BadParameter(f"{path!r} holds answers of {doc.get('projection')!r}, not {projection!r}",
                                 param_hint="--against")
    return doc
