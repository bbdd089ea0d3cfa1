"""Extension points of one send, so each concern lives in its own module:

- **checks** run before a message is sent (suppression, rate limits, domain quotas, ...). Each
  returns ``None`` (go on) or a :class:`Decision` to defer the message to a later time or to fail
  it with a reason. They run in the order of the one list in :mod:`services.sender.steps`; the first decision wins.
- **preparers** turn the message into bytes: the builder fetches attachments and writes the MIME
  text; transforms then rewrite those bytes (tracking, List-Unsubscribe, DKIM signature, ...).
- **on_sent** hooks run after the SMTP server accepted the message and its ``sent`` outcome was
  handed to the group commit (services/sender/group_commit.py).
- **on_done** callbacks run when an attempt is over, whatever its outcome (a check's reservation,
  such as a destination throttle slot, is released).

Nothing registers itself at import time: :func:`services.sender.steps.build` lists every step, in
order, and hands the :class:`Pipeline` to the engine."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Decision:
    kind: str  # "defer" | "reject"
    reason: str  # machine-readable first word, e.g. "rate_limit", "suppressed: hard bounce"
    until_ms: int | None = None  # for "defer": not before this time
    event_type: str = "error"  # for "reject": the event that ends the message ("error" or "rejected")

    @staticmethod
    def defer(reason: str, until_ms: int) -> Decision:
        return Decision("defer", reason, until_ms)

    @staticmethod
    def reject(reason: str, event_type: str = "error") -> Decision:
        return Decision("reject", reason, None, event_type)


@dataclass
class SendContext:
    """What a check, preparer or hook may look at for one attempt."""

    key: str  # table key of the message
    message: dict[str, Any]  # the Avro Message record
    account: dict[str, Any]  # the Account config record
    tenant: dict[str, Any] | None  # the Tenant config record, when known to the sender
    partition: int  # commands/events partition of the tenant (for table writes outside streams)
    attempt: int
    now_ms: int
    extra: dict[str, Any] = field(default_factory=dict)  # scratch space shared along one attempt


Check = Callable[[SendContext], Awaitable[Decision | None]]
Builder = Callable[[SendContext], Awaitable[bytes]]
Transform = Callable[[SendContext, bytes], Awaitable[bytes]]
Hook = Callable[[SendContext], Awaitable[None]]
Done = Callable[[str], None]


class PrepareError(Exception):
    """The message cannot be turned into bytes. ``temporary`` failures are retried like SMTP ones."""

    def __init__(self, reason: str, temporary: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.temporary = temporary


@dataclass
class Pipeline:
    """The steps of one send, in order (see :mod:`services.sender.steps`)."""

    checks: list[Check]
    builder: Builder
    transforms: list[Transform] = field(default_factory=list)
    on_sent: list[Hook] = field(default_factory=list)
    on_done: list[Done] = field(default_factory=list)

    async def run_checks(self, ctx: SendContext) -> Decision | None:
        for check in self.checks:
            decision = await check(ctx)
            if decision is not None:
                return decision
        return None

    async def prepare(self, ctx: SendContext) -> bytes:
        data = await self.builder(ctx)
        for transform in self.transforms:
            data = await transform(ctx, data)
        return data

    async def sent(self, ctx: SendContext) -> None:
        for hook in self.on_sent:
            await hook(ctx)

    def done(self, key: str) -> None:
        for fn in self.on_done:
            fn(key)
