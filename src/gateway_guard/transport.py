"""Guarded httpx transports: the sync and async httpx drivers of the call core.

Every decision of a call is :class:`gateway_guard._call.Call`'s; these drivers follow its
protocol (see that module) and add only the httpx glue: the timeout extension, the
classification of httpx's exceptions, and the guarded response bodies of
:mod:`gateway_guard._httpx_bodies`. The sync and async drivers differ only in how they
wait for a bulkhead slot, send, sleep and drain.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

import httpx

from ._call import RAISE, WRAP, Call, shed
from ._httpx_bodies import (
    AsyncGuardedStream,
    GuardedStream,
    adrain,
    aread_capped,
    drain,
    read_capped,
)
from .errors import LoadShedError, UpstreamError, from_exception
from .retry import never_sent

if TYPE_CHECKING:
    from .guard import UpstreamRuntime

__all__ = ["AsyncGuardedTransport", "GuardedTransport"]


def _start(rt: UpstreamRuntime, request: httpx.Request) -> Call:
    # A body held in memory can be sent again; a stream is consumed by the first attempt
    # (and may be replaced by a ByteStream once read, so look now): a streaming request,
    # multipart uploads included, is never retried.
    streaming = not isinstance(request.stream, httpx.ByteStream)
    return Call(rt, request.method, request.headers, streaming=streaming)


def _timeouts(call: Call) -> Mapping[str, float]:
    """The attempt's timeouts as httpx's ``timeout`` request extension."""
    if not call.clipped:
        return call.policy.timeouts  # prebuilt and shared: httpx only reads it
    connect, read = call.connect_timeout, call.read_timeout
    return {"connect": connect, "read": read, "write": read, "pool": connect}


def _classified(call: Call, exc: httpx.TransportError) -> tuple[UpstreamError, bool]:
    """The failed attempt's error, and whether the request may have reached the upstream."""
    return from_exception(exc, upstream=call.rt.name), not never_sent(exc)


def _sleep(seconds: float) -> None:
    if seconds > 0.0:
        time.sleep(seconds)


class GuardedTransport(httpx.BaseTransport):
    """An ``httpx.BaseTransport`` that guards every request to one upstream."""

    def __init__(self, runtime: UpstreamRuntime, inner: httpx.BaseTransport) -> None:
        self._rt = runtime
        self._inner = inner

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        rt = self._rt
        try:
            rt.bulkhead.acquire()
        except LoadShedError as exc:
            raise shed(rt, exc) from None
        try:
            call = _start(rt, request)
            while True:
                request.extensions["timeout"] = _timeouts(call)
                try:
                    response = self._inner.handle_request(request)
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
                outcome = call.answered(
                    response.status_code, response.headers, response.is_stream_consumed
                )
                if outcome < 0.0:
                    break
                drain(response)
                _sleep(outcome)
                call.admit()
        finally:
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

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        rt = self._rt
        if not rt.bulkhead.try_acquire():
            # A free slot is taken without creating a coroutine; only a wait needs one.
            try:
                await rt.bulkhead.acquire_async()
            except LoadShedError as exc:
                raise shed(rt, exc) from None
        try:
            call = _start(rt, request)
            while True:
                request.extensions["timeout"] = _timeouts(call)
                try:
                    response = await self._inner.handle_async_request(request)
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
                outcome = call.answered(
                    response.status_code, response.headers, response.is_stream_consumed
                )
                if outcome < 0.0:
                    break
                await adrain(response)
                if outcome > 0.0:
                    await asyncio.sleep(outcome)
                call.admit()
        finally:
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
