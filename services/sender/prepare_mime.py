"""The default builder: attachments (services/sender/attachments.py), then the MIME text
(services/sender/mime.py). Attachments that large_file_config rewrites become download links
appended to the body (text and html)."""

from __future__ import annotations

import html
from typing import Any

from services.sender import pipeline
from services.sender.attachments import Prepared, prepare_attachment
from services.sender.mime import build_message


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


@pipeline.set_builder
async def build(ctx: pipeline.SendContext) -> bytes:
    msg = ctx.message
    prepared = [await prepare_attachment(ctx, att) for att in msg.get("attachments") or []]
    attached = [(p.att, p.data) for p in prepared if p.data is not None]
    linked = [p for p in prepared if p.link is not None]
    return build_message(with_links(msg, linked), attached)
