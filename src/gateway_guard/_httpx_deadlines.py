"""Wall-clock deadlines under httpx: a guarded call's socket reads and writes stop at its
deadline, however the upstream paces its bytes.

httpx has no total timeout, and httpcore's read timeout bounds one socket read: an upstream
that sends a header line or a body byte every 0.25 s keeps every read short and never
trips it. So the network backend of httpx's own transports (their httpcore connection
pool) is wrapped once, when a guarded transport is built around one. Each read and write
then looks up the call in progress in this thread or task (:data:`active`, set by the
drivers while they send and while a guarded body is read), fails with
:class:`DeadlineExceeded` once its deadline has passed, and otherwise clips its own timeout
to what is left: a call ends at its deadline, not a read later. Outside a guarded call the
wrapper passes everything through.

Other inner transports (a ``MockTransport``, a user's own) keep only the per-attempt
timeouts clipped to the deadline: there is no socket here to bound.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterable
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

import httpcore

from .errors import UpstreamError, from_exception

if TYPE_CHECKING:
    from ._call import Call

__all__ = ["DeadlineExceeded", "active", "classified", "install"]

# The call whose deadline bounds socket I/O in this thread or task (None: no bound).
active: ContextVar[Call | None] = ContextVar("gateway_guard_active_call", default=None)


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
    remaining = call.deadline_at - call.rt.clock()
    if remaining <= 0.0:
        raise DeadlineExceeded(f"deadline of upstream {call.rt.name!r} exhausted")
    return remaining


def install(inner: object) -> None:
    """Bound ``inner``'s socket I/O by the active call's deadline, if it is one of httpx's
    HTTP transports (anything with an httpcore pool); otherwise leave it alone."""
    pool = getattr(inner, "_pool", None)
    backend = getattr(pool, "_network_backend", None)
    if isinstance(backend, _Backend | _AsyncBackend):
        return  # shared by two guarded transports: wrapped once
    if isinstance(backend, httpcore.NetworkBackend):
        pool._network_backend = _Backend(backend)  # type: ignore[union-attr]
    elif isinstance(backend, httpcore.AsyncNetworkBackend):
        pool._network_backend = _AsyncBackend(backend)  # type: ignore[union-attr]


# --- sync ----------------------------------------------------------------------------------


class _Stream(httpcore.NetworkStream):
    __slots__ = ("_inner",)

    def __init__(self, inner: httpcore.NetworkStream) -> None:
        self._inner = inner

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        call = active.get()
        if call is None:
            return self._inner.read(max_bytes, timeout)
        remaining = _remaining(call)
        if timeout is not None and timeout <= remaining:
            return self._inner.read(max_bytes, timeout)
        try:
            return self._inner.read(max_bytes, remaining)
        except httpcore.ReadTimeout as exc:
            raise DeadlineExceeded(str(exc)) from exc

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        call = active.get()
        if call is None:
            self._inner.write(buffer, timeout)
            return
        remaining = _remaining(call)
        if timeout is not None and timeout <= remaining:
            self._inner.write(buffer, timeout)
            return
        try:
            self._inner.write(buffer, remaining)
        except httpcore.WriteTimeout as exc:
            raise DeadlineExceeded(str(exc)) from exc

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
        call = active.get()
        if call is None:
            return await self._inner.read(max_bytes, timeout)
        remaining = _remaining(call)
        if timeout is not None and timeout <= remaining:
            return await self._inner.read(max_bytes, timeout)
        try:
            return await self._inner.read(max_bytes, remaining)
        except httpcore.ReadTimeout as exc:
            raise DeadlineExceeded(str(exc)) from exc

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        call = active.get()
        if call is None:
            await self._inner.write(buffer, timeout)
            return
        remaining = _remaining(call)
        if timeout is not None and timeout <= remaining:
            await self._inner.write(buffer, timeout)
            return
        try:
            await self._inner.write(buffer, remaining)
        except httpcore.WriteTimeout as exc:
            raise DeadlineExceeded(str(exc)) from exc

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
