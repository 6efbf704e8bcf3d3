"""GatewayGuardMiddleware: the pure ASGI driver of the inbound core.

Pure ASGI rather than Starlette's BaseHTTPMiddleware, which buffers, costs a task group
per request and breaks contextvars. Per-request state lives in ``__call__``; all
decisions are in :mod:`gateway_guard.inbound`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

from ._instrument import apply_settings
from .context import reset_context, set_context
from .guard import Guard
from .inbound import (
    REQUEST_ID,
    Wants,
    admit_async,
    as_upstream_error,
    log_gateway_error,
    on_response_start,
    release,
    respond,
    start,
    try_admit,
)
from .render import RenderedError
from .settings import SettingsSource

__all__ = ["GatewayGuardMiddleware"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
# ASGI's form of the field: a lower-case byte string.
_REQUEST_ID = REQUEST_ID.lower().encode()


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
        apply_settings(self.guard)  # the `instrument` setting
        self._endpoints = self.guard.endpoints

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        endpoints = self._endpoints
        if endpoints is not None and endpoints.wants(scope["path"]):
            client = scope.get("client")
            answer = endpoints.serve(
                scope["method"], scope["path"], scope["headers"], _read, client and client[0]
            )
            await _send_page(send, answer)
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
        if ctx.foreign_id is not None and ctx.foreign_id.pass_on:
            scope = _with_request_id(scope, ctx.request_id)
        # The common case takes a free slot without creating a coroutine: -3,660 simulated
        # cycles a request (bench/middleware.py --cachegrind-only, 2026-12-07).
        if not try_admit(ctx):
            refusal = await admit_async(ctx)
            if refusal is not None:
                wants = Wants.from_asgi(scope["headers"])
                await _send_page(send, respond(ctx, refusal, wants, method))
                return

        started = replaced = False

        def guarded_send(message: Message) -> Awaitable[None]:
            # A plain function handing back the server's awaitable: one coroutine fewer
            # per message. The start message comes first (ASGI); later ones pass straight
            # on, unless they are the body of a response we replaced.
            nonlocal started, replaced
            if started:
                return _dropped() if replaced else send(message)
            if message["type"] != "http.response.start":
                return send(message)
            started = True
            headers = message.get("headers") or ()
            decision = on_response_start(ctx, message["status"], headers, _read)
            if decision is None:
                return send(message)
            if isinstance(decision, str):
                # A NEW list: an app may reuse one list for every response, which must
                # never carry an earlier visitor's id. The message is ours to edit (as
                # Starlette's MutableHeaders does); the list inside it may be shared.
                message["headers"] = [*headers, (_REQUEST_ID, decision.encode())]
                return send(message)
            replaced = True
            wants = Wants.from_asgi(scope["headers"])
            return _send_page(send, respond(ctx, decision, wants, method))

        token = set_context(ctx)
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
                log_gateway_error(ctx, error, started=True)
                return
            await _send_page(send, respond(ctx, error, Wants.from_asgi(scope["headers"]), method))
        finally:
            reset_context(token)
            release(ctx)


def _read(headers: Iterable[tuple[bytes, bytes]], name: str) -> str | None:
    key = name.encode()
    # ASGI response header names are lower case (the spec says they must be).
    for field, value in headers:
        if field == key:
            return value.decode("latin-1")
    return None


def _with_request_id(scope: Scope, request_id: str) -> Scope:
    """A copy of ``scope`` whose request carries our id, for an id library inside us."""
    headers = [(k, v) for k, v in scope["headers"] if k != _REQUEST_ID]
    headers.append((_REQUEST_ID, request_id.encode()))
    return {**scope, "headers": headers}


async def _dropped() -> None:
    return None


async def _send_page(send: Send, rendered: RenderedError) -> None:
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
