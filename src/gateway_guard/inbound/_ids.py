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

Neither library is imported here, only looked up in ``sys.modules``, and only when that
changes size (:data:`WATCH`): what a process has imported is settled after its first
requests, and a library imported later (a lazily built sub-app) or dropped is still seen
at the next request. (A module replaced by another without the size changing, as
``importlib.reload`` does, keeps the context variable found before.) While neither is
loaded a request costs one ``len()`` and a compare. Once one is loaded, a request costs
a read of its context variable and, when we chose the id, a copy of the scope for an
inner library to read ours: a library imported but unused cannot be told from one inside
us before it runs, and ids that disagree would cost more than the copy.
"""

from __future__ import annotations

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
_new = object.__new__


class _Watch:
    """The id libraries loaded, as ``sys.modules`` had them at its last change of size."""

    __slots__ = ("idle", "libraries", "seen")

    def __init__(self) -> None:
        # len(sys.modules) when it was last looked at and no library was loaded; -1 while
        # one is (so :func:`~gateway_guard.inbound.start`'s one compare always calls
        # :func:`foreign_id`).
        self.idle = -1
        # len(sys.modules) when the libraries were last looked up.
        self.seen = -1
        # (context variable, answers its own header) of each library loaded.
        self.libraries: tuple[tuple[ContextVar[Any], bool], ...] = ()

    def look(self, count: int) -> None:
        found = []
        for module_name, name, answers_header in _LIBRARIES:
            var = getattr(_modules.get(module_name), name, None)
            if isinstance(var, ContextVar):
                found.append((var, answers_header))
        self.libraries = tuple(found)
        self.seen = count
        self.idle = -1 if found else count


#: Read by ``start()`` on every request: ``len(sys.modules) != WATCH.idle`` means an id
#: library is (or may have become) loaded, and :func:`foreign_id` is asked.
WATCH = _Watch()


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
    """The id libraries loaded, with their values as this request starts; None when none
    is (after ``sys.modules`` changed size, that is looked up again)."""
    count = len(_modules)
    if count != WATCH.seen:
        WATCH.look(count)
    libraries = WATCH.libraries
    if not libraries:
        return None
    found: list[tuple[ContextVar[Any], object]] = []
    outer: str | None = None
    answers = False
    for var, answers_header in libraries:
        value = var.get()
        found.append((var, value))
        if outer is None and isinstance(value, str) and value:
            outer = valid_request_id(value)
            answers = answers_header and outer is not None
    # Built without __init__ (a call from C into Python), on every request of a process
    # that imported a library, used or not: -290 instructions a request
    # (bench/middleware.py --instructions, 2026-12-07, "+ asgi-correlation-id loaded").
    foreign = _new(ForeignId)
    foreign.found = found
    foreign.outer = outer
    foreign.answers_header = answers
    foreign.pass_on = False
    return foreign


def forget(foreign: ForeignId) -> None:
    """Put inner libraries' context variables back as the request found them."""
    for var, value in foreign.found:
        try:
            if var.get() != value:
                var.set(value)
        except Exception:  # interop must never break a request's release
            pass
