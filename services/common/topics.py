"""Every Kafka topic of Postbus, with its partitioning and retention, and the bootstrap that creates them."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

log = logging.getLogger("postbus.topics")

COMMANDS = "postbus.commands"
EVENTS = "postbus.events"
CONFIG_TENANTS = "postbus.config.tenants"
CONFIG_ACCOUNTS = "postbus.config.accounts"
CONFIG_APIKEYS = "postbus.config.apikeys"
DEADLETTER = "postbus.deadletter"
CONFIG_INSTANCE = "postbus.config.instance"  # instance-wide config (key "instance")
CONFIG_SUSPENSIONS = "postbus.config.suspensions"  # per-tenant suspended batch codes (key tenant_id)
STATUS_SYNC = "postbus.status.sync"  # reporter's per-tenant sync status (key tenant_id)
REPORTS = "postbus.reports"  # acknowledged delivery reports (keyed by tenant), for reported_ts
# outbound domains (routes_domains + sender/domain_ledger)
CONFIG_DOMAINS = "postbus.config.domains"  # Domain records (key domain name)
STATUS_DOMAINS = "postbus.status.domains"  # the ledger's counters per domain (key domain name)
DOMAIN_RESULTS = "postbus.domain.results"  # the ledger's answer to each domain command (key tenant_id)
BILLING = "postbus.billing"  # monthly counters frozen before a reset (key domain name), kept forever
# inbound bounces / complaints / PEC receipts (services/inbound)
INBOUND_RAW = "postbus.inbound.raw"  # every inbound message as received (key: its id), kept forever
IMAP_POSITION = "postbus.inbound.imap-position"  # the IMAP poller's UIDVALIDITY + last UID (compacted)
# tracking and complaints (routes_suppression, sender/suppression): suppressed addresses (key tenant/address)
CONFIG_SUPPRESSION_LIST = "postbus.config.suppression-list"
# provider API (services/api/provider): compacted, 1 partition each; keys in docs/provider.md
CONFIG_PROVIDER_USERS = "postbus.config.provider-users"  # ProviderUser (key "<user_id>")
CONFIG_PROVIDER_TOKENS = "postbus.config.provider-tokens"  # ProviderToken (key "<token_id>")
CONFIG_PROVIDER_SENDERS = "postbus.config.provider-senders"  # ProviderSender (key "<tenant>/<sender_id>")
CONFIG_PROVIDER_TEMPLATES = "postbus.config.provider-templates"  # ProviderTemplate (key "<tenant>/<template_id>")
CONFIG_PROVIDER_LISTS = "postbus.config.provider-lists"  # ProviderList (key "<tenant>/<list_id>")
CONFIG_PROVIDER_MEMBERS = "postbus.config.provider-members"  # ProviderMember (key "<tenant>/<list_id>/<member_id>")
CONFIG_PROVIDER_IDS = "postbus.config.provider-ids"  # ProviderCounter: the integer id allocator (key kind)
# provider campaigns (services/api/provider/campaigns.py, services/sender/campaigns.py)
CONFIG_PROVIDER_CAMPAIGNS = "postbus.config.provider-campaigns"  # ProviderCampaign (key "<tenant>/<campaign_id>")
# the expansion cursor of each campaign, written in one transaction with its messages.add commands
STATE_CAMPAIGN_CURSORS = "postbus.state.campaign-cursors"  # CampaignCursor (key "<tenant>/<campaign_id>")

# Faust's own topics, named "<app id>-<table>-changelog" / "<app id>-__assignor-__leader" by Faust.
# Created here so their partition counts match the source topics before any worker starts (Faust
# refuses a table whose changelog and source partition counts differ).
SENDER_APP = "postbus-sender"
REPORTER_APP = "postbus-reporter"
SENDER_MESSAGES_CHANGELOG = f"{SENDER_APP}-messages-changelog"
SENDER_DOMAIN_LEDGER_CHANGELOG = f"{SENDER_APP}-domain_ledger-changelog"
# idempotency keys / message ids of domain increments and counted sends (sender/domain_ledger)
SENDER_DOMAIN_MARKS_CHANGELOG = f"{SENDER_APP}-domain_marks-changelog"
SENDER_RATE_LIMITS_CHANGELOG = f"{SENDER_APP}-rate_limits-changelog"  # per-account/tenant send windows
REPORTER_PENDING_CHANGELOG = f"{REPORTER_APP}-pending_reports-changelog"

FOREVER = {"retention.ms": "-1", "retention.bytes": "-1", "cleanup.policy": "delete"}
COMPACTED = {
    "cleanup.policy": "compact",
    "min.compaction.lag.ms": "60000",
    "delete.retention.ms": "86400000",
    "segment.ms": "3600000",
}


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    configs: dict[str, str] = field(default_factory=dict)


def topic_specs(partitions: int) -> list[TopicSpec]:
    """Commands and events are keyed by tenant and share a partition count, so a tenant's command
    and event partitions line up (Faust tables of the sender/reporter rely on that)."""
    return [
        # the audit log: every state-changing command, kept forever
        TopicSpec(COMMANDS, partitions, FOREVER),
        # delivery outcomes: the source of the reporter and of the ClickHouse analytics
        TopicSpec(EVENTS, partitions, FOREVER),
        TopicSpec(CONFIG_TENANTS, 1, COMPACTED),
        TopicSpec(CONFIG_ACCOUNTS, 1, COMPACTED),
        TopicSpec(CONFIG_APIKEYS, 1, COMPACTED),
        TopicSpec(CONFIG_INSTANCE, 1, COMPACTED),
        TopicSpec(CONFIG_SUSPENSIONS, 1, COMPACTED),
        TopicSpec(STATUS_SYNC, 1, COMPACTED),
        TopicSpec(REPORTS, partitions, FOREVER),
        TopicSpec(DEADLETTER, 1, {"retention.ms": str(30 * 86400_000)}),
        # table changelogs: co-partitioned with commands/events (tenant-keyed), compacted
        TopicSpec(SENDER_MESSAGES_CHANGELOG, partitions, {"cleanup.policy": "compact"}),
        # every report writes pending, ack marker and tombstone: compact eagerly so a restart
        # recovers a small table instead of replaying every report ever made
        TopicSpec(REPORTER_PENDING_CHANGELOG, partitions, {
            "cleanup.policy": "compact", "segment.ms": "600000", "min.cleanable.dirty.ratio": "0.1",
            "delete.retention.ms": "600000"}),
        # outbound domains: config and counters compacted, results short-lived, billing forever
        TopicSpec(CONFIG_DOMAINS, 1, COMPACTED),
        TopicSpec(STATUS_DOMAINS, 1, COMPACTED),
        TopicSpec(DOMAIN_RESULTS, partitions, {"retention.ms": str(3600_000)}),
        TopicSpec(BILLING, 1, FOREVER),
        TopicSpec(SENDER_DOMAIN_LEDGER_CHANGELOG, partitions, {"cleanup.policy": "compact"}),
        TopicSpec(SENDER_DOMAIN_MARKS_CHANGELOG, partitions, {
            "cleanup.policy": "compact", "segment.ms": "600000", "min.cleanable.dirty.ratio": "0.1",
            "delete.retention.ms": "600000"}),
        TopicSpec(INBOUND_RAW, partitions, FOREVER),
        TopicSpec(IMAP_POSITION, 1, COMPACTED),
        TopicSpec(CONFIG_SUPPRESSION_LIST, 1, COMPACTED),
        # provider API (users, tokens, senders, templates, lists, members, id counters)
        *(TopicSpec(t, 1, COMPACTED) for t in (
            CONFIG_PROVIDER_USERS, CONFIG_PROVIDER_TOKENS, CONFIG_PROVIDER_SENDERS, CONFIG_PROVIDER_TEMPLATES,
            CONFIG_PROVIDER_LISTS, CONFIG_PROVIDER_MEMBERS, CONFIG_PROVIDER_IDS)),
        TopicSpec(CONFIG_PROVIDER_CAMPAIGNS, 1, COMPACTED),  # campaigns and their cursors
        TopicSpec(STATE_CAMPAIGN_CURSORS, 1, COMPACTED),
        TopicSpec(SENDER_RATE_LIMITS_CHANGELOG, partitions, {
            "cleanup.policy": "compact", "segment.ms": "600000", "min.cleanable.dirty.ratio": "0.1"}),
        TopicSpec(f"{SENDER_APP}-__assignor-__leader", 1, {}),
        TopicSpec(f"{REPORTER_APP}-__assignor-__leader", 1, {}),
    ]


async def ensure_topics(bootstrap: str, partitions: int, timeout_s: float = 60.0) -> list[str]:
    """Create missing topics (idempotent). Returns the names created."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=15000)
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        try:
            await admin.start()
            break
        except Exception as exc:  # broker not up yet
            if asyncio.get_running_loop().time() > deadline:
                raise RuntimeError(f"Kafka at {bootstrap} did not answer: {exc}") from exc
            await asyncio.sleep(0.5)
    created: list[str] = []
    try:
        existing = set(await admin.list_topics())
        missing = [s for s in topic_specs(partitions) if s.name not in existing]
        for spec in missing:
            try:
                await admin.create_topics(
                    [NewTopic(spec.name, spec.partitions, 1, topic_configs=spec.configs)]
                )
                created.append(spec.name)
            except TopicAlreadyExistsError:
                pass
        if created:
            log.info("created topics", extra={"topics": created})
    finally:
        await admin.close()
    return created


def main() -> None:
    from services.common.logs import setup_logging
    from services.common.settings import get_settings

    s = get_settings()
    setup_logging("topics", s.log_level)
    created = asyncio.run(ensure_topics(s.kafka_bootstrap, s.topic_partitions))
    print(f"topics ready ({len(created)} created)")


if __name__ == "__main__":
    main()


class TopicMissing(RuntimeError):
    pass


async def topic_partitions(consumer: Any, topic: str, attempts: int = 50) -> list[int]:
    """The partition numbers of ``topic``, asked from the cluster (an unsubscribed consumer's
    metadata does not list it). Retries briefly: right after the bootstrap a topic may not be in
    the metadata yet."""
    for _ in range(attempts):
        cluster = await consumer._client.fetch_all_metadata()
        parts = cluster.partitions_for_topic(topic)
        if parts:
            return sorted(parts)
        await asyncio.sleep(0.1)
    raise TopicMissing(f"topic {topic} does not exist (run the topic bootstrap)")
