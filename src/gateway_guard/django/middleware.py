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

import contextlib
import sys
from collections.abc import Awaitable, Callable
from typing import Any, cast

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.core.signals import got_request_exception
from django.http import HttpRequest, HttpResponse
from django.http.response import HttpResponseBase

from gateway_guard._instrument import apply_settings
from gateway_guard.context import RequestContext, get_context, reset_context, set_context
from gateway_guard.errors import UpstreamError
from gateway_guard.inbound import (
    REQUEST_ID,
    AppError,
    Wants,
    admit,
    admit_async,
    as_upstream_error,
    on_response_start,
    release,
    respond,
    start,
    try_admit,
)
from gateway_guard.render import RenderedError

from .conf import get_guard

__all__ = ["GatewayErrorResponse", "GatewayGuardMiddleware"]

GetResponse = Callable[[HttpRequest], HttpResponseBase]
AsyncGetResponse = Callable[[HttpRequest], Awaitable[HttpResponseBase]]

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
        # than turning the first request into a 500. The `instrument` setting applies here.
        apply_settings(get_guard())

    def __call__(self, request: HttpRequest) -> HttpResponseBase | Awaitable[HttpResponseBase]:
        if self.async_mode:
            return self.__acall__(request)
        served = _served(request)
        if served is not None:
            return served
        ctx = _context(request)
        refusal = admit(ctx)
        if refusal is not None:
            return _page(request, ctx, refusal)
        token = set_context(ctx)
        try:
            response = cast(GetResponse, self.get_response)(request)
        finally:
            reset_context(token)
            release(ctx)
        return _finish(request, ctx, response)

    async def __acall__(self, request: HttpRequest) -> HttpResponseBase:
        served = _served(request)
        if served is not None:
            return served
        ctx = _context(request)
        # The common case takes a free slot without suspending.
        if not try_admit(ctx):
            refusal = await admit_async(ctx)
            if refusal is not None:
                return _page(request, ctx, refusal)
        token = set_context(ctx)
        try:
            response = await cast(AsyncGetResponse, self.get_response)(request)
        finally:
            reset_context(token)
            release(ctx)
        return _finish(request, ctx, response)

    def process_exception(
        self, request: HttpRequest, exception: Exception
    ) -> GatewayErrorResponse | None:
        error = as_upstream_error(exception)
        ctx = get_context()
        if error is None or ctx is None:
            return None  # not ours: Django (or a middleware below) answers it
        return _page(request, ctx, error)


# --- translation both modes share ------------------------------------------------------------


def _context(request: HttpRequest) -> RequestContext:
    meta = request.META
    ctx = start(
        get_guard(),
        request.method or "GET",
        request.path_info,
        meta.get("HTTP_X_REQUEST_ID"),
        meta.get("HTTP_TRACEPARENT"),
    )
    if ctx.foreign_id is not None and ctx.foreign_id.pass_on:
        _pass_on(request, ctx.request_id)
    return ctx


def _pass_on(request: HttpRequest, request_id: str) -> None:
    """Our id in the request, for an id library below us (django-guid reads its header)."""
    meta = request.META
    meta["HTTP_X_REQUEST_ID"] = request_id
    config = sys.modules.get("django_guid.config")
    name = getattr(getattr(config, "settings", None), "guid_header_name", None)
    if isinstance(name, str):
        meta["HTTP_" + name.upper().replace("-", "_")] = request_id
    vars(request).pop("headers", None)  # a cached HttpRequest.headers would miss it


def _meta_read(meta: dict[str, Any], name: str) -> str | None:
    value = meta.get("HTTP_" + name.upper().replace("-", "_"))
    return value if isinstance(value, str) else None


def _served(request: HttpRequest) -> GatewayErrorResponse | None:
    """The answer for a path the middleware serves itself (status page, health)."""
    endpoints = get_guard().endpoints
    path = request.path_info
    if endpoints is None or not endpoints.wants(path):
        return None
    meta = request.META
    answer = endpoints.serve(
        request.method or "GET", path, meta, _meta_read, meta.get("REMOTE_ADDR")
    )
    return GatewayErrorResponse(answer)


def _finish(
    request: HttpRequest, ctx: RequestContext, response: HttpResponseBase
) -> HttpResponseBase:
    error = vars(request).pop(_ERROR_ATTR, None)
    if error is not None and response.status_code == 500:
        return _page(request, ctx, error)  # the 500 Django made of our error
    decision = on_response_start(ctx, response.status_code, response, HttpResponseBase.get)
    if decision is None:
        return response
    if isinstance(decision, AppError):
        _close_body(response)
        return _page(request, ctx, decision)
    response[REQUEST_ID] = decision
    return response


def _page(
    request: HttpRequest, ctx: RequestContext, failure: UpstreamError | AppError
) -> GatewayErrorResponse:
    rendered = respond(ctx, failure, Wants.from_environ(request.META), request.method or "GET")
    response = GatewayErrorResponse(rendered)
    if isinstance(failure, UpstreamError):
        response._has_been_logged = True  # respond() logged it
    return response


def _close_body(response: HttpResponseBase) -> None:
    """Close the body of a response we replace, unread (a stream, a file).

    Its closers only: ``response.close()`` would also send ``request_finished`` in the
    middle of the request (closing database connections, resetting the urlconf), and again
    when the server closes our page. Django adds the request's own closer after the
    middleware chain, so none is here yet.
    """
    closers: list[Callable[[], object]] = getattr(response, "_resource_closers", [])
    for close in closers:
        with contextlib.suppress(Exception):  # as Django's own close() does
            close()
    closers.clear()


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
