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


class ForeignId:
    """Another library's request id, as found when the request started."""

    __slots__ = ("answers_header", "found", "outer", "pass_on", "var")

    def __init__(self, var: ContextVar[Any], found: object, answers_header: bool) -> None:
        self.var = var
        self.found = found
        # The outer library's id, when it set one we can use.
        self.outer = valid_request_id(found) if isinstance(found, str) and found else None
        self.answers_header = answers_header and self.outer is not None
        # Set by start(): the adapter hands our id to an inner library in the request.
        self.pass_on = False


def foreign_id() -> ForeignId | None:
    """The first id library in use, or None (the common case: two dict lookups)."""
    for module_name, name, answers in _LIBRARIES:
        module = _modules.get(module_name)
        if module is not None:
            var = getattr(module, name, None)
            if isinstance(var, ContextVar):
                return ForeignId(var, var.get(), answers)
    return None


def forget(foreign: ForeignId) -> None:
    """Put an inner library's context variable back as the request found it."""
    # Never let interop break a request's release.
    with contextlib.suppress(Exception):
        if foreign.var.get() != foreign.found:
            foreign.var.set(foreign.found)
