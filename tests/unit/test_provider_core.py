"""Provider API core pieces without a broker: templating (sandbox, autoescape, compile errors),
the error wording, the user_id check, token format, the token throttle, the views' indexes."""

from __future__ import annotations

import pytest

from services.api.provider import tokens
from services.api.provider.auth import _TOKEN, ProviderUser, check_user_id, hash_secret, new_token
from services.api.provider.envelope import ProviderError, validation_messages
from services.api.provider.tokens import Throttle
from services.api.provider.views import ProviderViews
from services.common import templating
from services.common.templating import TemplateError, compile_template, render, render_text


def test_render_autoescapes_html_and_not_text() -> None:
    assert render("<p>{{ name }}</p>", {"name": "<script>x</script>"}) == "<p>&lt;script&gt;x&lt;/script&gt;</p>"
    assert render_text("Welcome to {{ shop }}", {"shop": "A & <B>"}) == "Welcome to A & <B>"
    assert render("{{ missing }}|{{ email }}", {"email": "a@b"}) == "|a@b"  # undefined renders empty


def test_the_sandbox_refuses_python_internals() -> None:
    for source in ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "{{ email.__class__.__init__.__globals__ }}"):
        try:
            out = render(source, {"email": "a@b"})
        except TemplateError as exc:
            assert "not allowed" in str(exc) or "undefined" in str(exc).lower()
        else:
            assert "subclasses" not in out and "built-in" not in out and "function" not in out


def test_compile_errors_are_readable() -> None:
    with pytest.raises(TemplateError, match=r"^line 2: .*endif"):
        compile_template("<p>\n{% if x %}unclosed</p>")
    with pytest.raises(TemplateError, match="longer than"):
        compile_template("x" * (templating.MAX_SOURCE_CHARS + 1))
    compile_template("{% for m in items %}{{ m }}{% endfor %}")


def test_render_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(templating, "CACHE_SIZE", 3)
    templating._cache.clear()
    for i in range(10):
        assert render(f"{{{{ n }}}}-{i}", {"n": i}) == f"{i}-{i}"
    assert len(templating._cache) == 3


def test_validation_messages_in_the_seed_wording() -> None:
    errs = [{"type": "missing", "loc": ("body", "domain_name")},
            {"type": "int_parsing", "loc": ("body", "template_id")},
            {"type": "string_type", "loc": ("body", "name")},
            {"type": "too_long", "loc": ("body", "members"), "ctx": {"max_length": 10000}},
            {"type": "json_invalid", "loc": ("body", 1)}]
    assert validation_messages(errs) == ["The domain name field is required.", "The template id must be an integer.",
                                         "The name must be a string.",
                                         "The members may not have more than 10000 items.",
                                         "The request body must be valid JSON."]


def test_user_id_check() -> None:
    user = ProviderUser(7, "t1", "a@b.test", "A")
    check_user_id(user, 7)
    check_user_id(user, "7")
    for value, status, message in ((None, 422, "The user id field is required."), ("", 422, None),
                                   ("abc", 422, "The user id must be an integer."), (True, 422, None),
                                   (8, 403, "Wrong user id"), ("8", 403, "Wrong user id")):
        with pytest.raises(ProviderError) as exc:
            check_user_id(user, value)
        assert exc.value.status == status
        if message:
            assert exc.value.messages == [message]


def test_token_format_and_hash() -> None:
    token, token_id, secret_hash = new_token(b"pepper", 42)
    m = _TOKEN.match(token)
    assert m is not None and m[1] == "42" and m[2] == token_id
    assert secret_hash == hash_secret(b"pepper", m[3]) != hash_secret(b"other", m[3])
    assert m[3] not in secret_hash


def test_throttle_counts_failures_and_inflight_attempts(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(tokens.time, "monotonic", lambda: now[0])
    t = Throttle()
    for _ in range(4):
        assert t.retry_after("a", 5, 60) == 0
        t.fail("a")
    assert t.retry_after("a", 5, 60) == 0
    assert t.retry_after("a", 5, 60, inflight=1) == 1  # a fifth attempt is being checked
    t.fail("a")
    assert 55 <= t.retry_after("a", 5, 60) <= 60
    assert t.retry_after("b", 5, 60) == 0
    t.clear("a")
    assert t.retry_after("a", 5, 60) == 0
    t.fail("c")
    assert t.retry_after("c", 1, 60) == 60
    now[0] += 60
    assert t.retry_after("c", 1, 60) == 0  # failures leave the window


def test_views_keep_their_indexes_on_upserts_and_tombstones() -> None:
    v = ProviderViews("127.0.0.1:1")  # not started: only the callbacks are exercised
    v._user_changed("5", {"user_id": 5, "email": "A@x.test"})
    assert v.user_by_email == {"a@x.test": 5}
    v._user_changed("5", {"user_id": 5, "email": "b@x.test"})
    assert v.user_by_email == {"b@x.test": 5}
    v._user_changed("5", None)
    assert v.user_by_email == {}
    rec = {"member_id": 3, "list_id": 2, "tenant_id": "t/1", "email": "m@x.test", "status": "subscribed"}
    v._member_changed("t/1/2/3", rec)
    assert v.list_members("t/1", 2) == {3: rec} and v.member_by_email[("t/1", 2, "m@x.test")] == 3
    v._member_changed("t/1/2/3", None)
    assert v.list_members("t/1", 2) == {} and v.member_by_email == {}
