"""The aiohttp driver of the call core: a client middleware, and a guarded session.

aiohttp (3.12+) lets a ``ClientSession`` take middlewares that wrap every request and may
call the next handler more than once: the native seam for retries. :class:`GuardedMiddleware`
follows the call core's protocol (see :mod:`gateway_guard._call`) as the httpx drivers do
(``transport.py``), and adds only the aiohttp glue: the request's body kind, the
classification of aiohttp's exceptions (``errors.from_exception``, which knows them by
name) and a watch on the response body.

Deadlines: each attempt runs under ``asyncio.timeout`` set to what is left of the call's
deadline (the tighter of its own and the inbound request's). A session's own ``ClientTimeout``
still bounds connect and each socket read (``guard.aiohttp_session`` sets them from the
policy). The body of a response handed over is watched until it ends: at the deadline a
body still arriving is cut off (its reader raises :class:`UpstreamTimeout`), so a call ends
at its deadline however the upstream paces its bytes.

Its outcome is settled when the body ends, like the httpx drivers' ``WRAP``: when aiohttp
releases or closes the response's connection, the body either reached its end (a
success), broke off (a failure; the reader gets aiohttp's own error, which the inbound
adapters answer as a gateway error), or was given up early (says nothing of the upstream).

Imported only when asked for: ``import gateway_guard`` never imports aiohttp.
"""

from __future__ import annotations

import asyncio
import weakref
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import ClientSession as ClientSession  # re-exported for Guard's annotations
from aiohttp import payload

from ._call import RAISE, WRAP, Call, shed
from .errors import LoadShedError, UpstreamError, UpstreamTimeout, from_exception

if TYPE_CHECKING:
    from aiohttp import ClientRequest, ClientResponse
    from aiohttp.client_middlewares import ClientHandlerType

    from .guard import UpstreamRuntime

__all__ = ["GuardedMiddleware", "session"]

# What the next handler raises for the network (anything else is ours or the app's).
_TRANSPORT_ERRORS = (aiohttp.ClientError, OSError)
# Raised before a byte of the request is written: safe to retry for any method.
_NEVER_SENT = (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError)
_MAX_ERROR_BODY = 64 * 1024
_MAX_DRAIN = 64 * 1024


def _cut(task: asyncio.Task[Any] | None, expired: list[bool]) -> None:
    if task is not None:
        expired.append(True)
        task.cancel()


def _deadline_error(call: Call) -> UpstreamTimeout:
    name = call.rt.name
    return UpstreamTimeout(
        f"deadline of upstream {name!r} exhausted",
        proxy_error="http_response_timeout",
        upstream=name,
    )


def _streaming(request: ClientRequest) -> bool:
    body = request.body
    return not isinstance(body, payload.BytesPayload) and bool(getattr(body, "size", 0) != 0)


class GuardedMiddleware:
    """An aiohttp client middleware that guards every request to one upstream::

    session = aiohttp.ClientSession(middlewares=(guard.aiohttp_middleware("payments"),))
    """

    __slots__ = ("_rt",)

    def __init__(self, runtime: UpstreamRuntime) -> None:
        self._rt = runtime

    async def __call__(self, request: ClientRequest, handler: ClientHandlerType) -> ClientResponse:
        rt = self._rt
        try:
            await rt.bulkhead.acquire_async()
        except LoadShedError as exc:
            raise shed(rt, exc) from None
        try:
            call = Call(rt, request.method, request.headers, _streaming(request))
            loop = asyncio.get_running_loop()
            task = asyncio.current_task()
            while True:
                # The attempt ends at the call's deadline: a timer that cancels this task,
                # as asyncio.timeout() does but without its context manager (about half
                # the per-call overhead of this driver in bench/clients.py, 2026-12-07).
                expired: list[bool] = []
                timer = loop.call_later(call.deadline_at - rt.clock(), _cut, task, expired)
                try:
                    response = await handler(request)
                except _TRANSPORT_ERRORS as exc:
                    error: UpstreamError = from_exception(exc, upstream=rt.name)
                    wait = call.failed(error, not isinstance(exc, _NEVER_SENT))
                    if wait < 0.0:
                        raise error from exc
                    if wait > 0.0:
                        await asyncio.sleep(wait)
                    call.admit()
                    continue
                except asyncio.CancelledError as exc:
                    if not expired:
                        call.cancelled()
                        raise
                    task.uncancel()  # type: ignore[union-attr]  # our own cancel, consumed
                    error = _deadline_error(call)
                    if call.failed(error, True) < 0.0:  # the deadline is spent: RAISE
                        raise error from exc
                    call.admit()  # a clock that disagrees with the loop's: admit() decides
                    continue
                except BaseException:
                    call.cancelled()
                    raise
                finally:
                    timer.cancel()
                outcome = call.answered(response.status, response.headers, False)
                if outcome < 0.0:
                    break
                await _drain(response, call)
                if outcome > 0.0:
                    await asyncio.sleep(outcome)
                call.admit()
        finally:
            rt.bulkhead.release()
        if outcome == WRAP:
            _watch(response, call)
        elif outcome == RAISE:
            error = call.status_error()
            await _read_capped(response, call)
            error.response = response  # type: ignore[assignment]
            raise error
        return response


def _watch(response: ClientResponse, call: Call) -> None:
    """Settle ``call`` when the body of ``response`` ends, and cut it off at the deadline."""
    connection = response.connection
    if connection is None:
        # The body was whole (and the connection released) before the headers were
        # handed over: the common case for small bodies, settled at once, no timer.
        _settle(response, call)
        return
    connection.add_callback(_BodyWatch(response, call).released)


def _settle(response: ClientResponse, call: Call) -> None:
    content = response.content
    exc = content.exception()
    if exc is None and content.is_eof():
        call.body_done()
    elif isinstance(exc, UpstreamError):
        call.body_failed(exc)
    elif isinstance(exc, aiohttp.ClientPayloadError):
        call.body_failed(from_exception(exc, upstream=call.rt.name))
    else:
        call.cancelled()  # released or closed before the end: nothing learned


class _BodyWatch:
    """A body still arriving: settled when aiohttp releases or closes its connection (at
    its end, when it breaks off, or when the caller gives it up), cut off at the deadline."""

    __slots__ = ("__weakref__", "_call", "_handle", "_loop", "_open", "_response")

    def __init__(self, response: ClientResponse, call: Call) -> None:
        self._response = response
        self._call = call
        self._open = True
        self._loop = loop = asyncio.get_running_loop()
        # Through a weak reference: the loop's timer must not keep a response the caller
        # dropped alive until its deadline (aiohttp's finaliser is what releases it).
        delay = max(call.deadline_at - call.rt.clock(), 0.0)
        self._handle = loop.call_later(delay, _expire, weakref.ref(self))

    def released(self) -> None:
        # aiohttp calls this from release()/close(), which its finaliser may call for a
        # response dropped unread: the breaker's lock must not be taken here, so the
        # outcome is settled on the loop's next turn (call_soon takes no lock).
        if not self._open:
            return
        self._open = False
        self._handle.cancel()
        try:
            self._loop.call_soon(_settle, self._response, self._call)
        except RuntimeError:  # the loop is closed: only the lock-free report is left
            self._call.dropped()

    def expire(self) -> None:
        content = self._response.content
        if self._open and not content.is_eof():
            content.set_exception(_deadline_error(self._call))
            self._response.close()  # the connection goes, and released() hears of it


def _expire(ref: weakref.ref[_BodyWatch]) -> None:
    watch = ref()
    if watch is not None:
        watch.expire()


async def _drain(response: ClientResponse, call: Call) -> None:
    """Read (a small) failure body before retrying, so the connection can be reused."""
    try:
        async with asyncio.timeout(max(call.deadline_at - call.rt.clock(), 0.0)):
            size = 0
            while size <= _MAX_DRAIN:
                chunk = await response.content.readany()
                if not chunk:
                    break
                size += len(chunk)
    except (*_TRANSPORT_ERRORS, TimeoutError):
        pass  # the connection is gone anyway; the retry opens another
    finally:
        response.release()


async def _read_capped(response: ClientResponse, call: Call) -> None:
    """Keep up to _MAX_ERROR_BODY of a failure body (``await response.read()`` gives it)."""
    chunks: list[bytes] = []
    try:
        async with asyncio.timeout(max(call.deadline_at - call.rt.clock(), 0.0)):
            size = 0
            while size < _MAX_ERROR_BODY:
                chunk = await response.content.readany()
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
    except (*_TRANSPORT_ERRORS, TimeoutError):
        pass  # what arrived is kept; a failure body is evidence, not data
    finally:
        response._body = b"".join(chunks)[:_MAX_ERROR_BODY]
        response.release()


def session(runtime: UpstreamRuntime, **kwargs: Any) -> ClientSession:
    """A new ``aiohttp.ClientSession`` for the upstream of ``runtime``: ``base_url`` and the
    connect and read timeouts from its policy, and the guard as its first middleware."""
    policy = runtime.policy
    if policy.base_url is not None:
        kwargs.setdefault("base_url", policy.base_url)
    kwargs.setdefault(
        "timeout",
        aiohttp.ClientTimeout(
            total=None, sock_connect=policy.connect_timeout, sock_read=policy.read_timeout
        ),
    )
    middlewares = (GuardedMiddleware(runtime), *kwargs.pop("middlewares", ()))
    return ClientSession(middlewares=middlewares, **kwargs)
