"""The default builder: attachments (services/sender/attachments.py), then the MIME text
(services/sender/mime.py). Attachments that large_file_config rewrites become download links
appended to the body (text and html).

Memory: the attachment bytes being prepared at once in this process are bounded by a byte budget
(``sender_attachments_inflight_bytes``). A message reserves its estimate up front, all at once (no
message holds part of the budget while waiting for more, so workers cannot deadlock): inline
content by its decoded size, a fetched attachment by the largest size it may have (the tenant's
attachment threshold); a message whose estimate is over the whole budget waits until it runs
alone. After the fetch the reservation is trued up to the real size and held until the MIME text
is built."""

from __future__ import annotations

import asyncio
import html
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from services.common.settings import get_settings
from services.sender import pipeline
from services.sender.attachments import LargeFilePolicy, Prepared, prepare_attachment
from services.sender.mime import build_message


class ByteBudget:
    """An async semaphore counted in bytes. ``reserve(n)`` waits until ``n`` more fit (``n`` over
    the capacity waits for an empty budget); ``grow`` adds to a reservation without waiting."""

    def __init__(self, capacity: int) -> None:
        self.capacity = max(1, capacity)
        self.used = 0
        self._cond = asyncio.Condition()

    @asynccontextmanager
    async def reserve(self, n: int) -> AsyncIterator[Reservation]:
        n = max(0, min(n, self.capacity))
        async with self._cond:
            await self._cond.wait_for(lambda: self.used + n <= self.capacity)
            self.used += n
        held = Reservation(self, n)
        try:
            yield held
        finally:
            async with self._cond:
                self.used -= held.bytes
                self._cond.notify_all()


class Reservation:
    def __init__(self, budget: ByteBudget, n: int) -> None:
        self.budget = budget
        self.bytes = n

    def grow_to(self, n: int) -> None:
        """The reservation becomes ``n`` bytes if that is more (the real size was over the estimate)."""
        if n > self.bytes:
            self.budget.used += n - self.bytes
            self.bytes = n


_budget: ByteBudget | None = None


def budget() -> ByteBudget:
    global _budget
    if _budget is None:
        _budget = ByteBudget(get_settings().sender_attachments_inflight_bytes)
    return _budget


def estimate(att: dict[str, Any], fetch_limit: int) -> int:
    """The bytes one attachment may take in memory: decoded inline size, else the fetch limit."""
    if att.get("fetch_mode") == "base64":
        raw = att.get("storage_path") or ""
        return len(raw.removeprefix("base64:")) * 3 // 4
    return fetch_limit


def with_links(msg: dict[str, Any], linked: list[Prepared]) -> dict[str, Any]:
    """A copy of the message whose bodies list the download links of the rewritten attachments."""
    if not linked:
        return msg
    lines = [f"- {p.att['filename']} ({_size(p.size)}): {p.link}" for p in linked]
    text_note = "\n\nAttachments too large for e-mail, download them here:\n" + "\n".join(lines) + "\n"
    items = "".join(f'<li><a href="{html.escape(p.link or "")}">{html.escape(p.att["filename"])}</a> '
                    f"({_size(p.size)})</li>" for p in linked)
    html_note = f"<p>Attachments too large for e-mail, download them here:</p><ul>{items}</ul>"
    out = dict(msg)
    text, body_html = msg.get("body_text"), msg.get("body_html")
    if body_html is not None:
        i = body_html.lower().rfind("</body>")
        out["body_html"] = body_html[:i] + html_note + body_html[i:] if i >= 0 else body_html + html_note
    if text is not None or body_html is None:
        out["body_text"] = (text or "") + text_note
    return out


def _size(n: int) -> str:
    return f"{n / (1024 * 1024):.1f} MB" if n >= 1024 * 1024 else f"{max(1, n // 1024)} KB"


async def build(ctx: pipeline.SendContext) -> bytes:
    msg = ctx.message
    atts = msg.get("attachments") or []
    if not atts:
        return build_message(msg, [])
    policy = LargeFilePolicy.of(ctx.tenant)
    fetch_limit = policy.max_bytes if policy.enabled else get_settings().attachments_max_bytes
    async with budget().reserve(sum(estimate(att, fetch_limit) for att in atts)) as held:
        prepared: list[Prepared] = []
        for att in atts:
            p = await prepare_attachment(ctx, att)
            prepared.append(p)
            held.grow_to(sum(len(q.data) for q in prepared if q.data is not None))
        attached = [(p.att, p.data) for p in prepared if p.data is not None]
        linked = [p for p in prepared if p.link is not None]
        return build_message(with_links(msg, linked), attached)
