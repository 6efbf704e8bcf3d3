"""Wall-clock deadlines under httpx: a guarded call's socket reads and writes stop at its
deadline, however the upstream paces its bytes.

httpx has no total timeout, and httpcore's read timeout bounds one socket read: an upstream
that sends a header line or a body byte every 0.25 s keeps every read short and never
trips it. So the network backend of httpx's own transports (their httpcore connection
pool) is wrapped once, when a guarded transport is built around one, and the drivers give
each attempt a read/write timeout that is a :class:`Bound`: a float that also carries the
call. httpcore hands every socket read and write of that request (the body's too, long
after the transport returned) its own timeout, so the wrapped stream finds the deadline in
it: it fails with :class:`DeadlineExceeded` once the deadline has passed, and otherwise
clips the read to what is left, so a call ends at its deadline, not a read later. A plain
float (any request that is not a guarded call's) passes straight through.

Other inner transports (a ``MockTransport``, a user's own) keep only the per-attempt
timeouts clipped to the deadline: there is no socket here to bound.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import httpcore

from .errors import UpstreamError, from_exception

if TYPE_CHECKING:
    from ._call import Call

__all__ = ["Bound", "DeadlineExceeded", "classified", "install", "timeouts"]


class Bound(float):
    """A read or write timeout that carries the call whose deadline bounds it.

    Carried by the timeout rather than published per call (a ContextVar's set and reset
    cost ~2,500 instructions a call, a thread-local's about as much: bench/transport.py
    --instructions, 2026-12-07), and it bounds exactly this request's reads: not the
    caller's own code between two body chunks, nor another call made there.
    """

    __slots__ = ("call",)
    call: Call


def timeouts(call: Call) -> dict[str, float]:
    """An attempt's ``timeout`` extension: its timeouts, clipped to the deadline, with the
    read and write ones bounded by the deadline on every socket operation.

    Built per attempt, only for transports with sockets to bound: +0.21 µs an attempt
    over the policy's prebuilt dict (timeit, 2026-12-07), against a network round trip.
    """
    if call.clipped:
        connect, read = call.connect_timeout, call.read_timeout
    else:
        policy = call.policy
        connect, read = policy.connect_timeout, policy.read_timeout
    bound = Bound(read)
    bound.call = call
    return {"connect": connect, "read": bound, "write": bound, "pool": connect}


class DeadlineExceeded(httpcore.ReadTimeout):
    """The call's deadline passed during a socket read or write.

    A ``httpcore.ReadTimeout``, so that httpx raises it as ``httpx.ReadTimeout`` (chained)
    and connection pools treat it as the timeout it is.
    """


def classified(exc: BaseException, upstream: str) -> UpstreamError:
    """``errors.from_exception``, naming the deadline (504 ``http_response_timeout``) when
    it is what ended a read or write, not the per-read timeout httpx reports."""
    error = from_exception(exc, upstream=upstream)
    if isinstance(exc.__cause__, DeadlineExceeded):
        error.proxy_error = "http_response_timeout"
    return error


def _remaining(call: Call) -> float:
    # The clock read into a local: CPython 3.11 cannot specialise call.rt.clock().
    clock = call.rt.clock
    remaining = call.deadline_at - clock()
    if remaining <= 0.0:
        raise DeadlineExceeded(f"deadline of upstream {call.rt.name!r} exhausted")
    return remaining


def _limit(timeout: float | None) -> tuple[float | None, bool]:
    """One socket operation's timeout, and whether the call's deadline is what set it (a
    timeout then means the deadline, not the per-read timeout). Shared by the sync and
    async streams' reads and writes: one decision, four call sites."""
    if type(timeout) is not Bound:
        return timeout, False
    remaining = _remaining(timeout.call)
    if timeout <= remaining:
        return timeout, False
    return remaining, True


def install(inner: object) -> bool:
    """Bound ``inner``'s socket I/O by each guarded call's deadline, if it is one of httpx's
    HTTP transports (anything with an httpcore pool); otherwise leave it alone.

    True when ``inner``'s sockets are bounded: only then do attempts need :func:`timeouts`
    (with no socket to read, a :class:`Bound` would bound nothing).
    """
    pool = getattr(inner, "_pool", None)
    backend = getattr(pool, "_network_backend", None)
    if isinstance(backend, _Backend | _AsyncBackend):
        return True  # shared by two guarded transports: wrapped once
    if isinstance(backend, httpcore.NetworkBackend):
        pool._network_backend = _Backend(backend)  # type: ignore[union-attr]
        return True
    if isinstance(backend, httpcore.AsyncNetworkBackend):
        pool._network_backend = _AsyncBackend(backend)  # type: ignore[union-attr]
        return True
    return False


# --- sync ----------------------------------------------------------------------------------


class _Stream(httpcore.NetworkStream):
    __slots__ = ("_inner",)

    def __init__(self, inner: httpcore.NetworkStream) -> None:
        self._inner = inner

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        limit, deadline = _limit(timeout)
        try:
            return self._inner.read(max_bytes, limit)
        except httpcore.ReadTimeout as exc:
            if deadline:
                raise DeadlineExceeded(str(exc)) from exc
            raise

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        limit, deadline = _limit(timeout)
        try:
            self._inner.write(buffer, limit)
        except httpcore.WriteTimeout as exc:
            if deadline:
                raise DeadlineExceeded(str(exc)) from exc
            raise

    def close(self) -> None:
        self._inner.close()

    def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        return _Stream(self._inner.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _Backend(httpcore.NetworkBackend):
    __slots__ = ("_inner",)

    def __init__(self, inner: httpcore.NetworkBackend) -> None:
        self._inner = inner

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        stream = self._inner.connect_tcp(host, port, timeout, local_address, socket_options)
        return _Stream(stream)

    def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        return _Stream(self._inner.connect_unix_socket(path, timeout, socket_options))

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


# --- async ---------------------------------------------------------------------------------


class _AsyncStream(httpcore.AsyncNetworkStream):
    __slots__ = ("_inner",)

    def __init__(self, inner: httpcore.AsyncNetworkStream) -> None:
        self._inner = inner

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        limit, deadline = _limit(timeout)
        try:
            return await self._inner.read(max_bytes, limit)
        except httpcore.ReadTimeout as exc:
            if deadline:
                raise DeadlineExceeded(str(exc)) from exc
            raise

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        limit, deadline = _limit(timeout)
        try:
            await self._inner.write(buffer, limit)
        except httpcore.WriteTimeout as exc:
            if deadline:
                raise DeadlineExceeded(str(exc)) from exc
            raise

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.AsyncNetworkStream:
        return _AsyncStream(await self._inner.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _AsyncBackend(httpcore.AsyncNetworkBackend):
    __slots__ = ("_inner",)

    def __init__(self, inner: httpcore.AsyncNetworkBackend) -> None:
        self._inner = inner

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        stream = await self._inner.connect_tcp(host, port, timeout, local_address, socket_options)
        return _AsyncStream(stream)

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        return _AsyncStream(await self._inner.connect_unix_socket(path, timeout, socket_options))

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)
