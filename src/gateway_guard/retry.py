"""Retry decisions: backoff schedule, retry budget, Retry-After and idempotency.

Everything here is synchronous and I/O-free. The sync and async transports are short
loops around :meth:`RetryState.decide`, which returns a :class:`RetryDecision` they act on::

    budget.record_call()                     # every call, once, before the first attempt
    attempt, state = 1, None
    while True:
        exc, status, response = send_once()  # the only part that differs sync / async
        if exc is None and status not in policy.on_status:
            return response                  # happy path: no RetryState, no tenacity
        state = state or RetryState(policy, budget)
        decision = state.decide(
            attempt=attempt, exc=exc, status=status,
            retry_after_header=response.headers.get("retry-after") if response else None,
            remaining=deadline_remaining(),
            replayable=request_is_replayable(policy, method, headers),
            streaming_body=body_is_a_stream,
        )
        if not decision.retry:
            fail(decision)                   # reason and retry_after go into the error
        close(response); sleep(decision.wait); attempt += 1

``decide`` applies these rules in order; the first that matches gives the reason:

======================== ===== =========================================================
reason                   retry when
======================== ===== =========================================================
``attempts_exhausted``   no    ``attempt`` reached ``policy.attempts`` (or the testing cap)
``streaming_body``       no    the request body was a stream we cannot send again
``not_retryable``        no    neither a retryable exception nor a status in ``on_status``
``non_idempotent``       no    the request may have reached the upstream and is not
                               replayable (method / Idempotency-Key / opt-in)
``retry_after_too_long`` no    the upstream's Retry-After exceeds ``max_retry_after``
``deadline``             no    the wait would use up the remaining deadline, or the
                               upstream's Retry-After would not leave the next attempt
                               ``next_attempt`` seconds of it (fail fast: the caller
                               passes the Retry-After on instead of waiting it out)
``budget``               no    the upstream's retry budget is spent
``error``                yes   retrying a retryable transport error
``status``               yes   retrying a retryable status
======================== ===== =========================================================
"""

from __future__ import annotations

import functools
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, NamedTuple, Protocol, cast

import httpx
import tenacity

from gateway_guard import _fork
from gateway_guard.errors import (
    CircuitOpenError,
    LoadShedError,
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeout,
    classify,
)
from gateway_guard.headers import parse_retry_after
from gateway_guard.policy import RetryPolicy

if TYPE_CHECKING:
    from tenacity import RetryCallState

__all__ = ["is_testing", "set_testing", "testing"]

RetryReason = Literal[
    "attempts_exhausted",
    "budget",
    "deadline",
    "error",
    "non_idempotent",
    "not_retryable",
    "retry_after_too_long",
    "status",
    "streaming_body",
]


@dataclass(frozen=True, slots=True)
class RetryDecision:
    """What to do after a failed attempt.

    ``wait`` is the seconds to sleep before the next attempt (0 when ``retry`` is false).
    ``retry_after`` is the upstream's parsed Retry-After in seconds, when it sent one,
    whether or not we retry: the error raised on a denial can pass it on to the client.
    """

    retry: bool
    wait: float
    reason: RetryReason
    retry_after: float | None = None


# Denials that carry nothing call-specific are shared, so most "no" answers allocate nothing.
_EXHAUSTED = RetryDecision(False, 0.0, "attempts_exhausted")
_STREAMING = RetryDecision(False, 0.0, "streaming_body")
_NOT_RETRYABLE = RetryDecision(False, 0.0, "not_retryable")
_NON_IDEMPOTENT = RetryDecision(False, 0.0, "non_idempotent")


# --- testing mode ------------------------------------------------------------------------


class _Testing(NamedTuple):
    attempts: int | None


# A single module global, read once per decision: replacing it is atomic, so flipping the
# switch from a test thread never leaves a decision half in one mode and half in the other.
_testing: _Testing | None = None


def set_testing(enabled: bool = True, *, attempts: int | None = None) -> None:
    """Switch testing mode on or off for the whole process.

    In testing mode every retry wait is 0 (Retry-After included), so test suites that
    exercise failing upstreams do not sleep. ``attempts`` additionally caps the attempts
    per call (``attempts=1`` disables retries altogether). Every other rule still applies:
    a Retry-After above ``max_retry_after`` still fails fast, budgets are still spent.
    """
    global _testing
    if attempts is not None and attempts < 1:
        raise ValueError(f"attempts must be at least 1, got {attempts!r}")
    _testing = _Testing(attempts) if enabled else None


def is_testing() -> bool:
    """Whether testing mode is on."""
    return _testing is not None


# A class, not a @contextmanager function: pytest collects module-level functions whose
# names start with "test", so a function called ``testing`` imported into a user's test
# module would be run as a test. Classes are only collected when named ``Test*``; the
# lowercase name follows contextlib.suppress, another class used like a function.
class testing:
    """Testing mode for the duration of a ``with`` block, then whatever was set before.

    >>> with testing(attempts=2):
    ...     is_testing()
    True
    """

    __slots__ = ("_attempts", "_enabled", "_previous")

    def __init__(self, enabled: bool = True, *, attempts: int | None = None) -> None:
        if attempts is not None and attempts < 1:
            raise ValueError(f"attempts must be at least 1, got {attempts!r}")
        self._enabled = enabled
        self._attempts = attempts
        self._previous: _Testing | None = None

    def __enter__(self) -> None:
        self._previous = _testing
        set_testing(self._enabled, attempts=self._attempts)

    def __exit__(self, *exc_info: object) -> None:
        global _testing
        _testing = self._previous


# --- backoff schedule --------------------------------------------------------------------


class _AttemptNumber:
    """The part of tenacity's ``RetryCallState`` its exponential waits read.

    ``wait_exponential`` and ``wait_random_exponential`` only look at ``attempt_number``
    (tenacity/wait.py), so building a whole ``RetryCallState`` (a Future, timings,
    statistics) per wait would be waste.
    """

    __slots__ = ("attempt_number",)

    def __init__(self, attempt_number: int) -> None:
        self.attempt_number = attempt_number


class RetrySchedule:
    """Exponential backoff for one :class:`RetryPolicy`, on tenacity's wait strategies.

    The wait before retry ``n`` (the one after attempt ``n`` failed) is
    ``backoff_initial * 2 ** (n - 1)`` capped at ``backoff_max``. With ``jitter`` it is drawn
    uniformly from ``[0, that]`` ("full jitter", tenacity's ``wait_random_exponential``):
    when an upstream falls over, every worker of every instance of the app fails at the
    same moment, and a uniform draw over the whole interval spreads their retries out the
    most. Additive jitter (``wait_exponential_jitter``) keeps them in lockstep above the
    base delay and needs a jitter size that suits both 0.1 s and 2 s waits; the price of
    full jitter, shorter average waits, is paid for by the retry budget, and an upstream
    that needs a minimum pause says so with Retry-After, which is honoured.

    Build it through :meth:`for_policy`, which keeps one per policy.
    """

    __slots__ = ("_max", "_saturated", "_strategy")

    def __init__(self, policy: RetryPolicy) -> None:
        initial, maximum = policy.backoff_initial, policy.backoff_max
        for name, value in (("backoff_initial", initial), ("backoff_max", maximum)):
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name}: must be a finite number >= 0, got {value!r}")
        self._max = float(maximum)
        strategy_class = (
            tenacity.wait_random_exponential if policy.jitter else tenacity.wait_exponential
        )
        self._strategy = strategy_class(multiplier=initial, max=maximum, exp_base=2, min=0)
        # Past this attempt number the un-jittered wait is the cap for good. Clamping the
        # attempt number here keeps exponents small whatever a caller passes (attempt
        # 10**9 would otherwise ask for a 10**9-bit integer when the cap is 0).
        if initial > 0 and maximum > 0:
            doublings = math.ceil(max(0.0, math.log2(maximum) - math.log2(initial)))
            self._saturated = min(doublings + 2, 1100)
        else:
            self._saturated = 1

    @classmethod
    def for_policy(cls, policy: RetryPolicy) -> RetrySchedule:
        """The schedule for ``policy``, built on first use and then shared."""
        return _schedule_for(policy)

    def wait(self, attempt_number: int) -> float:
        """Seconds to wait before retry number ``attempt_number`` (1 = the first retry).

        Always within ``[0, backoff_max]``. Testing mode does not apply here: this is the
        raw schedule, :meth:`RetryState.decide` zeroes it.
        """
        stand_in = _AttemptNumber(max(1, min(attempt_number, self._saturated)))
        try:
            value = float(self._strategy(cast("RetryCallState", stand_in)))
        except OverflowError:  # tenacity guards this itself; do not depend on that
            return self._max
        if 0.0 <= value <= self._max:
            return value
        # NaN lands here too; waiting the cap is the side that never retries too early.
        return 0.0 if value < 0.0 else self._max


# Policies are frozen and hashable, and there are few of them (one per upstream and route
# layering), so a small LRU is enough; the bound protects against code that builds
# policies on the fly.
@functools.lru_cache(maxsize=256)
def _schedule_for(policy: RetryPolicy) -> RetrySchedule:
    return RetrySchedule(policy)


# --- retry budget ------------------------------------------------------------------------

# ratio * calls is a float; 0.57 * 100 is 56.99999999999999, and we do not want a
# rounding error to cost a retry the formula allows.
_BUDGET_EPSILON = 1e-9
_MAX_WINDOW = 3600.0


class RetryBudget:
    """Caps retries to a share of recent calls, per upstream.

    A retry is allowed when both hold, over the sliding window and over the last second::

        retries + 1         <= ratio * calls        + min_per_second * seconds
        recent_retries + 1  <= ratio * recent_calls + min_per_second

    ``calls`` counts first attempts (:meth:`record_call`), ``retries`` counts retries
    allowed so far (:meth:`try_spend`), and ``seconds`` is how many whole seconds of the
    window the budget has existed for: ``min(ceil(window), whole seconds since creation + 1)``.
    ``recent_*`` count the last second, sliding: the current second's counts plus the
    previous second's, weighted by how much of it the last 1 s still overlaps. The floor
    lets quiet upstreams retry at all; ratio keeps a busy one from having its load
    multiplied when it fails. With ratio 0.1 and no floor, 100 calls that
    all fail get at most 10 retries.

    The window bounds the total; the second line bounds the *rate*. Without it, the
    allowance that healthy traffic left unspent over the last window (ratio x 10 s of
    calls, plus the floor x 10 s) could all be spent in the first second of an outage:
    at 100 calls/s that is up to 200 retries at once, a retry storm at the very moment a
    budget exists to prevent one. With it, retries never run faster than ``ratio`` times
    the recent call rate plus ``min_per_second``.

    Calls are one running count; the window finds them through *marks*: the first call
    of each second notes the count so far in a ring of ``ceil(window)`` slots. The
    earliest mark inside the window tells how many calls came before it, and no call
    came between the window's start and that mark (it would have left an earlier mark),
    so ``calls = total - earliest mark``. Retries live in per-second buckets in a second
    ring. Memory is fixed, and the window slides in one-second steps (a call leaves it
    between ``window - 1`` and ``window`` seconds after it was made).

    :meth:`record_call` is on every call's path and takes no lock: the count is a plain
    ``+= 1`` and only the first call of a second takes the lock, to write its mark. The
    call core does the same inline, by this protocol: ``before = calls; calls = before +
    1``, then ``mark(now, before)`` when ``now >= next_second``.
    CPython 3.11 does not switch threads inside that increment; an interpreter that did
    could lose a call, which only makes the budget *stricter* (fewer retries allowed),
    never looser. Retries are counted under the lock in :meth:`try_spend`.
    """

    __slots__ = (
        "__weakref__",
        "_clock",
        "_lock",
        "_mark_calls",
        "_mark_seconds",
        "_min_per_second",
        "_peers",
        "_ratio",
        "_retries",
        "_retry_seconds",
        "_size",
        "_start",
        "calls",
        "next_second",
    )

    def __init__(
        self,
        ratio: float,
        min_per_second: float,
        *,
        window: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not (math.isfinite(ratio) and ratio >= 0):
            raise ValueError(f"ratio: must be a finite number >= 0, got {ratio!r}")
        if not (math.isfinite(min_per_second) and min_per_second >= 0):
            raise ValueError(
                f"min_per_second: must be a finite number >= 0, got {min_per_second!r}"
            )
        if not (1.0 <= window <= _MAX_WINDOW):
            raise ValueError(f"window: must be between 1 and {_MAX_WINDOW:g}, got {window!r}")
        self._ratio = float(ratio)
        self._min_per_second = float(min_per_second)
        self._clock = clock
        self._size = size = math.ceil(window)
        self._lock = threading.Lock()
        self.calls = 0
        # The first call at or after _next_second writes the mark of its second.
        self.next_second = -math.inf
        # _mark_seconds[i] is the second whose mark slot i holds (None: never written);
        # _mark_calls[i] how many calls were counted before that second's first one.
        self._mark_seconds: list[int | None] = [None] * size
        self._mark_calls = [0] * size
        self._retry_seconds: list[int | None] = [None] * size
        self._retries = [0] * size
        self._start = int(clock())
        # Fleet mode (gateway_guard._fleet): the other processes' (calls, retries,
        # recent calls, recent retries), added to ours in try_spend so the fleet shares
        # one allowance, floor included. Zeros in local mode.
        self._peers: tuple[int, int, float, float] = (0, 0, 0.0, 0.0)
        _fork.register(self)

    def _after_fork(self) -> None:
        self._lock = threading.Lock()  # a forked child's copy may be held for ever

    @classmethod
    def from_policy(
        cls,
        policy: RetryPolicy,
        *,
        window: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> RetryBudget:
        """A budget with ``policy``'s ``budget_ratio`` and ``budget_min_per_second``."""
        return cls(policy.budget_ratio, policy.budget_min_per_second, window=window, clock=clock)

    def record_call(self, now: float | None = None) -> None:
        """Count one call (its first attempt). Call it once per call, retries excluded.

        ``now`` saves a clock read when the caller has one.
        """
        before = self.calls
        self.calls = before + 1
        if now is None:
            now = self._clock()
        if now >= self.next_second:
            self.mark(now, before)

    def mark(self, now: float, before: int) -> None:
        """The first call of a new second: note how many calls came before it."""
        second = int(now)
        with self._lock:
            # Another thread's call of the same second may have got here first.
            if second + 1 > self.next_second:
                slot = second % self._size
                self._mark_seconds[slot] = second
                self._mark_calls[slot] = before
                # A float, so the hot path's comparison with the clock stays float-float
                # (a mixed comparison is a slower, generic one in CPython).
                self.next_second = float(second + 1)

    def _counts_locked(self, second: int) -> tuple[int, int]:
        """(calls, retries) in the window ending with ``second``."""
        oldest = second - self._size
        earliest: int | None = None
        before = 0
        for stamp, calls in zip(self._mark_seconds, self._mark_calls, strict=True):
            if (
                stamp is not None
                and oldest < stamp <= second
                and (earliest is None or stamp < earliest)
            ):
                earliest, before = stamp, calls
        calls = self.calls - before if earliest is not None else 0
        retries = 0
        for stamp, bucket in zip(self._retry_seconds, self._retries, strict=True):
            if stamp is not None and oldest < stamp <= second:
                retries += bucket
        return calls, retries

    def try_spend(self) -> bool:
        """Take one retry from the budget if the formula allows it; say whether it did."""
        now = self._clock()
        second = int(now)
        slot = second % self._size
        peer_calls, peer_retries, peer_recent_calls, peer_recent_retries = self._peers
        with self._lock:
            calls, retries = self._counts_locked(second)
            calls += peer_calls
            retries += peer_retries
            seconds = min(self._size, max(1, second - self._start + 1))
            allowance = self._ratio * calls + self._min_per_second * seconds
            if retries + 1 > allowance + _BUDGET_EPSILON:
                return False
            # The last second, sliding: this second's counts plus the share of the
            # previous second's that the last 1 s still overlaps.
            overlap = 1.0 - (now - second)
            calls_now, calls_before = self._calls_per_second_locked(second)
            retries_now = self._retries[slot] if self._retry_seconds[slot] == second else 0
            before = (second - 1) % self._size
            retries_before = (
                self._retries[before] if self._retry_seconds[before] == second - 1 else 0
            )
            recent_calls = calls_now + overlap * calls_before + peer_recent_calls
            recent_retries = retries_now + overlap * retries_before + peer_recent_retries
            if (
                recent_retries + 1
                > self._ratio * recent_calls + self._min_per_second + _BUDGET_EPSILON
            ):
                return False
            if retries_now:
                self._retries[slot] += 1
            else:
                self._retry_seconds[slot] = second
                self._retries[slot] = 1
            return True

    def _calls_per_second_locked(self, second: int) -> tuple[int, int]:
        """Calls counted in ``second``, and in the second before it."""
        size = self._size
        slot, before_slot = second % size, (second - 1) % size
        current = self._mark_calls[slot] if self._mark_seconds[slot] == second else None
        before = (
            self._mark_calls[before_slot] if self._mark_seconds[before_slot] == second - 1 else None
        )
        now_calls = self.calls - current if current is not None else 0
        end = current if current is not None else self.calls
        before_calls = end - before if before is not None else 0
        return now_calls, before_calls

    def remaining(self) -> float:
        """Retries the window still allows now (the rate over the last second aside)."""
        second = int(self._clock())
        with self._lock:
            calls, retries = self._counts_locked(second)
            seconds = min(self._size, max(1, second - self._start + 1))
            allowance = self._ratio * calls + self._min_per_second * seconds
        return max(0.0, allowance - retries)

    def counts(self) -> tuple[int, int]:
        """``(calls, retries)`` currently in the window, for metrics and tests."""
        second = int(self._clock())
        with self._lock:
            return self._counts_locked(second)

    def local_counts(self) -> tuple[int, int, float, float]:
        """This process's ``(calls, retries, recent calls, recent retries)``, peers left
        out: what a fleet store shares with the other processes."""
        now = self._clock()
        second = int(now)
        with self._lock:
            calls, retries = self._counts_locked(second)
            overlap = 1.0 - (now - second)
            calls_now, calls_before = self._calls_per_second_locked(second)
            slot, before = second % self._size, (second - 1) % self._size
            retries_now = self._retries[slot] if self._retry_seconds[slot] == second else 0
            retries_before = (
                self._retries[before] if self._retry_seconds[before] == second - 1 else 0
            )
        return (
            calls,
            retries,
            calls_now + overlap * calls_before,
            retries_now + overlap * retries_before,
        )

    def set_peer_counts(
        self, calls: int, retries: int, recent_calls: float, recent_retries: float
    ) -> None:
        """The other processes' :meth:`local_counts`, summed: the fleet shares one budget."""
        # One tuple, replaced whole: try_spend reads a consistent set without the lock.
        self._peers = (calls, retries, recent_calls, recent_retries)


# --- what may be retried -----------------------------------------------------------------


class HeaderLookup(Protocol):
    """Anything with a case-insensitive ``get``: ``httpx.Headers``, Starlette's ``Headers``."""

    def get(self, key: str, /) -> str | None: ...


def request_is_replayable(policy: RetryPolicy, method: str, headers: HeaderLookup) -> bool:
    """Whether sending this request twice is safe if the first one reached the upstream.

    True for a method in ``policy.methods``, for any method carrying a non-empty
    ``Idempotency-Key`` (the upstream promised to deduplicate it), and for everything when
    ``policy.retry_non_idempotent`` is set. A request that never left (see
    :func:`never_sent`) is safe to retry whatever this says.
    """
    # Cheapest checks first: most calls are GETs and answer on the first membership test.
    if method in policy.methods or policy.retry_non_idempotent:
        return True
    if method.upper() in policy.methods:
        return True
    return bool(headers.get("idempotency-key"))


def never_sent(exc: BaseException) -> bool:
    """Whether ``exc`` proves the request never reached the upstream.

    A failed or timed-out connect, or waiting too long for a pooled connection, happens
    before a byte of the request is written, so such a request can be retried even when
    it is not idempotent.
    """
    return isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout)


_RETRYABLE_CLASSES = (UpstreamConnectError, UpstreamTimeout, UpstreamProtocolError)
# Failures that will happen again on the next attempt exactly as they did on this one.
_DETERMINISTIC = frozenset({"tls_certificate_error", "http_response_content_coding"})


def _retryable(error_class: type[UpstreamError], proxy_error: str | None, reached: bool) -> bool:
    """Whether another attempt might succeed after an attempt failed as classified."""
    if issubclass(error_class, LoadShedError):
        # Out of an attempt, this is the client's own connection pool (our bulkhead refuses
        # before any attempt): the request was never sent, and a pooled connection may
        # well be free a moment later.
        return not reached
    return issubclass(error_class, _RETRYABLE_CLASSES) and proxy_error not in _DETERMINISTIC


def is_retryable_exception(exc: BaseException) -> bool:
    """Whether another attempt might succeed where this exception failed.

    Yes for connect failures, timeouts (connect, read, write, pool) and broken responses
    (incomplete, terminated, malformed). No for configuration problems (bad URL or
    scheme), a certificate that failed verification, an undecodable body, redirect loops,
    our own fail-fast errors (:class:`CircuitOpenError`, :class:`LoadShedError`), and
    anything that is not a transport failure at all (a bug in calling code is not fixed by
    calling again).
    """
    if isinstance(exc, CircuitOpenError | LoadShedError):
        return False
    if not isinstance(exc, httpx.TransportError | OSError | UpstreamError):
        return False
    error_class, proxy_error = classify(exc)
    # classify() names httpx.PoolTimeout our own connection limit; never_sent() knows it
    # was a wait for a pooled connection.
    return _retryable(error_class, proxy_error, not never_sent(exc))


# --- the decision ------------------------------------------------------------------------


class RetryState:
    """The retry bookkeeping of one call. Create it only once the first attempt failed.

    ``budget`` is the upstream's shared :class:`RetryBudget` (None: no budget).
    """

    __slots__ = ("_budget", "_policy", "_schedule")

    def __init__(self, policy: RetryPolicy, budget: RetryBudget | None = None) -> None:
        self._policy = policy
        self._budget = budget
        self._schedule: RetrySchedule | None = None

    def decide(
        self,
        *,
        attempt: int,
        exc: BaseException | None = None,
        status: int | None = None,
        retry_after_header: str | None = None,
        remaining: float | None = None,
        replayable: bool,
        streaming_body: bool,
        error: UpstreamError | None = None,
        reached: bool = True,
        next_attempt: float = 0.0,
    ) -> RetryDecision:
        """Whether to try again after attempt number ``attempt`` (1-based) failed, and when.

        Give ``exc`` when the attempt raised, else the ``status`` it answered with and its
        ``Retry-After`` header. A driver that classifies its client's exceptions itself
        gives ``error`` (the classified :class:`UpstreamError`) and ``reached`` (False when
        the request provably never left, see :func:`never_sent`) instead of ``exc``.
        ``remaining`` is the seconds left of the call's deadline (None: no deadline), and
        ``next_attempt`` the least of it an attempt needs: an upstream's Retry-After is
        waited out only when it leaves that much.
        ``replayable`` is :func:`request_is_replayable`'s answer; ``streaming_body`` says
        the request body was a stream that was not buffered. The rules and reasons are
        listed in the module docstring; the budget is consulted last, so a retry denied
        for any other reason never spends it.
        """
        policy = self._policy
        mode = _testing
        attempts = policy.attempts
        if mode is not None and mode.attempts is not None:
            attempts = min(attempts, mode.attempts)
        if attempt >= attempts:
            return _EXHAUSTED
        if streaming_body:
            return _STREAMING

        reason: RetryReason
        if exc is not None:
            retryable: bool | None = is_retryable_exception(exc)
            reached = not never_sent(exc)
        elif error is not None:
            retryable = _retryable(type(error), error.proxy_error, reached)
        else:
            retryable = None  # the attempt answered a status
        if retryable is not None:
            if not retryable:
                return _NOT_RETRYABLE
            if not replayable and reached:
                return _NON_IDEMPOTENT
            reason = "error"
        elif status is not None and status in policy.on_status:
            if not replayable:
                return _NON_IDEMPOTENT
            reason = "status"
        else:
            return _NOT_RETRYABLE

        if self._schedule is None:
            self._schedule = RetrySchedule.for_policy(policy)
        wait = self._schedule.wait(attempt)

        retry_after = None
        if policy.respect_retry_after and retry_after_header is not None:
            retry_after = parse_retry_after(retry_after_header)
            if retry_after is not None:
                if retry_after > policy.max_retry_after:
                    return RetryDecision(False, 0.0, "retry_after_too_long", retry_after)
                # Judged on the upstream's own value, in testing mode too: waiting out a
                # Retry-After only to find no time left for the attempt after it makes the
                # visitor wait for nothing, when they could have been told "try again in
                # N seconds" at once.
                if remaining is not None and not retry_after + next_attempt < remaining:
                    return RetryDecision(False, 0.0, "deadline", retry_after)
                # Never come back sooner than the upstream asked.
                wait = max(wait, retry_after)

        if mode is not None:
            wait = 0.0
        # Written as "not <" so that a NaN remaining denies too; a wait that uses up the
        # whole deadline would leave the next attempt no time at all.
        if remaining is not None and not wait < remaining:
            return RetryDecision(False, 0.0, "deadline", retry_after)
        if self._budget is not None and not self._budget.try_spend():
            return RetryDecision(False, 0.0, "budget", retry_after)
        return RetryDecision(True, wait, reason, retry_after)
