"""``POST /internal/ingest/wait``: read-your-writes for the API.

The API sends the offsets a read must see, per (topic, partition), typically the end offsets of one
tenant's partitions of the commands, events and reports topics at the time of the client's request.
The answer comes once the ingest has loaded every one of them into ClickHouse (200 ``reached``), or
503 when it cannot within ``timeout_s`` (``PROJECTION_BEHIND``), when a replay is rebuilding the
tables (``PROJECTION_REPLAYING``) or when this instance does not ingest (``NOT_INGESTING``)."""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from services.common.topics import COMMANDS, EVENTS, REPORTS
from services.metrics.ingest import Ingestor

MAX_WAIT_S = 120.0
WAITABLE_TOPICS = (COMMANDS, EVENTS, REPORTS)


class WaitOffset(BaseModel):
    topic: str = Field(min_length=1, max_length=255)
    partition: int = Field(ge=0, le=100_000)
    offset: int = Field(ge=0)


class WaitRequest(BaseModel):
    offsets: list[WaitOffset] = Field(max_length=1000)
    timeout_s: float = Field(10.0, ge=0, le=MAX_WAIT_S)


def _unavailable(code: str, message: str, positions: dict[str, Any] | None = None) -> JSONResponse:
    body: dict[str, Any] = {"reached": False, "error": {"code": code, "message": message}}
    if positions is not None:
        body["positions"] = positions
    return JSONResponse(body, status_code=503)


async def wait(ingestor: Ingestor | None, body: WaitRequest) -> Any:
    if ingestor is None:
        return _unavailable("NOT_INGESTING", "this metrics instance does not ingest")
    unknown = sorted({o.topic for o in body.offsets} - set(WAITABLE_TOPICS))
    if unknown:
        return JSONResponse({"error": {"code": "VALIDATION_ERROR",
                                       "message": f"not a projected topic: {', '.join(unknown)}"}}, status_code=422)
    targets = {(o.topic, o.partition): o.offset for o in body.offsets}
    outcome = await ingestor.wait_for(targets, body.timeout_s)
    positions = {f"{t}:{p}": ingestor.positions.get((t, p), 0) for t, p in sorted(targets)}
    if outcome == "reached":
        return {"reached": True, "positions": positions}
    if outcome == "replaying":
        return _unavailable("PROJECTION_REPLAYING", "a replay is rebuilding the projection", positions)
    return _unavailable("PROJECTION_BEHIND", f"the projection did not reach the offsets within {body.timeout_s}s",
                        positions)
