"""Provider API isolation against the running system: two tenants' users (and two users of one
tenant) cannot see or touch each other's domains, senders, templates, lists or members. Each
attack is made right after the owner did the same thing successfully (the positive control), and
the owner's objects are read back unchanged afterwards."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.conftest import Tenant
from tests.integration.provider_support import ProviderApi, User, domain_name, login, papi

pytestmark = pytest.mark.integration
__all__ = ["papi"]

NOT_FOUND = {"domain": ["The domain was not found."], "sender": ["The sender was not found."],
             "template": ["The template was not found."], "list": ["The mailing list was not found."]}


def owned_world(papi: ProviderApi, owner: User) -> dict[str, Any]:
    """The owner's domain (verified), sender, template, list with two members."""
    name = domain_name()
    assert owner.post("smtp-domain-add", domain_name=name).status_code == 200
    papi.publish(owner.get("smtp-domain-view", domain_name=name).json()["data"]["dns_records"])
    assert owner.get("smtp-domain-verify", domain_name=name).status_code == 200
    r = owner.post("smtp-domain-sender-add", domain_name=name, from_email=f"news@{name}")
    assert r.status_code == 200, r.text
    sender = r.json()["data"]["sender"]
    tpl = owner.post("smtp-template-add", name="Mine", html_body="<p>mine</p>").json()["data"]["template"]
    lst = owner.post("smtp-mailing-add", name="Mine").json()["data"]["mailing"]
    r = owner.post("smtp-mailing-members-add", mailing_list_id=lst["id"],
                   members=[{"email": "one@example.test"}, {"email": "two@example.test"}])
    assert r.json()["data"]["added"] == 2
    return {"domain": name, "sender": sender, "template": tpl, "list": lst}


def snapshot(owner: User, w: dict[str, Any]) -> dict[str, Any]:
    return {
        "domains": owner.get("smtp-domain-list").json()["data"]["domains"],
        "view": owner.get("smtp-domain-view", domain_name=w["domain"]).json()["data"],
        "senders": owner.get("smtp-sender-list").json()["data"]["sender_lists"],
        "templates": owner.get("smtp-template-index").json()["data"]["templates"],
        "lists": owner.get("smtp-mailing-list").json()["data"]["mailing_list"],
        "members": owner.get("smtp-mailing-members", mailing_list_id=w["list"]["id"]).json()["data"]["members"],
    }


def attack(papi: ProviderApi, owner: User, intruder: User, w: dict[str, Any], *, same_tenant: bool) -> None:
    before = snapshot(owner, w)
    assert before["members"] and before["templates"] and before["senders"] and before["lists"]

    def refused(r: httpx.Response, what: str, status: int = 404) -> None:
        assert r.status_code == status, r.text
        assert r.json() == {"success": False, "data": NOT_FOUND[what]}, r.text

    # listings show none of the owner's objects (a colleague shares the tenant's domains only)
    own_domains = [d["domain_name"] for d in intruder.get("smtp-domain-list").json()["data"]["domains"]]
    assert (w["domain"] in own_domains) is same_tenant
    assert intruder.get("smtp-sender-list").json()["data"]["sender_lists"] == []
    assert intruder.get("smtp-template-index").json()["data"]["templates"] == []
    assert intruder.get("smtp-mailing-list").json()["data"]["mailing_list"] == []
    if not same_tenant:
        refused(intruder.get("smtp-domain-view", domain_name=w["domain"]), "domain")
        refused(intruder.get("smtp-domain-verify", domain_name=w["domain"]), "domain")
        refused(intruder.post("smtp-domain-sender-add", domain_name=w["domain"],
                              from_email=f"evil@{w['domain']}"), "domain")
        r = intruder.post("smtp-domain-add", domain_name=w["domain"])
        assert r.status_code == 422 and r.json()["data"] == ["The domain name has already been taken."]
    else:  # a colleague may use the tenant's domain, but not take the owner's address on it
        r = intruder.post("smtp-domain-sender-add", domain_name=w["domain"], from_email=w["sender"]["from_email"])
        assert r.status_code == 422 and r.json()["data"] == ["The from email has already been taken."]
    refused(intruder.post("smtp-domain-sender-verify", from_email=w["sender"]["from_email"]), "sender")
    refused(intruder.get("smtp-template-show", template_id=w["template"]["id"]), "template")
    refused(intruder.post("smtp-template-update", template_id=w["template"]["id"], html_body="<p>pwned</p>"),
            "template")
    refused(intruder.get("smtp-mailing-members", mailing_list_id=w["list"]["id"]), "list")
    refused(intruder.post("smtp-mailing-members-add", mailing_list_id=w["list"]["id"],
                          members=[{"email": "evil@example.test"}]), "list")
    refused(intruder.post("smtp-mailing-members-remove", mailing_list_id=w["list"]["id"],
                          emails=["one@example.test"]), "list")
    # the owner's objects are unchanged, and no verification mail went to the owner's sender
    assert snapshot(owner, w) == before
    assert papi.mailbox.messages_to(w["sender"]["from_email"]) == []
    # positive control: the owner can do what the intruder could not
    assert owner.get("smtp-template-show", template_id=w["template"]["id"]).status_code == 200
    assert owner.post("smtp-domain-sender-verify", from_email=w["sender"]["from_email"]).status_code == 200
    papi.mailbox.wait_for(1, timeout=20, predicate=lambda m: w["sender"]["from_email"] in m.rcpt_tos)


def test_two_tenants_users_are_isolated(papi: ProviderApi, new_tenant: Callable[..., Tenant]) -> None:
    owner = login(papi, new_tenant())
    intruder = login(papi, new_tenant())
    w = owned_world(papi, owner)
    attack(papi, owner, intruder, w, same_tenant=False)
    # and the other way round: the intruder's own objects are its own (ids do not collide either)
    w2 = owned_world(papi, intruder)
    assert w2["template"]["id"] != w["template"]["id"] and w2["list"]["id"] != w["list"]["id"]
    refused = owner.get("smtp-template-show", template_id=w2["template"]["id"])
    assert refused.status_code == 404


def test_two_users_of_one_tenant_keep_their_own_objects(papi: ProviderApi, new_tenant: Callable[..., Tenant]) -> None:
    t = new_tenant()
    http = papi.tenant_http(t)
    owner = login(papi, t, http)
    colleague = login(papi, t, http)
    w = owned_world(papi, owner)
    attack(papi, owner, colleague, w, same_tenant=True)
