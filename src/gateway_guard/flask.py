"""Flask extension: guarded upstream calls and branded gateway error pages for a Flask app.

::

    from flask import Flask
    from gateway_guard.flask import GatewayGuard

    ext = GatewayGuard()                       # module level: the app-factory pattern

    def create_app() -> Flask:
        app = Flask(__name__)
        app.config["GATEWAY_GUARD"] = {"upstreams": {"catalog": {"base_url": "http://cat:80"}}}
        ext.init_app(app)
        return app

    @bp.get("/items")
    @ext.policy(retry={"attempts": 1})
    def items() -> Any:
        with ext.guard.client("catalog") as catalog:
            return catalog.get("/items").json()

``init_app`` does three things, and nothing else:

1. wraps ``app.wsgi_app`` in :class:`~gateway_guard.GatewayGuardWSGI`, so every response
   carries ``X-Request-ID``, inbound load shedding applies, the request context is set
   (``gateway_guard.current_guard()``, deadlines, request id propagation) and gateway
   errors that escape Flask still become error pages;
2. registers Flask error handlers for :class:`~gateway_guard.UpstreamError`,
   ``httpx.TransportError`` and ``httpx.DecodingError``: a view that lets one escape
   answers with the branded page, or with the app's own handler for it as an HTTP error
   (``@app.errorhandler(502)``, ``errorhandler(HTTPException)``...) when Flask finds one;
3. stores the app's :class:`Guard` in ``app.extensions["gateway_guard"]`` (never the app
   on the extension: one extension object serves any number of apps).

Flask is imported only here (the core is framework-free); install it with
``pip install 'gateway-guard[flask]'``.
"""

from __future__ import annotations

import functools
import inspect
import os
import weakref
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, Final, ParamSpec, TypeVar, cast

try:
    from flask import Flask, current_app, has_app_context, has_request_context, request
    from flask.typing import ResponseReturnValue
    from werkzeug.datastructures import Headers
    from werkzeug.exceptions import (
        BadGateway,
        GatewayTimeout,
        HTTPException,
        InternalServerError,
        ServiceUnavailable,
    )
    from werkzeug.wrappers import Response
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "gateway_guard.flask needs Flask: pip install 'gateway-guard[flask]'"
    ) from exc

from .context import RequestContext, current_context
from .errors import SettingsError, SettingsProblem, UpstreamError
from .guard import Guard
from .headers import format_retry_after
from .inbound import (
    GATEWAY_EXCEPTIONS,
    Wants,
    as_upstream_error,
    handler_headers,
    respond,
    start,
    view_policy,
)
from .render import RenderedError
from .routing import Route
from .settings import Settings, SettingsSource
from .wsgi import GatewayGuardWSGI

__all__ = [
    "EXTENSION_KEY",
    "ConfigKey",
    "GatewayGuard",
    "GatewayGuardState",
    "UpstreamBadGateway",
    "UpstreamGatewayTimeout",
    "UpstreamHTTPError",
    "UpstreamInternalServerError",
    "UpstreamServiceUnavailable",
    "get_guard",
]

P = ParamSpec("P")
R = TypeVar("R")

#: The key of the per-app state in ``app.extensions``.
EXTENSION_KEY: Final = "gateway_guard"

# Compiled per-view policies kept per app. Keys are (decorated view, endpoint): both come
# from code, not from requests, so this bound is only a guard against views decorated in
# a loop at runtime.
_MAX_VIEW_POLICIES: Final = 1024

# The attribute ``@ext.policy`` sets on the view it returns, so ``init_app`` and
# ``validate_policies`` can find decorated views among ``app.view_functions`` (and
# ``functools.wraps`` in decorators stacked above ours carries it along).
_POLICY_ATTR: Final = "__gateway_guard_policy__"


class ConfigKey:
    """The ``app.config`` keys the extension reads."""

    #: The settings: a mapping, a ``.toml``/``.json`` path, or a :class:`gateway_guard.Settings`.
    SETTINGS: Final = "GATEWAY_GUARD"


# --- the HTTP exceptions a user's error handler receives -----------------------------------


class UpstreamHTTPError(HTTPException):
    """What an ``@app.errorhandler(502)`` (503, 504, 500) handler receives for a gateway error.

    ``error`` is the original :class:`~gateway_guard.UpstreamError` (its ``status``,
    ``proxy_error``, ``upstream``, ``retry_after``...). ``description`` is werkzeug's generic
    text for the status: never upstream details. ``get_response()`` (or returning the
    exception from the handler) gives the branded page, so a handler may only log::

        @app.errorhandler(503)
        def unavailable(e: HTTPException) -> ResponseReturnValue:
            if isinstance(e, UpstreamHTTPError):
                metrics.incr("upstream_down", tags=[e.error.upstream])
                return e                      # the branded page, headers included
            return render_template("maintenance.html"), 503

    Flask itself chooses the handler (``app.handle_http_exception``), as for any HTTP
    error: by status (``errorhandler(502)``) before by class (this class, a per-status
    subclass, ``BadGateway``, ``HTTPException``...), on blueprints before the app. A
    handler's response gets the page's ``Proxy-Status`` (and on a 5xx its
    ``Retry-After``) unless it set its own.
    """

    error: UpstreamError

    def __init__(self, error: UpstreamError, response: Response | None = None) -> None:
        super().__init__(None, response)
        self.error = error

    @classmethod
    def for_error(
        cls, error: UpstreamError, *, status: int | None = None, response: Response | None = None
    ) -> UpstreamHTTPError:
        """The exception for ``error`` answered with ``status`` (default ``error.status``).

        >>> from gateway_guard import CircuitOpenError
        >>> e = UpstreamHTTPError.for_error(CircuitOpenError("open", retry_after=3))
        >>> type(e).__name__, e.code, e.retry_after
        ('UpstreamServiceUnavailable', 503, 3)
        """
        code = error.status if status is None else status
        special = _BY_STATUS.get(code)
        if special is not None:
            return special(error, response)
        exc = UpstreamHTTPError(error, response)
        exc.code = code
        return exc


class UpstreamInternalServerError(UpstreamHTTPError, InternalServerError):
    """A 500 gateway error (``proxy_configuration_error``); see :class:`UpstreamHTTPError`."""

    code = 500


class UpstreamBadGateway(UpstreamHTTPError, BadGateway):
    """A 502 gateway error; see :class:`UpstreamHTTPError`."""

    code = 502


class UpstreamServiceUnavailable(UpstreamHTTPError, ServiceUnavailable):
    """A 503 gateway error (breaker open, shed); ``retry_after`` in whole seconds."""

    code = 503

    def __init__(self, error: UpstreamError, response: Response | None = None) -> None:
        super().__init__(error, response)
        if error.retry_after is not None:
            # The whole seconds our pages' Retry-After gives for this wait.
            self.retry_after = int(format_retry_after(error.retry_after))


class UpstreamGatewayTimeout(UpstreamHTTPError, GatewayTimeout):
    """A 504 gateway error; see :class:`UpstreamHTTPError`."""

    code = 504


_BY_STATUS: Final[dict[int, type[UpstreamHTTPError]]] = {
    500: UpstreamInternalServerError,
    502: UpstreamBadGateway,
    503: UpstreamServiceUnavailable,
    504: UpstreamGatewayTimeout,
}


# --- per-app state --------------------------------------------------------------------------


class _PolicySpec:
    """The overrides of one ``@ext.policy``, identified by the object itself."""

    __slots__ = ("name", "overrides")

    def __init__(self, name: str, overrides: dict[str, Any]) -> None:
        self.name = name
        self.overrides = overrides


class GatewayGuardState:
    """What the extension keeps per app, in ``app.extensions["gateway_guard"]``.

    ``guard`` is the app's :class:`~gateway_guard.Guard`; compiled per-view policies are
    cached here too, so each app compiles its own against its own settings.
    """

    __slots__ = ("__weakref__", "_policies", "guard")

    def __init__(self, guard: Guard) -> None:
        self.guard = guard
        self._policies: dict[tuple[_PolicySpec, str], Route] = {}

    def __repr__(self) -> str:
        return f"<GatewayGuardState {self.guard!r}>"

    def view_route(self, spec: _PolicySpec, endpoint: str) -> Route:
        key = (spec, endpoint)
        route = self._policies.get(key)
        if route is None:
            # Two threads may compile the same policy at once: the results are equal and
            # either may win, so no lock is needed.
            route = self.guard.view_policy(endpoint, **spec.overrides)
            if len(self._policies) >= _MAX_VIEW_POLICIES:
                self._policies.clear()
            self._policies[key] = route
        return route


def _state(app: Flask) -> GatewayGuardState:
    state = app.extensions.get(EXTENSION_KEY)
    if not isinstance(state, GatewayGuardState):
        raise RuntimeError(
            f"gateway_guard is not set up on Flask app {app.name!r}: call "
            "GatewayGuard(app) or ext.init_app(app) first"
        )
    return state


def get_guard(app: Flask | None = None) -> Guard:
    """The :class:`~gateway_guard.Guard` of ``app`` (default: ``flask.current_app``).

    >>> guard = get_guard(app)                       # doctest: +SKIP
    >>> catalog = guard.client("catalog")            # doctest: +SKIP
    """
    if app is None:
        if not has_app_context():
            raise RuntimeError(
                "gateway_guard.flask.get_guard() without an app needs an app context "
                "(inside a request, or `with app.app_context():`); or pass the app"
            )
        app = current_app
    return _state(app).guard


# --- the extension ----------------------------------------------------------------------------


class GatewayGuard:
    """The Flask extension. ``GatewayGuard(app)``, or ``ext = GatewayGuard()`` then
    ``ext.init_app(app)`` in an app factory; one extension may serve many apps, each with
    its own :class:`~gateway_guard.Guard`.

    Settings, first found wins: ``init_app(guard=...)`` / ``init_app(settings=...)``, then
    the same arguments given to the constructor, then ``app.config["GATEWAY_GUARD"]`` (a
    mapping, a ``.toml``/``.json`` path, or a :class:`~gateway_guard.Settings`), then the
    environment (``GATEWAY_GUARD_SETTINGS``). ``settings=`` builds a new Guard for each app;
    ``guard=`` shares the given one between every app it is used for.

    >>> app = Flask("shop")
    >>> app.config["GATEWAY_GUARD"] = {"service": "shop", "upstreams": {"catalog": {}}}
    >>> ext = GatewayGuard(app)
    >>> with app.app_context():
    ...     ext.guard.settings.service
    'shop'
    """

    def __init__(
        self,
        app: Flask | None = None,
        *,
        settings: SettingsSource = None,
        guard: Guard | None = None,
    ) -> None:
        _exclusive(settings, guard, "GatewayGuard()")
        self._settings = settings
        self._guard = guard
        # The states of the apps set up through this extension, held weakly: the app owns
        # its state (app.extensions), and the extension must not keep apps alive.
        self._states: weakref.WeakSet[GatewayGuardState] = weakref.WeakSet()
        if app is not None:
            self.init_app(app)

    def init_app(
        self, app: Flask, *, settings: SettingsSource = None, guard: Guard | None = None
    ) -> None:
        """Set the extension up on ``app`` (see the class docstring for the settings order).

        Raises :class:`~gateway_guard.SettingsError` for invalid settings (or an invalid
        ``@ext.policy`` on a view already registered), ``TypeError`` when both ``settings``
        and ``guard`` are given, and ``RuntimeError`` when ``app`` is already set up.
        """
        _exclusive(settings, guard, "init_app()")
        if EXTENSION_KEY in app.extensions:
            raise RuntimeError(f"gateway_guard is already set up on Flask app {app.name!r}")
        guard = self._make_guard(app, settings, guard)
        state = GatewayGuardState(guard)
        # Views registered before init_app are checked now, so a bad per-view policy fails
        # at startup; views added later are checked on their first request (or by
        # validate_policies() at the end of the app factory).
        _validate(app, state)
        app.wsgi_app = GatewayGuardWSGI(  # type: ignore[method-assign]
            app.wsgi_app, guard=guard
        )
        # A handler the user registered for these classes already is theirs: keep it.
        app_handlers = app.error_handler_spec[None][None]
        # Exception too: optional clients' failures (requests, aiohttp) are known by name
        # only; the handler re-raises whatever is not a gateway error.
        for exc_class in (*GATEWAY_EXCEPTIONS, Exception):
            if exc_class not in app_handlers:
                app.register_error_handler(exc_class, _handle_gateway_error)
        app.extensions[EXTENSION_KEY] = state
        self._states.add(state)

    def _make_guard(self, app: Flask, settings: SettingsSource, guard: Guard | None) -> Guard:
        if guard is not None:
            return guard
        if settings is not None:
            return Guard(settings)
        if self._guard is not None:
            return self._guard
        if self._settings is not None:
            return Guard(self._settings)
        source = app.config.get(ConfigKey.SETTINGS)
        if source is not None and not isinstance(source, Mapping | str | os.PathLike | Settings):
            raise SettingsError(
                f'app.config["{ConfigKey.SETTINGS}"]: must be a mapping, a .toml/.json path '
                f"or a gateway_guard.Settings, got {type(source).__name__}"
            )
        return Guard(cast(SettingsSource, source))

    @property
    def guard(self) -> Guard:
        """The current app's :class:`~gateway_guard.Guard`.

        Inside an app context (a request, a CLI command, ``with app.app_context():``) that
        is ``current_app``'s. Outside one, the Guard of the only app this extension serves;
        with several live apps that is ambiguous and raises ``RuntimeError``.
        """
        if has_app_context():
            return _state(current_app).guard
        states = list(self._states)
        if len(states) == 1:
            return states[0].guard
        if not states:
            raise RuntimeError(
                "this GatewayGuard is not set up on any Flask app yet: call ext.init_app(app)"
            )
        raise RuntimeError(
            f"this GatewayGuard serves {len(states)} Flask apps, so ext.guard outside an app "
            "context is ambiguous: use it inside one (`with app.app_context():`) or call "
            "gateway_guard.flask.get_guard(app)"
        )

    def policy(self, **overrides: Any) -> Callable[[Callable[P, R]], Callable[P, R]]:
        """A per-view policy: the keys of a ``[[routes]]`` entry that apply to calls
        (``retry``, ``deadline``, ``connect_timeout``, ``read_timeout``,
        ``raise_on_failure_status``, ``depends_on``).

        The policy is compiled for each app on the view's first request (then cached) and
        applies to the guarded calls the view makes while it runs. A dependency whose
        breaker is open answers 503 without running the view. Works on ``def`` and
        ``async def`` views; put it below ``@app.route``::

            @app.post("/checkout")
            @ext.policy(retry={"attempts": 1}, deadline=5, depends_on=["payments"])
            def checkout() -> ResponseReturnValue: ...

        An invalid override raises :class:`~gateway_guard.SettingsError` naming
        ``view <endpoint>.<key>``: from ``init_app`` for views already registered, from
        :meth:`validate_policies`, or else on the view's first request.
        """
        frozen = dict(overrides)

        def decorate(view: Callable[P, R]) -> Callable[P, R]:
            spec = _PolicySpec(getattr(view, "__name__", repr(view)), frozen)
            wrapper: Callable[P, R]
            if inspect.iscoroutinefunction(view):
                wrapper = cast(Callable[P, R], _async_view(spec, cast(Any, view)))
            else:
                wrapper = _sync_view(spec, view)
            setattr(wrapper, _POLICY_ATTR, spec)
            return wrapper

        return decorate

    def validate_policies(self, app: Flask | None = None) -> int:
        """Compile the ``@ext.policy`` of every view registered on ``app`` (default: the
        current app) now; returns how many. Call it at the end of an app factory that
        registers blueprints after ``init_app``, so a bad policy fails at startup.

        Raises :class:`~gateway_guard.SettingsError` listing every problem found.
        """
        if app is None:
            if not has_app_context():
                raise RuntimeError("validate_policies() needs an app or an app context")
            app = current_app
        return _validate(app, _state(app))


def _exclusive(settings: SettingsSource, guard: Guard | None, where: str) -> None:
    if settings is not None and guard is not None:
        raise TypeError(f"give {where} either guard= or settings=, not both")


def _validate(app: Flask, state: GatewayGuardState) -> int:
    problems: list[SettingsProblem] = []
    count = 0
    for endpoint, view in app.view_functions.items():
        spec = getattr(view, _POLICY_ATTR, None)
        if not isinstance(spec, _PolicySpec):
            continue
        try:
            state.view_route(spec, endpoint)
        except SettingsError as exc:
            problems.extend(exc.problems)
        count += 1
    if problems:
        raise SettingsError(problems)
    return count


# --- per-view policies at request time ----------------------------------------------------


def _view_route(spec: _PolicySpec) -> Route | None:
    if not has_app_context():
        return None  # the view called as a plain function (a unit test): no policy
    state = _state(current_app)
    endpoint = request.endpoint if has_request_context() else None
    return state.view_route(spec, endpoint or spec.name)


def _sync_view(spec: _PolicySpec, view: Callable[P, R]) -> Callable[P, R]:
    @functools.wraps(view)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        route = _view_route(spec)
        if route is None:
            return view(*args, **kwargs)
        with view_policy(route):
            return view(*args, **kwargs)

    return wrapper


def _async_view(
    spec: _PolicySpec, view: Callable[P, Coroutine[Any, Any, R]]
) -> Callable[P, Coroutine[Any, Any, R]]:
    # Flask runs async views through asgiref's async_to_sync, which copies the context
    # into the coroutine: the request context (ours and Flask's) is visible here.
    @functools.wraps(view)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        route = _view_route(spec)
        if route is None:
            return await view(*args, **kwargs)
        with view_policy(route):
            return await view(*args, **kwargs)

    return wrapper


# --- gateway errors raised in views ---------------------------------------------------------


def _handle_gateway_error(exc: Exception) -> ResponseReturnValue:
    """Flask error handler for UpstreamError, httpx.TransportError and DecodingError.

    The page is the core's; which of the app's own handlers answers instead is Flask's
    choice: the error goes on as the ``UpstreamHTTPError`` for its status, through
    ``app.handle_http_exception``, exactly as a werkzeug ``BadGateway`` would.
    """
    if isinstance(exc, HTTPException):
        # Found as the handler for Exception: what Flask does with no handler at all.
        return exc
    error = as_upstream_error(exc)
    if error is None:  # not ours (the handler for Exception): Flask's own 500, as before
        raise exc
    app = current_app
    ctx = current_context()
    # Behind GatewayGuardWSGI (always, unless app.wsgi_app was replaced or a test calls
    # full_dispatch_request() directly) the wrapper gives every response its request id.
    wrapped = ctx is not None
    if ctx is None:
        ctx = _context_without_wrapper(_state(app).guard)
    rendered = respond(ctx, error, Wants.from_environ(request.environ), request.method)
    branded = _response(app, rendered, keep_request_id=not wrapped)
    http_error = UpstreamHTTPError.for_error(error, status=rendered.status, response=branded)
    http_error.__cause__ = error
    answer = app.handle_http_exception(http_error)
    if answer is http_error:
        return branded  # no handler of the app's, or one that only looked at it
    response = app.make_response(answer)
    headers = response.headers
    for name, value in handler_headers(rendered, response.status_code, headers, Headers.get):
        headers[name] = value
    return response


def _context_without_wrapper(guard: Guard) -> RequestContext:
    return start(
        guard,
        request.method,
        request.path,
        request.headers.get("X-Request-ID"),
        request.headers.get("traceparent"),
    )


def _response(app: Flask, rendered: RenderedError, *, keep_request_id: bool) -> Response:
    response = app.response_class(status=rendered.status)
    response.set_data(rendered.body)
    # The rendered headers replace werkzeug's defaults as they are: Content-Length is the
    # GET body's length even for HEAD (whose body is empty), as RFC 9110 §8.6 allows.
    response.headers = Headers(
        [(k, v) for k, v in rendered.headers if keep_request_id or k != "x-request-id"]
    )
    return response
