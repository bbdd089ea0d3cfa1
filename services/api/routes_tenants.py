"""Tenants (read, update, delete, list), API keys (rotate, revoke), accounts (list, delete)."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()
