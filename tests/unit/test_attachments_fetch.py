"""prepare_attachment against real loopback HTTP servers and a real local storage folder."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.fernet import Fernet

from services.common import signed_links
from services.common.crypto import SecretBox
from services.common.settings import Settings
from services.sender import attachments, pipeline
from services.sender.attachments import prepare_attachment
from tests.support.client_app import ClientApp
from tests.support.static_server import StaticServer

KEY = Fernet.generate_key().decode()
PDF = b"%PDF-1.7 " + bytes(range(256)) * 8


@pytest.fixture
def conf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    holder: dict[str, Any] = {"allow": True}

    def settings() -> Settings:
        return Settings(secret_key=KEY, state_dir=tmp_path, allow_private_networks=holder["allow"],
                        attachments_max_bytes=4096, attachments_hard_max_bytes=1 << 20,
                        api_port=18999, attachments_fetch_timeout_s=5)

    monkeypatch.setattr(attachments, "get_settings", settings)
    monkeypatch.setattr(attachments, "_cache", None)
    yield holder


def ctx(tenant: dict[str, Any] | None = None, tenant_id: str = "t1") -> pipeline.SendContext:
    return pipeline.SendContext(key="k", message={"tenant_id": tenant_id, "id": "m1"}, account={},
                                tenant={"id": tenant_id, **(tenant or {})}, partition=0, attempt=1, now_ms=0)


def att(path: str, mode: str, **kw: Any) -> dict[str, Any]:
    return {"filename": "doc.pdf", "storage_path": path, "fetch_mode": mode, "mime_type": None,
            "content_md5": None, "auth": None, **kw}


@pytest.fixture
def static() -> Iterator[StaticServer]:
    with StaticServer({"/doc.pdf": PDF, "/big.bin": b"x" * 5000}) as srv:
        yield srv


async def test_http_url_fetch_md5_and_cache(conf, static: StaticServer) -> None:
    md5 = hashlib.md5(PDF).hexdigest()
    got = await prepare_attachment(ctx(), att(static.url + "/doc.pdf", "http_url", content_md5=md5))
    # the server says application/octet-stream: the name's type wins over a generic one (genro 0.6)
    assert got.data == PDF and got.att["mime_type"] == "application/pdf"
    again = await prepare_attachment(ctx(), att(static.url + "/doc.pdf", "http_url"))
    assert again.data == PDF and static.hits("/doc.pdf") == 1  # served from the tenant's cache
    await prepare_attachment(ctx(tenant_id="t2"), att(static.url + "/doc.pdf", "http_url"))
    assert static.hits("/doc.pdf") == 2  # another tenant does not share it
    with pytest.raises(pipeline.PrepareError, match="content_md5 mismatch") as err:
        await prepare_attachment(ctx(), att(static.url + "/doc.pdf", "http_url",
                                            content_md5=base64.b64encode(b"0" * 16).decode()))
    assert not err.value.temporary


async def test_http_failures_are_classified(conf, static: StaticServer) -> None:
    static.fail("/doc.pdf", 1, 503)
    with pytest.raises(pipeline.PrepareError, match="HTTP 503") as err:
        await prepare_attachment(ctx(), att(static.url + "/doc.pdf", "http_url"))
    assert err.value.temporary
    with pytest.raises(pipeline.PrepareError, match="HTTP 404") as err:
        await prepare_attachment(ctx(), att(static.url + "/missing", "http_url"))
    assert not err.value.temporary
    with pytest.raises(pipeline.PrepareError, match="attachment too large") as err:
        await prepare_attachment(ctx(), att(static.url + "/big.bin", "http_url"))
    assert not err.value.temporary
    closed = StaticServer().start()
    url = closed.url + "/x"
    closed.stop()
    with pytest.raises(pipeline.PrepareError) as err:
        await prepare_attachment(ctx(), att(url, "http_url"))
    assert err.value.temporary


async def test_private_addresses_refused_unless_allowed(conf, static: StaticServer) -> None:
    conf["allow"] = False
    for url in (static.url + "/doc.pdf", f"http://localhost:{static.port}/doc.pdf", "http://169.254.169.254/x"):
        with pytest.raises(pipeline.PrepareError, match="non-public address") as err:
            await prepare_attachment(ctx(), att(url, "http_url"))
        assert not err.value.temporary
    assert static.hits("/doc.pdf") == 0  # refused before any connection


async def test_redirects_are_followed_and_checked(conf, static: StaticServer) -> None:
    static.redirect("/moved", "/doc.pdf")
    assert (await prepare_attachment(ctx(), att(static.url + "/moved", "http_url"))).data == PDF
    # the first hop (loopback) is allowed here; the hop it redirects to never is
    static.redirect("/evil", "http://0.0.0.0:9/secret")
    with pytest.raises(pipeline.PrepareError, match="non-public") as err:
        await prepare_attachment(ctx(), att(static.url + "/evil", "http_url"))
    assert not err.value.temporary and static.hits("/evil") == 1


async def test_endpoint_mode_uses_tenant_auth_or_the_attachment_auth(conf) -> None:
    box = SecretBox(KEY)
    with ClientApp(token="tok", attachments_path="/mail-proxy/attachments", files={"doc=1": PDF}) as app:
        tenant = {"client_base_url": app.url, "client_auth_method": "bearer",
                  "client_auth_secret_enc": box.encrypt("tok")}
        got = await prepare_attachment(ctx(tenant), att("doc=1", "endpoint"))
        assert got.data == PDF
        req = app.requests[-1]
        assert req.json == {"storage_path": "doc=1"} and req.headers["authorization"] == "Bearer tok"
        wrong = {"method": "bearer", "user": None, "secret_enc": box.encrypt("nope")}
        with pytest.raises(pipeline.PrepareError, match="HTTP 401") as err:
            await prepare_attachment(ctx(tenant), att("doc=1", "endpoint", auth=wrong))
        assert not err.value.temporary
    with ClientApp(token=None, basic=("u", "p"), attachments_path="/files", files={"doc=2": b"two"}) as app:
        tenant = {"client_base_url": app.url, "client_attachment_path": "/files"}
        own = {"method": "basic", "user": "u", "secret_enc": box.encrypt("p")}
        assert (await prepare_attachment(ctx(tenant), att("doc=2", "endpoint", auth=own))).data == b"two"


async def test_storage_mode_is_confined_to_allowed_roots(conf, tmp_path: Path) -> None:
    root = tmp_path / "files" / "acme"
    root.mkdir(parents=True)
    (root / "a.pdf").write_bytes(PDF)
    (tmp_path / "secret.txt").write_bytes(b"secret")
    tenant = {"large_file_config_json": json.dumps({"storage_url": f"file://{root}"})}
    assert (await prepare_attachment(ctx(tenant), att("a.pdf", "storage"))).data == PDF
    with pytest.raises(pipeline.PrepareError, match="outside"):
        await prepare_attachment(ctx(tenant), att("../../secret.txt", "storage"))
    with pytest.raises(pipeline.PrepareError, match="not found"):
        await prepare_attachment(ctx(tenant), att("nope.pdf", "storage"))
    outside = {"large_file_config_json": json.dumps({"storage_url": f"file://{tmp_path}"})}
    with pytest.raises(pipeline.PrepareError, match="not an allowed storage root"):
        await prepare_attachment(ctx(outside), att("secret.txt", "storage"))


async def test_large_file_actions(conf, static: StaticServer, tmp_path: Path) -> None:
    store = tmp_path / "files" / "out"
    base = {"enabled": True, "max_size_mb": 1000 / (1024 * 1024), "storage_url": f"file://{store}"}
    url = static.url + "/big.bin"

    def tenant(action: str) -> dict[str, Any]:
        return {"large_file_config_json": json.dumps({**base, "action": action})}

    assert (await prepare_attachment(ctx(tenant("warn")), att(url, "http_url"))).data == b"x" * 5000
    with pytest.raises(pipeline.PrepareError, match="attachment too large"):
        await prepare_attachment(ctx(tenant("reject")), att(url, "http_url"))
    got = await prepare_attachment(ctx(tenant("rewrite")), att(url, "http_url", filename="big.bin"))
    assert got.data is None and got.link.startswith("http://127.0.0.1:18999/files/")
    link = signed_links.verify(signed_links.link_key(attachments.get_settings()), got.link.rsplit("/", 1)[1])
    assert link.tenant_id == "t1" and link.filename == "big.bin"
    stored = Path(link.url.removeprefix("file://"))
    assert stored.is_relative_to(store)
    assert stored.read_bytes() == b"x" * 5000  # noqa: ASYNC240  (a test reading one small file)


async def test_storage_roots_never_reach_server_files_or_internal_urls(conf, static: StaticServer,
                                                                       tmp_path: Path) -> None:
    """Records written before the fix (a tenant-set storage_url) are checked again at fetch time."""
    for chained in ("simplecache::file:///", "filecache::file:///", "file:///", "memory://x"):
        tenant = {"large_file_config_json": json.dumps({"storage_url": chained})}
        with pytest.raises(pipeline.PrepareError, match="refused") as err:
            await prepare_attachment(ctx(tenant), att("etc/hostname", "storage"))
        assert not err.value.temporary
    # an http(s) root is fetched through the network policy: refused for loopback by default ...
    tenant = {"large_file_config_json": json.dumps({"storage_url": static.url})}
    conf["allow"] = False
    with pytest.raises(pipeline.PrepareError, match="non-public"):
        await prepare_attachment(ctx(tenant), att("doc.pdf", "storage"))
    assert static.hits("/doc.pdf") == 0
    # ... and served once the operator allows private networks (the positive control)
    conf["allow"] = True
    assert (await prepare_attachment(ctx(tenant), att("doc.pdf", "storage"))).data == PDF


async def test_named_operator_root(conf, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shared = tmp_path / "srv" / "t1"
    shared.mkdir(parents=True)
    (shared / "a.pdf").write_bytes(PDF)
    base = attachments.get_settings

    def settings() -> Settings:
        roots = {"shared": f"file://{tmp_path}/srv/{{tenant_id}}",
                 "vip": {"url": f"file://{tmp_path}/srv", "tenants": []}}
        return base().model_copy(update={"storage_roots_json": json.dumps(roots)})

    monkeypatch.setattr(attachments, "get_settings", settings)
    tenant = {"large_file_config_json": json.dumps({"storage_root": "shared"})}
    assert (await prepare_attachment(ctx(tenant), att("a.pdf", "storage"))).data == PDF
    with pytest.raises(pipeline.PrepareError, match="outside"):
        await prepare_attachment(ctx(tenant), att("../t2/a.pdf", "storage"))
    vip = {"large_file_config_json": json.dumps({"storage_root": "vip"})}
    with pytest.raises(pipeline.PrepareError, match="refused"):
        await prepare_attachment(ctx(vip), att("t1/a.pdf", "storage"))
