"""Who may write which field: the one table per resource that every write route consults.

``TENANT``: the tenant's own API key may write it (for its own tenant only; the admin may too).
``ADMIN``: only the admin token. A tenant-key request that names an admin-only field, whatever its
value, is refused as a whole with 403 ``admin_only_field`` (``details.fields`` lists them), before
anything is written. A field missing from a table counts as admin-only (fail closed): a new request
field must be classified here (tests/unit/test_field_policy.py checks every request model).

Nested fields are written ``parent.child``; a parent listed as a whole (``rate_limits``) covers its
children. Admin-only sub-fields of an object a tenant may write (``large_file_config.storage_url``)
keep their stored value when the tenant rewrites the object (see :func:`keep_admin_subfields`)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from services.api.commands import Actor
from services.api.errors import ApiError

TENANT = "tenant"
ADMIN = "admin"

# PUT /tenant/{id} (POST /tenant is an admin route: create-only fields are admin's by construction)
TENANT_FIELDS: dict[str, str] = {
    "name": TENANT,
    "client_base_url": TENANT,
    "client_sync_path": TENANT,
    "client_attachment_path": TENANT,
    "client_auth": TENANT,
    "tracking": TENANT,
    "default_from": TENANT,
    "large_file_config.enabled": TENANT,
    "large_file_config.max_size_mb": TENANT,
    "large_file_config.action": TENANT,
    "large_file_config.file_ttl_days": TENANT,
    "large_file_config.public_base_url": TENANT,
    "large_file_config.storage_root": TENANT,  # a name among the operator's roots
    "large_file_config.storage_url": ADMIN,  # a raw fsspec root URL
    "rate_limits": ADMIN,
    "active": ADMIN,
    "id": ADMIN,
    "expires_at": ADMIN,
    "expires_in_days": ADMIN,
}

# POST /account: the tenant's own SMTP accounts (tenant_id: only its own, see auth.scope_tenant)
ACCOUNT_FIELDS: dict[str, str] = {
    f: TENANT for f in ("id", "tenant_id", "host", "port", "user", "password", "use_tls", "batch_size",
                        "limit_per_minute", "limit_per_hour", "limit_per_day", "limit_behavior",
                        "max_connections", "tls_verify", "ca_bundle_pem", "allow_insecure_auth")
}

# PUT /domains/{name}/outbound: a tenant registers its domain (empty body or its own tenant_id);
# quotas, tier, enforcement and status (incl. lifting an automatic suspension) are the operator's
DOMAIN_FIELDS: dict[str, str] = {
    "tenant_id": TENANT,
    "outbound_daily_limit": ADMIN,
    "outbound_monthly_limit": ADMIN,
    "outbound_tier": ADMIN,
    "outbound_enforcement": ADMIN,
    "outbound_status": ADMIN,
}

# PUT /instance: the whole route is the admin's
INSTANCE_FIELDS: dict[str, str] = {
    f: ADMIN for f in ("name", "active", "sync_interval_seconds", "report_retention_seconds", "bounce")
}

TABLES: dict[str, dict[str, str]] = {
    "tenant": TENANT_FIELDS,
    "account": ACCOUNT_FIELDS,
    "domain": DOMAIN_FIELDS,
    "instance": INSTANCE_FIELDS,
}


def given_fields(body: BaseModel | None, table: dict[str, str], prefix: str = "") -> list[str]:
    """The dotted names of the fields a request sets (explicit nulls included)."""
    if body is None:
        return []
    out: list[str] = []
    for name in sorted(body.model_fields_set):
        dotted = prefix + name
        value = getattr(body, name, None)
        if dotted not in table and isinstance(value, BaseModel) and any(k.startswith(dotted + ".") for k in table):
            out += given_fields(value, table, dotted + ".")
        else:
            out.append(dotted)
    return out


def admin_only(resource: str, fields: list[str]) -> list[str]:
    table = TABLES[resource]
    return [f for f in fields if table.get(f, ADMIN) != TENANT]


def check_write(resource: str, actor: Actor, body: BaseModel | None) -> None:
    """Refuse (403 ``admin_only_field``) a tenant-key write that names an admin-only field."""
    if actor.kind == "admin":
        return
    refused = admin_only(resource, given_fields(body, TABLES[resource]))
    if refused:
        raise ApiError(403, "admin_only_field", f"only the admin may set: {', '.join(refused)}",
                       details={"fields": refused})


def keep_admin_subfields(resource: str, parent: str, new: dict[str, Any] | None,
                         stored: dict[str, Any] | None, actor: Actor) -> dict[str, Any] | None:
    """A tenant rewriting ``parent`` keeps the stored admin-only sub-fields (it could not name them)."""
    if actor.kind == "admin" or not stored:
        return new
    table = TABLES[resource]
    kept = {k: v for k, v in stored.items() if table.get(f"{parent}.{k}") == ADMIN}
    if not kept:
        return new
    return {**(new or {}), **kept}


def table_markdown() -> str:
    """The tables as README text (``python -m services.api.field_policy``)."""
    lines = []
    for resource, table in TABLES.items():
        tenant = ", ".join(f"`{f}`" for f, who in table.items() if who == TENANT) or "none"
        admin = ", ".join(f"`{f}`" for f, who in table.items() if who == ADMIN) or "none"
        lines.append(f"| {resource} | {tenant} | {admin} |")
    return "| resource | tenant key may write | admin only |\n|---|---|---|\n" + "\n".join(lines)


if __name__ == "__main__":
    print(table_markdown())
