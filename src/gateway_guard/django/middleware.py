"""GatewayGuardMiddleware: the Django driver of the inbound core.

One class for both handlers: Django calls ``__call__`` (WSGI, or sync middleware chains)
or gets a coroutine from it (``__acall__``, ASGI). All decisions are in
:mod:`gateway_guard.inbound`; this module only translates requests and responses.

Django turns exceptions into responses between middleware layers, so a gateway error
reaches us in one of two ways: raised by a view (or its template), through
``process_exception``; raised anywhere else below us (another middleware's ``__call__``
or ``process_view``), as the 500 that Django made of it, which we recognise because
``got_request_exception`` told us which exception it was.
"""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable
from contextvars import Token
from typing import Any, cast

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.core.signals import got_request_exception
from django.http import HttpRequest, HttpResponse
from django.http.response import HttpResponseBase

from gateway_guard.context import RequestContext, get_context, reset_context, set_context
from gateway_guard.errors import LoadShedError, UpstreamError
from gateway_guard.headers import parse_retry_after
from gateway_guard.inbound import (
    as_upstream_error,
    inbound_shed,
    log_gateway_error,
    render_error,
    start,
)
from gateway_guard.render import RenderedError

from .conf import get_guard

__all__ = ["GatewayErrorResponse", "GatewayGuardMiddleware"]

GetResponse = Callable[[HttpRequest], HttpResponseBase]
AsyncGetResponse = Callable[[HttpRequest], Awaitable[HttpResponseBase]]

_BRANDABLE = frozenset({502, 503, 504})
# Where got_request_exception leaves an upstream error for __call__ to find.
_ERROR_ATTR = "_gateway_guard_error"


class GatewayErrorResponse(HttpResponse):
    """A branded gateway error page, as the core rendered it.

    The headers are the renderer's, as they are: for HEAD the body is empty while
    ``Content-Length`` is the length of the GET body (RFC 9110 §9.3.2). Django adds no
    ``Content-Length`` of its own to a response that has one.
    """

    # Set when gateway_guard logged the error: Django's own 5xx log line would repeat it.
    _has_been_logged: bool

    def __init__(self, rendered: RenderedError) -> None:
        super().__init__(rendered.body, status=rendered.status)
        for name, value in rendered.headers:
            self[name] = value


class GatewayGuardMiddleware:
    """Request ids, load shedding and branded gateway error pages for a Django project.

    Put it near the top of ``MIDDLEWARE`` (after ``SecurityMiddleware`` is fine): every
    response passing through it gets an ``X-Request-ID``, and only what is below it is
    shed and has its gateway errors branded. See docs/django.md.
    """

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: GetResponse | AsyncGetResponse) -> None:
        self.get_response = get_response
        self.async_mode = iscoroutinefunction(get_response)
        if self.async_mode:
            markcoroutinefunction(self)
        # Django loads middleware at startup: invalid settings stop the server here rather
        # than turning the first request into a 500.
        get_guard()

    def __call__(self, request: HttpRequest) -> HttpResponseBase | Awaitable[HttpResponseBase]:
        if self.async_mode:
            return self.__acall__(request)
        ctx = _context(request)
        response: HttpResponseBase | None = _refuse(request, ctx)
        if response is None:
            token = set_context(ctx)
            try:
                response = cast(GetResponse, self.get_response)(request)
            finally:
                _leave(ctx, token)
        return _finish(request, ctx, response)

    async def __acall__(self, request: HttpRequest) -> HttpResponseBase:
        ctx = _context(request)
        response: HttpResponseBase | None = await _refuse_async(request, ctx)
        if response is None:
            token = set_context(ctx)
            try:
                response = await cast(AsyncGetResponse, self.get_response)(request)
            finally:
                _leave(ctx, token)
        return _finish(request, ctx, response)

    def process_exception(
        self, request: HttpRequest, exception: Exception
    ) -> GatewayErrorResponse | None:
        error = as_upstream_error(exception)
        ctx = get_context()
        if error is None or ctx is None:
            return None  # not ours: Django (or a middleware below) answers it
        return _error(request, ctx, error)


# --- the steps both modes share -------------------------------------------------------------


def _context(request: HttpRequest) -> RequestContext:
    meta = request.META
    return start(
        get_guard(),
        request.method or "GET",
        request.path_info,
        meta.get("HTTP_X_REQUEST_ID"),
        meta.get("HTTP_TRACEPARENT"),
    )


def _refuse(request: HttpRequest, ctx: RequestContext) -> GatewayErrorResponse | None:
    """A 503 when a dependency is down or the app is full; None once admitted."""
    if ctx.blocked is not None:
        return _error(request, ctx, ctx.blocked)
    if not ctx.exempt:
        try:
            ctx.guard.shedding.admit(ctx.route_key, ctx.priority)
        except LoadShedError as exc:
            return _error(request, ctx, inbound_shed(exc))
    return None


async def _refuse_async(request: HttpRequest, ctx: RequestContext) -> GatewayErrorResponse | None:
    if ctx.blocked is not None:
        return _error(request, ctx, ctx.blocked)
    shedding = ctx.guard.shedding
    # The common case takes a free slot without suspending.
    if ctx.exempt or shedding.try_admit(ctx.route_key):
        return None
    try:
        await shedding.admit_async(ctx.route_key, ctx.priority)
    except LoadShedError as exc:
        return _error(request, ctx, inbound_shed(exc))
    return None


def _leave(ctx: RequestContext, token: Token[RequestContext | None]) -> None:
    reset_context(token)
    if not ctx.exempt:
        ctx.guard.shedding.release(ctx.route_key)


def _finish(
    request: HttpRequest, ctx: RequestContext, response: HttpResponseBase
) -> HttpResponseBase:
    error = vars(request).pop(_ERROR_ATTR, None)
    if error is not None and response.status_code == 500:
        response = _error(request, ctx, error)
    elif (
        ctx.guard.settings.brand_app_errors
        and response.status_code in _BRANDABLE
        and not response.streaming  # a stream is never buffered nor thrown away
        # A response that already explains itself (our page, or the app's own handler
        # that set Proxy-Status) is not re-branded.
        and not response.has_header("Proxy-Status")
    ):
        response = _brand(request, ctx, response)
    # The app's own X-Request-ID (a singleton field) wins over ours; never send two.
    response.setdefault("X-Request-ID", ctx.request_id)
    return response


def _error(request: HttpRequest, ctx: RequestContext, error: UpstreamError) -> GatewayErrorResponse:
    log_gateway_error(ctx, error)
    rendered = render_error(
        ctx.guard, ctx, error, request.META.get("HTTP_ACCEPT"), request.method or "GET"
    )
    response = GatewayErrorResponse(rendered)
    response._has_been_logged = True
    return response


def _brand(
    request: HttpRequest, ctx: RequestContext, response: HttpResponseBase
) -> GatewayErrorResponse:
    """Replace an app's own 502/503/504 with the branded page (brand_app_errors)."""
    retry_after = response.get("Retry-After")
    rendered = ctx.guard.renderer.render_status(
        response.status_code,
        request_id=ctx.request_id,
        accept=request.META.get("HTTP_ACCEPT"),
        method=request.method or "GET",
        retry_after=parse_retry_after(retry_after) if retry_after is not None else None,
    )
    return GatewayErrorResponse(rendered)


def _remember_upstream_error(sender: object, request: HttpRequest | None = None, **_: Any) -> None:
    # Sent while Django turns an exception raised below us into a 500, with the exception
    # being handled: keep it so that _finish answers with the gateway page instead.
    exc = sys.exc_info()[1]
    if request is not None and exc is not None:
        error = as_upstream_error(exc)
        if error is not None:
            vars(request)[_ERROR_ATTR] = error


got_request_exception.connect(
    _remember_upstream_error, dispatch_uid="gateway_guard.django.middleware"
)
