"""The default builder: attachments, then the MIME text (services/sender/mime.py)."""

from __future__ import annotations

from typing import Any

from services.sender import pipeline
from services.sender.mime import build_message, decode_base64_attachment


async def fetch_attachment(ctx: pipeline.SendContext, att: dict[str, Any]) -> bytes:
    if att["fetch_mode"] != "base64":
        raise pipeline.PrepareError(f"attachment fetch_mode {att['fetch_mode']!r} is not supported by this sender yet")
    try:
        return decode_base64_attachment(att)
    except ValueError as exc:
        raise pipeline.PrepareError(str(exc)) from exc


@pipeline.set_builder
async def build(ctx: pipeline.SendContext) -> bytes:
    msg = ctx.message
    attachments = [(att, await fetch_attachment(ctx, att)) for att in msg.get("attachments") or []]
    return build_message(msg, attachments)
