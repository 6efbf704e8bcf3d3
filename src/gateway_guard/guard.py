"""Guard: the runtime that owns upstream policies, breakers, limiters and the route table."""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from types import ModuleType
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

import httpx

from ._bulkhead import Limiter, TokenLimiter, bulkhead
from ._hosts import HostMap
from ._recent import RecentErrors
from ._shedding import InboundShedding
from .breaker import BreakerState, CircuitBreaker, Transition
from .errors import UpstreamError
from .events import BreakerTransitioned, Event, Hooks
from .inbound._endpoints import Endpoints
from .policy import CallPolicy, Policies, compile_policies, compile_view_policy
from .render import ErrorRenderer
from .retry import RetryBudget
from .routing import Route
from .settings import Settings, SettingsSource, load_settings
from .transport import AsyncGuardedClient, AsyncGuardedTransport, GuardedClient, GuardedTransport

if TYPE_CHECKING:
    from ._aiohttp import ClientSession, GuardedMiddleware
    from ._fleet import FleetStore
    from ._requests import GuardedAdapter, GuardedSession

__all__ = ["Guard"]

logger = logging.getLogger("gateway_guard")

# httpx.Client arguments that configure the connection, i.e. the transport.
_TRANSPORT_OPTIONS = (
    "verify",
    "cert",
    "trust_env",
    "http1",
    "http2",
    "limits",
    "proxy",
    "mounts_proxy",
)

P = ParamSpec("P")
R = TypeVar("R")
E = TypeVar("E", bound=Event)


class UpstreamRuntime:
    """The shared state of one upstream: every client and transport of it uses this."""

    __slots__ = (
        "breaker",
        "budget",
        "bulkhead",
        "clock",
        "fail_fast",
        "hooks",
        "name",
        "policy",
        "start_traces",
    )

    def __init__(self, policy: CallPolicy, clock: Callable[[], float] = time.monotonic) -> None:
        self.name = policy.upstream
        self.policy = policy
        # Deadlines, breakers, budgets and bulkheads all read this one clock, so tests can
        # drive them together with a fake one: Guard(settings, clock=fake).
        self.clock = clock
        self.breaker = CircuitBreaker(policy.upstream, policy.breaker, clock=clock)
        self.bulkhead: Limiter = bulkhead(policy.upstream, policy.bulkhead, clock=clock)
        # The same bulkhead when it is fail-fast (the default): transports drive it inline.
        self.fail_fast = self.bulkhead if isinstance(self.bulkhead, TokenLimiter) else None
        self.budget = RetryBudget.from_policy(policy.retry, clock=clock)
        self.breaker.add_listener(_log_state_change)
        # The Guard's hooks while any callback is registered, else None: the call core
        # tests this one attribute and builds no event when nothing listens.
        self.hooks: Hooks | None = None
        # tracing.start_traces, set by the Guard: read only for a request without a trace.
        self.start_traces = False


def _driver(module: str, extra: str) -> ModuleType:
    """The driver module of an optional client library, imported on first use (so that
    ``import gateway_guard`` never imports requests or aiohttp)."""
    try:
        return importlib.import_module(f"gateway_guard.{module}")
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.startswith("gateway_guard"):
            raise
        raise ModuleNotFoundError(
            f"{exc.name} is not installed: pip install 'gateway-guard[{extra}]'", name=exc.name
        ) from exc


def _log_state_change(breaker: CircuitBreaker, old: BreakerState, new: BreakerState) -> None:
    # One line per transition, never per rejected call: an outage must not flood logs.
    level = (
        logging.WARNING if new in (BreakerState.OPEN, BreakerState.FORCED_OPEN) else logging.INFO
    )
    logger.log(
        level,
        "circuit breaker for upstream %s: %s -> %s",
        breaker.name,
        old.value,
        new.value,
        extra={"upstream": breaker.name, "breaker_from": old.value, "breaker_to": new.value},
    )


class Guard:
    """Load, validate and compile settings once; serve guarded clients and decisions.

    ``settings`` is a mapping, a ``.toml``/``.json`` path, a :class:`Settings`, or ``None``
    to read ``GATEWAY_GUARD_SETTINGS`` and ``GATEWAY_GUARD__*`` from the environment.
    Raises :class:`gateway_guard.SettingsError` naming every bad key.

    Breakers, retry budgets and bulkheads belong to the Guard, so every client and
    transport of the same upstream shares them::

        guard = Guard("gateway_guard.toml")
        with guard.client("payments") as payments:
            payments.post("/charges", json=charge, headers={"Idempotency-Key": key})
    """

    def __init__(
        self, settings: SettingsSource = None, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        # ``clock`` (monotonic seconds) drives deadlines, breakers, budgets and limiters;
        # tests pass a fake one. RequestContext.deadline_at is on this clock too.
        self.settings: Settings = load_settings(settings)
        # Read on every inbound request: a plain attribute, as a pydantic model's attribute
        # read costs ~420 instructions (its __getattr__ keeps CPython 3.11 from
        # specialising it; bench/middleware.py's child under valgrind, 2026-12-08).
        self.debug: bool = self.settings.debug
        self.policies: Policies = compile_policies(self.settings)
        self.clock = clock
        self._ssl: ssl.SSLContext | None = None
        self._upstreams = {
            name: UpstreamRuntime(policy, clock) for name, policy in self.policies.calls.items()
        }
        # Built now, not on the first error: a broken template shows up at startup
        # (renderer.template_problems) and the first outage pays no compile cost.
        self.renderer = ErrorRenderer(self.settings)
        # Which upstream a URL belongs to, for instrumentation and error logs.
        self.hosts = HostMap(
            {name: (up.base_url, up.match) for name, up in self.settings.upstreams.items()}
        )
        # What the status page remembers, and the paths the middleware answers itself
        # ([status], [health], [metrics]); None when unset: a request only compares with None.
        self.recent_errors = RecentErrors() if self.settings.status.path else None
        self.endpoints = Endpoints.for_guard(self)
        self.shedding = InboundShedding.from_policies(
            self.policies.shed,
            {route.index: route.shed for route in self.policies.routes.routes},
            clock=clock,
        )
        self._store: FleetStore | None = None
        if self.settings.state.backend == "redis":
            self._store = self._fleet_store()
        #: The event hooks (:meth:`on`). ``emitter`` is the same object while any callback
        #: is registered, else None: the inbound core tests it before building an event.
        self.hooks = Hooks(on_change=self._hooks_changed)
        self.emitter: Hooks | None = None
        for rt in self._upstreams.values():
            rt.start_traces = self.settings.tracing.start_traces
        for rt in self._upstreams.values():
            rt.breaker.subscribe(self._transitioned)
        self._integrations()

    def _fleet_store(self) -> FleetStore:
        # Imported here, only for the Redis backend: importing gateway_guard never imports
        # redis-py (an extra; the settings check named it at startup if it is missing).
        from ._fleet import FleetStore, FleetUpstream  # noqa: PLC0415 - see above

        store = FleetStore(
            self.settings.state,
            self.settings.service,
            [
                FleetUpstream(
                    rt.name,
                    rt.breaker,
                    rt.budget,
                    probe_timeout=rt.policy.deadline,
                    bulkhead=rt.bulkhead,
                )
                for rt in self._upstreams.values()
            ],
            recent=self.recent_errors,
        )
        # Connecting happens on the store's thread: Redis being down or slow never delays
        # startup, and never a request (the breakers count locally meanwhile).
        store.start()
        return store

    def close(self) -> None:
        """Stop sharing state with the fleet (``[state] backend = "redis"``): the store's
        threads and connections end, and the breakers and budgets are per process again.
        Nothing to do for the local backend. Clients made by the Guard are the caller's."""
        store, self._store = self._store, None
        if store is not None:
            store.close()

    def __repr__(self) -> str:
        return f"<Guard service={self.settings.service!r} upstreams={sorted(self._upstreams)}>"

    # --- events ------------------------------------------------------------------------

    def on(self, event: type[E], callback: Callable[[E], object]) -> Callable[[], None]:
        """Call ``callback(event)`` for every event of class ``event`` (a class from
        :mod:`gateway_guard.events`; :class:`~gateway_guard.events.Event` hears them all).

        Returns a function that unsubscribes it. Callbacks run synchronously where the
        decision is made and must be quick; one that raises never breaks a call (its
        first failure is logged). See docs/observability.md::

            stop = guard.on(gg.events.CallEnded, lambda e: print(e.upstream, e.outcome))
        """
        return self.hooks.on(event, callback)

    def _hooks_changed(self, active: bool) -> None:
        hooks = self.hooks if active else None
        self.emitter = hooks
        for rt in self._upstreams.values():
            rt.hooks = hooks

    def _transitioned(self, transition: Transition) -> None:
        hooks = self.emitter
        if hooks is not None:
            hooks.emit(
                BreakerTransitioned(
                    transition.upstream,
                    transition.old.value,
                    transition.new.value,
                    transition.reason,
                    transition.at,
                )
            )

    def _integrations(self) -> None:
        """Attach the optional integrations the settings turn on (metrics, tracing).

        Imported only here, when on: ``import gateway_guard`` never imports
        prometheus_client or OpenTelemetry. A missing extra fails at startup, naming it.
        """
        #: Paths the middleware answers itself (exact match) -> the answer for a method.
        metrics = self.settings.metrics
        if metrics.enabled or metrics.path is not None:
            module = importlib.import_module("gateway_guard.metrics")
            module.attach(self)
            if self.endpoints is not None and metrics.path is not None:
                self.endpoints.serve_metrics = module.endpoint
        if self.settings.tracing.enabled:
            importlib.import_module("gateway_guard.tracing").attach(self)

    # --- lookups -----------------------------------------------------------------------

    def runtime(self, upstream: str) -> UpstreamRuntime:
        try:
            return self._upstreams[upstream]
        except KeyError:
            known = ", ".join(sorted(self._upstreams)) or "none configured"
            raise KeyError(
                f"unknown upstream {upstream!r} (upstreams: {known}); add it under "
                f"[upstreams.{upstream}] in the settings"
            ) from None

    def policy(self, upstream: str) -> CallPolicy:
        """The effective policy of ``upstream`` outside any route."""
        return self.runtime(upstream).policy

    def breaker(self, upstream: str) -> CircuitBreaker:
        """The circuit breaker of ``upstream`` (``.state``, ``force_open()``, ``reset()``...)."""
        return self.runtime(upstream).breaker

    def bulkhead(self, upstream: str) -> Limiter:
        """The outbound concurrency limiter of ``upstream``."""
        return self.runtime(upstream).bulkhead

    def view_policy(self, view: str, **overrides: Any) -> Route:
        """Compile a per-view policy (keys as in a ``[[routes]]`` entry: ``retry``,
        ``deadline``, timeouts, ``raise_on_failure_status``, ``depends_on``).

        Framework adapters call this once per decorated view and apply the result with
        :func:`gateway_guard.inbound.view_policy` while the view runs.
        """
        return compile_view_policy(self.policies, view, overrides)

    @property
    def upstreams(self) -> tuple[str, ...]:
        return tuple(self._upstreams)

    def upstream_for_url(self, url: str) -> str | None:
        """The upstream an absolute URL belongs to (its ``base_url`` host and port, or one
        of its ``match`` patterns), or None: ``"http://payments.internal:8080/x"`` gives
        ``"payments"``. Time linear in the host; no regular expression reads the URL."""
        return self.hosts.lookup_url(url)

    # --- httpx ---------------------------------------------------------------------------

    def transport(
        self, upstream: str, inner: httpx.BaseTransport | None = None
    ) -> GuardedTransport:
        """An ``httpx.BaseTransport`` guarding calls to ``upstream`` through ``inner``."""
        return GuardedTransport(self.runtime(upstream), inner or httpx.HTTPTransport())

    def async_transport(
        self, upstream: str, inner: httpx.AsyncBaseTransport | None = None
    ) -> AsyncGuardedTransport:
        """An ``httpx.AsyncBaseTransport`` guarding calls to ``upstream`` through ``inner``."""
        return AsyncGuardedTransport(self.runtime(upstream), inner or httpx.AsyncHTTPTransport())

    def _ssl_context(self) -> ssl.SSLContext:
        # Loading the CA bundle costs ~20 ms; every client of this Guard shares one.
        ctx = self._ssl
        if ctx is None:
            ctx = httpx.create_ssl_context()
            self._ssl = ctx
        return ctx

    def _inner(self, kwargs: dict[str, Any], transport_cls: type[Any]) -> Any:
        """The inner httpx transport, built from the connection options of ``kwargs``.

        httpx ignores ``verify``, ``cert``, ``http2``, ``limits``... when a transport is
        given, and we always give one: so they are moved onto the inner transport here.
        """
        options = {key: kwargs.pop(key) for key in _TRANSPORT_OPTIONS if key in kwargs}
        if "verify" not in options and "cert" not in options:
            options["verify"] = self._ssl_context()
        return transport_cls(**options)

    def _client_kwargs(self, upstream: str, kwargs: dict[str, Any]) -> dict[str, Any]:
        policy = self.policy(upstream)
        if policy.base_url is not None:
            kwargs.setdefault("base_url", policy.base_url)
        # Per-attempt timeouts are set by the transport from the policy; this is only
        # what httpx reports if something reads the client's timeout.
        kwargs.setdefault(
            "timeout", httpx.Timeout(policy.read_timeout, connect=policy.connect_timeout)
        )
        return kwargs

    def client(self, upstream: str, **kwargs: Any) -> httpx.Client:
        """A new guarded ``httpx.Client`` for ``upstream``, owned (and closed) by the caller.

        ``base_url`` comes from the settings; any ``httpx.Client`` argument may be given.
        A ``transport=`` is wrapped, not replaced.
        """
        inner = kwargs.pop("transport", None) or self._inner(kwargs, httpx.HTTPTransport)
        kwargs = self._client_kwargs(upstream, kwargs)
        transport = self.transport(upstream, inner)
        transport.reads_whole_bodies = True
        return GuardedClient(transport=transport, **kwargs)

    def async_client(self, upstream: str, **kwargs: Any) -> httpx.AsyncClient:
        """A new guarded ``httpx.AsyncClient`` for ``upstream``, owned by the caller."""
        inner = kwargs.pop("transport", None) or self._inner(kwargs, httpx.AsyncHTTPTransport)
        kwargs = self._client_kwargs(upstream, kwargs)
        transport = self.async_transport(upstream, inner)
        transport.reads_whole_bodies = True
        return AsyncGuardedClient(transport=transport, **kwargs)

    # --- requests and aiohttp (extras: imported on first use) ---------------------------

    def requests_adapter(self, upstream: str, **kwargs: Any) -> GuardedAdapter:
        """A requests ``HTTPAdapter`` guarding calls to ``upstream``, for
        ``session.mount(prefix, adapter)`` on a session the app already has. ``kwargs``:
        ``pool_connections``, ``pool_maxsize``, ``pool_block``. Needs the ``requests`` extra.
        """
        adapter: GuardedAdapter = _driver("_requests", "requests").GuardedAdapter(
            self.runtime(upstream), **kwargs
        )
        return adapter

    def session(self, upstream: str, **kwargs: Any) -> GuardedSession:
        """A new guarded ``requests.Session`` for ``upstream``, owned (and closed) by the
        caller: relative URLs resolve against the upstream's ``base_url`` (or ``base_url=``),
        and every request it sends is guarded. Other ``kwargs`` set the session's
        attributes (``headers``, ``auth``, ``verify``, ``cert``, ``proxies``, ``params``...).
        Needs the ``requests`` extra.
        """
        driver = _driver("_requests", "requests")
        rt = self.runtime(upstream)
        session: GuardedSession = driver.GuardedSession(kwargs.pop("base_url", rt.policy.base_url))
        headers = kwargs.pop("headers", None)
        if headers:
            session.headers.update(headers)
        for key, value in kwargs.items():
            if key.startswith("_") or not hasattr(session, key):
                session.close()
                raise TypeError(f"session() got an unexpected keyword argument {key!r}")
            setattr(session, key, value)
        adapter = driver.GuardedAdapter(rt)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        return session

    def aiohttp_middleware(self, upstream: str) -> GuardedMiddleware:
        """An aiohttp client middleware guarding calls to ``upstream``, for a session the
        app already has: ``aiohttp.ClientSession(middlewares=(mw,))``. Needs the
        ``aiohttp`` extra (aiohttp 3.12 or later)."""
        middleware: GuardedMiddleware = _driver("_aiohttp", "aiohttp").GuardedMiddleware(
            self.runtime(upstream)
        )
        return middleware

    def aiohttp_session(self, upstream: str, **kwargs: Any) -> ClientSession:
        """A new guarded ``aiohttp.ClientSession`` for ``upstream``, owned (and closed) by
        the caller: ``base_url`` and timeouts from the settings; any ``ClientSession``
        argument may be given (its ``middlewares`` run inside the guard's). Needs the
        ``aiohttp`` extra."""
        session: ClientSession = _driver("_aiohttp", "aiohttp").session(
            self.runtime(upstream), **kwargs
        )
        return session

    # --- any callable ------------------------------------------------------------------

    def protect(
        self,
        upstream: str,
        *,
        failure: type[BaseException] | tuple[type[BaseException], ...] = Exception,
        ignore: type[BaseException] | tuple[type[BaseException], ...] = (),
    ) -> Callable[[Callable[P, R]], Callable[P, R]]:
        """Guard any sync or async callable with ``upstream``'s breaker and bulkhead.

        An exception matching ``failure`` (default: any ``Exception``) counts against the
        breaker; one matching ``ignore`` counts as a success (the upstream answered, the
        answer was "no"). Cancellation, and an :class:`UpstreamError` passing through
        (say from a guarded client called inside), count as neither. The call is not
        retried: only the caller knows whether it is safe to repeat.

        ::

            @guard.protect("search", ignore=(NotFound,))
            async def lookup(q: str) -> list[Hit]: ...
        """
        rt = self.runtime(upstream)

        def decorate(fn: Callable[P, R]) -> Callable[P, R]:
            if inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
                getattr(fn, "__call__", None)  # noqa: B004 - an object with async __call__
            ):
                return _protect_async(rt, fn, failure, ignore)  # type: ignore[arg-type, return-value]
            return _protect_sync(rt, fn, failure, ignore)

        return decorate


def _outcome(
    rt: UpstreamRuntime,
    exc: BaseException,
    probe: int,
    t0: float,
    failure: type[BaseException] | tuple[type[BaseException], ...],
    ignore: type[BaseException] | tuple[type[BaseException], ...],
) -> None:
    duration = time.monotonic() - t0
    if isinstance(exc, ignore):
        rt.breaker.record_success(duration, probe)
    elif isinstance(exc, failure) and not isinstance(exc, UpstreamError):
        rt.breaker.record_failure(duration, probe)
    else:
        rt.breaker.record_ignored(probe)


def _protect_sync(
    rt: UpstreamRuntime,
    fn: Callable[P, R],
    failure: type[BaseException] | tuple[type[BaseException], ...],
    ignore: type[BaseException] | tuple[type[BaseException], ...],
) -> Callable[P, R]:
    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        rt.bulkhead.acquire()
        try:
            probe = rt.breaker.admit()
            t0 = time.monotonic()
            try:
                result = fn(*args, **kwargs)
            except BaseException as exc:
                _outcome(rt, exc, probe, t0, failure, ignore)
                raise
            rt.breaker.record_success(time.monotonic() - t0, probe)
            return result
        finally:
            rt.bulkhead.release()

    return wrapper


def _protect_async(
    rt: UpstreamRuntime,
    fn: Callable[P, Awaitable[R]],
    failure: type[BaseException] | tuple[type[BaseException], ...],
    ignore: type[BaseException] | tuple[type[BaseException], ...],
) -> Callable[P, Awaitable[R]]:
    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        await rt.bulkhead.acquire_async()
        try:
            probe = rt.breaker.admit()
            t0 = time.monotonic()
            try:
                result = await fn(*args, **kwargs)
            except BaseException as exc:
                _outcome(rt, exc, probe, t0, failure, ignore)
                raise
            rt.breaker.record_success(time.monotonic() - t0, probe)
            return result
        finally:
            rt.bulkhead.release()

    return wrapper
