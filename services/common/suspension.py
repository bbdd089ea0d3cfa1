"""Suspended batches of one tenant: the pure rules shared by the API (which computes the new
record of a suspend/activate call) and the sender (which holds the messages the record covers).

A record is ``{"tenant_id", "all": bool, "batches": [batch_code, ...], "updated_ts"}``; ``all``
holds every message of the tenant, including those without a batch_code."""

from __future__ import annotations

from typing import Any

ALL = "*"


class AllBatchesSuspended(Exception):
    """Activating one batch while every batch is suspended: the caller must activate all first."""


def empty(tenant_id: str) -> dict[str, Any]:
    return {"tenant_id": tenant_id, "all": False, "batches": [], "updated_ts": 0}


def suspend(current: dict[str, Any] | None, tenant_id: str, batch_code: str | None, now_ms: int) -> dict[str, Any]:
    rec = current or empty(tenant_id)
    if batch_code in (None, "", ALL):
        return {**rec, "tenant_id": tenant_id, "all": True, "updated_ts": now_ms}
    batches = list(rec["batches"])
    if batch_code not in batches:
        batches.append(batch_code)
    return {**rec, "tenant_id": tenant_id, "batches": sorted(batches), "updated_ts": now_ms}


def activate(current: dict[str, Any] | None, tenant_id: str, batch_code: str | None, now_ms: int) -> dict[str, Any]:
    rec = current or empty(tenant_id)
    if batch_code in (None, "", ALL):
        # activating all releases everything, the individually suspended batches too
        return {**rec, "tenant_id": tenant_id, "all": False, "batches": [], "updated_ts": now_ms}
    if rec["all"]:
        raise AllBatchesSuspended(batch_code)
    return {**rec, "tenant_id": tenant_id, "batches": [b for b in rec["batches"] if b != batch_code],
            "updated_ts": now_ms}


def is_held(rec: dict[str, Any] | None, batch_code: str | None) -> bool:
    """A message with no batch_code is held only by an all-suspension."""
    if not rec:
        return False
    if rec.get("all"):
        return True
    return batch_code is not None and batch_code in rec.get("batches", ())


def newer(current: dict[str, Any] | None, candidate: dict[str, Any]) -> bool:
    """The sender learns a record twice (command stream and config topic): keep the latest."""
    return current is None or candidate["updated_ts"] >= current["updated_ts"]


INSTANCE_KEY = "instance"  # the one record of postbus.config.instance


def switched_off(instance: dict[str, Any] | None, tenant: dict[str, Any] | None) -> str | None:
    """Why nothing of this tenant may be sent now, by the on/off switches (``PUT /instance``
    ``active``, the admin's tenant-less suspend, the tenant's ``active``); None: switched on."""
    if instance is not None and instance.get("active") is False:
        return "instance inactive"
    if tenant is not None and tenant.get("active") is False:
        return "tenant inactive"
    return None
