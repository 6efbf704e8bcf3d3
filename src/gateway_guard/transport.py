"""Guarded httpx transports: thin sync and async drivers over one decision core.

``_Call`` holds every decision of one outbound call (policy, deadline, breaker admission,
timeouts, classification, retry). The drivers only do what differs between sync and async:
wait for a bulkhead slot, send through the inner transport, and sleep before a retry.

Only httpx transport errors count against an upstream: any other exception out of the
inner transport is a bug on our side of the wire, re-raised untouched and never blamed on
the upstream's breaker.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING

import httpx

from .context import CallRecord, RequestContext, get_context
from .errors import (
    CircuitOpenError,
    LoadShedError,
    UpstreamError,
    UpstreamStatusError,
    UpstreamTimeout,
    from_exception,
)
from .headers import new_traceparent, parse_retry_after
from .retry import RetryState, request_is_replayable

if TYPE_CHECKING:
    from .guard import UpstreamRuntime
    from .policy import CallPolicy

__all__ = ["AsyncGuardedTransport", "GuardedTransport"]

# What _Call.answered() says besides a retry wait (which is >= 0).
RETURN = -1.0
WRAP = -2.0
RAISE = -3.0

_ByteStream = httpx.ByteStream

# The most of a failure response's body kept for logs; the rest is never read.
_MAX_ERROR_BODY = 64 * 1024


class _Call:
    """The decisions of one outbound call, shared by the sync and async drivers.

    Created once the bulkhead slot is held; creating it admits the first attempt, so the
    happy path is one object, one breaker admission and two clock reads.
    """

    __slots__ = (
        "attempt",
        "ctx",
        "deadline_at",
        "last_status",
        "policy",
        "probe",
        "request",
        "rt",
        "started",
        "state",
        "streaming",
        "t0",
    )

    def __init__(self, rt: UpstreamRuntime, request: httpx.Request) -> None:
        # Every attribute that holds a callable is read into a local before the call: a
        # method call on an instance attribute is a lookup CPython 3.11 cannot specialise.
        clock = rt.clock
        now = clock()
        self.rt = rt
        self.request = request
        self.started = self.t0 = now
        self.attempt = 1
        self.state: RetryState | None = None
        self.last_status: int | None = None
        policy = rt.policy
        ctx = get_context()
        self.ctx = ctx
        if ctx is None:
            deadline_at = now + policy.deadline
        else:
            route = ctx.route
            if route is not None:
                policy = route.calls.get(rt.name, policy)
            deadline_at = now + policy.deadline
            if ctx.deadline_at is not None and ctx.deadline_at < deadline_at:
                deadline_at = ctx.deadline_at
            _propagate(request, ctx)
        self.policy = policy
        self.deadline_at = deadline_at
        # A body we hold in memory can be sent again; a stream is consumed by the first
        # attempt (and may be replaced by a ByteStream once read, so look now), so a
        # streaming request (including multipart uploads, whose file parts are read as
        # they are sent) is never retried.
        self.streaming = not isinstance(request.stream, _ByteStream)
        rt.budget.record_call(now)
        # The first attempt's admission, as in admit() but inline: it is on every call.
        remaining = deadline_at - now
        if remaining <= 0.0:
            raise self._deadline_error()
        breaker = rt.breaker
        if breaker.passing:
            self.probe = False  # what admit() would say, without calling it
        else:
            try:
                self.probe = breaker.admit()
            except CircuitOpenError as exc:
                self._refused(exc, now)
                raise
        if remaining >= policy.unclipped_after:
            request.extensions["timeout"] = policy.timeouts
        else:
            request.extensions["timeout"] = _clipped(policy, remaining)

    # --- before each retry -----------------------------------------------------------------

    def admit(self) -> None:
        """Admit a retry: the breaker may have opened, the deadline may have run out."""
        self.attempt += 1
        now = self.rt.clock()
        remaining = self.deadline_at - now
        if remaining <= 0.0:
            raise self._deadline_error()
        try:
            self.probe = self.rt.breaker.admit()
        except CircuitOpenError as exc:
            self._refused(exc, now)
            raise
        policy = self.policy
        if remaining >= policy.unclipped_after:
            self.request.extensions["timeout"] = policy.timeouts
        else:
            self.request.extensions["timeout"] = _clipped(policy, remaining)
        self.t0 = now

    def _refused(self, exc: CircuitOpenError, now: float) -> None:
        """The breaker said no (it may open between our own retries): say what was tried."""
        exc.attempts = self.attempt - 1
        exc.received_status = self.last_status
        exc.elapsed = now - self.started
        self._record(self.last_status, exc.proxy_error)

    # --- after each attempt ----------------------------------------------------------------

    def failed(self, exc: httpx.TransportError) -> float:
        """The attempt raised: record it, then return the wait before a retry or raise."""
        now = self.rt.clock()
        error = from_exception(
            exc, upstream=self.rt.name, attempts=self.attempt, elapsed=now - self.started
        )
        clipped = self.deadline_at - self.t0 < self.policy.unclipped_after
        if clipped and isinstance(exc, httpx.TimeoutException) and now >= self.deadline_at:
            # The attempt's timeout was cut to fit the deadline, and the deadline is what
            # ran out: say so, rather than blame a connect or read timeout it never reached.
            error.proxy_error = "http_response_timeout"
        breaker = self.rt.breaker
        if error.status in (502, 504):
            breaker.record_failure(now - self.t0, self.probe)
        else:
            # Our own pool (503) or configuration (500): nothing to hold against the upstream.
            breaker.record_ignored(self.probe)
        wait = self._decide(exc=exc, status=None, retry_after=None, now=now)
        if wait is None:
            self._record(None, error.proxy_error)
            raise error from exc
        return wait

    def answered(self, response: httpx.Response) -> float:
        """The attempt got a response: what to do with it.

        A wait (>= 0) before a retry, or one of :data:`RETURN` (hand it to the caller),
        :data:`WRAP` (hand it over with its body guarded: its breaker outcome is recorded
        when the body ends, so a body that breaks off is one failure, not a success and a
        failure) or :data:`RAISE` (retries spent on a failure status the caller asked not
        to receive). One decision, so the success path tests the status once.
        """
        status = response.status_code
        policy = self.policy
        if status not in policy.failure_statuses:
            if self.ctx is not None:
                self._record(status, None)
            if response.is_stream_consumed:
                # _succeeded(), inline: this is every successful call's path.
                rt = self.rt
                breaker = rt.breaker
                if breaker.times_successes:
                    clock = rt.clock
                    breaker.record_success(clock() - self.t0, self.probe)
                elif not breaker.quiet:
                    breaker.record_success(0.0, self.probe)
                return RETURN
            return WRAP
        now = self.rt.clock()
        self.last_status = status
        self.rt.breaker.record_status(status, now - self.t0, self.probe)
        if status in policy.retry.on_status:
            wait = self._decide(
                exc=None, status=status, retry_after=response.headers.get("retry-after"), now=now
            )
            if wait is not None:
                return wait
        self._record(status, None)
        return RAISE if policy.raise_on_failure_status else RETURN

    def status_error(self, response: httpx.Response) -> UpstreamStatusError:
        status = response.status_code
        retry_after = None
        header = response.headers.get("retry-after")
        if header is not None:
            retry_after = parse_retry_after(header)
        # httpx attaches the request after the transport returns; we raise before that.
        response.request = self.request
        return UpstreamStatusError(
            f"upstream {self.rt.name!r} answered {status} after {self.attempt} attempt(s)",
            response=response,
            upstream=self.rt.name,
            attempts=self.attempt,
            elapsed=self.rt.clock() - self.started,
            received_status=status,
            retry_after=retry_after,
        )

    def cancelled(self) -> None:
        """The attempt ended without an upstream answer we can judge (cancelled, or a bug
        on our side): it says nothing about the upstream."""
        self.rt.breaker.record_ignored(self.probe)

    # --- the body of a streamed response ---------------------------------------------------

    def body_done(self) -> None:
        self._succeeded()

    def _succeeded(self) -> None:
        rt = self.rt
        breaker = rt.breaker
        if breaker.times_successes:
            clock = rt.clock
            breaker.record_success(clock() - self.t0, self.probe)
        elif not breaker.quiet:
            # Nothing would use the duration: spare the clock read on every call.
            breaker.record_success(0.0, self.probe)

    def body_failed(self, exc: httpx.TransportError) -> UpstreamError:
        """The response body failed after the headers came: count it, classify it."""
        now = self.rt.clock()
        self.rt.breaker.record_failure(now - self.t0, self.probe)
        error = from_exception(
            exc, upstream=self.rt.name, attempts=self.attempt, elapsed=now - self.started
        )
        self._record(None, error.proxy_error)
        return error

    # --- shared decisions ------------------------------------------------------------------

    def _decide(
        self,
        *,
        exc: httpx.TransportError | None,
        status: int | None,
        retry_after: str | None,
        now: float,
    ) -> float | None:
        policy = self.policy
        if policy.retry.attempts <= self.attempt:
            return None
        state = self.state
        if state is None:
            state = self.state = RetryState(policy.retry, self.rt.budget)
        request = self.request
        decision = state.decide(
            attempt=self.attempt,
            exc=exc,
            status=status,
            retry_after_header=retry_after,
            remaining=self.deadline_at - now,
            replayable=request_is_replayable(policy.retry, request.method, request.headers),
            streaming_body=self.streaming,
        )
        return decision.wait if decision.retry else None

    def _deadline_error(self) -> UpstreamTimeout:
        self._record(self.last_status, "http_response_timeout")
        return UpstreamTimeout(
            f"deadline of upstream {self.rt.name!r} exhausted after {self.attempt - 1} attempt(s)",
            proxy_error="http_response_timeout",
            upstream=self.rt.name,
            attempts=self.attempt - 1,
            elapsed=self.rt.clock() - self.started,
            received_status=self.last_status,
        )

    def _record(self, status: int | None, error: str | None) -> None:
        ctx = self.ctx
        if ctx is not None and ctx.wants_records:
            ctx.record(
                CallRecord(
                    upstream=self.rt.name,
                    attempts=self.attempt,
                    elapsed=self.rt.clock() - self.started,
                    status=status,
                    error=error,
                )
            )


def _clipped(policy: CallPolicy, remaining: float) -> dict[str, float]:
    """The timeouts of an attempt with less time left than the policy's timeouts."""
    connect = min(policy.connect_timeout, remaining)
    read = min(policy.read_timeout, remaining)
    return {"connect": connect, "read": read, "write": read, "pool": connect}


def _shed(rt: UpstreamRuntime, exc: LoadShedError) -> LoadShedError:
    """The bulkhead refused the call: remember it for the request's diagnostics."""
    ctx = get_context()
    if ctx is not None and ctx.wants_records:
        ctx.record(
            CallRecord(
                upstream=rt.name,
                attempts=0,
                elapsed=exc.elapsed or 0.0,
                status=None,
                error=exc.proxy_error,
            )
        )
    return exc


def _propagate(request: httpx.Request, ctx: RequestContext) -> None:
    """Carry the inbound request id and trace to the upstream (the caller's own win)."""
    headers = request.headers
    if "x-request-id" not in headers:
        headers["X-Request-ID"] = ctx.request_id
    if "traceparent" not in headers:
        headers["traceparent"] = new_traceparent(ctx.trace_id)


def _read_capped(response: httpx.Response) -> None:
    """Keep up to _MAX_ERROR_BODY of a failure response (decoded) for logs, then close."""
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


async def _aread_capped(response: httpx.Response) -> None:
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


class _Settling:
    """What both guarded body streams share: the call's outcome is settled exactly once."""

    __slots__ = ("_call", "_inner", "_open")
    _call: _Call
    _open: bool

    def _settle(self) -> None:
        # Closed before the end (the caller stopped reading): nothing learned about the
        # upstream, but a half-open probe slot must be given back.
        if self._open:
            self._open = False
            self._call.cancelled()

    def __del__(self) -> None:
        # A response dropped without close() must not keep a probe slot forever.
        self._settle()


class _GuardedStream(_Settling, httpx.SyncByteStream):
    """Records the breaker outcome when the body ends; classifies failures mid-body."""

    def __init__(self, inner: httpx.SyncByteStream, call: _Call) -> None:
        self._inner = inner
        self._call = call
        self._open = True

    def __iter__(self) -> Iterator[bytes]:
        try:
            yield from self._inner
        except httpx.TransportError as exc:
            self._open = False
            raise self._call.body_failed(exc) from exc
        if self._open:
            self._open = False
            self._call.body_done()

    def close(self) -> None:
        try:
            self._inner.close()
        finally:
            self._settle()


class _AsyncGuardedStream(_Settling, httpx.AsyncByteStream):
    def __init__(self, inner: httpx.AsyncByteStream, call: _Call) -> None:
        self._inner = inner
        self._call = call
        self._open = True

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._inner:
                yield chunk
        except httpx.TransportError as exc:
            self._open = False
            raise self._call.body_failed(exc) from exc
        if self._open:
            self._open = False
            self._call.body_done()

    async def aclose(self) -> None:
        try:
            await self._inner.aclose()
        finally:
            self._settle()


# A failure body smaller than this is read before a retry so its connection goes back to
# the pool; a larger one is cheaper to drop than to download.
_MAX_DRAIN = 64 * 1024


def _drain(response: httpx.Response) -> None:
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


async def _adrain(response: httpx.Response) -> None:
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


def _sleep(seconds: float) -> None:
    if seconds > 0:
        time.sleep(seconds)


class GuardedTransport(httpx.BaseTransport):
    """An ``httpx.BaseTransport`` that guards every request to one upstream."""

    def __init__(self, runtime: UpstreamRuntime, inner: httpx.BaseTransport) -> None:
        self._rt = runtime
        self._inner = inner

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        rt = self._rt
        fast = rt.fail_fast
        if fast is not None:
            # The default fail-fast bulkhead, driven inline (TokenLimiter's protocol for
            # drivers that pair every take with one give-back, as the finally below does).
            try:
                fast.tokens.pop()
            except IndexError:
                raise _shed(rt, fast.refused()) from None
        else:
            try:
                rt.bulkhead.acquire()
            except LoadShedError as exc:
                raise _shed(rt, exc) from None
        try:
            call = _Call(rt, request)
            while True:
                try:
                    response = self._inner.handle_request(request)
                except httpx.TransportError as exc:
                    _sleep(call.failed(exc))
                    call.admit()
                    continue
                except BaseException:
                    call.cancelled()
                    raise
                outcome = call.answered(response)
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
            response.stream = _GuardedStream(response.stream, call)  # type: ignore[arg-type]
        elif outcome == RAISE:
            error = call.status_error(response)
            _read_capped(response)
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
        fast = rt.fail_fast
        if fast is not None:
            # As in GuardedTransport: the default bulkhead, driven inline.
            try:
                fast.tokens.pop()
            except IndexError:
                raise _shed(rt, fast.refused()) from None
        elif not rt.bulkhead.try_acquire():
            # A free slot is taken without creating a coroutine; only a wait needs one.
            try:
                await rt.bulkhead.acquire_async()
            except LoadShedError as exc:
                raise _shed(rt, exc) from None
        try:
            call = _Call(rt, request)
            while True:
                try:
                    response = await self._inner.handle_async_request(request)
                except httpx.TransportError as exc:
                    delay = call.failed(exc)
                    if delay > 0.0:
                        await asyncio.sleep(delay)
                    call.admit()
                    continue
                except BaseException:
                    call.cancelled()
                    raise
                outcome = call.answered(response)
                if outcome < 0.0:
                    break
                await _adrain(response)
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
            response.stream = _AsyncGuardedStream(response.stream, call)  # type: ignore[arg-type]
        elif outcome == RAISE:
            error = call.status_error(response)
            await _aread_capped(response)
            raise error
        return response

    async def aclose(self) -> None:
        await self._inner.aclose()
