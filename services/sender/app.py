"""The sender's Faust app, its topics and its tables: nothing else (no agents, no state).

The agents, timers and the engine are wired in services/sender/service.py; modules that need the
app get it passed (``register(app, ...)``), except the domain ledger, which still imports the app
from here (it imports nothing back, so there is no import cycle).

Tables (keys and values are JSON, Faust's default for untyped tables):
- ``messages``: key ``tenant \\x1f id``, every pending message and a marker for each final one
  (services/sender/engine.py describes the values); in RocksDB on disk, behind
  services/sender/message_store.py;
- ``rate_limits``: the rate-limit windows (services/sender/rate_limits.py)."""

from __future__ import annotations

from services.common import lag
from services.common.crypto import load_secret_box
from services.common.faust_support import make_app
from services.common.settings import get_settings
from services.common.topics import COMMANDS, DEADLETTER, EVENTS, SENDER_APP
from services.sender.message_store import ROCKSDB_OPTIONS

settings = get_settings()
box = load_secret_box(settings)

app = make_app(SENDER_APP, settings.kafka_bootstrap, str(settings.state_dir / "sender"),
               settings.topic_partitions)
lag.faust_app(app)  # postbus_consumer_lag (services/common/lag.py)
commands_topic = app.topic(COMMANDS, key_serializer="raw", value_serializer="raw", internal=False)
events_topic = app.topic(EVENTS, key_serializer="raw", value_serializer="raw", internal=False)
deadletter_topic = app.topic(DEADLETTER, key_serializer="raw", value_serializer="raw", internal=False)
messages = app.Table("messages", partitions=settings.topic_partitions, store="rocksdb:messages",
                     options=ROCKSDB_OPTIONS)  # ("rocksdb://" is an empty URL: Faust would take the app default)
rate_table = app.Table("rate_limits", partitions=settings.topic_partitions)
