from __future__ import annotations

from fastapi import Request

from services.api.state import ApiState


def state_of(request: Request) -> ApiState:
    return request.app.state.postbus  # type: ignore[no-any-return]
