"""Faust helpers shared by the sender and the reporter."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
from typing import Any

import faust
from aiokafka.structs import TopicPartition


async def table_put(table: Any, partition: int, key: Any, value: Any) -> None:
    """Write a table key from a background task (outside stream iteration) and wait until the
    changelog record is on the broker.

    Faust only allows table writes while processing an event, because it takes the changelog
    partition from that event. Our background tasks (SMTP workers, report flushers) know the
    partition of the tenant the key belongs to, so they write the store and the changelog with that
    explicit partition: the same record an in-stream write would have produced. The record goes
    straight to the producer (``Topic.send``), not through Faust's send-soon buffer, which adds
    tens of milliseconds under load."""
    table.data[key] = value
    fut = await table.changelog_topic.send(
        key=key, value=value, partition=partition,
        key_serializer=table.key_serializer, value_serializer=table.value_serializer, force=True,
    )
    await fut


async def produce_many(app: faust.App, topic: str,
                       records: list[tuple[int | None, bytes | None, bytes | None]]) -> None:
    """:func:`hand_over_many`, then until the broker acknowledged every record."""
    await (await hand_over_many(app, topic, records))


async def hand_over_many(app: faust.App, topic: str,
                         records: list[tuple[int | None, bytes | None, bytes | None]]) -> asyncio.Future[Any]:
    """Records ``(partition, key, value)`` (already serialised; partition None: the default
    partitioner's choice for the key, as ``Topic.send`` makes it) appended to the open producer
    batch of their partition in the app's own producer; returns once they are in the producer's
    accumulator (in order), with a future of their acknowledgements: the ``RecordMetadata`` of the
    last record of each producer batch they went into (partition, offset). Faust flushes the producer
    before it commits consumer offsets, so a record handed over while an event is processed is on
    the broker before that event's offset is committed.

    Awaiting ``Topic.send`` once per record costs ~0.7 ms of event-loop turns per record on a busy
    sender (measured: 46 ms to hand 63 outcome events to the producer, then 13 ms of broker acks).
    ``send_batch`` (a new batch per call) waits in aiokafka's ``add_batch`` until the partition's
    previous batch has been *sent*: a produce round trip per call when calls follow each other
    closely (every ``messages.add`` command, every group commit). ``add_message`` appends to the
    partition's open batch (the linger window) and waits only when that batch is full. Order per partition is kept: the
    records follow everything already in the producer's accumulator for that partition."""
    loop = asyncio.get_running_loop()
    if not records:
        done: asyncio.Future[Any] = loop.create_future()
        done.set_result([])
        return done
    producer = app.producer
    await app.maybe_start_producer()
    client = producer._ensure_producer()  # the aiokafka producer behind Faust's (same ordering, same acks)
    await client.client._wait_on_metadata(topic)
    accumulator = client._message_accumulator
    timeout_s = client._request_timeout_ms / 1000
    last: dict[int, tuple[Any, asyncio.Future[Any]]] = {}  # id(batch) -> (batch, its last record's future)
    for partition, key, value in records:
        if partition is None:
            partition = client._partition(topic, None, None, None, key, value)
        tp = TopicPartition(topic, partition)
        # appended to the partition's open batch; no event-loop turn unless that batch is full
        fut = await accumulator.add_message(tp, key, value, timeout_s)
        batch = accumulator._batches[tp][-1]  # nothing ran in between: the batch it went into
        last[id(batch)] = (batch, fut)  # (the batch is held: its id stays unique)
    # each resolves with its record's metadata (partition, offset) when its batch is acknowledged;
    # shielded: cancelling a waiter must not cancel aiokafka's own futures
    return asyncio.gather(*(asyncio.shield(f) for _, f in last.values()))


def make_app(name: str, bootstrap: str, datadir: str, partitions: int, **extra: Any) -> faust.App:
    """A Faust app with our defaults. Its command-consuming agents iterate ``guarded(stream, name)``
    (services/common/faust_guard.py: Faust loses records around a rebalance, issue 12 §1)."""
    from services.common import faust_guard
    from services.common.settings import get_settings

    faust_guard.set_enabled(get_settings().faust_offset_guard)
    faust_guard.install()
    install_buffer_flush()
    install_fetch_wait(get_settings().faust_fetch_max_wait_ms, get_settings().faust_fetch_min_bytes)
    app = faust.App(
        name,
        broker=f"kafka://{bootstrap}",
        store="memory://",
        web_enabled=False,
        autodiscover=False,
        datadir=datadir,
        topic_partitions=partitions,
        topic_replication_factor=1,
        table_standby_replicas=0,
        broker_commit_interval=1.0,
        producer_acks=-1,
        producer_linger=0.005,
        # one 16 KB batch (the default) holds ~13 of the sender's table records (each carries its
        # message): a 20-message command then waited for a produce round trip to free the batch
        producer_max_batch_size=512 * 1024,
        consumer_auto_offset_reset="earliest",
        # a SIGKILLed worker holds its partitions until its session expires: keep that short
        broker_session_timeout=10.0,
        broker_heartbeat_interval=2.0,
        **extra,
    )
    app._postbus_bootstrap = bootstrap  # the offset guard's own consumers
    return app


async def drain_flush(buffer: Any) -> None:
    """``ProducerBuffer.flush`` that drains the buffer. Faust's gives up as soon as 0.1 s pass
    without a record sent, and its consumer commits offsets right after ``producer.flush()``: under
    load (bench/chaos.py saw 5,000 records queued) a command's offset was committed while the table
    writes it caused were still in the send-soon buffer, and a crash then lost them (accepted
    messages gone from the sender's table). This one returns only once the buffer is empty, so the
    commit that follows (the aiokafka flush, then the offsets) comes after every buffered write."""
    while buffer.size:
        if buffer.state != "running":
            raise RuntimeError("Cannot flush: Producer not Running")
        buffer.message_sent.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(buffer.message_sent.wait(), timeout=1.0)


def install_fetch_wait(ms: int, min_bytes: int = 1) -> None:
    """The longest a fetch of the Faust consumer waits at the broker for new records (Faust
    hard-codes 1,500 ms). aiokafka has one fetch in flight per broker, and a fetch leaves out the
    partitions whose records are still buffered in the consumer; under a steady flow the next fetch
    then asks only for idle partitions (e.g. the empty command partitions of tenants not sending)
    and the broker holds it the whole wait, while new commands of the busy partitions queue up
    behind it. Measured on two idle cores at 1,000 msg/s offered in 20-message calls: commands read
    by the sender 1.2 s after they were written on average (``postbus_sender_stage_seconds``
    ``ingest``), accept -> SMTP p99 1.9 s. Idle cost: one empty fetch per consumer per ``ms``.
    ``min_bytes`` (aiokafka's ``fetch_min_bytes``): the broker holds a fetch until that much is there
    or ``ms`` passed; fewer, fuller fetches under a steady flow (docs/configuration.md)."""
    from faust.transport.drivers import aiokafka as faust_aiokafka

    global _fetch_wait_ms, _fetch_min_bytes
    _fetch_wait_ms, _fetch_min_bytes = ms, min_bytes
    cls = faust_aiokafka.AIOKafkaConsumerThread
    if getattr(cls, "_postbus_fetch_wait", False):
        return  # patched once (other patches, e.g. read_committed, may wrap this one)
    original = cls._create_worker_consumer

    def create(self: Any, transport: Any) -> Any:
        consumer = original(self, transport)
        consumer._fetch_max_wait_ms = _fetch_wait_ms  # read by AIOKafkaConsumer.start() (aiokafka 0.14)
        consumer._fetch_min_bytes = _fetch_min_bytes
        return consumer

    cls._create_worker_consumer = create
    cls._postbus_fetch_wait = True


_fetch_wait_ms = 1500
_fetch_min_bytes = 1


def install_buffer_flush() -> None:
    """Patch Faust's ProducerBuffer.flush with ``drain_flush`` (idempotent); called by make_app."""
    from faust.transport.producer import ProducerBuffer

    if ProducerBuffer.flush is not _patched_flush:
        ProducerBuffer.flush = _patched_flush  # type: ignore[method-assign]


async def _patched_flush(self: Any) -> None:
    await drain_flush(self)


def _await_chain(obj: Any, depth: int = 40) -> list[str]:
    """Where a suspended coroutine waits: follow cr_await / ag_await / gi_yieldfrom down the chain."""
    out: list[str] = []
    while obj is not None and depth > 0:
        frame = getattr(obj, "cr_frame", None) or getattr(obj, "ag_frame", None) or getattr(obj, "gi_frame", None)
        if frame is not None:
            out.append(f"{frame.f_code.co_filename}:{frame.f_lineno} {frame.f_code.co_name}")
        obj = (getattr(obj, "cr_await", None) or getattr(obj, "ag_await", None)
               or getattr(obj, "gi_yieldfrom", None)
               or (getattr(obj, "it", None) if frame is None else None))  # a Faust actor wraps its coroutine
        depth -= 1
    return out


def dump_tasks(app: faust.App | None = None) -> None:
    """Log every asyncio task, and every Faust agent's actors, with the chain of awaits each is
    suspended in (operators: ``kill -USR1 <pid>``)."""
    import logging

    log = logging.getLogger("postbus.tasks")
    for task in asyncio.all_tasks():
        log.warning("task", extra={"task": task.get_name(), "awaits": _await_chain(task.get_coro())})
    for name, agent in (app.agents.items() if app is not None else ()):
        for actor in list(getattr(agent, "_actors", ())):
            log.warning("agent", extra={"agent": name, "awaits": _await_chain(getattr(actor, "it", None))})
    if app is not None:
        log.warning("consumer", extra=consumer_state(app))


def consumer_state(app: faust.App) -> dict[str, Any]:
    """The Faust consumer's bookkeeping, for diagnosis: generation, flow, and per partition the read
    offset, the committed offset, the acked offsets waiting for a commit and the unacked records."""
    consumer = app.consumer
    unacked: dict[str, list[str]] = {}
    for message in list(consumer.unacked):
        unacked.setdefault(f"{message.topic}:{message.partition}", []).append(
            f"{message.offset} refcount={message.refcount} acked={message.acked} gen={message.generation_id}")
    return {
        "generation": app.consumer_generation_id, "flow_active": consumer.flow_active,
        "app_flow": app.flow_control.is_active(), "rebalancing": app.rebalancing,
        "read_offset": {f"{tp.topic}:{tp.partition}": o for tp, o in consumer._read_offset.items()},
        "committed": {f"{tp.topic}:{tp.partition}": o for tp, o in consumer._committed_offset.items()},
        "acked": {f"{tp.topic}:{tp.partition}": sorted(o)[:20] for tp, o in consumer._acked.items() if o},
        "unacked": unacked,
    }


def use_event_loop(name: str) -> None:
    """Make ``name`` (``uvloop`` or ``asyncio``) the event loop of every loop created from now on;
    called before Faust's worker or ``asyncio.run`` creates one. uvloop does the socket reads and
    writes and the callback scheduling in C, a large share of the sender's per-message CPU."""
    if name == "uvloop":
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    else:
        asyncio.set_event_loop_policy(asyncio.DefaultEventLoopPolicy())


def run_worker(app: faust.App, service: str, level: str, event_loop: str = "uvloop") -> None:
    from services.common.logs import logging_dict_config

    use_event_loop(event_loop)

    async def _install_dump() -> None:
        asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, dump_tasks, app)

    app.task(_install_dump)

    worker = PromptExitWorker(app, loglevel=level, quiet=True, logging_config=logging_dict_config(service, level))
    worker.execute_from_commandline()


STOP_GRACE_S = 8.0  # a graceful stop longer than this (e.g. broker down: nothing to commit to) is cut short


def _exit_after(grace_s: float) -> None:
    """Exit the process ``grace_s`` after a stop signal if the graceful stop has not finished: with
    the broker down, Faust's shutdown waits for commits and flushes that cannot happen. Exiting then
    is a crash as far as state goes: the changelog and committed offsets hold; at most the documented
    in-flight window is redone after the restart."""
    def fire() -> None:
        logger = logging.getLogger("postbus.faust")
        logger.error("graceful stop did not finish: exiting now", extra={"grace_s": grace_s})
        for handler in logging.getLogger().handlers:
            handler.flush()
        os._exit(0)

    timer = threading.Timer(grace_s, fire)
    timer.daemon = True
    timer.start()


class PromptExitWorker(faust.Worker):  # type: ignore[misc]
    """Faust's worker, with a bounded graceful stop on SIGTERM/SIGINT."""

    def _on_sigterm(self) -> None:
        _exit_after(STOP_GRACE_S)
        super()._on_sigterm()

    def _on_sigint(self) -> None:
        _exit_after(STOP_GRACE_S)
        super()._on_sigint()
