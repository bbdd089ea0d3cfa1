"""Provider templates: ``smtp-template-index``, ``-default``, ``-show``, ``-add``, ``-update``.

A template belongs to the user that added it (another user's or an unknown id: 404). Its
``html_body`` (and ``subject``) must compile in the Jinja2 sandbox when saved, else 422 with the
compiler's message; rendering autoescapes HTML (common/templating.py)."""

from __future__ import annotations

from typing import Any

from fastapi import Depends, Query, Request
from pydantic import BaseModel, Field

from services.api.commands import ConfigRecord
from services.api.deps import state_of
from services.api.provider.auth import ProviderUser, checked_user
from services.api.provider.common import iso, now_ms, write
from services.api.provider.default_templates import DEFAULT_TEMPLATES
from services.api.provider.envelope import ProviderError, errors, ok, provider_router
from services.api.provider.ids import next_id
from services.api.provider.owned import TEMPLATES
from services.common.templating import MAX_SOURCE_CHARS, TemplateError, compile_template
from services.common.topics import CONFIG_PROVIDER_TEMPLATES

router = provider_router(prefix="/api/v1", tags=["provider"])


class TemplateAddIn(BaseModel):
    user_id: int | None = Field(None, description="required: the token's user")
    name: str = Field(..., min_length=1, max_length=200)
    html_body: str = Field(..., min_length=1, max_length=MAX_SOURCE_CHARS)
    subject: str | None = Field(None, max_length=998)
    active: bool = True


class TemplateUpdateIn(BaseModel):
    user_id: int | None = Field(None, description="required: the token's user")
    template_id: int
    name: str | None = Field(None, min_length=1, max_length=200)
    html_body: str | None = Field(None, min_length=1, max_length=MAX_SOURCE_CHARS)
    subject: str | None = Field(None, max_length=998)
    active: bool | None = None


def template_out(rec: dict[str, Any]) -> dict[str, Any]:
    return {"id": int(rec["template_id"]), "user_id": int(rec["user_id"]), "name": rec["name"],
            "html_body": rec["html_body"], "subject": rec.get("subject"), "active": bool(rec["active"]),
            "created_at": iso(rec["created_ts"]), "updated_at": iso(rec["updated_ts"])}


MAX_BODY_BYTES = 256 * 1024  # a template travels in its command and its record (broker limit 1 MiB each)


def check_compiles(html_body: str | None, subject: str | None) -> None:
    for field, source in (("html body", html_body), ("subject", subject)):
        if source is None:
            continue
        if len(source.encode()) > MAX_BODY_BYTES:
            raise ProviderError(422, f"The {field} may not be greater than {MAX_BODY_BYTES // 1024} kilobytes.")
        if field == "subject" and ("\r" in source or "\n" in source):
            raise ProviderError(422, "The subject may not contain line breaks.")
        try:
            compile_template(source)
        except TemplateError as exc:
            raise ProviderError(422, f"The {field} is not a valid template: {exc}.") from None


@router.get("/smtp-template-index", summary="List the user's templates", responses=errors(401, 403, 422))
async def template_index(request: Request, user_id: int | None = Query(None),
                         user: ProviderUser = Depends(checked_user)) -> Any:
    return ok({"templates": [template_out(r) for r in TEMPLATES.of_user(state_of(request), user)]})


@router.get("/smtp-template-default", summary="List the built-in templates", responses=errors(401, 403, 422))
async def template_default(request: Request, user_id: int | None = Query(None),
                           user: ProviderUser = Depends(checked_user)) -> Any:
    return ok({"default_templates": [{k: v for k, v in t.items() if k != "key"} for t in DEFAULT_TEMPLATES]})


@router.get("/smtp-template-show", summary="Show one of the user's templates", responses=errors(401, 403, 404, 422))
async def template_show(request: Request, user_id: int | None = Query(None), template_id: str | None = Query(None),
                        user: ProviderUser = Depends(checked_user)) -> Any:
    return ok({"templates": template_out(TEMPLATES.owned(state_of(request), user, template_id))})


@router.post("/smtp-template-add", summary="Add a template (refused with 422 if it does not compile)",
             responses=errors(401, 403, 422, 503))
async def template_add(body: TemplateAddIn, request: Request, user: ProviderUser = Depends(checked_user)) -> Any:
    st = state_of(request)
    check_compiles(body.html_body, body.subject)
    template_id = await next_id(st, "template", user.tenant_id, user.actor)
    now = now_ms()
    rec = {"template_id": template_id, "tenant_id": user.tenant_id, "user_id": user.user_id, "name": body.name.strip(),
           "html_body": body.html_body, "subject": body.subject, "active": body.active, "created_ts": now,
           "updated_ts": now}
    await write(st, user, "provider.template.add", "POST /api/v1/smtp-template-add", "ProviderTemplate", rec,
                [ConfigRecord(CONFIG_PROVIDER_TEMPLATES, f"{user.tenant_id}/{template_id}", "ProviderTemplate", rec)])
    return ok({"template": template_out(rec)})


@router.post("/smtp-template-update", summary="Update a template (fields omitted keep their value)",
             responses=errors(401, 403, 404, 422, 503))
async def template_update(body: TemplateUpdateIn, request: Request,
                          user: ProviderUser = Depends(checked_user)) -> Any:
    st = state_of(request)
    rec = dict(TEMPLATES.owned(st, user, body.template_id))
    check_compiles(body.html_body, body.subject)
    given = body.model_fields_set
    for field in ("name", "html_body", "subject", "active"):
        if field in given and (getattr(body, field) is not None or field == "subject"):
            rec[field] = getattr(body, field)
    rec["updated_ts"] = now_ms()
    await write(st, user, "provider.template.update", "POST /api/v1/smtp-template-update", "ProviderTemplate", rec,
                [ConfigRecord(CONFIG_PROVIDER_TEMPLATES, f"{user.tenant_id}/{rec['template_id']}",
                              "ProviderTemplate", rec)])
    return ok({"template": template_out(rec)})
