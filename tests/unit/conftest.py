"""Fixtures shared by the unit tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from services.metrics.store import Store


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    """A real embedded ClickHouse (chdb) store with the metrics schema, in a temporary folder."""
    s = Store(f"chdb://{tmp_path / 'ch'}")
    s.create()
    try:
        yield s
    finally:
        s.close()
