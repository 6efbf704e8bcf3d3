"""Request ids that another library owns: asgi-correlation-id (ASGI) and django-guid (Django).

When one of them runs *outside* us it has already chosen the request's id (its context
variable is set when we start): we use theirs, so the app's log lines, our error page's
reference and the upstream's ``X-Request-ID`` all agree. asgi-correlation-id appends its
``X-Request-ID`` to the response after us, so we add none of our own (two otherwise).

When one runs *inside* us it reads the id from the request's header: the adapter passes
ours on (``ForeignId.pass_on``) and it adopts it. Its context variable, set inside our
request, is put back as we found it when we finish (:func:`forget`): in a thread-pool
server a thread's context outlives the request, and the next request must not take the
last one's id for an outer middleware's.

Neither library is imported here, only looked up in ``sys.modules``: when neither is in
use this costs two dict lookups a request.
"""

from __future__ import annotations

import contextlib
import sys
from contextvars import ContextVar
from typing import Any

from gateway_guard.headers import valid_request_id

# (module, its context variable, whether it answers X-Request-ID on the response itself).
# django-guid answers its own header (Correlation-ID by default); a response field set
# twice in Django is set once, so ours never doubles it.
_LIBRARIES = (
    ("asgi_correlation_id.context", "correlation_id", True),
    ("django_guid.context", "guid", False),
)
_modules = sys.modules
#: The modules whose presence means an id library may be in use (checked per request).
ID_MODULES = tuple(module for module, _, _ in _LIBRARIES)


class ForeignId:
    """The id libraries in use, as the request found them when it started."""

    __slots__ = ("answers_header", "found", "outer", "pass_on")

    def __init__(
        self, found: list[tuple[ContextVar[Any], object]], outer: str | None, answers: bool
    ) -> None:
        # Each library's context variable and its value when we started.
        self.found = found
        # The outer library's id, when one set an id we can use.
        self.outer = outer
        self.answers_header = answers
        # Set by start(): the adapter hands our id to an inner library in the request.
        self.pass_on = False


def foreign_id() -> ForeignId | None:
    """The id libraries in use, or None (the common case: two dict lookups)."""
    found: list[tuple[ContextVar[Any], object]] | None = None
    outer: str | None = None
    answers = False
    for module_name, name, answers_header in _LIBRARIES:
        module = _modules.get(module_name)
        if module is None:
            continue
        var = getattr(module, name, None)
        if not isinstance(var, ContextVar):
            continue
        value = var.get()
        if found is None:
            found = []
        found.append((var, value))
        if outer is None and isinstance(value, str) and value:
            outer = valid_request_id(value)
            answers = answers_header and outer is not None
    if found is None:
        return None
    return ForeignId(found, outer, answers)


def forget(foreign: ForeignId) -> None:
    """Put inner libraries' context variables back as the request found them."""
    # Never let interop break a request's release.
    with contextlib.suppress(Exception):
        for var, value in foreign.found:
            if var.get() != value:
                var.set(value)
