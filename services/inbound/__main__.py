"""``python -m services.inbound``: the inbound SMTP listener, the IMAP poller and the PEC
timeout scan in one asyncio process. Ready (Prometheus /metrics answers on
POSTBUS_INBOUND_METRICS_PORT) once the listener accepts connections."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

from aiokafka import AIOKafkaConsumer, TopicPartition

from services.common import lag
from services.common.avro import DecodeError, codec
from services.common.config_view import ConfigView
from services.common.crypto import load_secret_box
from services.common.http_server import start_metrics_server
from services.common.logs import setup_logging
from services.common.settings import get_settings
from services.common.topics import COMMANDS, CONFIG_INSTANCE, IMAP_POSITION
from services.inbound import pec_timeout
from services.inbound.imap_poller import ImapPoller
from services.inbound.listener import serve
from services.inbound.service import Inbound

log = logging.getLogger("postbus.inbound")


async def watch_reloads(bootstrap: str, poller: ImapPoller) -> None:
    """``bounce.reload`` commands (POST /instance/reload-bounce) wake the poller; only commands after
    start-up matter (the config itself comes from the compacted instance topic)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                isolation_level="read_committed")
    await consumer.start()
    try:
        parts = consumer.partitions_for_topic(COMMANDS) or set()
        if not parts:
            await consumer._client.force_metadata_update()
            parts = consumer.partitions_for_topic(COMMANDS) or set()
        tps = [TopicPartition(COMMANDS, p) for p in sorted(parts)]
        consumer.assign(tps)
        await consumer.seek_to_end(*tps)
        lag.register("inbound:reloads", lag.aiokafka_source(lambda: consumer))  # services/common/lag.py
        async for rec in consumer:
            try:
                _, env = codec().decode(rec.value, expect="CommandEnvelope")
            except DecodeError:
                continue
            if env["type"] in ("bounce.reload", "instance.update"):
                log.info("bounce config reload", extra={"command": env["type"]})
                poller.reload()
    finally:
        await consumer.stop()


async def main() -> None:
    settings = get_settings()
    setup_logging("inbound", settings.log_level)
    box = load_secret_box(settings)
    poller: ImapPoller | None = None
    # a new instance record (bounce settings) wakes the poller once the record itself is visible;
    # the reload command alone can arrive before the record reaches this view
    instance = ConfigView(settings.kafka_bootstrap, CONFIG_INSTANCE, "Instance",
                          on_change=lambda _k, _v: poller.reload() if poller is not None else None)
    positions = ConfigView(settings.kafka_bootstrap, IMAP_POSITION, "ImapPosition")
    inbound = Inbound(settings)
    await asyncio.gather(instance.start(), positions.start(), inbound.start())
    server = await serve(inbound, settings.inbound_smtp_host, settings.inbound_smtp_port,
                         settings.inbound_max_message_bytes)
    poller = ImapPoller(inbound, instance, positions, box)
    tasks = [asyncio.create_task(poller.run(), name="imap-poller"),
             asyncio.create_task(watch_reloads(settings.kafka_bootstrap, poller), name="reloads"),
             asyncio.create_task(pec_timeout.run(inbound, settings), name="pec-timeout")]
    start_metrics_server(settings, settings.inbound_metrics_port)  # /metrics needs the internal token
    log.info("inbound ready", extra={"smtp_port": settings.inbound_smtp_port})
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    with contextlib.suppress(Exception):
        await server.wait_closed()
    await asyncio.gather(inbound.stop(), instance.stop(), positions.stop(), return_exceptions=True)


if __name__ == "__main__":
    asyncio.run(main())
