"""The lookups every provider resource route makes (lists, templates, senders, campaigns): the user's
own records of a view in id order, and one of them by the id a request names (422 when the id is
missing or not an integer, 404 when it is unknown or another user's: never a hint that it exists)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from services.api.provider.auth import ProviderUser
from services.api.provider.envelope import ProviderError
from services.api.provider.views import ProviderViews
from services.api.state import ApiState
from services.common.config_view import ConfigView


@dataclass(frozen=True)
class Resource:
    view: Callable[[ProviderViews], ConfigView]  # the view of the resource in st.provider
    id_field: str  # its id in the record ("list_id")
    noun: str  # its name in the errors ("mailing list")

    def of_user(self, st: ApiState, user: ProviderUser) -> list[dict[str, Any]]:
        """The records that belong to ``user`` (its tenant, its user id), by id."""
        return sorted(st.provider.of_user(self.view(st.provider), user.tenant_id, user.user_id),
                      key=lambda r: int(r[self.id_field]))

    def owned(self, st: ApiState, user: ProviderUser, raw_id: Any) -> dict[str, Any]:
        """The record ``<tenant>/<raw_id>`` if it is the user's: "The <noun> id field is required." /
        "The <noun> id must be an integer." (422), "The <noun> was not found." (404) otherwise."""
        if raw_id is None or raw_id == "":
            raise ProviderError(422, f"The {self.noun} id field is required.")
        try:
            object_id = int(str(raw_id))
        except ValueError:
            raise ProviderError(422, f"The {self.noun} id must be an integer.") from None
        rec = st.provider.owned(self.view(st.provider), user.tenant_id, object_id, user.user_id)
        if rec is None:
            raise ProviderError(404, f"The {self.noun} was not found.")
        return rec


LISTS = Resource(lambda p: p.lists, "list_id", "mailing list")
TEMPLATES = Resource(lambda p: p.templates, "template_id", "template")
SENDERS = Resource(lambda p: p.senders, "sender_id", "sender")
CAMPAIGNS = Resource(lambda p: p.view("campaigns"), "campaign_id", "campaign")
