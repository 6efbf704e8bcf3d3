"""GatewayGuardWSGI: the WSGI driver of the inbound core (PEP 3333).

A WSGI body is iterated after the app returns, so the request context and the shedding
slot live until the server calls ``close()`` on the iterable we return, and an upstream
error raised before the first body chunk can still become an error page (``start_response``
may be called again with ``exc_info`` until headers are sent).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterable, Iterator
from contextvars import Token
from types import TracebackType
from typing import Any

from ._instrument import apply_settings
from .context import RequestContext, reset_context, set_context
from .errors import UpstreamError
from .guard import Guard
from .inbound import (
    REQUEST_ID,
    AppError,
    Wants,
    admit,
    as_upstream_error,
    log_gateway_error,
    on_response_start,
    release,
    respond,
    start,
)
from .render import RenderedError
from .settings import SettingsSource

__all__ = ["GatewayGuardWSGI"]

ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None]
StartResponse = Callable[..., Callable[[bytes], object]]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


class GatewayGuardWSGI:
    """Guard a WSGI app: request ids, load shedding (threads), and gateway error pages.

    ``app.wsgi_app = GatewayGuardWSGI(app.wsgi_app, guard=guard)`` or ``settings=...``.
    """

    def __init__(
        self, app: WSGIApp, *, guard: Guard | None = None, settings: SettingsSource = None
    ) -> None:
        if guard is not None and settings is not None:
            raise TypeError("give GatewayGuardWSGI either guard= or settings=, not both")
        self.app = app
        self.guard = guard if guard is not None else Guard(settings)
        apply_settings(self.guard)  # the `instrument` setting

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        path = environ.get("PATH_INFO", "") or "/"
        if not path.isascii():
            # PEP 3333 hands us the raw bytes as latin-1; routes are written in UTF-8.
            path = path.encode("latin-1").decode("utf-8", "replace")
        endpoints = self.guard.endpoints
        if endpoints is not None and endpoints.wants(path):
            answer = endpoints.serve(
                method, path, environ, _read_environ, environ.get("REMOTE_ADDR")
            )
            return _send_page(start_response, answer)
        ctx = start(
            self.guard,
            method,
            path,
            environ.get("HTTP_X_REQUEST_ID"),
            environ.get("HTTP_TRACEPARENT"),
        )
        if ctx.foreign_id is not None and ctx.foreign_id.pass_on:
            environ["HTTP_X_REQUEST_ID"] = ctx.request_id  # for an id library inside us
        refusal = admit(ctx)
        if refusal is not None:
            return _send_page(
                start_response, respond(ctx, refusal, Wants.from_environ(environ), method)
            )
        response = _Response(ctx, start_response, environ, method)
        token = set_context(ctx)
        try:
            body = self.app(environ, response.start_response)
        except BaseException as exc:
            # BaseException too: gevent's Timeout, SystemExit and KeyboardInterrupt must
            # give the slot back like any error, or a few of them shed every later request.
            response.finish(token)
            error = as_upstream_error(exc) if isinstance(exc, Exception) else None
            if error is None:
                raise
            return response.error_page(error)
        return _Body(body, response, token)


_REASONS = {
    200: "OK",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


def _send_page(
    start_response: StartResponse, rendered: RenderedError, exc_info: ExcInfo | None = None
) -> list[bytes]:
    status = f"{rendered.status} {_REASONS.get(rendered.status, 'Error')}"
    if exc_info is not None:
        start_response(status, list(rendered.headers), exc_info)
    else:
        start_response(status, list(rendered.headers))
    return [rendered.body]


def _read_environ(environ: dict[str, Any], name: str) -> str | None:
    value = environ.get("HTTP_" + name.upper().replace("-", "_"))
    return value if isinstance(value, str) else None


def _read(headers: list[tuple[str, str]], name: str) -> str | None:
    for field, value in headers:
        if field.lower() == name:
            return value
    return None


def _status_code(status: str) -> int:
    code = status[:3]
    return int(code) if code.isdigit() else 0


class _Response:
    """Per-request state: holds the app's status and headers until the first body chunk.

    PEP 3333 lets a middleware delay ``start_response`` until the body starts. Holding it
    means an upstream error raised before the first chunk replaces the app's response
    whole, instead of asking the server to swap headers it may already have merged.
    """

    __slots__ = (
        "_done",
        "_environ",
        "_method",
        "_pending",
        "_start_response",
        "_write",
        "ctx",
        "intercepted",
    )

    def __init__(
        self,
        ctx: RequestContext,
        start_response: StartResponse,
        environ: dict[str, Any],
        method: str,
    ) -> None:
        self.ctx = ctx
        self._start_response = start_response
        # Read only when a page is rendered: the request headers it is negotiated by.
        self._environ = environ
        self._method = method
        self._done = False
        self._pending: tuple[str, list[tuple[str, str]]] | None = None
        self._write: Callable[[bytes], object] | None = None
        # Our page's body when we replaced the app's response: the app's own gives way.
        self.intercepted: bytes | None = None

    @property
    def sent(self) -> bool:
        """Whether the status and headers went to the server."""
        return self._write is not None

    def start_response(
        self, status: str, headers: list[tuple[str, str]], exc_info: ExcInfo | None = None
    ) -> Callable[[bytes], object]:
        if exc_info is not None and self.sent:
            raise exc_info[1].with_traceback(exc_info[2])  # PEP 3333: too late to change
        decision = on_response_start(self.ctx, _status_code(status), headers, _read)
        if isinstance(decision, AppError):
            rendered = respond(self.ctx, decision, Wants.from_environ(self._environ), self._method)
            self.intercepted = rendered.body
            reason = _REASONS.get(rendered.status, "Error")
            self._pending = (f"{rendered.status} {reason}", list(rendered.headers))
            return _discard
        self.intercepted = None
        if decision is not None:
            # A new list: the app may pass the same list for every response.
            headers = [*headers, (REQUEST_ID, decision)]
        self._pending = (status, headers)
        return self.write

    def flush(self) -> None:
        """Hand the held status and headers to the server (once)."""
        if self._write is None and self._pending is not None:
            status, headers = self._pending
            self._write = self._start_response(status, headers)

    def write(self, data: bytes) -> object:
        """The legacy ``write()`` callable: it starts the response like a body chunk."""
        self.flush()
        assert self._write is not None
        return self._write(data)

    def error_page(self, error: UpstreamError) -> list[bytes]:
        """Our page instead of a response whose headers were not sent yet."""
        self._pending = None
        exc_info = sys.exc_info()
        rendered = respond(self.ctx, error, Wants.from_environ(self._environ), self._method)
        return _send_page(self._start_response, rendered, exc_info if exc_info[0] else None)

    def finish(self, token: Token[RequestContext | None] | None) -> None:
        if self._done:
            return
        self._done = True
        if token is not None:
            # close() may run in another context than __call__ (some servers do); the
            # token cannot be reset there, and that context dies with the request anyway.
            with contextlib.suppress(ValueError):
                reset_context(token)
        release(self.ctx)


def _discard(data: bytes) -> None:
    return None


def _close(body: Iterable[bytes]) -> None:
    close = getattr(body, "close", None)
    if close is not None:
        close()


class _Body:
    """The app's iterable, with errors before the first chunk turned into error pages."""

    __slots__ = ("_body", "_response", "_token")

    def __init__(
        self, body: Iterable[bytes], response: _Response, token: Token[RequestContext | None]
    ) -> None:
        self._body = body
        self._response = response
        self._token = token

    def __iter__(self) -> Iterator[bytes]:
        response = self._response
        try:
            for chunk in self._body:
                if response.intercepted is not None:
                    break  # a 502/503/504 we brand: the app's own body gives way
                if chunk:
                    response.flush()
                    yield chunk
                elif response.sent:
                    yield chunk
        except Exception as exc:
            error = as_upstream_error(exc)
            if error is None:
                raise
            if response.sent:
                # Headers and part of the body are out: all that is left is to make the
                # server drop the connection so the client knows the body is incomplete.
                log_gateway_error(response.ctx, error, started=True)
                raise
            yield from response.error_page(error)
            return
        response.flush()  # an empty body still needs its status and headers
        if response.intercepted is not None:
            yield response.intercepted

    def close(self) -> None:
        try:
            _close(self._body)
        finally:
            self._response.finish(self._token)
