"""The provider API's projections: one ConfigView per compacted provider topic (users, tokens,
senders, templates, lists, members, id counters), plus in-memory indexes kept up to date by the
views' change callbacks. Reached as ``st.provider`` (services/api/state.py).

Campaign modules register their own views at import time with :func:`register_view`; they are
built, started and waited on like the others (``st.provider.view(name)``)."""

from __future__ import annotations

import asyncio
from typing import Any

from services.common.config_view import ConfigView
from services.common.topics import (
    CONFIG_PROVIDER_IDS,
    CONFIG_PROVIDER_LISTS,
    CONFIG_PROVIDER_MEMBERS,
    CONFIG_PROVIDER_SENDERS,
    CONFIG_PROVIDER_TEMPLATES,
    CONFIG_PROVIDER_TOKENS,
    CONFIG_PROVIDER_USERS,
)

# name -> (topic, schema) of views other provider modules need (campaigns): see register_view
_EXTRA: dict[str, tuple[str, str]] = {}


def register_view(name: str, topic: str, schema: str) -> None:
    """Call at import time (before the API starts): ``st.provider.view(name)`` then follows ``topic``."""
    _EXTRA[name] = (topic, schema)


class ProviderViews:
    def __init__(self, bootstrap: str) -> None:
        self.users = ConfigView(bootstrap, CONFIG_PROVIDER_USERS, "ProviderUser", on_change=self._user_changed)
        self.tokens = ConfigView(bootstrap, CONFIG_PROVIDER_TOKENS, "ProviderToken")
        self.senders = ConfigView(bootstrap, CONFIG_PROVIDER_SENDERS, "ProviderSender")
        self.templates = ConfigView(bootstrap, CONFIG_PROVIDER_TEMPLATES, "ProviderTemplate")
        self.lists = ConfigView(bootstrap, CONFIG_PROVIDER_LISTS, "ProviderList")
        self.members = ConfigView(bootstrap, CONFIG_PROVIDER_MEMBERS, "ProviderMember",
                                  on_change=self._member_changed)
        self.ids = ConfigView(bootstrap, CONFIG_PROVIDER_IDS, "ProviderCounter")
        self.extra: dict[str, ConfigView] = {name: ConfigView(bootstrap, topic, schema)
                                             for name, (topic, schema) in _EXTRA.items()}
        # indexes
        self.user_by_email: dict[str, int] = {}  # lower-cased email -> user id
        self._user_email: dict[str, str] = {}  # user key -> email (to drop the index entry on a tombstone)
        # (tenant, list id) -> {member id: record}; (tenant, list id, email) -> member id
        self.members_by_list: dict[tuple[str, int], dict[int, dict[str, Any]]] = {}
        self.member_by_email: dict[tuple[str, int, str], int] = {}

    def all(self) -> list[ConfigView]:
        return [self.users, self.tokens, self.senders, self.templates, self.lists, self.members, self.ids,
                *self.extra.values()]

    def view(self, name: str) -> ConfigView:
        return self.extra[name]

    async def start(self) -> None:
        await asyncio.gather(*(v.start() for v in self.all()))

    async def stop(self) -> None:
        await asyncio.gather(*(v.stop() for v in self.all()), return_exceptions=True)

    async def wait_visible(self, offsets: dict[str, dict[int, int]], timeout: float) -> None:  # noqa: ASYNC109
        """Read-your-writes: return once the provider views have applied the given records (topics
        no provider view follows are ignored)."""
        views = {v.topic: v for v in self.all()}
        await asyncio.gather(*(views[t].wait_for(o, timeout) for t, o in offsets.items() if t in views))

    # --- indexes -----------------------------------------------------------------------------------

    def _user_changed(self, key: str, value: dict[str, Any] | None) -> None:
        old = self._user_email.pop(key, None)
        if old is not None and self.user_by_email.get(old) == int(key):
            del self.user_by_email[old]
        if value is not None:
            email = str(value["email"]).lower()
            self._user_email[key] = email
            self.user_by_email[email] = int(value["user_id"])

    def _member_changed(self, key: str, value: dict[str, Any] | None) -> None:
        parts = key.split("/")
        if len(parts) < 3:
            return
        tenant, list_id, member_id = "/".join(parts[:-2]), int(parts[-2]), int(parts[-1])
        members = self.members_by_list.setdefault((tenant, list_id), {})
        old = members.pop(member_id, None)
        if old is not None and self.member_by_email.get((tenant, list_id, old["email"])) == member_id:
            del self.member_by_email[(tenant, list_id, old["email"])]
        if value is not None:
            members[member_id] = value
            self.member_by_email[(tenant, list_id, value["email"])] = member_id
        elif not members:
            del self.members_by_list[(tenant, list_id)]

    # --- lookups -----------------------------------------------------------------------------------

    def user(self, user_id: int) -> dict[str, Any] | None:
        return self.users.get(str(user_id))

    def owned(self, view: ConfigView, tenant_id: str, object_id: int, user_id: int) -> dict[str, Any] | None:
        """The object ``<tenant>/<id>`` of ``view`` if it belongs to this user (else None: a 404)."""
        rec = view.get(f"{tenant_id}/{object_id}")
        if rec is None or rec.get("tenant_id") != tenant_id or int(rec.get("user_id", -1)) != user_id:
            return None
        return rec

    def of_user(self, view: ConfigView, tenant_id: str, user_id: int) -> list[dict[str, Any]]:
        return [v for v in list(view.items.values())
                if v.get("tenant_id") == tenant_id and int(v.get("user_id", -1)) == user_id]

    def list_members(self, tenant_id: str, list_id: int) -> dict[int, dict[str, Any]]:
        return self.members_by_list.get((tenant_id, list_id), {})
