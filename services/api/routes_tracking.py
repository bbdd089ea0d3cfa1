"""Tracking and unsubscribe endpoints, reached from the links the sender writes into messages
(services/sender/tracking.py). No authentication: the signed token is the credential.

- ``GET /t/o/{token}``: the open pixel (a 1x1 GIF); appends ``tracking.open``.
- ``GET /t/c/{token}``: 302 to the URL signed into the token; appends ``tracking.click``.
- ``GET /u/{token}``: a confirmation page whose button POSTs to the same URL (a GET never
  unsubscribes: mail scanners prefetch links).
- ``POST /u/{token}``: RFC 8058 one-click unsubscribe; appends ``tracking.unsubscribe`` with the
  address's suppression record in the same transaction.

A forged, altered or expired token is answered 404 (JSON) and never redirects anywhere."""

from __future__ import annotations

import base64
import html
import logging
import time
from typing import Any

from aiokafka.errors import KafkaError
from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from services.api.commands import Actor, ConfigRecord
from services.api.deps import state_of
from services.api.errors import ApiError
from services.api.models import ErrorOut
from services.api.routes_suppression import entry_key, new_entry, suppression_view, write
from services.common import track_tokens as tt
from services.common.topics import CONFIG_SUPPRESSION_LIST

log = logging.getLogger("postbus.api.tracking")
router = APIRouter(tags=["tracking"])

PIXEL = base64.b64decode("R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7")
_NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorOut, "description": "invalid_token: forged, altered or expired token"}}


def _token(request: Request, token: str, kind: str) -> tt.Token:
    st = state_of(request)
    key = getattr(request.app.state, "postbus_tracking_key", None)
    if key is None:
        key = tt.key_from_settings(st.settings)
        request.app.state.postbus_tracking_key = key
    tok = tt.verify(key, token, kind)
    if tok is None:
        raise ApiError(404, "invalid_token", "this link is not valid or has expired")
    return tok


def _hit(tok: tt.Token, kind: str, source: str) -> dict[str, Any]:
    return {"kind": kind, "tenant_id": tok.tenant_id, "message_id": tok.message_id, "account_id": tok.account_id,
            "recipient": tok.recipient, "url": tok.url if kind == "click" else None, "source": source,
            "ts": int(time.time() * 1000), "sender_domain": None, "bounce_type": None, "bounce_code": None,
            "bounce_reason": None, "feedback_type": None}


async def _record(request: Request, tok: tt.Token, kind: str, source: str, route: str) -> None:
    """Best effort: the reader gets the pixel / the redirect even if the log is unavailable."""
    st = state_of(request)
    try:
        await st.writer.append(f"tracking.{kind}", tok.tenant_id, Actor("tenant", tok.tenant_id, f"link:{source}"),
                               route, "Engagement", _hit(tok, kind, source))
    except KafkaError:
        log.warning("tracking event lost: the log is unavailable", extra={"kind": kind})


@router.get("/t/o/{token}", summary="Open-tracking pixel (records an open)", response_class=Response,
            responses={200: {"content": {"image/gif": {}}, "description": "a 1x1 transparent GIF"}, **_NOT_FOUND})
async def open_pixel(token: str, request: Request) -> Response:
    tok = _token(request, token, "o")
    await _record(request, tok, "open", "pixel", "GET /t/o/{token}")
    return Response(PIXEL, media_type="image/gif", headers={"Cache-Control": "no-store, max-age=0"})


@router.get("/t/c/{token}", summary="Click redirect (records a click, 302 to the signed URL)",
            response_class=RedirectResponse, status_code=302,
            responses={302: {"description": "redirect to the URL signed into the token"}, **_NOT_FOUND})
async def click(token: str, request: Request) -> RedirectResponse:
    tok = _token(request, token, "c")
    await _record(request, tok, "click", "link", "GET /t/c/{token}")
    assert tok.url is not None  # verify() accepts click tokens with a safe URL only
    return RedirectResponse(tok.url, status_code=302, headers={"Cache-Control": "no-store"})


_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>Unsubscribe</title></head>
<body style="font-family:sans-serif;max-width:32em;margin:4em auto">{body}</body></html>"""


@router.get("/u/{token}", summary="Unsubscribe confirmation page", response_class=HTMLResponse,
            responses={200: {"content": {"text/html": {}}, "description": "page with a confirm button"},
                       **_NOT_FOUND})
async def unsubscribe_page(token: str, request: Request) -> HTMLResponse:
    tok = _token(request, token, "u")
    who = html.escape(tok.recipient or "this address")
    return HTMLResponse(_PAGE.format(body=(
        f"<p>Stop receiving these emails at <b>{who}</b>?</p>"
        '<form method="post"><input type="hidden" name="List-Unsubscribe" value="One-Click">'
        '<button type="submit">Unsubscribe</button></form>')))


@router.post("/u/{token}", summary="One-click unsubscribe (RFC 8058): suppresses the address",
             response_class=HTMLResponse,
             responses={200: {"content": {"text/html": {}}, "description": "unsubscribed"}, **_NOT_FOUND,
                        503: {"model": ErrorOut, "description": "log_unavailable"}})
async def unsubscribe(token: str, request: Request) -> HTMLResponse:
    tok = _token(request, token, "u")
    st = state_of(request)
    if st.tenants.get(tok.tenant_id) is None or not tok.recipient:
        raise ApiError(404, "invalid_token", "this link is not valid or has expired")
    key = entry_key(tok.tenant_id, tok.recipient)
    records = []
    if suppression_view(request).get(key) is None:
        records.append(ConfigRecord(CONFIG_SUPPRESSION_LIST, key, "SuppressionEntry",
                                    new_entry(tok.tenant_id, tok.recipient, "unsubscribe", "one-click",
                                              detail=f"message {tok.message_id}"[:300])))
    await write(request, "tracking.unsubscribe", tok.tenant_id, Actor("tenant", tok.tenant_id, "link:one-click"),
                "POST /u/{token}", "Engagement", _hit(tok, "unsubscribe", "one-click"), records)
    return HTMLResponse(_PAGE.format(body=f"<p><b>{html.escape(tok.recipient)}</b> is unsubscribed.</p>"))
