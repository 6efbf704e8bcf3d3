"""``@gateway_policy``: a per-view policy for Django views, sync or async."""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import weakref
from collections.abc import Callable, Iterator
from typing import Any, TypeVar, cast

from asgiref.sync import iscoroutinefunction

from gateway_guard.context import get_context
from gateway_guard.guard import Guard
from gateway_guard.inbound import view_policy
from gateway_guard.routing import Route

__all__ = ["gateway_policy"]

V = TypeVar("V", bound=Callable[..., Any])

# Route names are at most 100 characters (settings.md, [[routes]] name).
_MAX_NAME = 100


class PolicySpec:
    """One ``@gateway_policy(...)``: its overrides, where it was written, and its views.

    Compiled per view on the view's first request, then looked up; a different Guard
    (settings changed under ``override_settings``) compiles it again. The system checks
    compile every spec at startup (``gateway_guard.E003``), so a typo does not wait for the
    first request.
    """

    __slots__ = ("__weakref__", "_compiled", "file", "line", "overrides", "views")

    def __init__(self, overrides: dict[str, Any], file: str, line: int) -> None:
        self.overrides = overrides
        # Where the decorator was written, for check messages.
        self.file = file
        self.line = line
        # The names of the views it decorates: bounded by the code, not by traffic
        # (method_decorator decorates anew on every call, always under the same name).
        self.views: set[str] = set()
        self._compiled: dict[str, tuple[Guard, Route]] = {}

    def route(self, guard: Guard, view: str) -> Route:
        """The policy of ``view`` under ``guard``; raises SettingsError on bad overrides."""
        compiled = self._compiled.get(view)
        if compiled is None or compiled[0] is not guard:
            # Two threads may both compile on a first request: same result, no harm.
            compiled = (guard, guard.view_policy(view, **self.overrides))
            self._compiled[view] = compiled
        return compiled[1]

    @contextlib.contextmanager
    def applied(self, view: str) -> Iterator[None]:
        ctx = get_context()
        if ctx is None:
            # Not behind GatewayGuardMiddleware (a view called from a unit test): no policy.
            yield
            return
        with view_policy(self.route(ctx.guard, view)):
            yield

    @property
    def where(self) -> str:
        """``shop/views.py:42``"""
        return f"{self.file}:{self.line}"

    def __repr__(self) -> str:
        return f"<PolicySpec at {self.where} {self.overrides!r}>"


# Weak: a spec lives as long as a view it decorates, so views defined in a test function
# do not outlive it; module-level views live as long as their module.
_registry: weakref.WeakSet[PolicySpec] = weakref.WeakSet()


def registered_policies() -> list[PolicySpec]:
    """Every live ``@gateway_policy(...)``, in source order (for the system checks)."""
    return sorted(_registry, key=lambda spec: (spec.file, spec.line))


def gateway_policy(**overrides: Any) -> Callable[[V], V]:
    """Per-view policy overrides, keyed as in a ``[[routes]]`` entry.

    ``retry``, ``deadline``, ``connect_timeout``, ``read_timeout``,
    ``raise_on_failure_status`` and ``depends_on``. The view's upstream policies replace
    the matched route's while it runs, its deadline can only shorten the request's, and
    while an upstream in ``depends_on`` has its breaker open the view is not run: the
    answer is a branded 503. Works on sync and async views::

        @gateway_policy(retry={"attempts": 1}, depends_on=["payments"])
        def checkout(request): ...

    For class-based views: ``@method_decorator(gateway_policy(...), name="dispatch")``.
    """
    caller = sys._getframe(1)
    spec = PolicySpec(overrides, _source_file(caller.f_code.co_filename), caller.f_lineno)
    _registry.add(spec)

    def decorate(view: V) -> V:
        name = _view_name(view)
        spec.views.add(name)
        if iscoroutinefunction(view):

            @functools.wraps(view)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                with spec.applied(name):
                    return await view(*args, **kwargs)

            return cast(V, async_wrapper)

        @functools.wraps(view)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with spec.applied(name):
                return view(*args, **kwargs)

        return cast(V, wrapper)

    return decorate


def _view_name(view: Callable[..., Any]) -> str:
    # The route name in logs: module.qualname, like Django's own view references
    # ("shop.views.checkout"), keeping the most telling end when it is too long.
    module = getattr(view, "__module__", None) or "?"
    qualname = getattr(view, "__qualname__", None) or type(view).__qualname__
    return f"{module}.{qualname}"[-_MAX_NAME:]


def _source_file(path: str) -> str:
    # Relative to the project (the working directory) when inside it: "shop/views.py".
    with contextlib.suppress(ValueError):  # another drive (Windows)
        relative = os.path.relpath(path)
        if not relative.startswith(".."):
            return relative
    return path
