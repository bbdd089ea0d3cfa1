"""The comparison behind ``postbus replay`` (services/cli/verify.py) and the salted view digests
(services/common/view_digest.py), without a system."""

from __future__ import annotations

import json
from pathlib import Path

import click
import pytest

from services.cli import verify
from services.common import view_digest


def test_compare_counts_identical_answers_and_lists_each_difference() -> None:
    before = {"a": 1, "b": {"sent": 2}, "c": [1, 2], "gone": 5}
    after = {"a": 1, "b": {"sent": 3}, "c": [1, 2], "new": 7}
    same, diffs = verify.compare(before, after)
    assert same == 2
    assert [d["answer"] for d in diffs] == ["b", "gone", "new"]
    assert diffs[0]["before"] == {"sent": 2} and diffs[0]["after"] == {"sent": 3}
    assert diffs[1]["after"] == "(no answer)" and diffs[2]["before"] == "(no answer)"
    assert verify.compare({"x": 1}, {"x": 1}) == (1, [])


def test_answers_are_redacted_and_a_difference_never_shows_a_secret() -> None:
    a = verify.answer({"id": "m1", "headers": {"X-API-Key": "k-secret"}, "password": "pw-secret", "n": (1, 2)})
    assert a == {"id": "m1", "headers": {"X-API-Key": "***"}, "password": "***", "n": [1, 2]}
    text = verify.render_difference({"answer": "message t/m1", "before": a, "after": {**a, "n": [1]}})
    assert "secret" not in text and text.startswith("differs: message t/m1")
    fields = verify.render_difference({"answer": "m", "before": {"sent": 1, "errors": 0, "gone": 1},
                                       "after": {"sent": 2, "errors": 0}})
    assert fields == 'differs: m\n  before: {"gone": 1, "sent": 1}\n  after:  {"gone": "(absent)", "sent": 2}'
    long = verify.render_difference({"answer": "x", "before": "y" * 5000, "after": 1})
    assert len(long) < 1000 and "chars)" in long


def test_answer_files_round_trip_and_refuse_another_projection(tmp_path: Path) -> None:
    path = tmp_path / "answers.json"
    verify.save(str(path), {"projection": "analytics", "params": {"tenants": []}, "answers": {"a": 1}})
    assert verify.load(str(path), "analytics")["answers"] == {"a": 1}
    with pytest.raises(click.BadParameter, match="not 'views'"):
        verify.load(str(path), "views")
    path.write_text(json.dumps({"answers": []}))
    with pytest.raises(click.BadParameter, match="not a file of recorded answers"):
        verify.load(str(path), "analytics")
    with pytest.raises(click.BadParameter, match="cannot read"):
        verify.load(str(tmp_path / "missing.json"), "analytics")


def test_view_digests_depend_on_the_salt_and_on_every_field() -> None:
    salt = view_digest.parse_salt("00" * 16)
    rec = {"id": "t1", "name": "A", "secret_enc": b"\x01\x02", "n": None}
    d = view_digest.view_digests(salt, {"t1": rec})
    assert list(d) == ["t1"] and len(d["t1"]) == 32
    assert view_digest.record_digest(salt, dict(reversed(list(rec.items())))) == d["t1"]  # key order
    assert view_digest.record_digest(salt, {**rec, "name": "B"}) != d["t1"]
    assert view_digest.record_digest(salt, {**rec, "secret_enc": b"\x01\x03"}) != d["t1"]
    assert view_digest.record_digest(view_digest.parse_salt("11" * 16), rec) != d["t1"]
    for bad in ("", "00" * 8, "zz" * 16, "0" * 130):
        with pytest.raises(ValueError):
            view_digest.parse_salt(bad)


def test_replay_analytics_windows_and_progress() -> None:
    from services.cli.replay_analytics import Params, loaded

    now = 1_795_000_000_000
    whole = Params(["a"], now, None)
    assert whole.window == "8760h" and whole.bi_to == now // 1000 and whole.bi_to - whole.bi_from == 400 * 86400
    recent = Params(["a"], now, now - 90 * 60_000)  # 90 minutes back: the whole hours covering them
    assert recent.window == "2h" and recent.bi_from == (now - 90 * 60_000) // 1000
    assert Params.of(recent.to_json()).to_json() == recent.to_json()
    assert Params(["a"], now, now - 10**12).window == "8760h"  # never past the longest window
    ends = {"postbus.events": {"0": 5, "1": 3}, "postbus.commands": {"0": 4}}
    status = {"topics": {"postbus.events": {"0": 7, "1": 1}, "postbus.commands": {}}}
    assert loaded(status, ends) == 5 + 1 + 0  # past an end counts as the end; a missing partition as 0
