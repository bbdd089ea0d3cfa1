"""GET /files/{token}: downloads of attachments that large_file_config moved to storage.

The token is the whole authorisation (services/common/signed_links.py): it names one stored object
and expires. Forged or malformed -> 403, expired / deleted tenant / missing object -> 404. Defence in
depth: the URL must still be a storage object (no protocol chains, no http(s), a local file inside an
allowed storage folder), else 404."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import fsspec
from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from services.api.deps import state_of
from services.api.errors import ApiError
from services.api.models import ErrorOut
from services.common import signed_links, storage_roots

router = APIRouter()
CHUNK = 256 * 1024
_keys: dict[int, bytes] = {}


def _key(request: Request) -> bytes:
    st = state_of(request)
    key = _keys.get(id(st))
    if key is None:
        key = _keys[id(st)] = signed_links.link_key(st.settings)
    return key


@router.get(
    "/files/{token}",
    tags=["public"],
    summary="Download a large attachment through its signed, expiring link",
    response_class=StreamingResponse,
    responses={200: {"description": "the file", "content": {"application/octet-stream": {}}},
               403: {"model": ErrorOut, "description": "forged or malformed link"},
               404: {"model": ErrorOut, "description": "expired link, or the file is gone"},
               503: {"model": ErrorOut, "description": "the storage is not reachable"}},
)
async def download(token: str, request: Request) -> Any:
    try:
        link = signed_links.verify(_key(request), token)
    except signed_links.ExpiredLink:
        raise ApiError(404, "link_expired", "this download link has expired") from None
    except signed_links.InvalidLink:
        raise ApiError(403, "invalid_link", "this download link is not valid") from None
    if state_of(request).tenants.get(link.tenant_id) is None:
        raise ApiError(404, "not_found", "file not found")  # a deleted tenant's links die with it
    try:
        url = storage_roots.check_download_url(link.url, state_of(request).settings)
    except storage_roots.StorageRootError:
        raise ApiError(404, "not_found", "file not found") from None
    try:
        fh, size = await asyncio.to_thread(_open, url)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise ApiError(404, "not_found", "file not found") from None
    except (OSError, ImportError, ValueError):
        raise ApiError(503, "storage_unavailable", "the file storage is not reachable") from None

    async def body() -> AsyncIterator[bytes]:
        try:
            while chunk := await asyncio.to_thread(fh.read, CHUNK):
                yield chunk
        finally:
            await asyncio.to_thread(fh.close)

    headers = {"Content-Disposition": f"attachment; filename*=utf-8''{quote(link.filename)}",
               "X-Content-Type-Options": "nosniff", "Cache-Control": "private, no-store"}
    if isinstance(size, int):
        headers["Content-Length"] = str(size)
    return StreamingResponse(body(), media_type=link.mime_type or "application/octet-stream", headers=headers)


def _open(url: str) -> tuple[Any, int | None]:
    fs, path = fsspec.core.url_to_fs(url)
    if fs.isdir(path):
        raise IsADirectoryError(path)
    return fs.open(path, "rb"), fs.size(path)
