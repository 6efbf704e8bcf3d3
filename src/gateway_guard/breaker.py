"""Circuit breaker: a plain, synchronous, I/O-free state machine shared by every driver.

::

            trip (rates over the window, or consecutive timeouts)
      CLOSED ─────────────────────────────────► OPEN
        ▲                                        │ open time elapsed (on the next admit)
        │ half_open_calls probes reported,       ▼
        │ their failure rate under the threshold
        └──────────────────────────────────── HALF_OPEN ──► OPEN (the probes' failure rate
                                                             reached the threshold; the
                                                             open time doubles)

      FORCED_OPEN and DISABLED are entered and left only by hand
      (force_open / disable / force_closed / reset).

A driver (transport, decorator) asks and then reports::

    probe = breaker.admit()              # raises CircuitOpenError when it must not call
    try:
        response = send(request)
    except BaseException as exc:
        if it_was_our_own_cancellation(exc):
            breaker.record_ignored(probe)
        else:
            breaker.record_failure(elapsed, probe, timeout=it_timed_out(exc))
        raise
    breaker.record_status(response.status_code, elapsed, probe)

Every admitted call must be reported exactly once, or a half-open probe slot leaks and the
breaker stays half-open until it is reset. ``probe`` is a token: False (0) for a call
admitted while closed, else the number of the half-open spell the probe belongs to, so a probe
that reports after its spell ended (late, or cancelled late) cannot close the breaker or
free a slot of a later spell. The breaker never holds its lock across the call, only for
the few operations of one state update, so the same object serves threads and thousands
of asyncio tasks alike.

Health is judged by *calls*, not attempts: a driver that retries reports each attempt
that is retried with :meth:`CircuitBreaker.record_retried` (it counts in no rate) and the
call's last attempt as above. A 50%-failing upstream behind three attempts fails ~40% of
calls, not 50%: the breaker sees what the callers see. Timeouts are the exception: every
attempt that timed out feeds the consecutive-timeouts trigger, which opens the breaker
of a hung upstream without waiting for ``min_calls`` (one sync worker would otherwise sit
through ``min_calls`` hung calls first).

Nothing a finaliser runs may take a lock (the garbage collector can run one on a thread
that holds this breaker's lock): a response body dropped unread reports through
:meth:`CircuitBreaker.record_dropped`, which only appends to a queue that the next
locked operation drains.
"""

from __future__ import annotations

import enum
import logging
import math
import random as _random
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, TypeAlias, TypeVar

from gateway_guard import _fork
from gateway_guard.errors import CircuitOpenError
from gateway_guard.policy import BreakerPolicy

__all__ = ["BreakerSnapshot", "BreakerState", "CircuitBreaker", "Transition"]

logger = logging.getLogger("gateway_guard")

# What a caller rejected in HALF_OPEN is told. The probes in flight decide the next state
# and we cannot know when they finish; one second is the smallest whole Retry-After that
# is not "now", and a client coming back then finds the breaker closed or open again.
HALF_OPEN_RETRY_AFTER = 1.0

# One recorded call, as stored in the windows: bit 0 failed, bit 1 slow.
_OK = 0
_FAIL = 1
_SLOW = 2


class BreakerState(enum.StrEnum):
    """The state of a :class:`CircuitBreaker`; the value is what metrics and the CLI show.

    A ``str`` subclass (``StrEnum`` is ``str`` + ``Enum``): ``state == "open"`` holds.
    """

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"
    FORCED_OPEN = "forced_open"
    DISABLED = "disabled"


class CallOutcome(enum.StrEnum):
    """What a call listener is told about one call."""

    SUCCESS = "success"
    FAILURE = "failure"
    IGNORED = "ignored"  # reported through record_ignored: neither success nor failure
    REJECTED = "rejected"  # admit() refused it; the duration reported is 0.0


_CLOSED = BreakerState.CLOSED
_OPEN = BreakerState.OPEN
_HALF_OPEN = BreakerState.HALF_OPEN
_FORCED_OPEN = BreakerState.FORCED_OPEN
_DISABLED = BreakerState.DISABLED

StateListener: TypeAlias = Callable[["CircuitBreaker", BreakerState, BreakerState], None]
"""``fn(breaker, old_state, new_state)``, called after every state change."""

CallListener: TypeAlias = Callable[["CircuitBreaker", CallOutcome, float], None]
"""``fn(breaker, outcome, duration)``, called for every reported call and every rejection."""


@dataclass(frozen=True, slots=True)
class Transition:
    """One change of a breaker's state, as :meth:`CircuitBreaker.subscribe` reports it.

    ``reason``: ``failure_rate``, ``slow_call_rate`` or ``consecutive_timeouts`` (it
    tripped), ``open_elapsed`` (open time over: half-open), ``probes_failed`` /
    ``probes_succeeded`` (the half-open spell was judged), the manual action
    (``force_open``, ``disable``, ``force_closed``, ``reset``), or ``fleet`` (adopted from
    the fleet's shared state, see docs/deployment.md). ``at`` is wall-clock time (Unix
    seconds), comparable across processes.
    """

    upstream: str
    old: BreakerState
    new: BreakerState
    reason: str
    at: float


TransitionCallback: TypeAlias = Callable[[Transition], object]

# (old, new, reason): what a locked operation hands to _notify_state once it has let go.
_Change: TypeAlias = tuple[BreakerState, BreakerState, str]


class FleetHook(Protocol):
    """What a breaker asks of a fleet-wide state store (``[state] backend = "redis"``).

    Only half-open probes touch it, so a closed breaker's calls never do."""

    def take_probe(self, upstream: str) -> bool | None:
        """A fleet-wide probe slot: True taken, False none left, None decide locally."""

    def probe_reported(self, upstream: str, failed: bool, slow: bool) -> None:
        """A probe's outcome, to be added to the fleet's (must not block)."""

    def probe_returned(self, upstream: str) -> None:
        """A probe slot given back unused (must not block: called under the lock)."""

    def manual(self, upstream: str, reason: str) -> None:
        """An operator's action that changed nothing here, for the rest of the fleet."""


@dataclass(frozen=True, slots=True)
class BreakerSnapshot:
    """A consistent copy of a breaker's numbers at one instant, for metrics and the CLI.

    ``calls``, ``failures`` and ``slow`` count the current window (slow calls include slow
    failures). Successes are timed only when their duration can matter (``slow_call_rate``
    below 1, or a call listener attached), so otherwise ``slow`` counts slow failures only.
    ``open_until`` is on the breaker's clock (``time.monotonic`` by default); it and
    ``open_remaining`` are ``None`` unless the state is ``OPEN``.
    """

    name: str
    state: BreakerState
    calls: int
    failures: int
    slow: int
    failure_rate: float
    slow_rate: float
    open_until: float | None
    open_remaining: float | None
    consecutive_opens: int
    probes_in_flight: int


class _CountWindow:
    """The last ``size`` calls: a ring of outcome codes with running totals.

    The breaker's lock guards every change, with one exception: the breaker's success
    path may move ``pos`` past a slot holding ``_OK`` without the lock, when the window is
    full (see :meth:`CircuitBreaker.record_success`). Counting a success in place of a
    success changes no total, and it is the steady state of a healthy upstream, so it must
    not pay for a lock. That lock-free step never writes the ring or a total; racing it
    can only make some slot be overwritten a little earlier or later, never make the
    totals disagree with the ring, because every locked :meth:`add` computes its change
    from the slot it replaces.
    """

    __slots__ = ("calls", "failures", "pos", "ring", "size", "slow")

    def __init__(self, size: int) -> None:
        self.size = size
        self.ring = [_OK] * size
        self.pos = 0
        self.calls = 0
        self.failures = 0
        self.slow = 0

    def add(self, code: int) -> bool:
        """Count one call; True when the rates may have risen, so thresholds need a look.

        A plain success in a full window replaces an equal or worse call, which can only
        lower the rates: skipping the check then keeps the steady state cheap.
        """
        pos = self.pos
        ring = self.ring
        old = ring[pos]
        # The change is computed from the slot replaced, whatever it holds, so the totals
        # always match the ring (also after a lock-free step moved ``pos``).
        if old != code:
            ring[pos] = code
            self.failures += (code & _FAIL) - (old & _FAIL)
            self.slow += (code >> 1) - (old >> 1)
        pos += 1
        self.pos = 0 if pos == self.size else pos
        if self.calls < self.size:
            self.calls += 1
            return True
        return code != _OK

    def refresh(self) -> None:
        """Nothing expires in a count window."""

    def clear(self) -> None:
        self.ring = [_OK] * self.size
        self.pos = 0
        self.calls = self.failures = self.slow = 0


class _TimeWindow:
    """The last ``size`` seconds in one bucket per second, with running totals.

    Buckets are indexed by ``second % size``; when the clock moves on, the buckets of the
    seconds skipped over are emptied (all of them at once after a gap of a whole window),
    so each bucket is cleared at most once per second it covers: O(1) amortised, and
    memory is three lists of ``size`` ints whatever the traffic.
    """

    __slots__ = (
        "_b_calls",
        "_b_failures",
        "_b_slow",
        "_clock",
        "_head",
        "_size",
        "calls",
        "failures",
        "slow",
    )

    def __init__(self, size: int, clock: Callable[[], float]) -> None:
        self._size = size
        self._clock = clock
        self._b_calls = [0] * size
        self._b_failures = [0] * size
        self._b_slow = [0] * size
        self._head: int | None = None
        self.calls = 0
        self.failures = 0
        self.slow = 0

    def _advance(self) -> int:
        """Move the window's end to the current second; returns that second's bucket index."""
        second = math.floor(self._clock())
        size = self._size
        head = self._head
        if head is None or second - head >= size:
            if self.calls:
                self.clear()
            head = second
        elif second > head:
            b_calls, b_failures, b_slow = self._b_calls, self._b_failures, self._b_slow
            for s in range(head + 1, second + 1):
                i = s % size
                if b_calls[i]:
                    self.calls -= b_calls[i]
                    self.failures -= b_failures[i]
                    self.slow -= b_slow[i]
                    b_calls[i] = b_failures[i] = b_slow[i] = 0
            head = second
        # A clock that steps back (only a test's can) leaves the window where it is: the call
        # is counted in the newest bucket rather than resurrecting an expired one.
        self._head = head
        return head % size

    def add(self, code: int) -> bool:
        i = self._advance()
        self._b_calls[i] += 1
        self.calls += 1
        if code:
            failed = code & _FAIL
            slow = code >> 1
            self._b_failures[i] += failed
            self._b_slow[i] += slow
            self.failures += failed
            self.slow += slow
        # Expiring old buckets can raise the rates even when this call succeeded.
        return True

    def refresh(self) -> None:
        self._advance()

    def clear(self) -> None:
        size = self._size
        self._b_calls = [0] * size
        self._b_failures = [0] * size
        self._b_slow = [0] * size
        self.calls = self.failures = self.slow = 0


class CircuitBreaker:
    """A circuit breaker for one upstream, driven by :meth:`admit` and the ``record_*`` calls.

    ``clock`` (seconds, monotonic) and ``random`` (uniform in [0, 1), for the jitter of
    re-open times) are injectable so tests are exact without sleeping.

    Drivers on the hottest path may read three hints, without the lock, to skip a call
    that would change nothing: ``passing`` (:meth:`admit` would return False, no probe),
    ``quiet`` (:meth:`record_success` of a call faster than ``slow_call_seconds`` would
    write nothing) and ``times_successes`` (whether a success's duration can matter; when
    False, report it as 0.0). A hint read just before another thread changes the state
    is a call that raced that change, which the breaker treats the same way.

    >>> from gateway_guard.policy import BreakerPolicy
    >>> breaker = CircuitBreaker("payments", BreakerPolicy(min_calls=2, window_size=2))
    >>> for _ in range(2):
    ...     probe = breaker.admit()
    ...     breaker.record_failure(0.1, probe)
    >>> breaker.state
    <BreakerState.OPEN: 'open'>
    """

    __slots__ = (
        "__weakref__",
        "_call_listeners",
        "_clock",
        "_consecutive_opens",
        "_consecutive_timeouts",
        "_counts",
        "_dropped",
        "_failure_rate",
        "_failure_status",
        "_fast",
        "_fleet",
        "_fleet_probes",
        "_half_open_calls",
        "_lock",
        "_manual_seq",
        "_max_open_seconds",
        "_min_calls",
        "_open_seconds",
        "_open_until",
        "_peer_calls",
        "_peer_failures",
        "_peer_slow",
        "_probe_failures",
        "_probe_results",
        "_probe_slow",
        "_probes",
        "_random",
        "_slow_call_rate",
        "_slow_seconds",
        "_slow_trips",
        "_spell",
        "_state",
        "_state_listeners",
        "_streak",
        "_streak_since",
        "_subscribers",
        "_window",
        "name",
        "passing",
        "policy",
        "quiet",
        "times_successes",
    )

    def __init__(
        self,
        name: str,
        policy: BreakerPolicy,
        *,
        clock: Callable[[], float] = time.monotonic,
        random: Callable[[], float] = _random.random,
    ) -> None:
        self.name = name
        self.policy = policy
        self._clock = clock
        self._random = random
        self._lock = threading.Lock()
        _fork.register(self)
        # Policy values are copied into slots so the hot path reads one attribute each, and
        # clamped so a policy that slipped past validation cannot wedge the state machine.
        self._failure_rate = policy.failure_rate
        # A 429 is the upstream pacing us, answered on purpose by a working upstream: never a
        # failure, even when listed, or one client's burst would cut off every caller.
        self._failure_status = policy.failure_status - {429}
        self._consecutive_timeouts = max(0, policy.consecutive_timeouts)
        self._min_calls = max(1, policy.min_calls)
        self._slow_seconds = policy.slow_call_seconds
        self._slow_call_rate = policy.slow_call_rate
        self._slow_trips = policy.slow_call_rate < 1.0
        # Whether a success's duration can matter: drivers skip timing successes (a clock
        # read on every call) when it cannot, and report them with a duration of 0.0.
        self.times_successes = self._slow_trips
        self._open_seconds = policy.open_seconds
        self._max_open_seconds = max(policy.max_open_seconds, 0.0)
        self._half_open_calls = max(1, policy.half_open_calls)
        size = max(1, policy.window_size)
        self._window: _CountWindow | _TimeWindow = (
            _TimeWindow(size, clock) if policy.window == "time" else _CountWindow(size)
        )
        # The same window when it counts calls: its successes may skip the lock.
        self._counts = self._window if isinstance(self._window, _CountWindow) else None
        self._state_listeners: tuple[StateListener, ...] = ()
        self._call_listeners: tuple[CallListener, ...] = ()
        self._subscribers: tuple[TransitionCallback, ...] = ()
        # Fleet mode only (see gateway_guard._fleet): the other processes' window counts,
        # added to this window's when judging the rates, and the fleet's probe results of
        # the current half-open spell. All zero, and the hook None, in local mode.
        self._fleet: FleetHook | None = None
        self._peer_calls = self._peer_failures = self._peer_slow = 0
        self._fleet_probes = (0, 0, 0)
        self._open_until = 0.0
        self._consecutive_opens = 0
        # How many operator actions (force_open, disable, force_closed, reset) this breaker
        # has taken: the fleet store adopts no state decided elsewhere over one it has not
        # published yet (adopt's ``manual_seq``).
        self._manual_seq = 0
        # The half-open spell: its number (the token its probes carry), the probe slots
        # taken (admitted, minus those given back), and what the probes reported.
        self._spell = 0
        self._probes = 0
        self._probe_results = 0
        self._probe_failures = 0
        self._probe_slow = 0
        # Consecutive timed-out attempts while closed, and when the first was reported.
        self._streak = 0
        self._streak_since = 0.0
        # Probe tokens of bodies dropped unread, reported by finalisers without the lock.
        # Bounded: only admitted calls are ever queued, and every locked operation drains it.
        self._dropped: deque[int] = deque()
        self._state = _CLOSED if policy.enabled else _DISABLED
        # The hot-path flags, kept in step with _state by _set_state (the public ones are
        # the lock-free hints documented on the class):
        # passing: admit() may say yes without the lock (CLOSED, DISABLED).
        # _fast: record_success() may take the short path (CLOSED, and no call listener).
        # quiet: _fast, and the window is a full count window of successes only, so a
        # success changes nothing at all.
        self.passing = True
        self._fast = policy.enabled
        self.quiet = False

    def __repr__(self) -> str:
        return f"<CircuitBreaker {self.name!r} {self.state.value}>"

    def _after_fork(self) -> None:
        # In a forked child (see gateway_guard._fork): the lock may be held by a thread
        # that did not follow, and so may half-open probes that will never report back.
        self._lock = threading.Lock()
        self._probes = self._probe_results

    # --- the decision API ----------------------------------------------------------------

    def admit(self) -> int:
        """May a call go ahead? Returns its probe token: ``False`` (0) when it is not a
        probe, else the number of the half-open spell it probes (truthy exactly for probes).

        Raises :class:`CircuitOpenError` when the call must not be made. Every admitted
        call must then be reported once through ``record_success`` / ``record_failure`` /
        ``record_status`` / ``record_ignored`` / ``record_dropped`` with the token returned
        here (``record_retried`` for an attempt that is followed by a retry).
        """
        if self.passing:
            return False
        return self._admit_slow()

    def _admit_slow(self) -> int:
        changed: _Change | None = None
        retry_after: float | None = None
        with self._lock:
            owed = self._drain() if self._dropped else 0
            state = self._state
            if state is _CLOSED or state is _DISABLED:
                # It was not when admit() looked, but it is now.
                admitted = False
            else:
                now = self._clock()
                if state is _OPEN and now >= self._open_until:
                    # Half-open is entered lazily, by the first caller after the open time.
                    changed = self._set_state(_HALF_OPEN, "open_elapsed")
                    state = _HALF_OPEN
                admitted = state is _HALF_OPEN and self._probes < self._half_open_calls
                if admitted:
                    self._probes += 1
                elif state is _OPEN:
                    retry_after = self._open_until - now
                elif state is _HALF_OPEN:
                    retry_after = HALF_OPEN_RETRY_AFTER
            token = self._spell
        if owed:
            self._pay(owed)
        if changed is not None:
            self._notify_state(*changed)
        if state is _CLOSED or state is _DISABLED:
            return False
        if admitted:
            fleet = self._fleet
            # The probe slot is held locally while the fleet is asked (one round trip,
            # outside the lock: probes are rare, calls in CLOSED never get here).
            if fleet is None or fleet.take_probe(self.name) is not False:
                return token
            with self._lock:
                # The fleet had no token for it: free the local slot, and only that.
                if token == self._spell and self._probes > self._probe_results:
                    self._probes -= 1
            retry_after = HALF_OPEN_RETRY_AFTER
        if self._call_listeners:
            self._notify_call(CallOutcome.REJECTED, 0.0)
        raise CircuitOpenError(
            f"circuit breaker for upstream {self.name!r} is {state.value}",
            upstream=self.name,
            retry_after=retry_after,
        )

    def record_success(self, duration: float, probe: int) -> None:
        """Report an admitted call that succeeded after ``duration`` seconds."""
        if self.quiet and duration < self._slow_seconds:
            # Every slot of a full count window holds a success: one more replaces one,
            # and which one does not matter, so there is nothing to write at all.
            return
        if self._fast and not probe and duration < self._slow_seconds:
            counts = self._counts
            if counts is not None and counts.calls == counts.size:
                pos = counts.pos
                if not counts.ring[pos]:
                    # A success in place of a success: no total changes, no lock needed
                    # (see _CountWindow for why racing this is safe).
                    pos += 1
                    counts.pos = 0 if pos == counts.size else pos
                    return
            with self._lock:
                over = self._window.add(_OK) and self._over_threshold()
                if not over:
                    # It may have replaced the window's last failure.
                    self._check_quiet()
                    return
                changed = self._trip(over)
            if changed is not None:
                self._notify_state(*changed)
            return
        self._record(_SLOW if duration >= self._slow_seconds else _OK, duration, probe, False)

    def record_failure(self, duration: float, probe: int, *, timeout: bool = False) -> None:
        """Report an admitted call that failed after ``duration`` seconds.

        ``timeout``: it failed by timing out (it then also feeds the consecutive-timeouts
        trigger).
        """
        code = (_FAIL | _SLOW) if duration >= self._slow_seconds else _FAIL
        self._record(code, duration, probe, timeout)

    def record_status(self, status: int, duration: float, probe: int) -> None:
        """Report an admitted call by the status it answered.

        A status in the policy's ``failure_status`` is a failure; anything else, 4xx
        included, is a success: the upstream answered as designed, the client asked wrong.
        429 is never a failure, even when listed: the upstream is pacing us, on purpose.
        """
        if status in self._failure_status:
            self.record_failure(duration, probe)
        else:
            self.record_success(duration, probe)

    def record_retried(self, duration: float, probe: int, *, timeout: bool = False) -> None:
        """Report an admitted attempt that failed and is followed by a retry of the call.

        It counts in no rate: the breaker judges calls by their last attempt, the outcome
        the caller sees, so retries that rescue a call do not trip it. A timed-out attempt
        still feeds the consecutive-timeouts trigger. A probe gives its slot back (the
        retry is admitted afresh). Call listeners hear a failure, as for any failed attempt.
        """
        changed: _Change | None = None
        with self._lock:
            owed = self._drain() if self._dropped else 0
            state = self._state
            if state is _CLOSED:
                if timeout:
                    if self._timed_out(duration):
                        changed = self._trip("consecutive_timeouts")
                elif self._streak:
                    self._end_streak()
            elif state is _HALF_OPEN:
                self._give_back(probe)
        if owed:
            self._pay(owed)
        if changed is not None:
            self._notify_state(*changed)
        if self._call_listeners and state is not _DISABLED:
            self._notify_call(CallOutcome.FAILURE, duration)

    def record_ignored(self, probe: int) -> None:
        """Report an admitted call whose outcome must not count (e.g. the caller cancelled).

        A half-open probe gives its slot back, so another caller can probe instead.
        """
        owed = 0
        if probe or self._dropped:
            with self._lock:
                owed = self._drain() if self._dropped else 0
                self._give_back(probe)
        if owed:
            self._pay(owed)
        if self._call_listeners and self._state is not _DISABLED:
            self._notify_call(CallOutcome.IGNORED, 0.0)

    def record_dropped(self, probe: int) -> None:
        """:meth:`record_ignored` for finalisers: takes no lock, calls no listener.

        A finaliser can run on a thread that already holds this breaker's lock (the garbage
        collector runs whenever an allocation asks it to), so it must not wait for one.
        The token is queued (``deque.append`` is atomic) and the next locked operation
        gives the slot back and tells the call listeners.
        """
        if probe or self._call_listeners:
            self._dropped.append(probe)

    def _record(self, code: int, duration: float, probe: int, timeout: bool) -> None:
        changed: _Change | None = None
        reported = False
        with self._lock:
            owed = self._drain() if self._dropped else 0
            state = self._state
            if state is _DISABLED:
                return
            if state is _CLOSED:
                # A probe reported after a manual close is just a call made while closed.
                over = self._window.add(code) and self._over_threshold()
                if over:
                    changed = self._trip(over)
                elif timeout and self._timed_out(duration):
                    changed = self._trip("consecutive_timeouts")
                else:
                    if self._streak and not timeout:
                        self._end_streak()  # an answer, or another kind of failure
                    self._check_quiet()
            elif state is _HALF_OPEN and probe == self._spell:
                self._probe_results += 1
                self._probe_failures += code & _FAIL
                self._probe_slow += code >> 1
                reported = self._fleet is not None
                changed = self._judge_probes()
            # Otherwise a call admitted before the breaker opened (or a probe of an earlier
            # half-open spell) finished late: it says nothing about the upstream now.
        if owed:
            self._pay(owed)
        if reported and self._fleet is not None:
            self._fleet.probe_reported(self.name, bool(code & _FAIL), bool(code >> 1))
        if changed is not None:
            self._notify_state(*changed)
        if self._call_listeners:
            self._notify_call(
                CallOutcome.FAILURE if code & _FAIL else CallOutcome.SUCCESS, duration
            )

    # --- bookkeeping (all called with the lock held) -------------------------------------

    def _give_back(self, probe: int) -> None:
        # Only a probe of the current spell holds a slot of it: a report from an earlier
        # spell must not hand out extra slots in this one.
        if (
            probe
            and probe == self._spell
            and self._state is _HALF_OPEN
            and self._probes > self._probe_results
        ):
            self._probes -= 1
            if self._fleet is not None:
                self._fleet.probe_returned(self.name)

    def _drain(self) -> int:
        """Settle what finalisers queued; the number of call listeners' IGNORED owed.

        Callers test ``self._dropped`` first, so the common case (nothing queued) is one
        truth test on each locked operation."""
        dropped = self._dropped
        owed = 0
        while dropped:
            self._give_back(dropped.popleft())
            owed += 1
        return owed

    def _pay(self, owed: int) -> None:
        # Without the lock: the IGNORED notifications of bodies dropped unread.
        if self._call_listeners and self._state is not _DISABLED:
            for _ in range(owed):
                self._notify_call(CallOutcome.IGNORED, 0.0)

    def _timed_out(self, duration: float) -> bool:
        """Count one timed-out attempt while closed; True when the streak must open it.

        The streak opens the breaker once it is ``consecutive_timeouts`` long and its last
        attempt began after its first one was reported: a whole attempt went by in which
        nothing answered. Without that, concurrent calls to a partly slow upstream would
        line timeouts up by chance; any answer in between ends the streak.
        """
        limit = self._consecutive_timeouts
        if not limit:
            return False
        now = self._clock()
        if not self._streak:
            self._streak_since = now
            # Successes must now take the locked path, which ends the streak.
            self._fast = False
            self._check_quiet()
        self._streak += 1
        return self._streak >= limit and (limit == 1 or now - duration >= self._streak_since)

    def _end_streak(self) -> None:
        self._streak = 0
        self._fast = self._state is _CLOSED and not self._call_listeners
        self._check_quiet()

    def _judge_probes(self) -> _Change | None:
        # The spell is judged by its probes' rates against the thresholds, as the window
        # is: one failed probe of three no longer re-opens a breaker whose upstream answers
        # most calls. Rates are over all half_open_calls probes, so a re-open is decided
        # as soon as it is certain, a close once every probe has reported.
        # In fleet mode this process's probes are a subset of the fleet's (whose totals
        # _fleet_probes holds), so a decision either set of counts makes is the fleet's.
        n = self._half_open_calls
        results, failures, slow = self._fleet_probes
        failures = max(failures, self._probe_failures)
        slow = max(slow, self._probe_slow)
        if (failures and failures / n >= self._failure_rate) or (
            self._slow_trips and slow and slow / n >= self._slow_call_rate
        ):
            return self._open("probes_failed")
        if max(results, self._probe_results) >= n:
            self._window.clear()
            self._consecutive_opens = 0
            return self._set_state(_CLOSED, "probes_succeeded")
        return None

    # --- transitions (all called with the lock held) -------------------------------------

    def _over_threshold(self) -> str:
        """The rate that reached its threshold (``failure_rate``, ``slow_call_rate``), or ""."""
        window = self._window
        # The peers' counts are zero in local mode; in fleet mode the rates are the
        # fleet's, so one sick process among healthy ones does not open the breaker.
        calls = window.calls + self._peer_calls
        if calls < self._min_calls:
            return ""
        # Division, not a precomputed count: failures / calls is correctly rounded, so a
        # rate exactly at the threshold (3 of 10 against 0.3) compares equal, as documented.
        # A window with no failures never trips on failures, even at failure_rate 0.
        failures = window.failures + self._peer_failures
        if failures and failures / calls >= self._failure_rate:
            return "failure_rate"
        slow = window.slow + self._peer_slow
        if self._slow_trips and slow > 0 and slow / calls >= self._slow_call_rate:
            return "slow_call_rate"
        return ""

    def _trip(self, reason: str) -> _Change | None:
        # Another thread may have opened (or disabled) the breaker between this call's
        # fast-path check and taking the lock.
        if self._state is not _CLOSED:
            return None
        return self._open(reason)

    def _open_wait(self, reopens: int) -> float:
        """How long the breaker stays open after ``reopens`` earlier consecutive opens."""
        # min() on the exponent keeps 2.0 ** n finite however long the upstream stays down.
        wait = min(self._open_seconds * 2.0 ** min(reopens, 64), self._max_open_seconds)
        if reopens:
            # Jitter only downwards, so the cap is a promise; it spreads the probes of many
            # processes that opened together. The first open stays exact and predictable.
            wait *= 1.0 - 0.2 * self._random()
        return wait

    def _open(self, reason: str) -> _Change:
        reopens = self._consecutive_opens
        self._consecutive_opens = reopens + 1
        self._open_until = self._clock() + self._open_wait(reopens)
        return self._set_state(_OPEN, reason)

    def _set_state(self, new: BreakerState, reason: str) -> _Change:
        old = self._state
        self._state = new
        self.passing = new is _CLOSED or new is _DISABLED
        self._streak = 0
        self._fast = new is _CLOSED and not self._call_listeners
        self._check_quiet()
        if new is _HALF_OPEN:
            self._spell += 1
        elif new is _CLOSED:
            # A fresh window, fleet-wide too: the peers' old counts must not re-trip it.
            self._peer_calls = self._peer_failures = self._peer_slow = 0
        self._probes = self._probe_results = self._probe_failures = self._probe_slow = 0
        self._fleet_probes = (0, 0, 0)
        return old, new, reason

    def _check_quiet(self) -> None:
        # Called with the lock held after every change of the window, the state or the
        # listeners. A racing lock-free success that still saw True is simply not counted:
        # it would have replaced a success, which changes nothing but a ring position.
        counts = self._counts
        self.quiet = (
            self._fast
            and counts is not None
            and counts.calls == counts.size
            and not counts.failures
            and not counts.slow
        )

    # --- manual control ------------------------------------------------------------------

    def force_open(self) -> None:
        """Reject every call until :meth:`force_closed`, :meth:`reset` or :meth:`disable`."""
        self._manual(_FORCED_OPEN, "force_open")

    def disable(self) -> None:
        """Admit every call and count nothing, until :meth:`force_closed` or :meth:`reset`."""
        self._manual(_DISABLED, "disable")

    def force_closed(self) -> None:
        """Return to normal operation from any state: CLOSED, with a fresh window.

        Also switches on a breaker whose policy has ``enabled = false``.
        """
        self._manual(_CLOSED, "force_closed")

    def reset(self) -> None:
        """As new: the policy's starting state (CLOSED, or DISABLED when the settings say
        ``enabled = false``), an empty window, re-open count zero. Resetting every breaker
        must never switch on one the configuration turned off."""
        self._manual(_CLOSED if self.policy.enabled else _DISABLED, "reset", fresh=True)

    def _manual(self, new: BreakerState, reason: str, *, fresh: bool = False) -> None:
        with self._lock:
            owed = self._drain() if self._dropped else 0
            self._manual_seq += 1
            if fresh or new is _CLOSED:
                self._window.clear()
                self._consecutive_opens = 0
            old, _, _ = self._set_state(new, reason)
        if owed:
            self._pay(owed)
        if old is not new:
            self._notify_state(old, new, reason)
        elif self._fleet is not None:
            # Not a change here, but maybe one elsewhere in the fleet: an operator's
            # action must reach every process even if this one already agreed.
            self._fleet.manual(self.name, reason)

    # --- the fleet (``[state] backend = "redis"``; see gateway_guard._fleet) -------------

    def attach_fleet(self, hook: FleetHook | None) -> None:
        """Have half-open probes take their slots from ``hook`` (None: local again)."""
        with self._lock:
            self._fleet = hook
            if hook is None:
                self._peer_calls = self._peer_failures = self._peer_slow = 0

    def set_peer_counts(self, calls: int, failures: int, slow: int) -> None:
        """The other processes' window counts, added to this one's when judging rates.

        Opens the breaker when the fleet's rates now reach a threshold."""
        changed: _Change | None = None
        with self._lock:
            self._peer_calls, self._peer_failures, self._peer_slow = calls, failures, slow
            if self._state is _CLOSED and (failures or slow):
                self._window.refresh()
                reason = self._over_threshold()
                if reason:
                    changed = self._trip(reason)
        if changed is not None:
            self._notify_state(*changed)

    def set_fleet_probes(self, results: int, failures: int, slow: int) -> None:
        """The fleet's probe outcomes of the current half-open spell; judges them."""
        changed: _Change | None = None
        with self._lock:
            if self._state is _HALF_OPEN:
                self._fleet_probes = (results, failures, slow)
                changed = self._judge_probes()
        if changed is not None:
            self._notify_state(*changed)

    @property
    def manual_seq(self) -> int:
        """How many operator actions this breaker has taken (see :meth:`adopt`)."""
        return self._manual_seq

    def adopt(
        self,
        state: BreakerState,
        open_remaining: float = 0.0,
        consecutive_opens: int = 0,
        *,
        manual_seq: int | None = None,
    ) -> bool:
        """Take on a state the fleet decided elsewhere (reason ``"fleet"``); False when
        refused.

        ``open_remaining``: seconds until an OPEN breaker may probe; HALF_OPEN is adopted
        as OPEN with nothing remaining, so the next admit starts this process's part of
        the fleet's probing. ``manual_seq``: the :attr:`manual_seq` the fleet has seen
        published; when an operator has acted here since, the state is refused, checked
        under the lock: a record read before a force-open must not undo it before it is
        published."""
        changed: _Change | None = None
        with self._lock:
            if manual_seq is not None and manual_seq != self._manual_seq:
                return False
            owed = self._drain() if self._dropped else 0
            current = self._state
            if state is _OPEN or state is _HALF_OPEN:
                self._consecutive_opens = consecutive_opens
                if not (state is _HALF_OPEN and current is _HALF_OPEN):
                    remaining = max(0.0, open_remaining) if state is _OPEN else 0.0
                    self._open_until = self._clock() + remaining
                    if current is not _OPEN:
                        changed = self._set_state(_OPEN, "fleet")
            elif current is not state:
                if state is _CLOSED:
                    self._window.clear()
                    self._consecutive_opens = 0
                changed = self._set_state(state, "fleet")
        if owed:
            self._pay(owed)
        if changed is not None:
            self._notify_state(*changed)
        return True

    # --- reading -------------------------------------------------------------------------

    @property
    def state(self) -> BreakerState:
        """The current state; HALF_OPEN as soon as the open time is over, before any admit."""
        state = self._state
        if state is _OPEN and self._clock() >= self._open_until:
            return _HALF_OPEN
        return state

    def retry_after(self) -> float | None:
        """What a call rejected now would be told, in seconds.

        ``None`` when a call would be admitted now, or when no time can be promised
        (FORCED_OPEN: it opens when an operator says so).
        """
        answer: float | None = None
        with self._lock:
            owed = self._drain() if self._dropped else 0
            state = self._state
            if state is _OPEN:
                remaining = self._open_until - self._clock()
                # Not positive: the next admit becomes the first probe.
                answer = remaining if remaining > 0 else None
            elif state is _HALF_OPEN and self._probes >= self._half_open_calls:
                answer = HALF_OPEN_RETRY_AFTER
        if owed:
            self._pay(owed)
        return answer

    def snapshot(self) -> BreakerSnapshot:
        with self._lock:
            owed = self._drain() if self._dropped else 0
            window = self._window
            window.refresh()
            state = self._state
            now = self._clock()
            open_until: float | None = None
            open_remaining: float | None = None
            if state is _OPEN:
                if now >= self._open_until:
                    state = _HALF_OPEN
                else:
                    open_until = self._open_until
                    open_remaining = open_until - now
            calls, failures, slow = window.calls, window.failures, window.slow
            snapshot = BreakerSnapshot(
                name=self.name,
                state=state,
                calls=calls,
                failures=failures,
                slow=slow,
                failure_rate=failures / calls if calls else 0.0,
                slow_rate=slow / calls if calls else 0.0,
                open_until=open_until,
                open_remaining=open_remaining,
                consecutive_opens=self._consecutive_opens,
                probes_in_flight=(
                    self._probes - self._probe_results if self._state is _HALF_OPEN else 0
                ),
            )
        if owed:
            self._pay(owed)
        return snapshot

    # --- listeners -----------------------------------------------------------------------

    def add_listener(self, listener: StateListener) -> None:
        """Call ``listener(breaker, old_state, new_state)`` after every state change.

        Listeners run after the breaker's lock is released, on whichever thread or task
        caused the change; one that raises is logged and skipped, never propagated.
        """
        with self._lock:
            self._state_listeners = (*self._state_listeners, listener)

    def remove_listener(self, listener: StateListener) -> None:
        """Stop calling ``listener``; ValueError if it was not added."""
        with self._lock:
            self._state_listeners = _without(self._state_listeners, listener)

    def subscribe(self, callback: TransitionCallback) -> Callable[[], None]:
        """Call ``callback(transition)`` (a :class:`Transition`) after every state change.

        Returns a function that unsubscribes it (calling it again does nothing). Callbacks
        run after the breaker's lock is released, on whichever thread or task caused the
        change; one that raises is logged once (per breaker and callback) and swallowed.
        """
        with self._lock:
            self._subscribers = (*self._subscribers, callback)
        done = False

        def unsubscribe() -> None:
            nonlocal done
            with self._lock:
                if not done:
                    done = True
                    self._subscribers = _without(self._subscribers, callback)

        return unsubscribe

    def _subscriber_failed(self, callback: TransitionCallback, transition: Transition) -> None:
        # Logged once per callback: a broken subscriber must not log on every transition.
        key = (self.name, id(callback))
        if key in _FAILED_SUBSCRIBERS:
            return
        if len(_FAILED_SUBSCRIBERS) < 1024:
            _FAILED_SUBSCRIBERS.add(key)
        logger.exception(
            "circuit breaker %r: transition subscriber %r failed on %s -> %s",
            self.name,
            callback,
            transition.old.value,
            transition.new.value,
        )

    def add_call_listener(self, listener: CallListener) -> None:
        """Call ``listener(breaker, outcome, duration)`` for every call reported or rejected.

        Outcomes reported while DISABLED are not passed on. Having any call listener moves
        successes off the fastest path, so use one only when you need per-call metrics.
        """
        with self._lock:
            self._call_listeners = (*self._call_listeners, listener)
            self._listeners_changed()

    def remove_call_listener(self, listener: CallListener) -> None:
        """Stop calling ``listener``; ValueError if it was not added."""
        with self._lock:
            self._call_listeners = _without(self._call_listeners, listener)
            self._listeners_changed()

    def _listeners_changed(self) -> None:
        # With the lock held: the hot-path flags that depend on having call listeners.
        self._fast = self._state is _CLOSED and not self._call_listeners and not self._streak
        self.times_successes = self._slow_trips or bool(self._call_listeners)
        self._check_quiet()

    def _notify_state(self, old: BreakerState, new: BreakerState, reason: str) -> None:
        # The tuples are replaced, never mutated, so iterating them needs no lock.
        subscribers = self._subscribers
        if subscribers:
            transition = Transition(self.name, old, new, reason, time.time())
            for callback in subscribers:
                try:
                    callback(transition)
                except Exception:
                    self._subscriber_failed(callback, transition)
        for listener in self._state_listeners:
            try:
                listener(self, old, new)
            except Exception:
                logger.exception(
                    "circuit breaker %r: state listener %r failed on %s -> %s",
                    self.name,
                    listener,
                    old.value,
                    new.value,
                )

    def _notify_call(self, outcome: CallOutcome, duration: float) -> None:
        for listener in self._call_listeners:
            try:
                listener(self, outcome, duration)
            except Exception:
                logger.exception(
                    "circuit breaker %r: call listener %r failed on %s",
                    self.name,
                    listener,
                    outcome.value,
                )


_T = TypeVar("_T")
# (breaker name, subscriber id) whose failure was logged: bounded, so logged at most once.
_FAILED_SUBSCRIBERS: set[tuple[str, int]] = set()


def _without(items: tuple[_T, ...], item: _T) -> tuple[_T, ...]:
    index = items.index(item)  # ValueError for a listener that was never added
    return items[:index] + items[index + 1 :]
