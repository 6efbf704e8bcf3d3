"""Guarded httpx transports: the sync and async httpx drivers of the call core.

Every decision of a call is :class:`gateway_guard._call.Call`'s; these drivers follow its
protocol (see that module) and add only the httpx glue: the request's body kind and
timeout extension, the classification of httpx's exceptions (``errors.from_exception``)
and the guarded response bodies of :mod:`gateway_guard._httpx_bodies`. The two differ only
in how they wait for a bulkhead slot, send, sleep and drain.

Each attempt, each read of a failure body and each read of a body handed to the caller
ends at the call's deadline (the tighter of its own and the inbound request's), whatever
the upstream's pacing: each attempt's read and write timeouts carry the call
(:class:`~gateway_guard._httpx_deadlines.Bound`), and :mod:`gateway_guard._httpx_deadlines`
bounds every socket operation by its deadline.

On the transport of a guarded client (``reads_whole_bodies``), a success may be read within
the attempt when the call core says so (``Call.reads_ahead``), so that a body breaking off
is a failed attempt, retried like any other; ``client.stream()`` (which marks its
requests) and bodies of unknown length stream to the caller as they arrive.

A body held in memory (``httpx.ByteStream``) can be sent again; a stream is consumed by
the first attempt (and may be replaced by a ByteStream once read, so the drivers look
before sending): a streaming request, multipart uploads included, is never retried.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from typing import TYPE_CHECKING, Any

import httpx

from ._call import RAISE, WRAP, Call, _propagate, shed
from ._httpx_bodies import (
    AsyncGuardedStream,
    GuardedStream,
    adrain,
    aread_ahead,
    aread_capped,
    drain,
    read_ahead,
    read_capped,
)
from ._httpx_deadlines import classified, install, timeouts
from .errors import LoadShedError, UpstreamError
from .headers import new_traceparent
from .retry import never_sent

if TYPE_CHECKING:
    from ._call import RequestHeaders
    from .context import RequestContext
    from .guard import UpstreamRuntime

__all__: list[str] = []

# The request extension by which a guarded client's ``stream()`` tells its transport that
# the caller wants the body as it arrives. Every other request of a guarded client may
# have its body read within the attempt (the call core's ``reads_ahead``): marking the
# streamed requests, not the whole-body ones, keeps an override of ``send()`` off every
# call (-2,800 instructions a client call, bench/transport.py's call under cachegrind,
# 2026-12-07). A transport on a client of the caller's own has ``reads_whole_bodies``
# False and leaves every body to the caller.
STREAMS_BODY = "gateway_guard.streams_body"


def _clipped(call: Call) -> Mapping[str, float]:
    """An attempt's timeouts cut to the deadline, on a transport with no sockets to bound
    (one with time to spare uses ``call.policy.timeouts``, built once per policy and shared
    by every request: httpx and httpcore only read it)."""
    connect, read = call.connect_timeout, call.read_timeout
    return {"connect": connect, "read": read, "write": read, "pool": connect}


def _content_length(response: httpx.Response) -> bytes | None:
    """The answer's Content-Length as sent, or None.

    Read from httpx's raw header list (raw name, lower-cased name, value), stable since
    httpx 0.18: ``Headers.get()`` decodes every header to find one, ~70 bytecodes a call.
    """
    for _, name, value in response.headers._list:
        if name == b"content-length":
            return value
    return None


def _classified(call: Call, exc: httpx.TransportError) -> tuple[UpstreamError, bool]:
    """The failed attempt's error, and whether the request may have reached the upstream."""
    return classified(exc, call.rt.name), not never_sent(exc)


def _propagate_httpx(headers: RequestHeaders, ctx: RequestContext, start_traces: bool) -> None:
    """The call core's ``_propagate`` on httpx's raw header list (raw name, lower-cased
    name, value), which ``httpx.Headers`` keeps as is: its ``in`` and item assignment
    decode or rebuild every header on each use. A call made within an inbound request:
    +46,760 -> +33,490 instructions over bare httpx sync, +49,190 -> +33,290 async
    (bench/transport.py --quick --instructions, "in request", 2026-12-07).
    A value that is not ASCII takes the generic path, with httpx's own encoding.
    """
    raw: list[tuple[bytes, bytes, bytes]] = headers._list  # type: ignore[attr-defined]
    has_id = has_trace = False
    for _, name, _ in raw:
        if name == b"x-request-id":
            has_id = True
        elif name == b"traceparent":
            has_trace = True
    try:
        if not has_id:
            raw.append((b"X-Request-ID", b"x-request-id", ctx.request_id.encode("ascii")))
        if not has_trace:
            value = ctx.traceparent
            if value is None and start_traces:
                value = new_traceparent(ctx.trace_id)
            if value is not None:
                raw.append((b"traceparent", b"traceparent", value.encode("ascii")))
    except UnicodeEncodeError:
        _propagate(headers, ctx, start_traces)


class _HttpxCall(Call):
    """The call core for httpx requests: only the headers' propagation differs."""

    __slots__ = ()
    propagate = staticmethod(_propagate_httpx)


def _sleep(seconds: float) -> None:
    if seconds > 0.0:
        time.sleep(seconds)


class GuardedTransport(httpx.BaseTransport):
    """An ``httpx.BaseTransport`` that guards every request to one upstream."""

    def __init__(self, runtime: UpstreamRuntime, inner: httpx.BaseTransport) -> None:
        self._rt = runtime
        self._inner = inner
        # Only a transport with sockets to bound needs the call carried in its timeouts.
        self._bounded = install(inner)
        # Set by Guard.client(): its caller reads bodies whole unless it uses stream().
        self.reads_whole_bodies = False

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        rt = self._rt
        fast = rt.fail_fast
        if fast is not None:
            # The default fail-fast bulkhead by TokenLimiter's inline protocol (every take
            # paired with one give-back in the finally below): -1,760 simulated cycles/call
            # (-950 instructions) in bench/transport.py's client call, 2026-12-07.
            try:
                fast.tokens.pop()
            except IndexError:
                raise shed(rt, fast.refused()) from None
        else:
            try:
                rt.bulkhead.acquire()
            except LoadShedError as exc:
                raise shed(rt, exc) from None
        try:
            # Built and extended inline, not by shared helpers: -3,850 simulated
            # cycles/call (-2,050 instructions) in bench/transport.py, 2026-12-07.
            call = _HttpxCall(
                rt,
                request.method,
                request.headers,
                not isinstance(request.stream, httpx.ByteStream),
            )
            while True:
                # The attempt's timeouts: on a transport whose sockets are bounded
                # (install), ones that carry the call, so every read and write stops at its
                # deadline. Chosen here, not by a helper: -1 call an attempt.
                if self._bounded:
                    request.extensions["timeout"] = timeouts(call)
                elif call.clipped:
                    request.extensions["timeout"] = _clipped(call)
                else:
                    request.extensions["timeout"] = call.policy.timeouts
                try:
                    response = self._inner.handle_request(request)
                    complete = response.is_stream_consumed
                    if (
                        not complete
                        and self.reads_whole_bodies
                        and STREAMS_BODY not in request.extensions
                        and call.reads_ahead(response.status_code, _content_length(response))
                    ):
                        # A body that breaks off now fails this attempt, like any other
                        # transport error below.
                        complete = read_ahead(response)
                except httpx.TransportError as exc:
                    error, reached = _classified(call, exc)
                    wait = call.failed(error, reached)
                    if wait < 0.0:
                        raise error from exc
                    _sleep(wait)
                    call.admit()
                    continue
                except BaseException:
                    call.cancelled()
                    raise
                outcome = call.answered(response.status_code, response.headers, complete)
                if outcome < 0.0:
                    break
                drain(response)
                _sleep(outcome)
                call.admit()
        finally:
            if fast is not None:
                fast.tokens.append(None)
                fast.released += 1
            else:
                rt.bulkhead.release()
        if outcome == WRAP:
            response.stream = GuardedStream(response.stream, call)  # type: ignore[arg-type]
        elif outcome == RAISE:
            error = call.status_error()
            # httpx attaches the request after the transport returns; we raise before that.
            response.request = request
            error.response = response
            read_capped(response)
            raise error
        return response

    def close(self) -> None:
        self._inner.close()


class AsyncGuardedTransport(httpx.AsyncBaseTransport):
    """An ``httpx.AsyncBaseTransport`` that guards every request to one upstream."""

    def __init__(self, runtime: UpstreamRuntime, inner: httpx.AsyncBaseTransport) -> None:
        self._rt = runtime
        self._inner = inner
        # Only a transport with sockets to bound needs the call carried in its timeouts.
        self._bounded = install(inner)
        # Set by Guard.async_client(), as for GuardedTransport.
        self.reads_whole_bodies = False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        rt = self._rt
        fast = rt.fail_fast
        if fast is not None:
            # As in GuardedTransport: -2,450 simulated cycles/call (-1,610 instructions)
            # in bench/transport.py's async client call, 2026-12-07.
            try:
                fast.tokens.pop()
            except IndexError:
                raise shed(rt, fast.refused()) from None
        else:
            try:
                await rt.bulkhead.acquire_async()
            except LoadShedError as exc:
                raise shed(rt, exc) from None
        try:
            # As in GuardedTransport.
            call = _HttpxCall(
                rt,
                request.method,
                request.headers,
                not isinstance(request.stream, httpx.ByteStream),
            )
            while True:
                if self._bounded:  # as in GuardedTransport
                    request.extensions["timeout"] = timeouts(call)
                elif call.clipped:
                    request.extensions["timeout"] = _clipped(call)
                else:
                    request.extensions["timeout"] = call.policy.timeouts
                try:
                    response = await self._inner.handle_async_request(request)
                    complete = response.is_stream_consumed
                    if (
                        not complete
                        and self.reads_whole_bodies
                        and STREAMS_BODY not in request.extensions
                        and call.reads_ahead(response.status_code, _content_length(response))
                    ):
                        complete = await aread_ahead(response)
                except httpx.TransportError as exc:
                    error, reached = _classified(call, exc)
                    wait = call.failed(error, reached)
                    if wait < 0.0:
                        raise error from exc
                    if wait > 0.0:
                        await asyncio.sleep(wait)
                    call.admit()
                    continue
                except BaseException:
                    call.cancelled()
                    raise
                outcome = call.answered(response.status_code, response.headers, complete)
                if outcome < 0.0:
                    break
                await adrain(response)
                if outcome > 0.0:
                    await asyncio.sleep(outcome)
                call.admit()
        finally:
            if fast is not None:
                fast.tokens.append(None)
                fast.released += 1
            else:
                rt.bulkhead.release()
        if outcome == WRAP:
            response.stream = AsyncGuardedStream(response.stream, call)  # type: ignore[arg-type]
        elif outcome == RAISE:
            error = call.status_error()
            response.request = request
            error.response = response
            await aread_capped(response)
            raise error
        return response

    async def aclose(self) -> None:
        await self._inner.aclose()


# --- clients -------------------------------------------------------------------------------


def _streamed(extensions: Mapping[str, Any] | None) -> dict[str, Any]:
    return {**extensions, STREAMS_BODY: True} if extensions else {STREAMS_BODY: True}


class GuardedClient(httpx.Client):
    """The ``httpx.Client`` of ``Guard.client()``: its ``stream()`` tells the transport that
    the caller wants the body as it arrives; any other call may have its body read, and
    retried, within the call."""

    def stream(  # type: ignore[override]
        self,
        method: str,
        url: httpx.URL | str,
        *,
        extensions: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> AbstractContextManager[httpx.Response]:
        return super().stream(method, url, extensions=_streamed(extensions), **kwargs)


class AsyncGuardedClient(httpx.AsyncClient):
    """The ``httpx.AsyncClient`` of ``Guard.async_client()``, as :class:`GuardedClient`."""

    def stream(  # type: ignore[override]
        self,
        method: str,
        url: httpx.URL | str,
        *,
        extensions: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> AbstractAsyncContextManager[httpx.Response]:
        return super().stream(method, url, extensions=_streamed(extensions), **kwargs)
