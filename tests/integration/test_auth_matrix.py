"""Authorization matrix: every route of /openapi.json x {no token, bad token, another tenant's key,
the target tenant's own key, admin}, with the expected status from the table below.

The route list comes from the running API, so a route missing from ``ROUTES`` (or a stale row)
fails ``test_every_route_is_in_the_table``: a new route cannot be forgotten."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from tests.conftest import ADMIN_TOKEN

IDENTITIES = ("none", "bad", "other", "own", "admin")
# auth level -> expected status per identity ("ok" = the route's success status)
LEVELS: dict[str, dict[str, int | str]] = {
    "public": dict.fromkeys(IDENTITIES, "ok"),
    "any": {"none": 401, "bad": 401, "other": "ok", "own": "ok", "admin": "ok"},
    # a tenant key naming another tenant: 401 tenant_mismatch (mail-proxy surface)
    "tenant": {"none": 401, "bad": 401, "other": 401, "own": "ok", "admin": "ok"},
    "admin": {"none": 401, "bad": 401, "other": 403, "own": 403, "admin": "ok"},
    # tenant SMTP API seed: another tenant's token is 403 INSUFFICIENT_PERMISSIONS
    "smtp": {"none": 401, "bad": 401, "other": 403, "own": "ok", "admin": "ok"},
    # outbound domains: another tenant's domain is answered as if it did not exist
    "domain": {"none": 401, "bad": 401, "other": 404, "own": "ok", "admin": "ok"},
    # provider API (docs/provider.md): only a provider token (POST /api/smtp-token-generate) opens it;
    # tenant keys and the admin token are not provider tokens
    "provider": dict.fromkeys(IDENTITIES, 401),
}
FAR_FUTURE = 4102444800


@dataclass(frozen=True)
class Route:
    level: str
    query: dict[str, str] = field(default_factory=dict)  # "{tenant}" is replaced by the target tenant
    body: Any = None
    ok: int = 200
    victim: bool = False  # the admin call destroys the target: use a throwaway tenant
    overrides: dict[str, int] = field(default_factory=dict)
    setup_account: bool = False  # (re)create account "authz-del" of the target before each call
    before: tuple[str, str] | None = None  # (method, path) called once with the admin token first


T = {"tenant_id": "{tenant}"}
ROUTES: dict[tuple[str, str], Route] = {
    ("GET", "/health"): Route("public"),
    # provider API users: the tenant's key or the admin; the admin's repeat of the same email is 409
    ("POST", "/tenant/{tenant_id}/users"): Route("tenant", body={"email": "authz-{tenant}@users.example.test",
                                                                 "name": "Authz", "password": "authz-password"},
                                                 overrides={"admin": 409}),
    ("GET", "/tenant/{tenant_id}/users"): Route("tenant"),
    ("DELETE", "/tenant/{tenant_id}/users/{user_id}"): Route("tenant", ok=404),  # a literal "{user_id}"
    # the token route is public: an unknown email is 401 for everyone (seed shape {status, message})
    ("POST", "/api/smtp-token-generate"): Route("public", ok=401,
                                                body={"email": "nobody-authz@users.example.test", "password": "x"}),
    ("GET", "/api/v1/smtp-sender-confirm"): Route("public", query={"token": "forged.link"}, ok=404),
    **{(m, f"/api/v1/{p}"): Route("provider") for m, p in (
        ("POST", "smtp-domain-add"), ("GET", "smtp-domain-list"), ("GET", "smtp-domain-view"),
        ("GET", "smtp-domain-verify"), ("GET", "smtp-sender-list"), ("POST", "smtp-domain-sender-add"),
        ("POST", "smtp-domain-sender-verify"), ("GET", "smtp-template-index"), ("GET", "smtp-template-default"),
        ("GET", "smtp-template-show"), ("POST", "smtp-template-add"), ("POST", "smtp-template-update"),
        ("GET", "smtp-mailing-list"), ("POST", "smtp-mailing-add"), ("POST", "smtp-mailing-members-add"),
        ("GET", "smtp-mailing-members"), ("POST", "smtp-mailing-members-remove"), ("POST", "smtp-welcome-mail"),
        ("GET", "smtp-campaign-index"), ("GET", "smtp-campaign-create"), ("POST", "smtp-campaign-store"),
        ("POST", "smtp-campaign-pause"), ("GET", "smtp-campaign-edit"), ("POST", "smtp-campaign-update"))},
    ("GET", "/metrics"): Route("public"),
    # a made-up token: 403 invalid_link for everyone (the signed token is the only credential)
    ("GET", "/files/{token}"): Route("public", ok=403),
    ("GET", "/status"): Route("any"),
    # run-now names no tenant: another tenant's key simply acts on its own tenant
    ("POST", "/commands/run-now"): Route("tenant", overrides={"other": 200}),
    ("POST", "/commands/add-messages"): Route("tenant", body={"messages": [{
        "id": "authz-1", "tenant_id": "{tenant}", "account_id": "main", "from": "app@authz.test",
        "to": ["bob@example.test"], "subject": "authz", "body": "b", "deferred_ts": FAR_FUTURE}]}),
    ("POST", "/commands/suspend"): Route("tenant", query={**T, "batch_code": "authz-batch"}),
    ("POST", "/commands/activate"): Route("tenant", query={**T, "batch_code": "authz-batch"}),
    ("POST", "/commands/delete-messages"): Route("tenant", query=T, body={"ids": ["authz-none"]}),
    ("POST", "/commands/cleanup-messages"): Route("tenant", query=T, body={}),
    ("GET", "/messages"): Route("tenant", query=T),
    ("POST", "/account"): Route("tenant", body={"id": "authz", "tenant_id": "{tenant}", "host": "smtp.example.test"}),
    ("GET", "/accounts"): Route("tenant", query=T),
    ("DELETE", "/account/{account_id}"): Route("tenant", query=T, setup_account=True),
    ("POST", "/tenant"): Route("admin", body={"id": "authz-" + uuid.uuid4().hex[:8]}),
    ("GET", "/tenants"): Route("admin"),
    ("GET", "/tenants/sync-status"): Route("admin"),
    ("GET", "/tenant/{tenant_id}"): Route("tenant"),
    ("PUT", "/tenant/{tenant_id}"): Route("tenant", body={"name": "authz"}),
    ("DELETE", "/tenant/{tenant_id}"): Route("admin", victim=True),
    ("POST", "/tenant/{tenant_id}/api-key"): Route("admin", victim=True),
    ("DELETE", "/tenant/{tenant_id}/api-key"): Route("admin", victim=True),
    ("GET", "/instance"): Route("admin"),
    ("PUT", "/instance"): Route("admin", body={}),
    ("POST", "/instance/reload-bounce"): Route("admin"),
    ("GET", "/command-log"): Route("admin", query={"limit": "1"}),
    ("GET", "/command-log/export"): Route("admin", query=T),
    # without {"confirm": true} the admin gets 400 confirmation_required (no replay of the shared
    # system here; test_durability.py replays through this route and checks the rebuild)
    ("POST", "/admin/replay/metrics"): Route("admin", body={}, overrides={"admin": 400}),
    ("GET", "/admin/replay/metrics"): Route("admin"),
    ("GET", "/admin/views/digest"): Route("admin", query={"salt": "00" * 16}),
    ("GET", "/api/v1/tenants/{tenant_id}/smtp/metrics"): Route("smtp"),
    ("GET", "/api/v1/tenants/{tenant_id}/smtp/status"): Route("smtp"),
    ("GET", "/api/v1/tenants/{tenant_id}/smtp/config"): Route("smtp"),
    # BI aggregates (docs/bi.md): a tenant key for its own tenant; another tenant's is 403
    ("GET", "/api/v1/bi/metrics"): Route("smtp", query=T),
    ("GET", "/domains/{name}/outbound"): Route("domain"),
    # registering another tenant's unverified (live) claim: 409 domain_claim_pending; proving DNS
    # control instead: its own challenge token (ses-verify) and the DNS check of it (ses-status)
    ("PUT", "/domains/{name}/outbound"): Route("domain", body={}, overrides={"other": 409}),
    ("POST", "/domains/{name}/outbound/increment"): Route("domain"),
    ("POST", "/domains/{name}/ses-verify"): Route("domain", overrides={"other": 200}),
    ("GET", "/domains/{name}/ses-status"): Route("domain", overrides={"other": 200}),
    ("GET", "/domains/{name}/dkim"): Route("domain"),
    ("POST", "/domains/{name}/dkim/rotate"): Route("domain", before=("POST", "/domains/{name}/ses-verify")),
    ("POST", "/outbound/reset-daily"): Route("admin"),
    ("POST", "/outbound/reset-monthly"): Route("admin"),
    # tracking and complaints: links carry a signed token (a literal "{token}" is forged: 404 for all);
    # the SNS webhook takes no token (an empty body is not an SNS message: 400)
    ("GET", "/suppressions"): Route("tenant", query=T),
    ("POST", "/suppressions"): Route("tenant", body={"tenant_id": "{tenant}", "addresses": ["authz@example.test"]}),
    ("DELETE", "/suppressions/{address}"): Route("tenant", query=T, overrides={"own": 404, "admin": 404}),
    ("GET", "/t/o/{token}"): Route("public", ok=404),
    ("GET", "/t/c/{token}"): Route("public", ok=404),
    ("GET", "/u/{token}"): Route("public", ok=404),
    ("POST", "/u/{token}"): Route("public", ok=404),
    ("POST", "/webhooks/ses"): Route("public", ok=400),
}


@dataclass
class Principal:
    id: str
    key: str
    domain: str = ""  # an outbound domain registered by this tenant


@pytest.fixture(scope="module")
def principals(system, admin: httpx.Client, smtp) -> Iterator[dict[str, Principal]]:
    out = {}
    for name in ("target", "other"):
        tid = "az" + uuid.uuid4().hex[:10]
        r = admin.post("/tenant", json={"id": tid, "name": tid})
        assert r.status_code == 200, r.text
        key = r.json()["api_key"]
        r = admin.post("/account", json={"id": "main", "tenant_id": tid, "host": smtp.host, "port": smtp.port,
                                         "use_tls": False})
        assert r.status_code == 200, r.text
        domain = f"{tid}.authz.example"
        r = httpx.put(f"{system.url('api')}/domains/{domain}/outbound", json={}, headers={"X-API-Token": key},
                      timeout=30)
        assert r.status_code == 200, r.text
        out[name] = Principal(tid, key, domain)
    yield out


def _fill(value: Any, tenant: str) -> Any:
    if isinstance(value, str):
        return value.replace("{tenant}", tenant)
    if isinstance(value, dict):
        return {k: _fill(v, tenant) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, tenant) for v in value]
    return value


def test_every_route_is_in_the_table(admin: httpx.Client) -> None:
    spec = admin.get("/openapi.json").json()
    served = {(m.upper(), p) for p, ops in spec["paths"].items() for m in ops
              if m in ("get", "post", "put", "delete", "patch")}
    missing = served - set(ROUTES)
    stale = set(ROUTES) - served
    assert not missing, f"routes without an authorization row: {sorted(missing)}"
    assert not stale, f"rows for routes the API does not serve: {sorted(stale)}"


@pytest.mark.parametrize(("method", "path"), sorted(ROUTES), ids=[f"{m} {p}" for m, p in sorted(ROUTES)])
def test_authorization(method: str, path: str, system, admin: httpx.Client,
                       principals: dict[str, Principal]) -> None:
    route = ROUTES[(method, path)]
    target = principals["target"]
    if route.victim:
        r = admin.post("/tenant", json={"id": "azv" + uuid.uuid4().hex[:10]})
        assert r.status_code == 200, r.text
        target = Principal(r.json()["tenant_id"], r.json()["api_key"])
    tokens = {"none": None, "bad": "pbk_0123456789abcdef_not-a-real-secret", "other": principals["other"].key,
              "own": target.key, "admin": ADMIN_TOKEN}
    url = (path.replace("{tenant_id}", target.id).replace("{account_id}", "authz-del")
           .replace("{name}", principals["target"].domain))
    failures = []
    if route.before:
        r = admin.request(route.before[0], route.before[1].replace("{name}", principals["target"].domain))
        assert r.status_code == 200, r.text
    with httpx.Client(base_url=system.url("api"), timeout=30) as http:
        for who in IDENTITIES:
            if route.setup_account:
                r = admin.post("/account", json={"id": "authz-del", "tenant_id": target.id,
                                                 "host": "smtp.example.test"})
                assert r.status_code == 200, r.text
            expected = route.overrides.get(who, LEVELS[route.level][who])
            expected = route.ok if expected == "ok" else expected
            headers = {"X-API-Token": tokens[who]} if tokens[who] else {}
            kwargs: dict[str, Any] = {"params": _fill(route.query, target.id), "headers": headers}
            if route.body is not None:
                kwargs["json"] = _fill(route.body, target.id)
            r = http.request(method, url, **kwargs)
            if r.status_code != expected:
                failures.append(f"{who}: expected {expected}, got {r.status_code} {r.text[:200]}")
            elif r.status_code in (401, 403) and not path.startswith(("/api/v1/", "/api/smtp-")):
                err = r.json()["error"]
                assert r.json()["ok"] is False and err["code"] and err["message"]
    assert not failures, f"{method} {path}:\n" + "\n".join(failures)
