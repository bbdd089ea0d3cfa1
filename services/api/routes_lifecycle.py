"""Message lifecycle commands: suspend, activate, delete-messages, cleanup-messages."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()
