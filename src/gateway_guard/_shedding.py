"""Inbound load shedding: the app-wide limiter plus optional per-route ones.

Every inbound request that is not exempt takes a slot here before the app sees it; when
the app is saturated, requests queue by priority for a bounded time and are then shed
with a 503 (see :class:`~gateway_guard._concurrency.ConcurrencyLimiter`).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from typing import TypeAlias

from ._concurrency import ConcurrencyLimiter
from ._schema import Priority
from .policy import ShedPolicy

__all__ = ["InboundShedding", "RouteKey", "shedder"]

#: How a route is named in :class:`InboundShedding`: its index or name in the settings.
RouteKey: TypeAlias = int | str


def shedder(
    name: str, policy: ShedPolicy, *, clock: Callable[[], float] = time.monotonic
) -> ConcurrencyLimiter:
    """The inbound limiter for the ``[shed]`` settings (app-wide or a route's override)."""
    return ConcurrencyLimiter(
        name, policy.max_concurrent, policy.max_queue, policy.queue_timeout, clock=clock
    )


class InboundShedding:
    """The app-wide inbound limiter plus optional per-route ones.

    ``routes`` maps a route's key (its index or name in the settings, see
    :data:`RouteKey`) to its limiter. It is built once at startup, so its size is fixed by
    the settings; raw request paths never become keys. A route without its own limiter
    (or ``route_key=None`` when no route matched) is limited by the app's alone. Exempt
    paths are the caller's business: it simply does not call :meth:`admit`.

    A request takes its route's slot first, then the app's: while it waits for the
    route's, it holds nothing the rest of the app needs. A request admitted by
    :meth:`admit` / :meth:`admit_async` must be released with :meth:`release` and the
    same key. The two waits add up: the worst case is the route's ``queue_timeout``
    plus the app's.
    """

    __slots__ = ("app", "routes")

    def __init__(
        self,
        app: ConcurrencyLimiter,
        routes: Mapping[RouteKey, ConcurrencyLimiter] | None = None,
    ) -> None:
        self.app = app
        # Unlimited route limiters are dropped so such routes skip a call on every request.
        self.routes: dict[RouteKey, ConcurrencyLimiter] = {
            key: limiter for key, limiter in (routes or {}).items() if not limiter.unlimited
        }

    @classmethod
    def from_policies(
        cls,
        app: ShedPolicy,
        routes: Mapping[RouteKey, ShedPolicy | None] | None = None,
        *,
        name: str = "inbound",
        clock: Callable[[], float] = time.monotonic,
    ) -> InboundShedding:
        """Build the limiters: ``name`` for the app, ``name[key]`` for each route.

        ``routes`` maps each route's key to its effective shed policy, ``None`` (or a
        disabled policy) for routes without their own limit.
        """
        return cls(
            shedder(name, app, clock=clock),
            {
                key: shedder(f"{name}[{key}]", policy, clock=clock)
                for key, policy in (routes or {}).items()
                if policy is not None and policy.enabled
            },
        )

    def admit(self, route_key: RouteKey | None, priority: Priority = "normal") -> None:
        """Take the route's slot (if it has a limiter), then the app's. Raises LoadShedError."""
        route = self.routes.get(route_key) if route_key is not None else None
        if route is None:
            self.app.acquire(priority)
            return
        route.acquire(priority)
        try:
            self.app.acquire(priority)
        except BaseException:
            route.release()
            raise

    def try_admit(self, route_key: RouteKey | None) -> bool:
        """Admit at once if the route's and the app's limiters both have a free slot.

        False (holding nothing) means the caller must go through :meth:`admit_async` /
        :meth:`admit`, which queue or shed.
        """
        route = self.routes.get(route_key) if route_key is not None else None
        if route is None:
            return self.app.try_acquire()
        if not route.try_acquire():
            return False
        if self.app.try_acquire():
            return True
        route.release()
        return False

    async def admit_async(self, route_key: RouteKey | None, priority: Priority = "normal") -> None:
        """Like :meth:`admit`, suspending instead of blocking while queued."""
        route = self.routes.get(route_key) if route_key is not None else None
        if route is None:
            await self.app.acquire_async(priority)
            return
        await route.acquire_async(priority)
        try:
            await self.app.acquire_async(priority)
        except BaseException:
            route.release()
            raise

    def release(self, route_key: RouteKey | None) -> None:
        """Give back what :meth:`admit` took for ``route_key``."""
        self.app.release()
        if route_key is not None:
            route = self.routes.get(route_key)
            if route is not None:
                route.release()

    @contextmanager
    def admitted(self, route_key: RouteKey | None, priority: Priority = "normal") -> Iterator[None]:
        """``with shedding.admitted(key, priority):`` for callers off the hot path."""
        self.admit(route_key, priority)
        try:
            yield
        finally:
            self.release(route_key)

    @asynccontextmanager
    async def admitted_async(
        self, route_key: RouteKey | None, priority: Priority = "normal"
    ) -> AsyncIterator[None]:
        await self.admit_async(route_key, priority)
        try:
            yield
        finally:
            self.release(route_key)
