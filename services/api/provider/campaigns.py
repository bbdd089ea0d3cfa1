"""Provider campaigns: ``smtp-campaign-index``, ``-create``, ``-store``, ``-edit``, ``-update``,
``-pause`` (seed smtp-provider-api-reference, PRODUCT.md section 6; docs/campaigns.md).

The API only appends commands: ``store`` / ``update`` write the ``ProviderCampaign`` record on
``postbus.config.provider-campaigns`` (key ``<tenant>/<campaign_id>``) with its command;
``pause`` toggles the record's ``paused`` AND suspends (or activates) the campaign's batch code
``campaign-<id>`` in the same transaction (the command is the ordinary ``messages.suspend`` /
``messages.activate``, so the sender holds the campaign's queued mail exactly as for any
suspended batch). The expansion of the list into messages is the sender's
(services/sender/campaigns.py); its cursor (``postbus.state.campaign-cursors``) gives the status
and the ``queued``/skipped counts, the metrics service (ClickHouse) the delivery counts.

Status: ``paused`` (the record), else ``finished`` (the cursor reached the end of the list), else
``sending`` (begins_at passed or expansion started), else ``scheduled``."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from fastapi import Depends, Query, Request
from pydantic import BaseModel, Field

from services.api.commands import ConfigRecord, ConfigWrite
from services.api.deps import state_of
from services.api.provider.auth import ProviderUser, checked_user
from services.api.provider.common import iso, now_ms, valid_email, write, write_fenced
from services.api.provider.envelope import ProviderError, errors, ok, provider_router
from services.api.provider.ids import next_id
from services.api.provider.owned import CAMPAIGNS, LISTS, SENDERS, TEMPLATES
from services.api.provider.views import register_view
from services.api.state import ApiState
from services.common import suspension
from services.common.templating import MAX_SOURCE_CHARS, TemplateError, compile_template
from services.common.topics import CONFIG_PROVIDER_CAMPAIGNS, CONFIG_SUSPENSIONS, STATE_CAMPAIGN_CURSORS

log = logging.getLogger("postbus.api.provider.campaigns")

router = provider_router(prefix="/api/v1", tags=["provider campaigns"])

register_view("campaigns", CONFIG_PROVIDER_CAMPAIGNS, "ProviderCampaign")
register_view("campaign_cursors", STATE_CAMPAIGN_CURSORS, "CampaignCursor")

# the sender's bounds (services/sender/campaigns.py; the API does not import the sender)
DEFAULT_SPEED = 10_000
MAX_SPEED = 3_600_000
NOT_FOUND = "The campaign was not found."
UPDATED = "update sucessfully"  # sic: the seed's wording


class AllRequest(BaseModel):
    subject: str | None = Field(None, max_length=998)
    html_body: str | None = Field(None, max_length=MAX_SOURCE_CHARS)
    text_body: str | None = Field(None, max_length=MAX_SOURCE_CHARS)
    from_email: str = Field(..., max_length=254)
    from_name: str | None = Field(None, max_length=200)
    reply_email: str | None = Field(None, max_length=254)
    sender_email: str | None = Field(None, max_length=254)
    speed: int | None = Field(None, description=f"messages per hour, 1..{MAX_SPEED} (default {DEFAULT_SPEED})")
    vmta_id: int | str | None = Field(None, description="one of the tenant's SMTP account ids (vmtas)")
    bounce_email_id: int | None = Field(None, description="a verified sender id whose address is the return path "
                                                          "(0 or absent: the default)")
    url_domain_id: int | None = Field(None, description="0: the default tracking base, 1: the tenant's tracking "
                                                        "domain (url_domains)")


class CampaignStoreIn(BaseModel):
    user_id: int | None = Field(None, description="required: the token's user")
    template_id: int
    mailing_list_id: int
    campaign_name: str = Field(..., min_length=1, max_length=200)
    begins_at: str = Field(..., max_length=40, description="UTC, 'YYYY-MM-DD HH:MM:SS' (or ISO 8601)")
    segment: str | None = Field("all", max_length=50)
    all_request: AllRequest


class CampaignUpdateIn(BaseModel):
    user_id: int | None = Field(None, description="required: the token's user")
    campaign_id: int
    template_id: int | None = None
    mailing_list_id: int | None = None
    campaign_name: str | None = Field(None, min_length=1, max_length=200)
    begins_at: str | None = Field(None, max_length=40)
    segment: str | None = Field(None, max_length=50)
    all_request: AllRequest


class CampaignPauseIn(BaseModel):
    user_id: int | None = Field(None, description="required: the token's user")
    campaign_id: int


# --- helpers --------------------------------------------------------------------------------------------

def _key(tenant_id: str, campaign_id: int) -> str:
    return f"{tenant_id}/{campaign_id}"


def batch_code(campaign_id: int) -> str:
    return f"campaign-{campaign_id}"


def parse_begins_at(value: str) -> int:
    text = value.strip()
    for fmt in ("%Y-%m-%d %H:%M:%S", "%Y-%m-%d %H:%M"):
        try:
            return int(datetime.strptime(text, fmt).replace(tzinfo=UTC).timestamp() * 1000)
        except ValueError:
            pass
    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ProviderError(422, "The begins at does not match the format Y-m-d H:i:s.") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return int(dt.timestamp() * 1000)


def _views(st: ApiState) -> tuple[Any, Any]:
    return st.provider.view("campaigns"), st.provider.view("campaign_cursors")


def status_of(rec: dict[str, Any], cursor: dict[str, Any] | None, now: int | None = None) -> str:
    if rec.get("paused"):
        return "paused"
    if cursor and cursor.get("finished"):
        return "finished"
    if cursor or rec["begins_ts"] <= (now if now is not None else now_ms()):
        return "sending"
    return "scheduled"


def _vmtas(st: ApiState, tenant_id: str) -> list[dict[str, Any]]:
    out = []
    for key, acc in sorted(list(st.accounts.items.items())):
        tid, _, account_id = key.partition("/")
        if tid == tenant_id:
            out.append({"id": account_id, "name": account_id, "host": acc.get("host"), "port": acc.get("port")})
    return out


def _url_domains(st: ApiState, tenant_id: str) -> list[dict[str, Any]]:
    base = (st.settings.tracking_base_url or f"http://{st.settings.api_host}:{st.settings.api_port}").rstrip("/")
    out = [{"id": 0, "domain": base.split("://", 1)[-1], "default": True}]
    tracking = (st.tenants.get(tenant_id) or {}).get("tracking_domain")
    if tracking:
        out.append({"id": 1, "domain": tracking, "default": False})
    return out


def _user_senders(st: ApiState, user: ProviderUser) -> list[dict[str, Any]]:
    return SENDERS.of_user(st, user)


def _domain_verified(request: Request, name: str) -> bool:
    runtime = getattr(request.app.state, "postbus_domains", None)
    rec = runtime.domains.get(name) if runtime is not None else None
    return bool(rec and rec.get("verified"))


def _sender_details(request: Request, st: ApiState, user: ProviderUser) -> list[dict[str, Any]]:
    return [{"id": int(r["sender_id"]), "from_email": r["from_email"], "sender_name": r.get("sender_name"),
             "domain_name": r["domain_name"], "verified": bool(r["verified"]),
             "domain_verified": _domain_verified(request, r["domain_name"]),
             "usable": bool(r["verified"]) and _domain_verified(request, r["domain_name"])}
            for r in _user_senders(st, user)]


def _bounce_emails(request: Request, st: ApiState, user: ProviderUser) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [{"id": 0, "email": None, "default": True}]
    out += [{"id": s["id"], "email": s["from_email"], "default": False}
            for s in _sender_details(request, st, user) if s["usable"]]
    return out


def _templates(st: ApiState, user: ProviderUser) -> list[dict[str, Any]]:
    recs = TEMPLATES.of_user(st, user)
    return [{"id": int(r["template_id"]), "name": r["name"], "subject": r.get("subject"), "active": bool(r["active"])}
            for r in recs]


async def _counts(st: ApiState, tenant_id: str, ids: list[int]) -> dict[int, dict[str, int]] | None:
    """ClickHouse counts per campaign through the metrics service; None when it is unavailable."""
    if not ids:
        return {}
    try:
        r = await st.metrics.get(f"/internal/tenants/{tenant_id}/campaigns",
                                 params={"ids": ",".join(str(i) for i in ids)})
        if r.status_code != 200:
            return None
        return {int(k): v for k, v in r.json()["campaigns"].items()}
    except Exception as exc:
        log.warning("campaign counts unavailable", extra={"error": repr(exc)})
        return None


COUNT_FIELDS = ("sent", "delivered", "bounced", "complained", "opened", "clicked", "unsubscribed", "failed")


def campaign_out(rec: dict[str, Any], cursor: dict[str, Any] | None,
                 counts: dict[int, dict[str, int]] | None) -> dict[str, Any]:
    cid = int(rec["campaign_id"])
    ch = (counts or {}).get(cid, {})
    stats: dict[str, Any] = {"queued": int((cursor or {}).get("queued", 0))}
    stats.update({f: int(ch.get(f, 0)) for f in COUNT_FIELDS})
    stats["skipped_unsubscribed"] = int((cursor or {}).get("skipped_unsubscribed", 0))
    stats["skipped_suppressed"] = int((cursor or {}).get("skipped_suppressed", 0))
    stats["skipped_invalid"] = int((cursor or {}).get("skipped_invalid", 0))
    return {
        "id": cid, "user_id": int(rec["user_id"]), "campaign_name": rec["name"], "template_id": int(rec["template_id"]),
        "mailing_list_id": int(rec["mailing_list_id"]), "segment": rec.get("segment") or "all",
        "begins_at": iso(rec["begins_ts"]), "status": status_of(rec, cursor), "batch_code": batch_code(cid),
        "subject": rec["subject"], "html_body": rec["html_body"], "text_body": rec.get("text_body"),
        "from_email": rec["from_email"], "from_name": rec.get("from_name"), "reply_email": rec.get("reply_email"),
        "sender_email": rec.get("sender_email"), "speed": int(rec["speed"]), "vmta_id": rec["vmta_id"],
        "bounce_email": rec.get("bounce_email"), "url_domain": rec.get("url_domain"),
        "created_at": iso(rec["created_ts"]), "updated_at": iso(rec["updated_ts"]),
        "started_at": iso((cursor or {}).get("started_ts")), "finished_at": iso((cursor or {}).get("finished_ts")),
        "stats": stats, "stats_available": counts is not None,
    }


class _Change:
    """What a fenced change of one of the user's campaigns (update, pause) starts from: the views, the
    campaign as this replica reads it now, and its key."""

    def __init__(self, request: Request, user: ProviderUser, campaign_id: int) -> None:
        self.st = state_of(request)
        self.user = user
        self.campaigns, self.cursors = _views(self.st)
        rec = CAMPAIGNS.owned(self.st, user, campaign_id)
        self.campaign_id = int(rec["campaign_id"])
        self.rec = rec
        self.key = _key(user.tenant_id, self.campaign_id)

    def current(self) -> dict[str, Any]:
        """The campaign on the caught-up view, inside ``build`` (another replica may have changed it)."""
        current = self.campaigns.get(self.key)
        if current is None or int(current["user_id"]) != self.user.user_id:
            raise ProviderError(404, NOT_FOUND)
        return current  # type: ignore[no-any-return]

    def catch_up(self, *views: Any) -> Any:
        async def run() -> None:
            for view in (self.campaigns, *views):
                await view.catch_up()
        return run


def _resolve(request: Request, st: ApiState, user: ProviderUser, a: AllRequest, template_id: int,
             list_id: int, name: str, segment: str | None) -> dict[str, Any]:
    """The campaign fields an all_request (+ its template, list) decides, validated; 422/404 otherwise."""
    tpl = TEMPLATES.owned(st, user, template_id)
    LISTS.owned(st, user, list_id)
    if (segment or "all") != "all":
        raise ProviderError(422, "The selected segment is invalid.")
    msgs: list[str] = []
    html_body = a.html_body if a.html_body and a.html_body.strip() else tpl["html_body"]
    subject = (a.subject if a.subject and a.subject.strip() else tpl.get("subject")) or name
    for field, source in (("subject", subject), ("html body", html_body), ("text body", a.text_body)):
        if source is None:
            continue
        if field == "subject" and ("\r" in source or "\n" in source):
            msgs.append("The subject may not contain line breaks.")
            continue
        try:
            compile_template(source)
        except TemplateError as exc:
            msgs.append(f"The {field} is not a valid template: {exc}.")
    from_email = a.from_email.strip().lower()
    sender = next((s for s in _sender_details(request, st, user) if s["from_email"] == from_email), None)
    if sender is None:
        msgs.append("The from email must be one of your senders.")
    elif not sender["verified"]:
        msgs.append("The from email is not verified.")
    elif not sender["domain_verified"]:
        msgs.append("The domain of the from email is not verified.")
    for field, value in (("reply email", a.reply_email), ("sender email", a.sender_email)):
        if value and not valid_email(value.strip()):
            msgs.append(f"The {field} must be a valid email address.")
    for field, value in (("from name", a.from_name),):
        if value and ("\r" in value or "\n" in value):
            msgs.append(f"The {field} may not contain line breaks.")
    speed = DEFAULT_SPEED if a.speed is None else a.speed
    if not 1 <= speed <= MAX_SPEED:
        msgs.append(f"The speed must be between 1 and {MAX_SPEED}.")
    vmtas = [v["id"] for v in _vmtas(st, user.tenant_id)]
    if a.vmta_id is None or str(a.vmta_id).strip() == "":
        if len(vmtas) != 1:
            msgs.append("The vmta id field is required." if vmtas else "The tenant has no SMTP account (vmta).")
        vmta = vmtas[0] if len(vmtas) == 1 else ""
    else:
        vmta = str(a.vmta_id).strip()
        if vmta not in vmtas:
            msgs.append("The selected vmta id is invalid.")
    bounce = None
    if a.bounce_email_id:
        match = next((b for b in _bounce_emails(request, st, user) if b["id"] == a.bounce_email_id), None)
        if match is None:
            msgs.append("The selected bounce email id is invalid.")
        else:
            bounce = match["email"]
    url_domain = None
    if a.url_domain_id is not None:
        match = next((u for u in _url_domains(st, user.tenant_id) if u["id"] == a.url_domain_id), None)
        if match is None:
            msgs.append("The selected url domain id is invalid.")
        else:
            url_domain = match["domain"]
    if msgs:
        raise ProviderError(422, *msgs)
    return {"template_id": template_id, "mailing_list_id": list_id, "name": name.strip(), "segment": "all",
            "subject": subject, "html_body": html_body, "text_body": a.text_body or None, "from_email": from_email,
            "from_name": a.from_name.strip() if a.from_name and a.from_name.strip() else None,
            "reply_email": a.reply_email.strip() if a.reply_email and a.reply_email.strip() else None,
            "sender_email": a.sender_email.strip() if a.sender_email and a.sender_email.strip() else None,
            "speed": speed, "vmta_id": vmta, "bounce_email": bounce, "url_domain": url_domain}


# --- routes ---------------------------------------------------------------------------------------------

@router.get("/smtp-campaign-index", summary="List the user's campaigns with status and counts",
            responses=errors(401, 403, 422))
async def campaign_index(request: Request, user_id: int | None = Query(None),
                         user: ProviderUser = Depends(checked_user)) -> Any:
    st = state_of(request)
    campaigns, cursors = _views(st)
    recs = sorted(st.provider.of_user(campaigns, user.tenant_id, user.user_id), key=lambda r: int(r["campaign_id"]))
    counts = await _counts(st, user.tenant_id, [int(r["campaign_id"]) for r in recs])
    return ok({"campaigns": [campaign_out(r, cursors.get(_key(user.tenant_id, int(r["campaign_id"]))), counts)
                             for r in recs]})


@router.get("/smtp-campaign-create", summary="The choices a new campaign needs", responses=errors(401, 403, 422))
async def campaign_create(request: Request, user_id: int | None = Query(None),
                          user: ProviderUser = Depends(checked_user)) -> Any:
    st = state_of(request)
    lists = LISTS.of_user(st, user)
    return ok({"senderDetails": _sender_details(request, st, user), "templates": _templates(st, user),
               "mailing_lists": [{"id": int(r["list_id"]), "name": r["name"]} for r in lists],
               "url_domains": _url_domains(st, user.tenant_id), "vmtas": _vmtas(st, user.tenant_id),
               "bounce_email_id": _bounce_emails(request, st, user), "speed": DEFAULT_SPEED,
               "speed_max": MAX_SPEED})


@router.post("/smtp-campaign-store", summary="Create a campaign, expanded at begins_at (UTC)",
             responses=errors(401, 403, 404, 422, 503))
async def campaign_store(body: CampaignStoreIn, request: Request, user: ProviderUser = Depends(checked_user)) -> Any:
    st = state_of(request)
    begins = parse_begins_at(body.begins_at)
    fields = _resolve(request, st, user, body.all_request, body.template_id, body.mailing_list_id,
                      body.campaign_name, body.segment)
    campaign_id = await next_id(st, "campaign", user.tenant_id, user.actor)
    now = now_ms()
    rec = {"campaign_id": campaign_id, "tenant_id": user.tenant_id, "user_id": user.user_id, **fields,
           "begins_ts": begins, "paused": False, "created_ts": now, "updated_ts": now}
    await write(st, user, "provider.campaign.store", "POST /api/v1/smtp-campaign-store", "ProviderCampaign", rec,
                [ConfigRecord(CONFIG_PROVIDER_CAMPAIGNS, _key(user.tenant_id, campaign_id), "ProviderCampaign", rec)])
    return ok({"campaign": campaign_out(rec, None, {})})


@router.get("/smtp-campaign-edit", summary="A campaign with the choices to edit it",
            responses=errors(401, 403, 404, 422))
async def campaign_edit(request: Request, user_id: int | None = Query(None), campaign_id: int | None = Query(None),
                        user: ProviderUser = Depends(checked_user)) -> Any:
    st = state_of(request)
    rec = CAMPAIGNS.owned(st, user, campaign_id)
    cursor = _views(st)[1].get(_key(user.tenant_id, int(rec["campaign_id"])))
    counts = await _counts(st, user.tenant_id, [int(rec["campaign_id"])])
    return ok({"campaign": campaign_out(rec, cursor, counts), "senderDetails": _sender_details(request, st, user),
               "templates": _templates(st, user), "url_domains": _url_domains(st, user.tenant_id),
               "vmtas": _vmtas(st, user.tenant_id), "bounce_email_id": _bounce_emails(request, st, user),
               "speed": int(rec["speed"])})


@router.post("/smtp-campaign-update", summary="Change a campaign that has not finished",
             responses=errors(401, 403, 404, 422, 503))
async def campaign_update(body: CampaignUpdateIn, request: Request, user: ProviderUser = Depends(checked_user)) -> Any:
    ch = _Change(request, user, body.campaign_id)
    st, cursors, key = ch.st, ch.cursors, ch.key
    begins = parse_begins_at(body.begins_at) if body.begins_at else None

    def check(current: dict[str, Any], cursor: dict[str, Any] | None) -> dict[str, Any]:
        if cursor and cursor.get("finished"):
            raise ProviderError(422, "The campaign has finished and can no longer be changed.")
        started = cursor is not None
        list_id = body.mailing_list_id if body.mailing_list_id is not None else int(current["mailing_list_id"])
        if started and list_id != int(current["mailing_list_id"]):
            raise ProviderError(422, "The mailing list of a campaign that has started cannot be changed.")
        if started and begins is not None and begins != current["begins_ts"]:
            raise ProviderError(422, "The begins at of a campaign that has started cannot be changed.")
        return _resolve(request, st, user, body.all_request,
                        body.template_id if body.template_id is not None else int(current["template_id"]), list_id,
                        body.campaign_name or current["name"], body.segment or current.get("segment"))

    check(ch.rec, cursors.get(key))  # validation errors before any write

    def build() -> ConfigWrite:  # on the caught-up views
        current = ch.current()
        fields = check(current, cursors.get(key))
        new = {**current, **fields, "begins_ts": begins if begins is not None else current["begins_ts"],
               "updated_ts": now_ms()}
        return ConfigWrite("provider.campaign.update", user.tenant_id, user.actor, "POST /api/v1/smtp-campaign-update",
                           "ProviderCampaign", new, [ConfigRecord(CONFIG_PROVIDER_CAMPAIGNS, key, "ProviderCampaign",
                                                                  new)])

    await write_fenced(st, await st.writer.shard_of(user.tenant_id), ch.catch_up(cursors), build)
    return ok({"campaigns": UPDATED})


@router.post("/smtp-campaign-pause", summary="Pause or resume a campaign (its expansion and its queued mail)",
             responses=errors(401, 403, 404, 422, 503))
async def campaign_pause(body: CampaignPauseIn, request: Request, user: ProviderUser = Depends(checked_user)) -> Any:
    ch = _Change(request, user, body.campaign_id)
    st, cursors, key = ch.st, ch.cursors, ch.key
    tid, code = user.tenant_id, batch_code(ch.campaign_id)
    assert st.suspensions is not None
    susp_view = st.suspensions
    out: dict[str, Any] = {}

    def build() -> ConfigWrite:  # on the caught-up views
        current = ch.current()
        pause = not current.get("paused")
        now = now_ms()
        new = {**current, "paused": pause, "updated_ts": now}
        out["rec"] = new
        route = "POST /api/v1/smtp-campaign-pause"
        records = [ConfigRecord(CONFIG_PROVIDER_CAMPAIGNS, key, "ProviderCampaign", new)]
        try:
            record = (suspension.suspend if pause else suspension.activate)(susp_view.get(tid), tid, code, now)
        except suspension.AllBatchesSuspended:  # the tenant's whole mail is suspended: that stays as it is
            return ConfigWrite("provider.campaign.resume", tid, user.actor, route, "ProviderCampaign", new, records)
        # the ordinary suspension command: the sender holds / releases the batch's queued messages
        return ConfigWrite(f"messages.{'suspend' if pause else 'activate'}", tid, user.actor, route, "Suspension",
                           record, [ConfigRecord(CONFIG_SUSPENSIONS, tid, "Suspension", record), *records])

    offsets = await st.writer.update_config(await st.writer.shard_of(tid), ch.catch_up(susp_view), build)
    await st.provider.wait_visible(offsets, st.settings.write_timeout_s)
    if CONFIG_SUSPENSIONS in offsets:
        await susp_view.wait_for(offsets[CONFIG_SUSPENSIONS], st.settings.write_timeout_s)
    new = out["rec"]
    return ok({"campaign": campaign_out(new, cursors.get(key), None) | {"stats_available": False},
               "paused": bool(new["paused"]), "message": "Campaign paused" if new["paused"] else "Campaign resumed"})
