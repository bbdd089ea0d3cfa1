"""Jinja2 templating of provider templates, campaigns and welcome mail.

Templates run in Jinja2's sandbox (no attribute access to Python internals, no unsafe calls,
``range`` capped) with HTML autoescaping on: a member's name ``<script>`` renders as ``&lt;script&gt;``.
:func:`compile_template` is the save-time check (a template that does not compile is refused then,
not when a campaign sends); :func:`render` compiles once per distinct source (a bounded LRU cache)
so a campaign renders each member with the already compiled template."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

from jinja2 import TemplateSyntaxError, select_autoescape
from jinja2.exceptions import SecurityError
from jinja2.exceptions import TemplateError as JinjaTemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

MAX_SOURCE_CHARS = 512 * 1024
CACHE_SIZE = 512

_env = ImmutableSandboxedEnvironment(autoescape=select_autoescape(default=True, default_for_string=True),
                                     auto_reload=False)
_text_env = ImmutableSandboxedEnvironment(autoescape=False, auto_reload=False)  # headers (subjects): not HTML
_cache: OrderedDict[str, Any] = OrderedDict()
_lock = threading.Lock()


class TemplateError(ValueError):
    """A template that does not compile or cannot render, with a readable message."""


def compile_template(source: str) -> Any:
    """The compiled template, or :class:`TemplateError` ("line 3: unexpected '}'")."""
    if not isinstance(source, str):
        raise TemplateError("the template must be a string")
    if len(source) > MAX_SOURCE_CHARS:
        raise TemplateError(f"the template is longer than {MAX_SOURCE_CHARS} characters")
    try:
        return _env.from_string(source)
    except TemplateSyntaxError as exc:
        raise TemplateError(f"line {exc.lineno}: {exc.message}") from None
    except JinjaTemplateError as exc:
        raise TemplateError(str(exc)) from None


def _compiled(source: str) -> Any:
    with _lock:
        tpl = _cache.get(source)
        if tpl is not None:
            _cache.move_to_end(source)
            return tpl
    tpl = compile_template(source)
    with _lock:
        _cache[source] = tpl
        while len(_cache) > CACHE_SIZE:
            _cache.popitem(last=False)
    return tpl


def render(source: str, context: dict[str, Any]) -> str:
    """``source`` rendered with ``context`` (HTML-escaped values); :class:`TemplateError` on failure."""
    tpl = _compiled(source)
    try:
        return str(tpl.render(context))
    except SecurityError as exc:
        raise TemplateError(f"not allowed in a template: {exc}") from None
    except JinjaTemplateError as exc:
        raise TemplateError(str(exc)) from None
    except (TypeError, ValueError, ArithmeticError, LookupError) as exc:
        raise TemplateError(f"{type(exc).__name__}: {exc}") from None


def render_text(source: str, context: dict[str, Any]) -> str:
    """A plain-text template (a subject line): the same sandbox, no HTML escaping, not cached."""
    if len(source) > MAX_SOURCE_CHARS:
        raise TemplateError(f"the template is longer than {MAX_SOURCE_CHARS} characters")
    try:
        return str(_text_env.from_string(source).render(context))
    except TemplateSyntaxError as exc:
        raise TemplateError(f"line {exc.lineno}: {exc.message}") from None
    except SecurityError as exc:
        raise TemplateError(f"not allowed in a template: {exc}") from None
    except JinjaTemplateError as exc:
        raise TemplateError(str(exc)) from None
    except (TypeError, ValueError, ArithmeticError, LookupError) as exc:
        raise TemplateError(f"{type(exc).__name__}: {exc}") from None
