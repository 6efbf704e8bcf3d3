"""GatewayGuardMiddleware: the pure ASGI driver of the inbound core.

Pure ASGI rather than Starlette's BaseHTTPMiddleware, which buffers, costs a task group
per request and breaks contextvars. Per-request state lives in ``__call__``; all
decisions are in :mod:`gateway_guard.inbound`.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from .context import RequestContext, reset_context, set_context
from .errors import LoadShedError, UpstreamError
from .guard import Guard
from .headers import parse_retry_after
from .inbound import as_upstream_error, inbound_shed, log_gateway_error, render_error, start
from .render import RenderedError
from .settings import SettingsSource

__all__ = ["GatewayGuardMiddleware"]

logger = logging.getLogger("gateway_guard")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_BRANDABLE = frozenset({502, 503, 504})


class GatewayGuardMiddleware:
    """Guard an ASGI app: request ids, load shedding, and gateway error pages.

    ``app.add_middleware(GatewayGuardMiddleware, guard=guard)`` or ``settings=...``.
    """

    def __init__(
        self, app: ASGIApp, *, guard: Guard | None = None, settings: SettingsSource = None
    ) -> None:
        if guard is not None and settings is not None:
            raise TypeError("give GatewayGuardMiddleware either guard= or settings=, not both")
        self.app = app
        self.guard = guard if guard is not None else Guard(settings)
        self._shedding = self.guard.shedding
        # Requests outside a route with its own limiter (most) go straight to the app's.
        self._app_try = self._shedding.app.try_acquire
        self._app_release = self._shedding.app.release
        self._brand_app_errors = self.guard.settings.brand_app_errors

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # Only the two headers every request needs are looked for here; Accept matters
        # only to an error page, and is read from the scope when one is rendered.
        request_id = traceparent = None
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                request_id = value
            elif name == b"traceparent":
                traceparent = value
        method = scope["method"]
        ctx = start(self.guard, method, scope["path"], request_id, traceparent)
        rid_header = (b"x-request-id", ctx.request_id.encode())  # ids are ASCII (validated or ours)

        if ctx.blocked is not None:
            await self._error(send, ctx, ctx.blocked, scope, method)
            return
        shed = not ctx.exempt
        route_key = ctx.route_key
        # The common case takes a free slot without creating a coroutine.
        if shed and not (
            self._app_try() if route_key is None else self._shedding.try_admit(route_key)
        ):
            try:
                await self._shedding.admit_async(route_key, ctx.priority)
            except LoadShedError as exc:
                await self._error(send, ctx, inbound_shed(exc), scope, method)
                return

        started = False

        def guarded_send(message: Message) -> Awaitable[None]:
            # Adds our request id to the response and passes everything on. A plain
            # function handing back the server's awaitable: one coroutine fewer per
            # message. The start message comes first (ASGI); later ones pass straight on.
            nonlocal started
            if not started and message["type"] == "http.response.start":
                started = True
                headers = message.get("headers") or ()
                # ASGI header names are lower-case. An app (or an inner middleware) that
                # set its own id keeps it; otherwise ours goes on a NEW list, because an
                # app may reuse one list for every response and must never carry an
                # earlier visitor's id. The message is ours to edit (as Starlette's
                # MutableHeaders does); the list inside it may be shared by the app.
                for name, _ in headers:
                    if name == b"x-request-id":
                        break
                else:
                    message["headers"] = [*headers, rid_header]
            return send(message)

        app_send = guarded_send
        if self._brand_app_errors:
            brand = True

            async def branding_send(message: Message) -> None:
                # The app's own 502/503/504 is replaced by our page.
                nonlocal brand, started
                if message["type"] == "http.response.start":
                    headers = message.get("headers") or ()
                    # A response that already explains itself (our page, or an error
                    # handler that set Proxy-Status) is not re-branded.
                    if message["status"] in _BRANDABLE and not any(
                        name == b"proxy-status" for name, _ in headers
                    ):
                        started = True
                        await self._brand(send, ctx, message, scope, method)
                        return
                    brand = False
                elif brand:
                    return  # the app's own 502/503/504 body, replaced by our page
                await guarded_send(message)

            app_send = branding_send

        token = set_context(ctx)
        try:
            await self.app(scope, receive, app_send)
        except Exception as exc:
            error = as_upstream_error(exc)
            if error is None:
                raise
            if started:
                # Too late for an error page. Returning without finishing the body makes
                # the server close the connection, so the client sees an incomplete
                # response instead of a truncated one that looks whole.
                log_gateway_error(ctx, error, started=True)
                return
            await self._error(send, ctx, error, scope, method)
        finally:
            reset_context(token)
            if shed:
                if route_key is None:
                    self._app_release()
                else:
                    self._shedding.release(route_key)

    async def _brand(
        self, send: Send, ctx: RequestContext, message: Message, scope: Scope, method: str
    ) -> None:
        """Replace an app's own 502/503/504 with the branded page (brand_app_errors)."""
        rendered = self.guard.renderer.render_status(
            message["status"],
            request_id=ctx.request_id,
            accept=_accept(scope),
            method=method,
            retry_after=_retry_after(message),
        )
        await _send_rendered(send, rendered)

    async def _error(
        self,
        send: Send,
        ctx: RequestContext,
        error: UpstreamError,
        scope: Scope,
        method: str,
    ) -> None:
        log_gateway_error(ctx, error)
        rendered = render_error(self.guard, ctx, error, _accept(scope), method)
        await _send_rendered(send, rendered)


def _retry_after(message: Message) -> float | None:
    for name, value in message.get("headers") or ():
        if name.lower() == b"retry-after":
            return parse_retry_after(value.decode("latin-1"))
    return None


def _accept(scope: Scope) -> str | None:
    """The request's Accept field; repeated field lines form one list (RFC 9110 §5.3)."""
    values = [value for name, value in scope["headers"] if name == b"accept"]
    return b", ".join(values).decode("latin-1") if values else None


async def _send_rendered(send: Send, rendered: RenderedError) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": rendered.status,
            "headers": [
                (k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in rendered.headers
            ],
        }
    )
    await send({"type": "http.response.body", "body": rendered.body, "more_body": False})
