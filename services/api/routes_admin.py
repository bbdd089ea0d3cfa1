"""Instance config, bounce reload, status, command log and its export."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()
