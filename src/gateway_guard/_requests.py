"""The requests driver of the call core: a guarded ``HTTPAdapter`` and session.

Every decision of a call is :class:`gateway_guard._call.Call`'s; the adapter follows its
protocol (see that module) as the httpx drivers do (``transport.py``) and adds only the
requests glue: the request's body kind, the attempt's timeouts, the classification of
requests' and urllib3's exceptions (``errors.from_exception``, which knows them by name),
and a guarded response body. urllib3's own retries are off (``max_retries=0``): ours
decide.

requests has no total timeout: each attempt's timeouts carry the call
(:class:`~gateway_guard._httpx_deadlines.Bound`), and the adapter's connection pools bound
every socket read and write by its deadline (:mod:`gateway_guard._urllib3_deadlines`).

With ``stream=False`` (``session.get()`` and the like, as httpx's ``client.get()``) the
adapter reads a success's body before it returns, as the session would at once anyway.
When the call core says so (``Call.reads_ahead``: a request that may be retried, attempts
left, a ``Content-Length`` within ``retry.buffer_body_bytes``) it reads it within the
attempt, so a body that breaks off or stalls is a failed attempt, retried like any other
(one that cannot be decoded is not: the same bytes would fail the same way). Otherwise it
reads it after the last attempt and settles the call at its end, like the httpx drivers'
``WRAP``: a body that breaks off is one failure, not retried. Either way a failure raises
the classified :class:`UpstreamError` from ``send``. With ``stream=True`` (as httpx's
``client.stream()``) the caller reads the body later: ``response.raw`` is wrapped so that
the breaker hears of the end, of a body that breaks off (raised as the classified error),
or of a response closed early. A body held in memory (``bytes``/``str``) can be
sent again; a generator or file is consumed by the first attempt, so such a request is
never retried.

Imported only when a guarded session or adapter is asked for: ``import gateway_guard``
never imports requests.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import requests
from requests.adapters import HTTPAdapter
from requests.models import CONTENT_CHUNK_SIZE
from urllib3.exceptions import ConnectTimeoutError, EmptyPoolError, NewConnectionError
from urllib3.exceptions import HTTPError as Urllib3Error

from ._call import RAISE, WRAP, Call, shed
from ._httpx_deadlines import Bound
from ._urllib3_deadlines import POOL_CLASSES, deadline_hit
from .errors import LoadShedError, UpstreamError, from_exception

if TYPE_CHECKING:
    from urllib3.poolmanager import PoolManager

    from .guard import UpstreamRuntime

__all__ = ["GuardedAdapter", "GuardedSession"]

# What requests' adapter raises for the network (everything else out of it is ours or the
# app's: re-raised untouched, never blamed on the upstream).
_TRANSPORT_ERRORS = (requests.RequestException, Urllib3Error, OSError)
# Raised before a byte of the request is written: safe to retry for any method.
_NEVER_SENT = (NewConnectionError, ConnectTimeoutError, EmptyPoolError)
# The most of a failure response's body kept for logs; the rest is never read.
_MAX_ERROR_BODY = 64 * 1024
# A failure body smaller than this is read before a retry so its connection goes back to
# the pool; a larger one is cheaper to drop than to download.
_MAX_DRAIN = 64 * 1024


def classified(exc: BaseException, upstream: str) -> UpstreamError:
    """The classified error for ``exc``, naming the deadline (504 ``http_response_timeout``)
    when it is what ended a read or write, not the per-read timeout urllib3 reports."""
    error = from_exception(exc, upstream=upstream)
    if deadline_hit(exc):
        error.proxy_error = "http_response_timeout"
    return error


def _never_sent(exc: BaseException) -> bool:
    current: BaseException | None = exc
    for _ in range(8):
        if current is None:
            return False
        if isinstance(current, _NEVER_SENT):
            return True
        reason = getattr(current, "reason", None)
        inner = current.args[0] if current.args else None
        if isinstance(reason, BaseException):
            current = reason
        elif isinstance(inner, BaseException):
            current = inner
        else:
            current = current.__cause__ or current.__context__
    return False


def _timeouts(call: Call) -> tuple[Bound, Bound]:
    """An attempt's (connect, read) timeouts, clipped to the deadline, carrying the call
    (see module doc). A tuple: requests builds urllib3's Timeout from it, as it does for a
    bare session's, so we build none of our own."""
    if call.clipped:
        connect, read = call.connect_timeout, call.read_timeout
    else:
        policy = call.policy
        connect, read = policy.connect_timeout, policy.read_timeout
    bound_connect = Bound(connect)
    bound_connect.call = call
    bound_read = Bound(read)
    bound_read.call = call
    return bound_connect, bound_read


def _streaming(body: object) -> bool:
    return body is not None and not isinstance(body, bytes | str)


def _sleep(seconds: float) -> None:
    if seconds > 0.0:
        time.sleep(seconds)


class GuardedAdapter(HTTPAdapter):
    """A requests ``HTTPAdapter`` that guards every request to one upstream.

    Mount it on a session the app already has::

        session.mount("https://payments.internal/", guard.requests_adapter("payments"))

    Whatever ``timeout=`` a request passes is replaced by the upstream's policy (its
    timeouts, clipped to the call's and the inbound request's deadline).
    """

    def __init__(
        self,
        runtime: UpstreamRuntime,
        pool_connections: int = 10,
        pool_maxsize: int = 10,
        pool_block: bool = False,
    ) -> None:
        self._rt = runtime
        super().__init__(
            pool_connections=pool_connections,
            pool_maxsize=pool_maxsize,
            max_retries=0,  # urllib3's Retry(0, read=False): ours decide
            pool_block=pool_block,
        )

    def init_poolmanager(
        self, connections: int, maxsize: int, block: bool = False, **pool_kwargs: Any
    ) -> None:
        super().init_poolmanager(connections, maxsize, block, **pool_kwargs)
        self.poolmanager.pool_classes_by_scheme = POOL_CLASSES

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> PoolManager:
        manager: PoolManager = super().proxy_manager_for(proxy, **proxy_kwargs)
        if not proxy.lower().startswith("socks"):
            # SOCKS pools build their own connections: those keep only the per-attempt
            # timeouts clipped to the deadline.
            manager.pool_classes_by_scheme = POOL_CLASSES
        return manager

    def send(
        self,
        request: requests.PreparedRequest,
        stream: bool = False,
        timeout: Any = None,
        verify: bool | str = True,
        cert: Any = None,
        proxies: Mapping[str, str] | None = None,
    ) -> requests.Response:
        rt = self._rt
        fast = rt.fail_fast
        if fast is not None:
            # The fail-fast bulkhead by TokenLimiter's inline protocol, as in transport.py.
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
            call = Call(rt, request.method or "GET", request.headers, _streaming(request.body))
            while True:
                try:
                    response = super().send(request, True, _timeouts(call), verify, cert, proxies)
                    complete = False
                    if not stream:
                        # Content-Length from the store of the header dict requests builds
                        # anyway, encoded bare (it was decoded as Latin-1, so it encodes;
                        # non-ASCII is no digit to reads_ahead): -920 and -280 instructions
                        # against headers.get() and encode("ascii", "replace") (cachegrind,
                        # 10,000 lookups, 2026-12-08).
                        length = response.headers._store.get("content-length")  # type: ignore[attr-defined]
                        if call.reads_ahead(
                            response.status_code,
                            None if length is None else length[1].encode(),
                        ):
                            # A body that breaks off or stalls now fails this attempt,
                            # like any other transport error just below; one that cannot be
                            # decoded fails it too, and the call core never retries that
                            # (the same bytes would fail the same way): one failure.
                            _read(response)
                            complete = True
                except _TRANSPORT_ERRORS as exc:
                    error = classified(exc, rt.name)
                    wait = call.failed(error, not _never_sent(exc))
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
                _drain(response)
                _sleep(outcome)
                call.admit()
        finally:
            if fast is not None:
                fast.tokens.append(None)
                fast.released += 1
            else:
                rt.bulkhead.release()
        if outcome == WRAP:
            if stream:
                response.raw = GuardedBody(response.raw, call)
            else:
                _read_whole(response, call)
        elif outcome == RAISE:
            error = call.status_error()
            _read_capped(response)
            error.response = response  # type: ignore[assignment]
            raise error
        return response


class GuardedBody:
    """``response.raw`` of a guarded response: urllib3's response, whose end (or breaking
    off, or early close) settles the call's breaker outcome exactly once."""

    __slots__ = ("_call", "_inner", "_open", "_original_response")

    def __init__(self, inner: Any, call: Call) -> None:
        self._inner = inner
        self._call = call
        self._open = True
        # Read three times a call by requests (cookies): as a slot it skips __getattr__,
        # which runs only after a failed lookup has built an AttributeError: -15,700
        # instructions a stream=True call (cachegrind, 400 minus 100 calls, 2026-12-07).
        self._original_response = getattr(inner, "_original_response", None)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def _failed(self, exc: BaseException) -> UpstreamError:
        self._open = False
        call = self._call
        error = classified(exc, call.rt.name)
        call.body_failed(error)
        return error

    def _done(self) -> None:
        if self._open:
            self._open = False
            self._call.body_done()

    def stream(
        self, amt: int | None = 2**16, decode_content: bool | None = None
    ) -> Iterator[bytes]:
        try:
            yield from self._inner.stream(amt, decode_content=decode_content)
        except _TRANSPORT_ERRORS as exc:
            if not self._open:
                raise
            raise self._failed(exc) from exc
        self._done()

    def read(self, amt: int | None = None, *args: Any, **kwargs: Any) -> bytes:
        try:
            data: bytes = self._inner.read(amt, *args, **kwargs)
        except _TRANSPORT_ERRORS as exc:
            if not self._open:
                raise
            raise self._failed(exc) from exc
        if amt is None or (not data and amt != 0):
            self._done()
        return data

    def close(self) -> None:
        try:
            self._inner.close()
        finally:
            if self._open:
                # Closed before the end: nothing learned about the upstream, but a
                # half-open probe slot must be given back.
                self._open = False
                self._call.cancelled()

    def release_conn(self) -> None:
        self._inner.release_conn()

    def __del__(self) -> None:
        # A response dropped unread must not keep a probe slot for ever. The garbage
        # collector may run this on a thread that holds the breaker's lock: dropped()
        # takes none.
        if self._open:
            self._open = False
            self._call.dropped()


def _read_whole(response: requests.Response, call: Call) -> None:
    """Read the body now, as the session would (``response.content``), and settle the
    call at its end: a body that breaks off raises the classified UpstreamError. For a
    ``stream=False`` body the call core did not have read within the attempt.

    Read as ``Response.content`` reads it (``raw.stream`` in ``CONTENT_CHUNK_SIZE``
    chunks, decoded), but from urllib3's response directly, so that its errors are
    classified before requests wraps them, with no GuardedBody and no generator of
    requests' or ours in between: -12,900 instructions a call (cachegrind, 400 minus 100
    calls of bench/clients.py, 2026-12-07).
    """
    try:
        _read(response)
    except _TRANSPORT_ERRORS as exc:
        error = classified(exc, call.rt.name)
        call.body_failed(error)
        raise error from exc
    except BaseException:
        call.cancelled()
        raise
    call.body_done()


def _read(response: requests.Response) -> None:
    """The whole body into ``response.content``, decoded, as ``Response.content`` reads it
    (``raw.stream`` in ``CONTENT_CHUNK_SIZE`` chunks); its errors are urllib3's. Used
    within the attempt (read ahead) and after it (:func:`_read_whole`)."""
    response._content = b"".join(response.raw.stream(CONTENT_CHUNK_SIZE, decode_content=True))
    response._content_consumed = True  # type: ignore[attr-defined]


def _read_capped(response: requests.Response) -> None:
    """Keep up to _MAX_ERROR_BODY of a failure response (decoded) for logs, then close.

    Every read stops at the call's deadline: what arrived by then is kept."""
    chunks: list[bytes] = []
    try:
        size = 0
        for chunk in response.raw.stream(_MAX_ERROR_BODY, decode_content=True):
            chunks.append(chunk)
            size += len(chunk)
            if size >= _MAX_ERROR_BODY:
                break
    except _TRANSPORT_ERRORS:
        pass  # what arrived is kept; a failure body is evidence, not data
    finally:
        response._content = b"".join(chunks)[:_MAX_ERROR_BODY]
        response._content_consumed = True  # type: ignore[attr-defined]
        response.raw.close()
        response.raw.release_conn()


def _drain(response: requests.Response) -> None:
    """Read (a small) failure body before retrying, so the connection can be reused."""
    raw = response.raw
    try:
        size = 0
        while size <= _MAX_DRAIN:
            data = raw.read(8192, decode_content=False)
            if not data:
                break  # read whole: urllib3 has put the connection back in its pool
            size += len(data)
    except _TRANSPORT_ERRORS:
        pass  # the connection is gone anyway; the retry opens another
    finally:
        response.close()


class GuardedSession(requests.Session):
    """A ``requests.Session`` whose relative URLs resolve against ``base_url`` (as httpx's
    ``base_url`` does: ``/charges`` under ``http://pay/api`` is ``http://pay/api/charges``)."""

    def __init__(self, base_url: str | None = None) -> None:
        super().__init__()
        self.base_url = base_url.rstrip("/") if base_url else None

    def request(
        self, method: str | bytes, url: str | bytes, *args: Any, **kwargs: Any
    ) -> requests.Response:
        base = self.base_url
        if base is not None:
            text = url.decode() if isinstance(url, bytes) else url
            if "://" not in text:
                url = f"{base}/{text.lstrip('/')}" if text else base
        return super().request(method, url, *args, **kwargs)
