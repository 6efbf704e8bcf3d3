"""httpx response bodies for the guarded transports: guarded streams, failure bodies.

A successful response whose body is still to come is handed over with its stream
wrapped, so that the call's breaker outcome is settled when the body ends (the call core's
``WRAP``). A failure response is either drained before a retry (so its connection can be
reused) or read, capped, into the :class:`UpstreamStatusError` raised for it.

Every read of a body, by the caller or by us, stops at the call's deadline by itself: the
request's read timeout carries the call (:class:`~gateway_guard._httpx_deadlines.Bound`).
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING

import httpx

from ._httpx_deadlines import classified
from .errors import UpstreamError

if TYPE_CHECKING:
    from ._call import Call

__all__ = [
    "AsyncGuardedStream",
    "GuardedStream",
    "adrain",
    "aread_ahead",
    "aread_capped",
    "drain",
    "read_ahead",
    "read_capped",
]

# The most of a failure response's body kept for logs; the rest is never read.
_MAX_ERROR_BODY = 64 * 1024

# A failure body smaller than this is read before a retry so its connection goes back to
# the pool; a larger one is cheaper to drop than to download.
_MAX_DRAIN = 64 * 1024


# --- guarded streams -----------------------------------------------------------------------


class _Settling:
    """What both guarded body streams share: the call's outcome is settled exactly once."""

    __slots__ = ("_call", "_inner", "_open")
    _call: Call
    _open: bool

    def _done(self) -> None:
        if self._open:
            self._open = False
            self._call.body_done()

    def _failed(self, exc: httpx.TransportError) -> UpstreamError:
        """The body broke off: the classified error to raise (chained to ``exc``)."""
        self._open = False
        call = self._call
        error = classified(exc, call.rt.name)
        call.body_failed(error)
        return error

    def _closed(self) -> None:
        """close()/aclose(): the caller stopped reading.

        httpx decodes a body above the transport, so a corrupt ``Content-Encoding`` never
        reaches us as an error of our stream: only as the exception being handled while
        httpx closes the response. That one is the upstream's failure; any other early
        close tells us nothing about the upstream.
        """
        exc = sys.exc_info()[1]
        if self._open and isinstance(exc, httpx.DecodingError):
            self._open = False
            call = self._call
            call.body_failed(classified(exc, call.rt.name))
        else:
            self._settle()

    def _settle(self) -> None:
        # Closed before the end (the caller stopped reading): nothing learned about the
        # upstream, but a half-open probe slot must be given back.
        if self._open:
            self._open = False
            self._call.cancelled()

    def __del__(self) -> None:
        # A response dropped without close() must not keep a probe slot forever. The
        # garbage collector may run this on a thread that holds the breaker's lock, so
        # it reports through dropped(), which takes none.
        if self._open:
            self._open = False
            self._call.dropped()


class GuardedStream(_Settling, httpx.SyncByteStream):
    """Records the breaker outcome when the body ends; classifies failures mid-body."""

    def __init__(self, inner: httpx.SyncByteStream, call: Call) -> None:
        self._inner = inner
        self._call = call
        self._open = True

    def __iter__(self) -> Iterator[bytes]:
        # Each read stops at the call's deadline by itself: the request's timeouts carry
        # the call (_httpx_deadlines.Bound).
        try:
            yield from self._inner
        except httpx.TransportError as exc:
            raise self._failed(exc) from exc
        self._done()

    def close(self) -> None:
        try:
            self._inner.close()
        finally:
            self._closed()


class AsyncGuardedStream(_Settling, httpx.AsyncByteStream):
    def __init__(self, inner: httpx.AsyncByteStream, call: Call) -> None:
        self._inner = inner
        self._call = call
        self._open = True

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._inner:
                yield chunk
        except httpx.TransportError as exc:
            raise self._failed(exc) from exc
        self._done()

    async def aclose(self) -> None:
        try:
            await self._inner.aclose()
        finally:
            self._closed()


# --- bodies read within the attempt ---------------------------------------------------------


def read_ahead(response: httpx.Response) -> bool:
    """Read a success's body within its attempt (the call core's ``reads_ahead``).

    A body that breaks off or stalls raises its transport error here, where the driver
    handles it as the attempt's failure; one that arrives whole is handed on from memory,
    still encoded: httpx decodes it for the caller as before. True when that decoding
    cannot fail (no ``Content-Encoding``), so the call is settled now; otherwise it is
    settled by the guarded stream, which counts a corrupt encoding as the upstream's.
    """
    stream: httpx.SyncByteStream = response.stream  # type: ignore[assignment]
    try:
        body = b"".join(stream)
    finally:
        stream.close()  # the connection goes back to the pool, or away after a failure
    response.stream = httpx.ByteStream(body)
    return _identity(response)


async def aread_ahead(response: httpx.Response) -> bool:
    stream: httpx.AsyncByteStream = response.stream  # type: ignore[assignment]
    try:
        body = b"".join([chunk async for chunk in stream])
    finally:
        await stream.aclose()
    response.stream = httpx.ByteStream(body)
    return _identity(response)


def _identity(response: httpx.Response) -> bool:
    # httpx's raw header list (raw name, lower-cased name, value), as transport.py reads
    # Content-Length: Headers.get() would decode every header to find one.
    for _, name, _value in response.headers._list:  # noqa: SIM110 - all() adds a generator
        if name == b"content-encoding":
            return False
    return True


# --- failure bodies ------------------------------------------------------------------------


def read_capped(response: httpx.Response) -> None:
    """Keep up to _MAX_ERROR_BODY of a failure response (decoded) for logs, then close.

    Reading stops at the call's deadline (its request's timeouts carry it): what arrived
    by then is kept.
    """
    if response.is_stream_consumed:  # built from bytes: already in memory
        response.close()
        return
    chunks: list[bytes] = []
    try:
        size = 0
        for chunk in response.iter_bytes():
            chunks.append(chunk)
            size += len(chunk)
            if size >= _MAX_ERROR_BODY:
                break
    except httpx.HTTPError:
        pass  # what arrived is kept; a failure body is evidence, not data
    finally:
        response._content = b"".join(chunks)[:_MAX_ERROR_BODY]
        response.close()


async def aread_capped(response: httpx.Response) -> None:
    if response.is_stream_consumed:
        await response.aclose()
        return
    chunks: list[bytes] = []
    try:
        size = 0
        async for chunk in response.aiter_bytes():
            chunks.append(chunk)
            size += len(chunk)
            if size >= _MAX_ERROR_BODY:
                break
    except httpx.HTTPError:
        pass
    finally:
        response._content = b"".join(chunks)[:_MAX_ERROR_BODY]
        await response.aclose()


def drain(response: httpx.Response) -> None:
    """Read (a small) failure body before retrying, so the connection can be reused."""
    if response.is_stream_consumed:
        response.close()
        return
    try:
        size = 0
        for chunk in response.iter_raw():
            size += len(chunk)
            if size > _MAX_DRAIN:
                break
    except httpx.HTTPError:
        pass  # the connection is gone anyway; the retry opens another
    finally:
        response.close()


async def adrain(response: httpx.Response) -> None:
    if response.is_stream_consumed:
        await response.aclose()
        return
    try:
        size = 0
        async for chunk in response.aiter_raw():
            size += len(chunk)
            if size > _MAX_DRAIN:
                break
    except httpx.HTTPError:
        pass
    finally:
        await response.aclose()
