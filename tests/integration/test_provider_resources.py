"""Provider API resources against the running system, as a client of the seed document would use
them: domains (added, listed, viewed, verified against a loopback DNS server; the same record as
the outbound domain API), senders (verification mail received by an aiosmtpd server, link
followed), templates (compile errors refused, autoescaping), mailing lists and members (per-member
reasons, suppressed addresses, paging, removal) and welcome mail. Every write is read back at once."""

from __future__ import annotations

import base64
import re
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import load_der_public_key

from infra.supervisor import LocalSystem
from tests.conftest import Tenant, wait_until
from tests.integration.provider_support import SYSTEM_FROM, ProviderApi, User, domain_name, login, papi, token_for
from tests.support.smtp_server import ReceivedMessage

pytestmark = pytest.mark.integration
__all__ = ["papi"]


def html_of(msg: ReceivedMessage) -> str:
    part = msg.message.get_body(preferencelist=("html",))
    assert part is not None
    return str(part.get_content())


def verified_domain(papi: ProviderApi, user: User) -> str:
    name = domain_name()
    assert user.post("smtp-domain-add", domain_name=name).status_code == 200
    papi.publish(user.get("smtp-domain-view", domain_name=name).json()["data"]["dns_records"])
    r = user.get("smtp-domain-verify", domain_name=name)
    assert r.status_code == 200, r.text
    return name


def test_domain_add_view_verify_is_the_outbound_domain_record(papi: ProviderApi,
                                                              new_tenant: Callable[..., Tenant]) -> None:
    t = new_tenant()
    user = login(papi, t)
    name = domain_name()
    r = user.post("smtp-domain-add", domain_name=name.upper())
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["success"] is True and body["data"]["success"] is True
    dom = body["data"]["domain"]
    assert set(dom) == {"id", "domain_name", "host", "selector", "public_key"}
    assert isinstance(dom["id"], int) and dom["domain_name"] == name
    assert dom["selector"] == "smtp" and dom["host"] == f"smtp._domainkey.{name}"
    assert dom["public_key"].startswith("v=DKIM1; h=sha256; k=rsa; p=")
    key = load_der_public_key(base64.b64decode(dom["public_key"].split("p=", 1)[1]))
    assert isinstance(key, rsa.RSAPublicKey) and key.key_size == 2048
    assert "PRIVATE" not in r.text

    listed = user.get("smtp-domain-list").json()["data"]["domains"]
    assert [(d["id"], d["domain_name"], d["verified"]) for d in listed] == [(dom["id"], name, False)]
    view = user.get("smtp-domain-view", domain_name=name)
    assert view.status_code == 200
    records = {rec["host"]: rec for rec in view.json()["data"]["dns_records"]}
    assert records[f"smtp._domainkey.{name}"]["value"] == dom["public_key"]
    assert set(records) == {f"smtp._domainkey.{name}", f"_amazonses.{name}"}

    # unique across tenants, and for the same tenant too
    again = user.post("smtp-domain-add", domain_name=name)
    assert again.status_code == 422
    assert again.json() == {"success": False, "data": ["The domain name has already been taken."]}
    other = login(papi, new_tenant())
    taken = other.post("smtp-domain-add", domain_name=name)
    assert taken.status_code == 422 and taken.json()["data"] == ["The domain name has already been taken."]
    assert other.get("smtp-domain-list").json()["data"]["domains"] == []

    # verify: nothing published -> which records are missing; a wrong DKIM value -> said so
    r = user.get("smtp-domain-verify", domain_name=name)
    assert r.status_code == 422 and r.json()["success"] is False
    assert f"The verification TXT record _amazonses.{name} is missing." in r.json()["data"]
    assert f"The DKIM record smtp._domainkey.{name} is missing." in r.json()["data"]
    papi.publish([records[f"_amazonses.{name}"],
                  {"host": f"smtp._domainkey.{name}", "value": "v=DKIM1; k=rsa; p=AAAA"}])
    r = user.get("smtp-domain-verify", domain_name=name)
    assert r.status_code == 422 and r.json()["data"] == [f"The DKIM record smtp._domainkey.{name} has a wrong value."]
    assert user.get("smtp-domain-list").json()["data"]["domains"][0]["verified"] is False
    papi.publish([records[f"smtp._domainkey.{name}"]])
    r = user.get("smtp-domain-verify", domain_name=name)
    assert r.status_code == 200, r.text
    assert r.json() == {"success": True, "data": {"success": True, "message": "Verified Successfully"}}
    assert user.get("smtp-domain-list").json()["data"]["domains"][0]["verified"] is True
    # the outbound domain API sees the same record: verified, the tenant's
    tenant_http = papi.tenant_http(t)
    outbound = tenant_http.get(f"/domains/{name}/outbound")
    assert outbound.status_code == 200 and outbound.json()["ses_verified"] is True
    dkim = tenant_http.get(f"/domains/{name}/dkim").json()
    assert dkim["selector"] == "smtp"
    # every user of the tenant sees the tenant's domains
    colleague = login(papi, t, tenant_http)
    assert [d["domain_name"] for d in colleague.get("smtp-domain-list").json()["data"]["domains"]] == [name]


def test_sender_add_and_verification_link(papi: ProviderApi, new_tenant: Callable[..., Tenant]) -> None:
    user = login(papi, new_tenant())
    name = verified_domain(papi, user)
    r = user.post("smtp-domain-sender-add", domain_name=name, sender_name="Demo Team", from_email=f"News@{name}")
    assert r.status_code == 200, r.text
    sender = r.json()["data"]["sender"]
    assert sender["from_email"] == f"news@{name}" and sender["sender_name"] == "Demo Team"
    assert sender["verified"] is False and isinstance(sender["id"], int)
    for bad, message in (({"from_email": "news@elsewhere.example.test"}, "The from email must belong to the domain."),
                         ({"from_email": f"news@{name}"}, "The from email has already been taken."),
                         ({"from_email": "not-an-address"}, "The from email must be a valid email address.")):
        r = user.post("smtp-domain-sender-add", {"domain_name": name, **bad})
        assert r.status_code == 422 and r.json() == {"success": False, "data": [message]}, bad
    r = user.post("smtp-domain-sender-add", domain_name=domain_name(), from_email="a@b.example.test")
    assert r.status_code == 404 and r.json()["data"] == ["The domain was not found."]
    assert [s["id"] for s in user.get("smtp-sender-list").json()["data"]["sender_lists"]] == [sender["id"]]

    r = user.post("smtp-domain-sender-verify", from_email=f"news@{name}")
    assert r.status_code == 200, r.text
    assert r.json()["data"]["message"] == "Verification Email Sent Successfully"
    [mail] = papi.mailbox.wait_for(1, timeout=20, predicate=lambda m: f"news@{name}" in m.rcpt_tos)
    assert mail.mail_from == SYSTEM_FROM and mail.message["Subject"] == "Verify your sender address"
    link = re.search(r'href="([^"]+)"', html_of(mail))
    assert link is not None
    url = link.group(1).replace("&amp;", "&")
    token = parse_qs(urlsplit(url).query)["token"][0]
    # a tampered link is refused and verifies nothing
    forged = token[:-3] + ("aaa" if not token.endswith("aaa") else "bbb")
    r = httpx.get(f"{papi.url}/api/v1/smtp-sender-confirm", params={"token": forged})
    assert r.status_code == 404 and r.json() == {"success": False, "data": ["The verification link is not valid."]}
    assert user.get("smtp-sender-list").json()["data"]["sender_lists"][0]["verified"] is False
    r = httpx.get(url, timeout=30)  # the link as mailed
    assert r.status_code == 200, r.text
    assert r.json()["data"]["message"] == "Sender Verified Successfully"
    listed = user.get("smtp-sender-list").json()["data"]["sender_lists"]
    assert listed[0]["verified"] is True and listed[0]["verified_at"]
    r = user.post("smtp-domain-sender-verify", from_email=f"news@{name}")
    assert r.json()["data"]["message"] == "Sender already verified"
    r = user.post("smtp-domain-sender-verify", from_email=f"nobody@{name}")
    assert r.status_code == 404 and r.json()["data"] == ["The sender was not found."]


def test_templates_compile_check_and_defaults(papi: ProviderApi, new_tenant: Callable[..., Tenant]) -> None:
    user = login(papi, new_tenant())
    r = user.post("smtp-template-add", name="Welcome Template", html_body="<h1>Welcome {{ name }}</h1>", active=True)
    assert r.status_code == 200, r.text
    tpl = r.json()["data"]["template"]
    assert tpl["name"] == "Welcome Template" and tpl["html_body"] == "<h1>Welcome {{ name }}</h1>"
    assert tpl["active"] is True and isinstance(tpl["id"], int)
    shown = user.get("smtp-template-show", template_id=tpl["id"])
    assert shown.status_code == 200 and shown.json()["data"]["templates"] == tpl

    r = user.post("smtp-template-add", name="Broken", html_body="<p>{% if name %}unclosed</p>")
    assert r.status_code == 422, r.text
    [message] = r.json()["data"]
    assert message.startswith("The html body is not a valid template: line 1:") and "endif" in message
    r = user.post("smtp-template-add", name="Broken subject", html_body="<p>ok</p>", subject="{{ name ")
    assert r.status_code == 422 and r.json()["data"][0].startswith("The subject is not a valid template")
    assert [x["id"] for x in user.get("smtp-template-index").json()["data"]["templates"]] == [tpl["id"]]

    r = user.post("smtp-template-update", template_id=tpl["id"], html_body="{{ broken }")
    assert r.status_code == 422
    assert user.get("smtp-template-show", template_id=tpl["id"]).json()["data"]["templates"]["html_body"] == \
        "<h1>Welcome {{ name }}</h1>"  # unchanged
    r = user.post("smtp-template-update", template_id=tpl["id"], name="Renamed", active=False)
    assert r.status_code == 200
    updated = user.get("smtp-template-show", template_id=tpl["id"]).json()["data"]["templates"]
    assert (updated["name"], updated["active"], updated["html_body"]) == ("Renamed", False, tpl["html_body"])

    defaults = user.get("smtp-template-default").json()["data"]["default_templates"]
    assert {"default-welcome", "default-newsletter"} <= {d["id"] for d in defaults}
    assert all(d["html_body"] and d["name"] for d in defaults)


def test_mailing_lists_and_members(papi: ProviderApi, new_tenant: Callable[..., Tenant]) -> None:
    t = new_tenant()
    user = login(papi, t)
    r = user.post("smtp-mailing-add", name="Newsletter Subscribers")
    assert r.status_code == 200, r.text
    lst = r.json()["data"]["mailing"]
    assert lst["name"] == "Newsletter Subscribers" and lst["members_count"] == 0
    assert [x["id"] for x in user.get("smtp-mailing-list").json()["data"]["mailing_list"]] == [lst["id"]]

    # a suppressed address of the tenant (through the tenant API): accepted, flagged, never mailed
    assert t.http.post("/suppressions", json={"addresses": ["Blocked@Example.test"]}).status_code == 200
    members = [{"email": "Ann@Example.test", "name": "Ann", "fields": {"city": "Rome"}},
               {"email": "bob@example.test"},
               {"email": "not-an-address"},
               {"email": "ann@example.test"},  # repeated in the call (case-insensitive)
               {"email": "carl@example.test", "fields": ["not", "an", "object"]},
               {"email": "blocked@example.test", "name": "Blocked"},
               {"email": "dora@example.test", "status": "unsubscribed"},
               {"email": "eve@example.test", "status": "bouncing"}]
    r = user.post("smtp-mailing-members-add", mailing_list_id=lst["id"], members=members)
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert data["added"] == 4
    assert data["refused"] == [{"index": 2, "email": "not-an-address", "reason": "invalid_email"},
                               {"index": 3, "email": "ann@example.test", "reason": "duplicate"},
                               {"index": 4, "email": "carl@example.test", "reason": "invalid_fields"},
                               {"index": 7, "email": "eve@example.test", "reason": "invalid_status"}]
    assert data["suppressed"] == ["blocked@example.test"]
    # again: everything already there is a duplicate, nothing is added twice
    r = user.post("smtp-mailing-members-add", mailing_list_id=lst["id"],
                  members=[{"email": "bob@example.test"}, {"email": "fay@example.test"}])
    assert r.json()["data"]["added"] == 1
    assert r.json()["data"]["refused"] == [{"index": 0, "email": "bob@example.test", "reason": "duplicate"}]

    page = user.get("smtp-mailing-members", mailing_list_id=lst["id"], per_page=2, page=1).json()["data"]
    assert page["pagination"] == {"page": 1, "per_page": 2, "total": 5, "last_page": 3}
    everyone = user.get("smtp-mailing-members", mailing_list_id=lst["id"]).json()["data"]["members"]
    by_email = {m["email"]: m for m in everyone}
    assert [m["email"] for m in page["members"]] == [m["email"] for m in everyone[:2]]
    assert set(by_email) == {"ann@example.test", "bob@example.test", "blocked@example.test", "dora@example.test",
                             "fay@example.test"}
    assert by_email["ann@example.test"]["fields"] == {"city": "Rome"} and by_email["ann@example.test"]["name"] == "Ann"
    assert by_email["blocked@example.test"]["suppressed"] is True
    assert by_email["bob@example.test"]["suppressed"] is False
    assert by_email["dora@example.test"]["status"] == "unsubscribed"
    listed = user.get("smtp-mailing-list").json()["data"]["mailing_list"][0]
    assert (listed["members_count"], listed["subscribed_count"]) == (5, 4)

    r = user.post("smtp-mailing-members-remove", mailing_list_id=lst["id"],
                  emails=["BOB@example.test", "nobody@example.test"], member_ids=[by_email["fay@example.test"]["id"]])
    assert r.status_code == 200 and r.json()["data"] == {"mailing_list_id": lst["id"], "removed": 2,
                                                         "not_found": ["nobody@example.test"]}
    left = {m["email"] for m in user.get("smtp-mailing-members", mailing_list_id=lst["id"]).json()["data"]["members"]}
    assert left == {"ann@example.test", "blocked@example.test", "dora@example.test"}
    # bob may be added again after removal
    assert user.post("smtp-mailing-members-add", mailing_list_id=lst["id"],
                     members=[{"email": "bob@example.test"}]).json()["data"]["added"] == 1

    # at most 10,000 members per call: refused whole, nothing written
    too_many = [{"email": f"m{i}@bulk.example.test"} for i in range(10_001)]
    r = user.post("smtp-mailing-members-add", mailing_list_id=lst["id"], members=too_many)
    assert r.status_code == 422 and r.json()["data"] == ["The members may not have more than 10000 items."]
    r = user.post("smtp-mailing-members-add", mailing_list_id=lst["id"], members=too_many[:2500])
    assert r.status_code == 200 and r.json()["data"]["added"] == 2500 and r.json()["data"]["refused"] == []
    total = user.get("smtp-mailing-members", mailing_list_id=lst["id"]).json()["data"]["pagination"]["total"]
    assert total == 4 + 2500
    r = user.post("smtp-mailing-members-add", mailing_list_id=999_999_999, members=[{"email": "x@example.test"}])
    assert r.status_code == 404 and r.json()["data"] == ["The mailing list was not found."]


def test_welcome_mail_default_and_custom(papi: ProviderApi, new_tenant: Callable[..., Tenant]) -> None:
    user = login(papi, new_tenant())
    rcpt = f"owner-{user.id}@example.test"
    r = user.post("smtp-welcome-mail", from_email=rcpt, shop_name="Demo <Store>")
    assert r.status_code == 200, r.text
    assert r.json() == {"success": True, "data": {"success": True, "message": "Welcome Mail Sent Successfully"}}
    [mail] = papi.mailbox.wait_for(1, timeout=20, predicate=lambda m: rcpt in m.rcpt_tos)
    assert mail.message["Subject"] == "Welcome to Demo <Store>"  # a header: not HTML-escaped
    html = html_of(mail)
    assert "Welcome to Demo &lt;Store&gt;!" in html and "<Store>" not in html  # the body is autoescaped

    rcpt2 = f"custom-{user.id}@example.test"
    r = user.post("smtp-welcome-mail", from_email=rcpt2, shop_name="<script>alert(1)</script>",
                  subject="Welcome to SMTPProvider", html_content="<h1>Hi from {{ shop_name }}</h1>")
    assert r.status_code == 200, r.text
    [mail] = papi.mailbox.wait_for(1, timeout=20, predicate=lambda m: rcpt2 in m.rcpt_tos)
    assert mail.message["Subject"] == "Welcome to SMTPProvider"
    html = html_of(mail)
    assert "<h1>Hi from &lt;script&gt;alert(1)&lt;/script&gt;</h1>" in html and "<script>" not in html

    rcpt3 = f"refused-{user.id}@example.test"
    for body, message in (({"subject": "Only a subject"},
                           "The html content field is required when subject is present."),
                          ({"subject": "Bad", "html_content": "{% for %}"}, None),
                          ({"subject": "Two\r\nBcc: x@example.test", "html_content": "<p>x</p>"},
                           "Header values may not contain line breaks.")):
        r = user.post("smtp-welcome-mail", {"from_email": rcpt3, "shop_name": "Shop", **body})
        assert r.status_code == 422, r.text
        if message:
            assert r.json()["data"] == [message]
    # a last valid mail to the same address arrives alone: the refused ones sent nothing
    assert user.post("smtp-welcome-mail", from_email=rcpt3, shop_name="Shop").status_code == 200
    papi.mailbox.wait_for(1, timeout=20, predicate=lambda m: rcpt3 in m.rcpt_tos)
    assert len(papi.mailbox.messages_to(rcpt3)) == 1


def test_ids_and_user_emails_stay_unique_across_api_replicas(papi: ProviderApi, system: LocalSystem,
                                                             new_tenant: Callable[..., Tenant]) -> None:
    """Two API processes (the session's and the provider test API) write at once: the fenced id
    allocator hands out each id once, and one email becomes one user."""
    t = new_tenant()
    user = login(papi, t)
    main = httpx.Client(base_url=system.url("api"), headers=dict(user.http.headers), timeout=30)
    wait_until(lambda: main.get("/api/v1/smtp-template-index", params={"user_id": user.id}).status_code == 200,
               timeout=60, what="token visible to the other API process")

    def add(i: int) -> int:
        client = main if i % 2 else user.http
        r = client.post("/api/v1/smtp-template-add", json={"user_id": user.id, "name": f"t{i}", "html_body": "<p/>"})
        assert r.status_code == 200, r.text
        return int(r.json()["data"]["template"]["id"])

    with ThreadPoolExecutor(8) as pool:
        ids = list(pool.map(add, range(24)))
    assert len(set(ids)) == 24
    wait_until(lambda: {x["id"] for x in user.get("smtp-template-index").json()["data"]["templates"]} == set(ids),
               timeout=30, what="every template readable")

    tenant_main = httpx.Client(base_url=system.url("api"), headers={"X-API-Token": t.api_key}, timeout=30)
    tenant_papi = papi.tenant_http(t)
    email = f"race-{uuid.uuid4().hex[:8]}@users.example.test"

    def create(client: httpx.Client) -> int:
        return client.post(f"/tenant/{t.id}/users", json={"email": email, "name": "R", "password": "race-password"}
                           ).status_code

    with ThreadPoolExecutor(6) as pool:
        codes = list(pool.map(create, [tenant_main, tenant_papi] * 3))
    assert sorted(codes) == [200] + [409] * 5, codes
    wait_until(lambda: sum(u["email"] == email for u in tenant_papi.get(f"/tenant/{t.id}/users").json()["users"]) == 1,
               timeout=30, what="the one user")
    assert token_for(papi, email, "race-password").status_code == 200


def test_a_restarted_api_rebuilds_the_same_answers_from_the_topics(papi: ProviderApi, system: LocalSystem,
                                                                   new_tenant: Callable[..., Tenant]) -> None:
    """Users, tokens, domains, senders, templates, lists and members are projections of topics: an
    API process killed and started again (its views replayed from the beginning) answers the same."""
    t = new_tenant()
    user = login(papi, t)
    name = verified_domain(papi, user)
    assert user.post("smtp-domain-sender-add", domain_name=name, from_email=f"news@{name}").status_code == 200
    assert user.post("smtp-template-add", name="T", html_body="<p>{{ name }}</p>").status_code == 200
    lst = user.post("smtp-mailing-add", name="L").json()["data"]["mailing"]
    r = user.post("smtp-mailing-members-add", mailing_list_id=lst["id"],
                  members=[{"email": f"m{i}@example.test", "fields": {"i": i}} for i in range(30)])
    assert r.json()["data"]["added"] == 30
    assert user.post("smtp-mailing-members-remove", mailing_list_id=lst["id"],
                     emails=["m0@example.test"]).json()["data"]["removed"] == 1
    main = httpx.Client(base_url=system.url("api"), headers=dict(user.http.headers), timeout=30)
    reads = [("smtp-domain-list", {}), ("smtp-domain-view", {"domain_name": name}), ("smtp-sender-list", {}),
             ("smtp-template-index", {}), ("smtp-mailing-list", {}),
             ("smtp-mailing-members", {"mailing_list_id": lst["id"]})]

    def answers(client: httpx.Client) -> list[object]:
        return [client.get(f"/api/v1/{p}", params={"user_id": user.id, **q}).json() for p, q in reads]

    expected = answers(user.http)
    assert all(a["success"] is True for a in expected)  # type: ignore[index]
    wait_until(lambda: answers(main) == expected, timeout=60, what="the other API process caught up")
    system.kill_service("api")
    system.start_service("api")
    assert answers(main) == expected  # rebuilt from the topics before it answered ready
    users = httpx.get(f"{system.url('api')}/tenant/{t.id}/users", headers={"X-API-Token": t.api_key}, timeout=30)
    assert [u["id"] for u in users.json()["users"]] == [user.id]
    assert token_for(papi, user.email, user.password).status_code == 200
