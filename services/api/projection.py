"""Read-your-writes for the message projection (ClickHouse, behind the metrics service).

The projection is built from three tenant-keyed topics: ``postbus.commands`` (submissions, delete /
cleanup / tenant-delete marks), ``postbus.events`` (delivery outcomes) and ``postbus.reports``
(acknowledged reports -> ``reported_ts``). Before a read of one tenant's messages the API takes the
latest committed end offset of the tenant's partition of each topic it needs from the broker (and
never less than this process's own last write there, see ``CommandWriter.read_positions``), then
asks the metrics service to answer once its ingest has loaded everything before those offsets
(``POST /internal/ingest/wait``). Whatever a client wrote (or was told, e.g. a delivery report)
before its read is therefore in the answer, whichever API replica took the write.

Bounded: ``projection_wait_timeout_s``; a projection that is down, replaying or behind for longer
answers 503 ``projection_unavailable``."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import httpx

from services.api.errors import ApiError
from services.api.state import ApiState
from services.common.topics import COMMANDS, EVENTS, REPORTS

log = logging.getLogger("postbus.api.projection")

ALL_TOPICS = (COMMANDS, EVENTS, REPORTS)  # GET /messages, cleanup-messages
STATE_TOPICS = (COMMANDS, EVENTS)  # pending / final: delete-messages
SENT_TOPICS = (EVENTS,)  # "already sent": add-messages
WAIT_PATH = "/internal/ingest/wait"
HTTP_MARGIN_S = 5.0  # on top of the wait itself, for the HTTP round trip


class ProjectionUnavailable(ApiError):
    def __init__(self, message: str) -> None:
        super().__init__(503, "projection_unavailable", message)


async def wait_for_tenant(st: ApiState, tenant_id: str, topics: Sequence[str] = ALL_TOPICS,
                          timeout_s: float | None = None) -> None:
    """Return once the projection has loaded every record of the tenant written before this call
    on ``topics``; raise :class:`ProjectionUnavailable` (503) otherwise."""
    timeout = st.settings.projection_wait_timeout_s if timeout_s is None else timeout_s
    targets = await st.writer.read_positions(tenant_id, topics, timeout_s=min(timeout, 5.0) or 0.5)
    offsets = [{"topic": t, "partition": p, "offset": o} for (t, p), o in sorted(targets.items()) if o > 0]
    if not offsets:
        return  # nothing was ever written there: nothing to wait for
    try:
        r = await st.metrics.post(WAIT_PATH, json={"offsets": offsets, "timeout_s": timeout},
                                  timeout=timeout + HTTP_MARGIN_S)
    except httpx.HTTPError as exc:
        log.warning("message projection unreachable", extra={"tenant_id": tenant_id, "error": repr(exc)})
        raise ProjectionUnavailable("the message projection (metrics service) is not reachable; retry later") from None
    if r.status_code == 200 and _reached(r):
        return
    code = _error_code(r)
    log.warning("message projection not at the tenant's writes",
                extra={"tenant_id": tenant_id, "status": r.status_code, "code": code, "offsets": offsets})
    if code == "PROJECTION_BEHIND":
        raise ProjectionUnavailable(f"the message projection did not catch up with the latest writes within "
                                    f"{timeout:g}s; retry later")
    if code == "PROJECTION_REPLAYING":
        raise ProjectionUnavailable("the message projection is being rebuilt (replay); retry later")
    raise ProjectionUnavailable("the message projection (metrics service) is unavailable; retry later")


def _reached(r: httpx.Response) -> bool:
    try:
        return bool(r.json().get("reached"))
    except ValueError:
        return False


def _error_code(r: httpx.Response) -> str | None:
    try:
        err = r.json().get("error")
    except ValueError:
        return None
    return err.get("code") if isinstance(err, dict) else None
