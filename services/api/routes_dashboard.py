"""``GET /dashboard``: the BI dashboard page (docs/dashboard.md).

Public static content shipped in the package (services/api/static/dashboard/): the page holds no
data and no credential; it asks the user for a token (admin, BI principal or tenant key), keeps it
in sessionStorage only and calls ``/api/v1/bi/metrics`` with it. Every answer carries a
Content-Security-Policy that allows scripts, styles and requests to this origin only (no inline
script, no external requests) and forbids framing."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, RedirectResponse, Response

from services.api.errors import ApiError

router = APIRouter(tags=["dashboard"])
STATIC = Path(__file__).resolve().parent / "static" / "dashboard"

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; font-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-cache",
}
# the only files served: a fixed table, so no path from the request ever reaches the filesystem
ASSETS = {
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
    "chart.umd.min.js": "text/javascript; charset=utf-8",
    "chart.js.LICENSE.md": "text/plain; charset=utf-8",
}


@router.get("/dashboard", include_in_schema=False)
async def dashboard_page() -> Response:
    return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8", headers=HEADERS)


@router.get("/dashboard/", include_in_schema=False)
async def dashboard_slash() -> Response:
    return RedirectResponse("/dashboard", status_code=308)


@router.get("/dashboard/{name}", include_in_schema=False)
async def dashboard_asset(name: str) -> Response:
    media_type = ASSETS.get(name)
    if media_type is None:
        raise ApiError(404, "not_found", "no such dashboard file")
    return FileResponse(STATIC / name, media_type=media_type, headers=HEADERS)
