"""The call core: every decision of one outbound call, for any HTTP client.

A driver (one per client library, sync or async) is a loop around :class:`Call` and makes
no decision of its own; it only translates its client's request, response and exceptions
to plain values. The protocol, in the manner of tenacity's ``iter()``::

    take a bulkhead slot                  # refused: raise shed(runtime, exc)
    call = Call(runtime, method, headers, body_is_a_stream)   # admits attempt 1; may raise
    while True:
        set the attempt's timeouts from call.connect_timeout / call.read_timeout
        try:
            response = send()
            if the caller reads the whole body and call.reads_ahead(status, content_length):
                read the body now  # one that breaks off fails this attempt, just below
        except <the client's transport errors> as exc:
            error = classify(exc)          # the driver's own classifier: an UpstreamError
            wait = call.failed(error, <the request may have reached the upstream>)
            if wait < 0.0: raise error from exc
            sleep(wait); call.admit(); continue            # admit() may raise
        except BaseException:
            call.cancelled(); raise        # cancelled, or a bug on our side: not the upstream's
        outcome = call.answered(response.status, response.headers, body_in_memory)
        if outcome < 0.0: break            # RETURN, WRAP or RAISE
        discard(response); sleep(outcome); call.admit()
    give the bulkhead slot back
    RETURN: return the response.  RAISE: raise call.status_error() (attach the response).
    WRAP: return it with its body guarded: body_done() at its end, body_failed(error) if it
          breaks off (raise that error), cancelled() if it is closed or dropped before.

Every admitted attempt is reported to the breaker exactly once, with its probe token, by
``failed`` / ``answered`` / ``cancelled`` / ``body_*`` (``dropped`` from a finaliser: it
takes no lock). An attempt that is retried is reported as retried, which counts in no
rate: the breaker judges the call by its last attempt, the outcome the caller sees.
Creating the Call (the first attempt) and ``admit`` (each retry) raise
:class:`CircuitOpenError` when the breaker says no and :class:`UpstreamTimeout` when the
deadline has run out, with what was tried so far.
A streamed request body (``body_is_a_stream``) is never sent twice. Waits are seconds
(>= 0); the negative constants below say what to do instead. The sync and async httpx
drivers (``transport.py``) are this loop plus the httpx glue.

Only the client's transport errors count against an upstream: any other exception out of
the client is a bug on our side of the wire (or a cancellation), re-raised untouched and
never blamed on the upstream's breaker.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from .context import CallRecord, RequestContext, get_context
from .errors import (
    CircuitOpenError,
    LoadShedError,
    UpstreamError,
    UpstreamStatusError,
    UpstreamTimeout,
)
from .events import (
    AttemptEnded,
    AttemptStarted,
    BreakerRejected,
    BudgetExhausted,
    BulkheadRejected,
    CallGivenUp,
    RetryScheduled,
)
from .headers import new_traceparent, parse_retry_after
from .retry import HeaderLookup, RetryState, request_is_replayable

if TYPE_CHECKING:
    from .events import AttemptOutcome, CallOutcome, Hooks
    from .guard import UpstreamRuntime
    from .policy import CallPolicy

__all__ = ["RAISE", "RETURN", "WRAP", "Call", "RequestHeaders", "shed"]

# What Call.answered() and Call.failed() say besides a retry wait (which is >= 0).
RETURN = -1.0  # hand the response to the caller
WRAP = -2.0  # hand it over with its body guarded (the breaker hears when the body ends)
RAISE = -3.0  # raise: the classified error (failed) or status_error() (answered)


class RequestHeaders(HeaderLookup, Protocol):
    """A request's headers, case-insensitive: ``httpx.Headers``, requests' and aiohttp's."""

    def __contains__(self, key: object, /) -> bool: ...

    def __setitem__(self, key: str, value: str, /) -> None: ...


def _propagate(headers: RequestHeaders, ctx: RequestContext, start_traces: bool) -> None:
    """Carry the inbound request id and trace to the upstream (the caller's own win).

    The inbound ``traceparent`` is passed on as it came: its parent-id is the caller's
    span, which exists. None is invented (a made-up parent-id is a span no collector
    ever sees) unless ``tracing.start_traces`` asks for one. With tracing on, the
    tracing hook then injects its attempt span's context over it.
    """
    if "x-request-id" not in headers:
        headers["X-Request-ID"] = ctx.request_id
    if "traceparent" not in headers:
        inbound = ctx.traceparent
        if inbound is not None:
            headers["traceparent"] = inbound
        elif start_traces:
            headers["traceparent"] = new_traceparent(ctx.trace_id)


class Call:
    """The decisions of one outbound call to one upstream. No I/O, no client types.

    Created once the bulkhead slot is held; creating it resolves the policy and the
    deadline, propagates the request id and trace into ``headers``, and admits the first
    attempt. ``streaming`` says the request body is a stream that cannot be sent twice (a
    body held in memory can).
    """

    __slots__ = (
        "attempt",
        "clipped",
        "ctx",
        "deadline_at",
        "headers",
        "hooks",
        "last_status",
        "method",
        "policy",
        "probe",
        "retry_after",
        "rt",
        "started",
        "state",
        "streaming",
        "t0",
        "why",
    )

    # How the request id and trace reach the upstream: a driver whose client offers a
    # cheaper way subclasses Call and replaces it (transport.py, for httpx's headers).
    propagate = staticmethod(_propagate)

    def __init__(
        self, rt: UpstreamRuntime, method: str, headers: RequestHeaders, streaming: bool
    ) -> None:
        # A callable held in a slot is read into a local first: CPython 3.11 cannot
        # specialise a method-style call of an instance attribute (rt.clock()).
        clock = rt.clock
        now = clock()
        self.rt = rt
        self.method = method
        self.headers = headers
        self.streaming = streaming
        self.started = now
        self.state: RetryState | None = None
        self.last_status: int | None = None
        self.retry_after: str | None = None
        # The Guard's event hooks, None when nothing listens (then no event is built).
        # Set to None again once CallEnded is emitted: a streamed body's end says nothing.
        self.hooks: Hooks | None = rt.hooks
        self.why = ""
        policy = rt.policy
        ctx = get_context()
        self.ctx = ctx
        if ctx is None:
            deadline_at = now + policy.deadline
        else:
            # The current route's policy for this upstream overrides the upstream's own,
            # and the call may not outlive the inbound request it serves.
            route = ctx.route
            if route is not None:
                policy = route.calls.get(rt.name, policy)
            deadline_at = now + policy.deadline
            if ctx.deadline_at is not None and ctx.deadline_at < deadline_at:
                deadline_at = ctx.deadline_at
            self.propagate(headers, ctx, rt.start_traces)
            ctx.upstream = rt.name  # log records name it (gateway_guard.log)
        self.policy: CallPolicy = policy
        self.deadline_at = deadline_at
        # RetryBudget.record_call(now), inline by its protocol (see RetryBudget), and the clock
        # read into a local above: 690,394 -> 689,377 instructions a client call
        # (bench/transport.py's call under valgrind, ASLR off, PYTHONHASHSEED=0, 2026-12-08).
        budget = rt.budget
        calls = budget.calls
        budget.calls = calls + 1
        if now >= budget.next_second:
            budget.mark(now, calls)
        # The first attempt's admission, as admit() with the breaker's passing hint, inline
        # (and _succeeded inline in answered): -1.0 us/call sync, -0.9 us async in
        # bench/transport.py client calls, interleaved runs, 2026-12-07.
        self.attempt = 1
        remaining = deadline_at - now
        if remaining <= 0.0:
            raise self._deadline_error()
        breaker = rt.breaker
        self.probe: int
        if breaker.passing:
            self.probe = False
        else:
            try:
                self.probe = breaker.admit()
            except CircuitOpenError as exc:
                self._refused(exc, now)
                raise
        self.clipped = remaining < policy.unclipped_after
        self.t0 = now
        if self.hooks is not None and self.hooks.each_attempt:
            self._attempt_started()

    # --- before each attempt ---------------------------------------------------------------

    def admit(self) -> None:
        """Admit a retry: the breaker may have opened, the deadline may have run out."""
        self.attempt += 1
        clock = self.rt.clock  # as in __init__
        now = clock()
        remaining = self.deadline_at - now
        if remaining <= 0.0:
            raise self._deadline_error()
        try:
            self.probe = self.rt.breaker.admit()
        except CircuitOpenError as exc:
            self._refused(exc, now)
            raise
        # With at least the longer timeout left, the policy's own timeouts apply as they
        # are (drivers reuse a prebuilt form of them); otherwise both are cut to fit.
        self.clipped = remaining < self.policy.unclipped_after
        self.t0 = now
        if self.hooks is not None and self.hooks.each_attempt:
            self._attempt_started()

    @property
    def connect_timeout(self) -> float:
        """This attempt's connect timeout in seconds (also for a pooled connection)."""
        return min(self.policy.connect_timeout, self.deadline_at - self.t0)

    @property
    def read_timeout(self) -> float:
        """This attempt's read timeout in seconds (also for writing the request)."""
        return min(self.policy.read_timeout, self.deadline_at - self.t0)

    def _refused(self, exc: CircuitOpenError, now: float) -> None:
        """The breaker said no (it may open between our own retries): say what was tried."""
        exc.attempts = self.attempt - 1
        exc.received_status = self.last_status
        exc.elapsed = now - self.started
        self._record(self.last_status, exc.proxy_error)
        hooks = self.hooks
        if hooks is not None:
            hooks.emit(
                BreakerRejected(
                    self.rt.name,
                    self._route(),
                    self.method,
                    id(self),
                    self.attempt,
                    self.rt.breaker.state.value,
                    exc.retry_after,
                )
            )
            self._call_ended("rejected", now, self.last_status, exc.proxy_error)

    # --- after each attempt ----------------------------------------------------------------

    def failed(self, error: UpstreamError, reached: bool) -> float:
        """The attempt raised ``error`` (classified by the driver): record it, then return
        the wait before a retry, or :data:`RAISE` (raise ``error``, chained to the cause).

        ``reached`` is False only when the request provably never left (a failed connect,
        a wait for a pooled connection): such a request is safe to retry for any method.
        """
        now = self.rt.clock()
        error.attempts = self.attempt
        error.elapsed = now - self.started
        if self.clipped and isinstance(error, UpstreamTimeout) and now >= self.deadline_at:
            # The attempt's timeout was cut to fit the deadline, and the deadline is what
            # ran out: say so, rather than blame a connect or read timeout it never reached.
            error.proxy_error = "http_response_timeout"
        wait = self._decide(error, reached, None, now)
        breaker = self.rt.breaker
        if error.status in (502, 504):
            timeout = isinstance(error, UpstreamTimeout)
            if wait < 0.0:
                breaker.record_failure(now - self.t0, self.probe, timeout=timeout)
            else:
                breaker.record_retried(now - self.t0, self.probe, timeout=timeout)
        else:
            # Our own pool (503) or configuration (500): nothing to hold against the upstream.
            breaker.record_ignored(self.probe)
        if wait < 0.0:
            self._record(None, error.proxy_error)
        if self.hooks is not None:
            self._attempt_ended("failure", now, None, error.proxy_error, wait)
        return wait

    def reads_ahead(self, status: int, length: bytes | None) -> bool:
        """Whether the driver should read this answer's body within the attempt, before
        :meth:`answered`, for a caller that reads the whole body anyway.

        Then a body that breaks off or stalls is this attempt's failure (:meth:`failed`),
        retried like any other, instead of the caller's after the call has ended. Only
        for a success that a retry could replace (a replayable request, attempts left, not
        a probe) and whose ``Content-Length`` (``length``, as sent; None if there is none)
        is at most ``retry.buffer_body_bytes``: a body of unknown length (a server-sent
        event stream, a chunked download) keeps streaming to the caller.
        """
        policy = self.policy
        retry = policy.retry
        limit = retry.buffer_body_bytes
        if (
            not limit
            or self.attempt >= retry.attempts
            or self.probe
            or self.streaming
            or status in policy.failure_statuses
        ):
            return False
        # ASCII digits only (bytes.isdigit), and few enough for int(); a malformed length
        # is httpcore's to refuse, as the failure it is.
        if length is None or len(length) > 18 or not length.isdigit() or int(length) > limit:
            return False
        # request_is_replayable's first test inline: a GET is answered without its frame,
        # on every read-ahead of a real call: -394 instructions (cachegrind, 100,000 calls,
        # ASLR off, 2026-12-08).
        method = self.method
        return method in retry.methods or request_is_replayable(retry, method, self.headers)

    def answered(self, status: int, headers: HeaderLookup, complete: bool) -> float:
        """The attempt got a response with ``status`` and ``headers``: what to do with it.

        ``complete`` says its body is already in memory. A wait (>= 0) before a retry, or
        one of :data:`RETURN`, :data:`WRAP` (a success whose body is still to come: its
        breaker outcome is recorded when the body ends, so a body that breaks off is one
        failure, not a success and a failure) or :data:`RAISE` (retries spent on a failure
        status the caller asked not to receive). The success path tests the status once.
        """
        policy = self.policy
        if status not in policy.failure_statuses:
            ctx = self.ctx
            # Recorded only for debug mode's Server-Timing (ctx.records): -1,305
            # instructions a call made within a request (715,546 -> 714,241 under valgrind,
            # ASLR off, PYTHONHASHSEED=0, 2026-12-08).
            if ctx is not None and ctx.records:
                self._record(status, None)
            hooks = self.hooks
            if hooks is not None:
                if hooks.each_attempt:
                    self._attempt_ended("success", self.rt.clock(), status, None, RETURN)
                else:  # only its end is heard: -3,100 instructions (bench/observability.py)
                    self._call_ended("success", self.rt.clock(), status, None)
            if complete:
                # _succeeded(), inline: paid for with the inline first admission (__init__).
                rt = self.rt
                breaker = rt.breaker
                if breaker.times_successes:
                    breaker.record_success(rt.clock() - self.t0, self.probe)
                elif not breaker.quiet:
                    breaker.record_success(0.0, self.probe)
                return RETURN
            return WRAP
        now = self.rt.clock()
        self.last_status = status
        self.retry_after = headers.get("retry-after")
        breaker = self.rt.breaker
        if status in policy.retry.on_status:
            wait = self._decide(None, True, status, now)
            if wait >= 0.0:
                breaker.record_retried(now - self.t0, self.probe)
                if self.hooks is not None:
                    self._attempt_ended("failure", now, status, None, wait)
                return wait
        else:
            self.why = "not_retryable"
        breaker.record_status(status, now - self.t0, self.probe)
        self._record(status, None)
        if self.hooks is not None:
            self._attempt_ended("failure", now, status, None, RAISE)
        return RAISE if policy.raise_on_failure_status else RETURN

    def status_error(self) -> UpstreamStatusError:
        """The error for :data:`RAISE` after :meth:`answered` (the driver attaches the
        response to it)."""
        status = self.last_status
        header = self.retry_after
        name = self.rt.name
        return UpstreamStatusError(
            f"upstream {name!r} answered {status} after {self.attempt} attempt(s)",
            upstream=name,
            attempts=self.attempt,
            elapsed=self.rt.clock() - self.started,
            received_status=status,
            retry_after=parse_retry_after(header) if header is not None else None,
        )

    def cancelled(self) -> None:
        """The attempt ended without an upstream answer we can judge (cancelled, or a bug
        on our side): it says nothing about the upstream, but a probe slot is given back."""
        self.rt.breaker.record_ignored(self.probe)
        if self.hooks is not None:
            self._attempt_ended("cancelled", self.rt.clock(), None, None, RAISE)

    def dropped(self) -> None:
        """:meth:`cancelled` for a finaliser (a response dropped unread): takes no lock."""
        self.rt.breaker.record_dropped(self.probe)

    # --- the body of a WRAPped response ----------------------------------------------------

    def body_done(self) -> None:
        """The body arrived whole: the call succeeded."""
        self._succeeded()

    def body_failed(self, error: UpstreamError) -> None:
        """The body broke off after the headers came (``error`` classified by the driver):
        count it against the upstream; the driver raises ``error``."""
        now = self.rt.clock()
        self.rt.breaker.record_failure(now - self.t0, self.probe)
        error.attempts = self.attempt
        error.elapsed = now - self.started
        self._record(None, error.proxy_error)

    # --- shared decisions ------------------------------------------------------------------

    def _succeeded(self) -> None:
        rt = self.rt
        breaker = rt.breaker
        if breaker.times_successes:
            breaker.record_success(rt.clock() - self.t0, self.probe)
        elif not breaker.quiet:
            # Nothing would use the duration: spare the clock read on every call.
            breaker.record_success(0.0, self.probe)

    def _decide(
        self, error: UpstreamError | None, reached: bool, status: int | None, now: float
    ) -> float:
        """The wait before the next attempt, or RAISE when there is none."""
        policy = self.policy
        if policy.retry.attempts <= self.attempt or self.probe:
            # A half-open probe is one attempt: it asks whether the upstream is back, and
            # retrying it would hold the spell open while the slot it gives back lets yet
            # another caller into a hung upstream (bench/outage scenario 1, threaded).
            self.why = "probe" if self.probe else "attempts_exhausted"
            return RAISE
        state = self.state
        if state is None:
            state = self.state = RetryState(policy.retry, self.rt.budget)
        decision = state.decide(
            attempt=self.attempt,
            error=error,
            reached=reached,
            status=status,
            retry_after_header=self.retry_after if status is not None else None,
            remaining=self.deadline_at - now,
            replayable=request_is_replayable(policy.retry, self.method, self.headers),
            streaming_body=self.streaming,
            # A Retry-After is waited out only when the attempt after it can at least
            # connect before the deadline; otherwise the caller (and the visitor) gets the
            # upstream's Retry-After at once.
            next_attempt=policy.connect_timeout,
        )
        if decision.retry:
            return decision.wait
        self.why = decision.reason
        return RAISE

    def _deadline_error(self) -> UpstreamTimeout:
        self._record(self.last_status, "http_response_timeout")
        name = self.rt.name
        if self.hooks is not None:
            now = self.rt.clock()
            status = self.last_status
            sent = self.attempt - 1
            if sent:
                self.why = "deadline"
                self._given_up(now, status, "http_response_timeout", sent)
            self._call_ended("failure", now, status, "http_response_timeout", sent)
        return UpstreamTimeout(
            f"deadline of upstream {name!r} exhausted after {self.attempt - 1} attempt(s)",
            proxy_error="http_response_timeout",
            upstream=name,
            attempts=self.attempt - 1,
            elapsed=self.rt.clock() - self.started,
            received_status=self.last_status,
        )

    # --- events (only with hooks: self.hooks is not None) -----------------------------------

    def _route(self) -> str | None:
        ctx = self.ctx
        route = ctx.route if ctx is not None else None
        return route.name if route is not None else None

    def _attempt_started(self) -> None:
        hooks = self.hooks
        assert hooks is not None
        if hooks.wants(AttemptStarted):  # built only when heard, as every event below
            hooks.emit(
                AttemptStarted(
                    self.rt.name, self._route(), self.method, self.attempt, id(self), self.headers
                )
            )

    def _attempt_ended(
        self,
        outcome: AttemptOutcome,
        now: float,
        status: int | None,
        proxy_error: str | None,
        wait: float,
    ) -> None:
        """The attempt's end, then what follows: a retry after ``wait``, or the call's end
        (RETURN: a success; otherwise it failed, or was cancelled)."""
        hooks = self.hooks
        assert hooks is not None
        name, route, method, call_id = self.rt.name, self._route(), self.method, id(self)
        if hooks.wants(AttemptEnded):  # built only when heard: see events._fast_init
            hooks.emit(
                AttemptEnded(
                    name,
                    route,
                    method,
                    self.attempt,
                    call_id,
                    outcome,
                    now - self.t0,
                    status,
                    proxy_error,
                )
            )
        if wait >= 0.0:
            if hooks.wants(RetryScheduled):
                hooks.emit(
                    RetryScheduled(
                        name, route, method, self.attempt, call_id, wait, status, proxy_error
                    )
                )
        elif wait == RETURN:
            self._call_ended("success", now, status, None)
        elif outcome == "cancelled":
            self._call_ended("cancelled", now, status, proxy_error)
        else:
            if self.why == "budget":
                hooks.emit(BudgetExhausted(name, route, method, call_id, self.attempt))
            self._given_up(now, status, proxy_error, self.attempt)
            self._call_ended("failure", now, status, proxy_error)

    def _given_up(
        self, now: float, status: int | None, proxy_error: str | None, attempts: int
    ) -> None:
        assert self.hooks is not None
        self.hooks.emit(
            CallGivenUp(
                self.rt.name,
                self._route(),
                self.method,
                id(self),
                attempts,
                self.why or "error",
                now - self.started,
                status,
                proxy_error,
            )
        )

    def _call_ended(
        self,
        outcome: CallOutcome,
        now: float,
        status: int | None,
        proxy_error: str | None,
        attempts: int | None = None,
    ) -> None:
        hooks = self.hooks
        assert hooks is not None
        # Once: what a streamed body does later is not the call's outcome any more.
        self.hooks = None
        ended = hooks.call_ended  # CallEnded's fields: the hooks build it only if needed
        if ended is None:
            return
        if attempts is None:
            attempts = self.attempt if outcome != "rejected" else self.attempt - 1
        ended(
            self.rt.name,
            self._route(),
            self.method,
            id(self),
            outcome,
            attempts,
            now - self.started,
            status,
            proxy_error,
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


def shed(rt: UpstreamRuntime, exc: LoadShedError) -> LoadShedError:
    """The bulkhead refused the call (no attempt made): remember it for the request's
    diagnostics, and return the error for the driver to raise."""
    ctx = get_context()
    hooks = rt.hooks
    if hooks is not None:
        route = ctx.route if ctx is not None else None
        hooks.emit(
            BulkheadRejected(rt.name, route.name if route is not None else None, exc.retry_after)
        )
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
