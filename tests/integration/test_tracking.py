"""Open and click tracking end to end: the mail at the SMTP server carries the pixel and rewritten
links, following them records events (counted by the metrics service), forged tokens 404."""

from __future__ import annotations

import re

import httpx

from tests.conftest import wait_until

HTML = '<html><body><p>Hi</p><a href="https://example.org/landing?a=1&amp;b=2">go</a></body></html>'


def _mail(smtp, tenant_id: str, mid: str):
    return wait_until(lambda: next((m for m in smtp.messages if m.message["X-Postbus-Tenant"] == tenant_id
                                    and m.message["X-Postbus-Message-Id"] == mid), None), timeout=60, what=mid)


def test_pixel_and_click_are_tracked_and_counted(new_tenant, smtp, system) -> None:
    t = new_tenant(tracking={"opens": True, "clicks": True})
    assert t.http.get(f"/tenant/{t.id}").json()["tracking"] == {"opens": True, "clicks": True, "unsubscribe": False,
                                                                 "domain": None}
    r = t.http.post("/commands/add-messages", json={"messages": [
        t.message("trk-1", body=HTML, content_type="html", to=["reader@example.test"])]})
    assert r.status_code == 200 and r.json()["queued"] == 1, r.text
    html = _mail(smtp, t.id, "trk-1").message.get_body(("html",)).get_content()
    assert "https://example.org/landing" not in html  # rewritten
    api = system.url("api")
    click = re.search(r'href="([^"]+/t/c/[^"]+)"', html).group(1)
    pixel = re.search(r'src="([^"]+/t/o/[^"]+)"', html).group(1)
    assert click.startswith(api) and pixel.startswith(api)

    with httpx.Client(timeout=30) as anon:  # no token: the link is the credential
        r = anon.get(pixel)
        assert r.status_code == 200 and r.headers["content-type"] == "image/gif" and r.content.startswith(b"GIF")
        r = anon.get(click, follow_redirects=False)
        assert r.status_code == 302 and r.headers["location"] == "https://example.org/landing?a=1&b=2"
        # a forged or altered token never redirects
        token = click.rpartition("/")[2]
        body, sig = token.split(".")
        for forged in (f"{body}.{sig[::-1]}", body[:-4] + "AAAA." + sig, "x.y"):
            r = anon.get(f"{api}/t/c/{forged}", follow_redirects=False)
            assert r.status_code == 404 and "location" not in r.headers
            assert r.json()["error"]["code"] == "invalid_token"
        # a pixel token is not a click token
        r = anon.get(f"{api}/t/c/{pixel.rpartition('/')[2]}", follow_redirects=False)
        assert r.status_code == 404

    def metrics() -> dict:
        r = t.http.get(f"/api/v1/tenants/{t.id}/smtp/metrics", params={"window": "24h"})
        assert r.status_code == 200, r.text
        return r.json()["data"]

    wait_until(lambda: (d := metrics())["opens"] >= 1 and d["clicks"] >= 1 and d, timeout=60,
               what="opens and clicks counted")


def test_tracking_is_off_by_default(new_tenant, smtp) -> None:
    t = new_tenant()
    r = t.http.post("/commands/add-messages", json={"messages": [t.message("plain-1", body=HTML, content_type="html")]})
    assert r.status_code == 200 and r.json()["queued"] == 1, r.text
    mail = _mail(smtp, t.id, "plain-1").message
    assert mail.get_body(("html",)).get_content().strip() == HTML
    assert mail["List-Unsubscribe"] is None


def test_per_message_flags_override_the_tenant_default(new_tenant, smtp) -> None:
    t = new_tenant()  # tracking off for the tenant
    r = t.http.post("/commands/add-messages", json={"messages": [
        t.message("own-on", body=HTML, content_type="html", track_opens=True, track_clicks=True)]})
    assert r.status_code == 200 and r.json()["queued"] == 1, r.text
    html = _mail(smtp, t.id, "own-on").message.get_body(("html",)).get_content()
    assert "/t/o/" in html and "/t/c/" in html
