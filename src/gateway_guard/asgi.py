"""GatewayGuardMiddleware: the pure ASGI driver of the inbound core.

Pure ASGI rather than Starlette's BaseHTTPMiddleware, which buffers, costs a task group
per request and breaks contextvars. Per-request state lives in ``__call__``; all
decisions are in :mod:`gateway_guard.inbound`.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from .context import reset_context, set_context
from .errors import LoadShedError, UpstreamError
from .guard import Guard
from .inbound import Inbound, as_upstream_error, log_gateway_error, render_error, start
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
        self._brand_app_errors = self.guard.settings.brand_app_errors

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = traceparent = accept = None
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                request_id = value
            elif name == b"traceparent":
                traceparent = value
            elif name == b"accept":
                accept = value
        method = scope["method"]
        inbound = start(self.guard, method, scope["path"], request_id, traceparent)
        rid_header = (b"x-request-id", inbound.ctx.request_id.encode("ascii"))

        if inbound.blocked is not None:
            await self._error(send, inbound, inbound.blocked, accept, method)
            return
        shed = not inbound.exempt
        if shed:
            try:
                await self._shedding.admit_async(inbound.route_key, inbound.priority)
            except LoadShedError as exc:
                await self._error(send, inbound, exc, accept, method)
                return

        started = False
        intercepted = False

        async def guarded_send(message: Message) -> None:
            nonlocal started, intercepted
            if intercepted:
                return  # the app's own 502/503/504 body, replaced by our page
            if message["type"] == "http.response.start":
                started = True
                if self._brand_app_errors and message["status"] in _BRANDABLE:
                    intercepted = True
                    rendered = self.guard.renderer.render_status(
                        message["status"],
                        request_id=inbound.ctx.request_id,
                        accept=_text(accept),
                        method=method,
                    )
                    await _send_rendered(send, rendered)
                    return
                headers = message.get("headers")
                if isinstance(headers, list):
                    headers.append(rid_header)
                else:
                    message = {**message, "headers": [*(headers or ()), rid_header]}
            await send(message)

        token = set_context(inbound.ctx)
        try:
            await self.app(scope, receive, guarded_send)
        except Exception as exc:
            error = as_upstream_error(exc)
            if error is None:
                raise
            if started:
                # Too late for an error page. Returning without finishing the body makes
                # the server close the connection, so the client sees an incomplete
                # response instead of a truncated one that looks whole.
                log_gateway_error(inbound, error, started=True)
                return
            await self._error(send, inbound, error, accept, method)
        finally:
            reset_context(token)
            if shed:
                self._shedding.release(inbound.route_key)

    async def _error(
        self,
        send: Send,
        inbound: Inbound,
        error: UpstreamError,
        accept: bytes | None,
        method: str,
    ) -> None:
        log_gateway_error(inbound, error)
        rendered = render_error(self.guard, inbound, error, _text(accept), method)
        await _send_rendered(send, rendered)


def _text(value: bytes | None) -> str | None:
    return value.decode("latin-1") if value is not None else None


async def _send_rendered(send: Send, rendered: Any) -> None:
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
