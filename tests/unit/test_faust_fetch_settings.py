"""POSTBUS_FAUST_FETCH_MAX_WAIT_MS and POSTBUS_FAUST_FETCH_MIN_BYTES reach the aiokafka consumer Faust
creates (services/common/faust_support.py install_fetch_wait; Faust hard-codes a 1,500 ms wait)."""

from __future__ import annotations

import faust

from services.common import faust_support
from services.common.settings import get_settings


async def test_fetch_wait_and_min_bytes_reach_the_faust_consumer() -> None:
    app = faust.App("fetch-test", broker="kafka://127.0.0.1:1", store="memory://", autodiscover=False)
    thread = app.consumer._thread
    try:
        faust_support.install_fetch_wait(1500, 1)
        before = thread._create_worker_consumer(app.transport)
        faust_support.install_fetch_wait(123, 4567)
        after = thread._create_worker_consumer(app.transport)
    finally:
        faust_support.install_fetch_wait(get_settings().faust_fetch_max_wait_ms, get_settings().faust_fetch_min_bytes)
    assert (before._fetch_max_wait_ms, before._fetch_min_bytes) == (1500, 1)
    assert (after._fetch_max_wait_ms, after._fetch_min_bytes) == (123, 4567)
