"""GatewayGuardMiddleware: the pure ASGI driver of the inbound core.

Pure ASGI rather than Starlette's BaseHTTPMiddleware, which buffers, costs a task group
per request and breaks contextvars. Per-request state lives in ``__call__``; all
decisions are in :mod:`gateway_guard.inbound`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from functools import partial
from typing import Any

import anyio.to_thread

from ._instrument import apply_settings
from .context import reset_context, set_context
from .guard import Guard
from .inbound import (
    BRANDABLE,
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
        endpoints = self._endpoints = self.guard.endpoints
        # Endpoints.wants() without its call, on every request while a status page, health
        # check or metrics path is set: -1,180 instructions a request with the frozenset
        # of paths (bench/middleware.py --instructions, 2026-12-07, "+ status, health").
        self._own_paths = endpoints.paths if endpoints is not None else None
        self._own_prefix = endpoints.prefix if endpoints is not None else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        own = self._own_paths
        if own is not None and (
            path in own or (self._own_prefix is not None and path.startswith(self._own_prefix))
        ):
            await self._serve(scope, send)
            return
        # Only the two headers every request needs are looked for here; Accept matters
        # only to an error page, and is read from the scope when one is rendered.
        request_id = traceparent = None
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                request_id = value
            elif name == b"traceparent":
                traceparent = value
        # admit_now: the common case takes a free slot in start() itself, without a
        # coroutine (-3,660 simulated cycles a request, bench/middleware.py
        # --cachegrind-only, 2026-12-07) or a call of try_admit (-470 instructions,
        # bench/middleware.py --instructions, 2026-12-07).
        ctx = start(self.guard, scope["method"], path, request_id, traceparent, True)
        if ctx.foreign_id is not None and ctx.foreign_id.pass_on:
            scope = _with_request_id(scope, ctx.request_id, request_id is not None)
        if not ctx.admitted and not try_admit(ctx):
            refusal = await admit_async(ctx)
            if refusal is not None:
                wants = Wants.from_asgi(scope["headers"])
                await _send_page(send, respond(ctx, refusal, wants, ctx.method))
                return

        # 0 until the app's response starts, then 1 (passed on) or 2 (replaced by our page).
        # One variable, and the method read from ctx: each name the closure shares with
        # this frame is a cell made per request (-500 instructions a cell,
        # bench/middleware.py --instructions, 2026-12-07).
        state = 0

        def guarded_send(message: Message) -> Awaitable[None]:
            # A plain function handing back the server's awaitable: one coroutine fewer
            # per message. The start message comes first (ASGI); later ones pass straight
            # on, unless they are the body of a response we replaced.
            nonlocal state
            if state:
                return send(message) if state == 1 else _dropped()
            if message["type"] != "http.response.start":
                return send(message)
            state = 1
            headers = message.get("headers") or ()
            status = message["status"]
            if status not in BRANDABLE and (
                ctx.foreign_id is None or not ctx.foreign_id.answers_header
            ):
                # on_response_start's answer when neither re-branding nor an id library
                # that answers the header itself can apply, without its two calls: -1,610
                # instructions a request (bench/middleware.py --instructions, 2026-12-07).
                # The app's own X-Request-ID wins; else ours goes on a NEW list: an app
                # may reuse one list for every response, which must never carry an
                # earlier visitor's id. The message is ours to edit (as Starlette's
                # MutableHeaders does).
                for name, _ in headers:
                    if name == _REQUEST_ID:
                        return send(message)
                message["headers"] = [*headers, (_REQUEST_ID, ctx.request_id.encode())]
                return send(message)
            decision = on_response_start(ctx, status, headers, _read)
            if decision is None:
                return send(message)
            if isinstance(decision, str):
                message["headers"] = [*headers, (_REQUEST_ID, decision.encode())]
                return send(message)
            state = 2
            wants = Wants.from_asgi(scope["headers"])
            return _send_page(send, respond(ctx, decision, wants, ctx.method))

        app = self.app  # see below
        token = set_context(ctx)
        try:
            # Called from a local: CPython 3.11 cannot specialise a method-style call of an
            # instance attribute (self.app(...)): -111 instructions a request
            # (bench/middleware.py's child under valgrind, ASLR off, 2026-12-08).
            await app(scope, receive, guarded_send)
        except Exception as exc:
            error = as_upstream_error(exc)
            if error is None:
                raise
            if state:
                # Too late for an error page. Returning without finishing the body makes
                # the server close the connection, so the client sees an incomplete
                # response instead of a truncated one that looks whole.
                log_gateway_error(ctx, error, started=True)
                return
            wants = Wants.from_asgi(scope["headers"])
            await _send_page(send, respond(ctx, error, wants, ctx.method))
        finally:
            reset_context(token)
            release(ctx)

    async def _serve(self, scope: Scope, send: Send) -> None:
        """Answer a request for a path the middleware serves itself (status page, health,
        metrics)."""
        endpoints = self._endpoints
        assert endpoints is not None
        client = scope.get("client")
        serve = partial(
            endpoints.serve,
            scope["method"],
            scope["path"],
            scope["headers"],
            _read,
            client and client[0],
        )
        if scope["path"] == endpoints.health:
            answer = serve()  # no I/O: answered on the loop, even with every thread busy
        else:
            # The status page may wait on Redis (up to the fleet store's command_timeout)
            # and /metrics reads every worker's files in multiprocess mode: on a worker
            # thread, so that the event loop goes on serving the app meanwhile.
            answer = await anyio.to_thread.run_sync(serve)
        await _send_page(send, answer)


def _read(headers: Iterable[tuple[bytes, bytes]], name: str) -> str | None:
    key = name.encode()
    # ASGI response header names are lower case (the spec says they must be).
    for field, value in headers:
        if field == key:
            return value.decode("latin-1")
    return None


def _with_request_id(scope: Scope, request_id: str, replace: bool) -> Scope:
    """A copy of ``scope`` whose request carries our id, for an id library inside us;
    ``replace``: the request has an ``X-Request-ID`` of its own (one we did not accept)."""
    field = (_REQUEST_ID, request_id.encode())
    if replace:
        headers = []
        for header in scope["headers"]:
            if header[0] != _REQUEST_ID:
                headers.append(header)
        headers.append(field)
    else:
        headers = [*scope["headers"], field]
    copy = dict(scope)
    copy["headers"] = headers
    return copy


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
