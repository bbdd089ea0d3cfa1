"""Address parsing, once per distinct string: ``email.utils`` parsing is slow (``_parseaddr``, 8 %
of the sender's CPU in the profile) and one send used to parse the same From and To strings about
ten times (envelope, headers, Message-ID, throttle, suppression, tracking, DKIM, domain checks).
The results are pure functions of the string, so a bounded LRU cache serves every later call (in
the same send and in retries)."""

from __future__ import annotations

from collections.abc import Iterable
from email.utils import getaddresses, parseaddr
from functools import lru_cache

CACHE_SIZE = 16384


@lru_cache(maxsize=CACHE_SIZE)
def parse_one(raw: str) -> tuple[str, str]:
    """``email.utils.parseaddr``: (display name, address)."""
    return parseaddr(raw)


@lru_cache(maxsize=CACHE_SIZE)
def parse_item(raw: str) -> tuple[tuple[str, str], ...]:
    """The (name, address) pairs of one list entry (an entry may hold several, comma separated)."""
    return tuple(getaddresses([raw]))


def parse_list(items: Iterable[str]) -> list[tuple[str, str]]:
    """``email.utils.getaddresses`` over a list of entries, entry by entry."""
    return [pair for raw in items for pair in parse_item(raw)]


def bare(raw: str) -> str:
    return parse_one(raw)[1]
