"""Consumer lag in Prometheus, per consumer group (or group-less reader) and partition.

``postbus_consumer_lag{group, topic, partition}``: records on the broker, up to the partition's high
watermark, that this process has not processed yet. Every Kafka reader of every service reports
here, refreshed every ``INTERVAL_S`` by one task per process:

- the Faust apps (sender, reporter: ``faust_source``, labelled with the group id, e.g.
  ``postbus-sender``): records not fetched yet plus records fetched and not yet acknowledged by
  their agent;
- the metrics ingest (``postbus-metrics``): records not yet stored in ClickHouse with their offsets
  (it rises during a ClickHouse outage, and falls once the store has caught up);
- every ``ConfigView`` (the API's views, the sender's, reporter's and inbound's), labelled
  ``<service>:view:<topic>``: records not yet applied to the view;
- other readers registered by their service (``aiokafka_source``), e.g. ``inbound:reloads``.

The high watermark, not the last stable offset, is the end: records of a transaction still open
count as not processed (a hanging transaction blocks every ``read_committed`` reader: alert-worthy).
Positions move past transaction markers, so a reader that is caught up shows 0. Partitions a reader
no longer has disappear from the gauge."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client import Gauge

log = logging.getLogger("postbus.lag")

LAG = Gauge("postbus_consumer_lag",
            "Records on the broker (up to the high watermark) not yet processed by this process, per consumer "
            "group (or group-less reader: <service>:view:<topic>) and partition",
            ["group", "topic", "partition"])
INTERVAL_S = 1.0

Lags = dict[tuple[str, int], int]
Source = Callable[[], Lags | None]

_sources: dict[str, Source] = {}
_published: dict[str, set[tuple[str, int]]] = {}
_task: asyncio.Task[None] | None = None
_service: str | None = None


def set_service(name: str) -> None:
    global _service
    _service = name


def service_name() -> str:
    """The running service (``python -m services.<name>``), for the labels of group-less readers."""
    if _service:
        return _service
    main = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    if main is not None and main.name == "__main__.py" and main.parent.parent.name == "services":
        return main.parent.name
    return "postbus"


def register(group: str, source: Source) -> None:
    """Report ``source()`` (``{(topic, partition): lag}``, or None while unknown) as ``group``, from
    now on; starts the refresh task when called in a running event loop."""
    _sources[group] = source
    ensure_running()


def unregister(group: str) -> None:
    _sources.pop(group, None)
    for topic, partition in _published.pop(group, set()):
        with contextlib.suppress(KeyError):
            LAG.remove(group, topic, str(partition))


def update() -> None:
    """One refresh of every registered source (also called by tests)."""
    for group, source in list(_sources.items()):
        try:
            lags = source()
        except Exception:  # a reader being (re)started: keep the last values
            log.debug("lag source failed", exc_info=True, extra={"group": group})
            continue
        if lags is None:
            continue
        for (topic, partition), value in lags.items():
            LAG.labels(group, topic, str(partition)).set(max(0, int(value)))
        gone = _published.get(group, set()) - set(lags)
        for topic, partition in gone:
            with contextlib.suppress(KeyError):
                LAG.remove(group, topic, str(partition))
        _published[group] = set(lags)


async def _loop() -> None:
    while True:
        update()
        await asyncio.sleep(INTERVAL_S)


def ensure_running() -> None:
    global _task
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return  # registered at import time: the first registration inside the loop starts it
    if _task is None or _task.done() or _task.get_loop() is not loop:
        _task = loop.create_task(_loop(), name="consumer-lag")


# -- sources ------------------------------------------------------------------------------------
def _state(consumer: Any, tp: Any) -> tuple[int, int] | None:
    """(position, high watermark) of an assigned partition of an aiokafka consumer, None while either
    is unknown (before the first fetch, during a reset). Synchronous reads of its bookkeeping."""
    try:
        st = consumer._subscription.subscription.assignment.state_value(tp)
    except AttributeError:
        return None
    if st is None or not st.has_valid_position or st.highwater is None:
        return None
    return st.position, st.highwater


def aiokafka_source(get_consumer: Callable[[], Any],
                    processed: Callable[[Any], int | None] | None = None) -> Source:
    """Lag of an aiokafka consumer's assigned partitions: high watermark minus ``processed(tp)`` (the
    next offset the reader has still to process), or minus its fetch position without one."""
    def source() -> Lags | None:
        consumer = get_consumer()
        if consumer is None:
            return None
        out: Lags = {}
        for tp in consumer.assignment():
            state = _state(consumer, tp)
            if state is None:
                continue
            position, highwater = state
            done = processed(tp) if processed is not None else position
            if done is None:
                continue
            out[(tp.topic, tp.partition)] = max(0, highwater - min(done, position))
        return out
    return source


def faust_source(app: Any) -> Source:
    """Lag of a Faust app's source partitions (changelogs excluded): records not fetched yet plus
    records fetched and not acknowledged by their agent."""
    def source() -> Lags | None:
        consumer = getattr(app, "consumer", None)
        thread = getattr(consumer, "_thread", None)
        inner = getattr(thread, "_consumer", None)
        if inner is None:
            return None
        pending: dict[tuple[str, int], int] = {}
        for message in list(consumer.unacked):
            key = (message.topic, message.partition)
            pending[key] = pending.get(key, 0) + 1
        out: Lags = {}
        for tp in list(inner.assignment()):
            if tp.topic.endswith("-changelog"):
                continue
            state = _state(inner, tp)
            if state is None:
                continue
            position, highwater = state
            out[(tp.topic, tp.partition)] = max(0, highwater - position) + pending.get((tp.topic, tp.partition), 0)
        return out
    return source


def faust_app(app: Any) -> None:
    """Report a Faust app's lag as its group id, from its start on (called next to ``make_app``)."""
    async def _register() -> None:
        register(app.conf.id, faust_source(app))

    app.task(_register)
