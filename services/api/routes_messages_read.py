"""GET /messages and sync status: reads served by the metrics service's projections."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()
