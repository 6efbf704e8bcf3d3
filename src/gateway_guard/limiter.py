"""Concurrency limiters: outbound bulkheads and inbound load shedding.

One accounting core, :class:`ConcurrencyLimiter`, serves threads and any number of event
loops at once. It is a few plain counters behind a ``threading.Lock`` that is held only
for a handful of operations, never across a wait::

    acquire ──► slot free? ──yes──► in_flight += 1                        (fast path)
                   │ no
                   ▼
               queue room? ──yes──► wait in the priority queue ──► handed a slot
                   │ no                   │ timeout / evicted
                   ▼                      ▼
               evict a lower-priority  LoadShedError (503, connection_limit_reached)
               waiter, or LoadShedError

    release ──► anyone waiting? ──yes──► hand the slot to the best waiter (no barging)
                   │ no
                   ▼
               in_flight -= 1

The queue serves ``critical`` before ``normal`` before ``sheddable``, FIFO within one
priority. When it is full, an arrival evicts the newest waiter of a strictly lower
priority, so ``sheddable`` requests are shed first and ``critical`` ones last.

Waking is the only thing the two drivers do differently: a thread blocks on a private
lock that the releaser unlocks; a task awaits a future that the releaser resolves through
its loop (``call_soon_threadsafe`` from another thread). Who owns a slot is decided only
under the limiter's lock by the waiter's state, never by whether the wake-up arrived, so a
timeout or a cancellation racing a hand-off either keeps the slot or gives it back.

:func:`bulkhead` and :func:`shedder` build limiters from the compiled policies;
:class:`InboundShedding` combines the app-wide limiter with per-route ones.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Final, TypeAlias

from gateway_guard.errors import LoadShedError
from gateway_guard.policy import BulkheadPolicy, Priority, ShedPolicy

__all__ = [
    "BULKHEAD_QUEUE_FACTOR",
    "MAX_RETRY_AFTER",
    "ConcurrencyLimiter",
    "InboundShedding",
    "Limiter",
    "LimiterSnapshot",
    "RouteKey",
    "TokenLimiter",
    "bulkhead",
    "shedder",
]

#: A bulkhead with ``max_wait > 0`` queues at most this many callers per slot.
BULKHEAD_QUEUE_FACTOR: Final = 4
#: Upper bound of the ``retry_after`` estimate, in seconds.
MAX_RETRY_AFTER: Final = 60.0

#: How a route is named in :class:`InboundShedding`: its index or name in the settings.
RouteKey: TypeAlias = int | str

_RANK: Final[dict[str, int]] = {"critical": 0, "normal": 1, "sheddable": 2}
_PRIORITIES: Final[tuple[Priority, ...]] = ("critical", "normal", "sheddable")
_LOWEST: Final = 2

# Each completed hold moves the hold-time average this far towards it: about the last
# ten holds matter, enough to follow an upstream that just slowed down within a second
# or two, smooth enough that one odd request does not swing the estimate.
_ALPHA: Final = 0.1
_KEEP: Final = 1.0 - _ALPHA

# Waiter states. Only the limiter, under its lock, moves a waiter out of _WAITING.
_WAITING: Final = 0
_GRANTED: Final = 1  # the releaser handed it a slot: it now counts in in_flight
_EVICTED: Final = 2  # pushed out of a full queue by a higher-priority arrival
_GONE: Final = 3  # timed out or cancelled; it holds nothing


class _Waiter:
    __slots__ = ("rank", "since", "state")

    def __init__(self, rank: int, since: float) -> None:
        self.rank = rank
        self.since = since
        self.state = _WAITING

    def wake(self) -> bool:
        """Ring the waiter's doorbell; False when it can never hear it (its loop closed)."""
        raise NotImplementedError


class _ThreadWaiter(_Waiter):
    __slots__ = ("bell",)

    def __init__(self, rank: int, since: float) -> None:
        super().__init__(rank, since)
        # A plain lock, taken now and released by the waker, is the cheapest one-shot
        # doorbell threading offers (an Event is a Condition around two locks).
        self.bell = threading.Lock()
        self.bell.acquire()

    def wake(self) -> bool:
        self.bell.release()
        return True


def _ring(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class _TaskWaiter(_Waiter):
    __slots__ = ("future", "loop", "thread")

    def __init__(self, rank: int, since: float, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(rank, since)
        self.loop = loop
        self.future: asyncio.Future[None] = loop.create_future()
        self.thread = threading.get_ident()

    def wake(self) -> bool:
        try:
            if threading.get_ident() == self.thread:
                # Releasing from the waiter's own loop: skip the self-pipe write.
                self.loop.call_soon(_ring, self.future)
            else:
                self.loop.call_soon_threadsafe(_ring, self.future)
        except RuntimeError:  # the loop is closed: nobody is left to take the slot
            return False
        return True


@dataclass(frozen=True, slots=True)
class LimiterSnapshot:
    """A consistent copy of a limiter's numbers at one instant, for metrics.

    ``admitted`` counts every slot ever granted (``released + in_flight``). ``rejected``,
    ``evicted`` and ``timed_out`` are the three ways a caller is shed; ``cancelled``
    counts waiters whose caller gave up (task cancelled, thread interrupted).
    ``hold_time`` is the smoothed seconds a slot is held (0.0 before any release) and
    ``retry_after`` what a 503 would say right now.
    """

    name: str
    max_concurrent: int
    max_queue: int
    queue_timeout: float
    in_flight: int
    queued: int
    queued_by_priority: Mapping[str, int]
    admitted: int
    released: int
    rejected: int
    evicted: int
    timed_out: int
    cancelled: int
    hold_time: float
    retry_after: float


class ConcurrencyLimiter:
    """At most ``max_concurrent`` holders at once; up to ``max_queue`` more may wait.

    ``max_concurrent == 0`` means unlimited: :meth:`acquire` and :meth:`release` return at
    once and count nothing. ``max_queue == 0`` or ``queue_timeout == 0`` means fail fast:
    a caller who finds every slot taken is shed at once. Waiters give up after
    ``queue_timeout`` seconds. Every failure to get a slot raises
    :class:`~gateway_guard.errors.LoadShedError` with ``upstream=name`` and an honest
    ``retry_after`` (see :meth:`retry_after`).

    Every successful acquire must be matched by exactly one :meth:`release`::

        limiter.acquire("critical")
        try:
            ...
        finally:
            limiter.release()

    or ``with limiter.slot("critical"):`` / ``async with limiter.async_slot():``. The same
    object may be used from threads and from several event loops at the same time.
    """

    __slots__ = (
        "_cancelled",
        "_clock",
        "_done",
        "_evicted",
        "_fail_fast",
        "_hold",
        "_hold_weight",
        "_in_flight",
        "_lock",
        "_max_concurrent",
        "_max_queue",
        "_occupancy",
        "_queue_timeout",
        "_queued",
        "_queues",
        "_rejected",
        "_released",
        "_slots",
        "_timed_out",
        "_unlimited",
        "_wait_timeout",
        "name",
    )

    def __init__(
        self,
        name: str,
        max_concurrent: int,
        max_queue: int,
        queue_timeout: float,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_concurrent < 0:
            raise ValueError(f"max_concurrent must be >= 0 (0 = unlimited), got {max_concurrent}")
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        if not queue_timeout >= 0:  # also rejects NaN
            raise ValueError(f"queue_timeout must be >= 0 seconds, got {queue_timeout}")
        self.name = name
        self._max_concurrent = max_concurrent
        self._max_queue = max_queue
        self._queue_timeout = float(queue_timeout)
        self._unlimited = max_concurrent == 0
        self._fail_fast = max_queue == 0 or queue_timeout == 0
        self._wait_timeout = min(self._queue_timeout, threading.TIMEOUT_MAX)
        self._clock = clock
        self._lock = threading.Lock()
        self._in_flight = 0
        self._queued = 0
        self._queues: tuple[deque[_Waiter], ...] = (deque(), deque(), deque())
        # Hold-time accounting without remembering who acquired when: every acquire
        # subtracts its time and every release adds its time, so at any instant
        # ``_occupancy + in_flight * now`` is the slot-seconds used since the last fold,
        # i.e. the integral of in_flight over time. Dividing by the releases in the same
        # stretch (``_done``) is Little's law: the mean time a slot is held. It costs the
        # hot path one clock read and one addition, and stays exact when slots are
        # released in a different order than they were taken.
        self._occupancy = 0.0
        self._done = 0
        self._hold = 0.0
        self._hold_weight = 0.0
        self._released = 0
        self._rejected = 0
        self._evicted = 0
        self._timed_out = 0
        self._cancelled = 0
        # Context managers carry no per-use state, so one per priority serves all callers.
        self._slots = {p: _Slot(self, p) for p in _PRIORITIES}

    # --- introspection ------------------------------------------------------------------

    @property
    def max_concurrent(self) -> int:
        return self._max_concurrent

    @property
    def max_queue(self) -> int:
        return 0 if self._fail_fast else self._max_queue

    @property
    def queue_timeout(self) -> float:
        return self._queue_timeout

    @property
    def unlimited(self) -> bool:
        return self._unlimited

    @property
    def in_flight(self) -> int:
        """Slots held right now (always 0 when unlimited)."""
        return self._in_flight

    @property
    def queued(self) -> int:
        """Callers waiting for a slot right now."""
        return self._queued

    def retry_after(self) -> float:
        """Whole seconds after which a shed caller may reasonably try again, 1 to 60.

        The time for the callers already waiting, plus one, to get a slot:
        ``hold_time * (queued + 1) / max_concurrent``, rounded up. ``hold_time`` is an
        exponentially weighted average of how long recent slots were held (weight 0.1 per
        release, computed from acquire and release times); while nothing has been
        released since the last update, the holders' current age is used if it is larger,
        so a stuck upstream raises the estimate before its calls finish. At least 1 s
        (``Retry-After`` is whole seconds, and 0 invites an instant retry storm) and at
        most :data:`MAX_RETRY_AFTER` (beyond that the number says more about one
        long-lived stream than about the queue).
        """
        with self._lock:
            return self._retry_after_locked(self._clock())

    def snapshot(self) -> LimiterSnapshot:
        with self._lock:
            now = self._clock()
            self._fold(now)
            return LimiterSnapshot(
                name=self.name,
                max_concurrent=self._max_concurrent,
                max_queue=self.max_queue,
                queue_timeout=self._queue_timeout,
                in_flight=self._in_flight,
                queued=self._queued,
                queued_by_priority=dict(zip(_PRIORITIES, map(len, self._queues), strict=True)),
                admitted=self._released + self._in_flight,
                released=self._released,
                rejected=self._rejected,
                evicted=self._evicted,
                timed_out=self._timed_out,
                cancelled=self._cancelled,
                hold_time=self._hold_time(),
                retry_after=self._retry_after_locked(now),
            )

    def __repr__(self) -> str:
        limit = "unlimited" if self._unlimited else str(self._max_concurrent)
        return (
            f"<ConcurrencyLimiter {self.name!r} {self._in_flight}/{limit} in flight,"
            f" {self._queued}/{self.max_queue} queued>"
        )

    # --- drivers ------------------------------------------------------------------------
    # The fast paths are spelled out in both drivers rather than shared through a helper:
    # a Python call costs as much as the whole uncontended acquire does.

    def acquire(self, priority: Priority = "normal") -> None:
        """Take a slot, blocking this thread while queued. Raises LoadShedError."""
        if self._unlimited:
            return
        lock = self._lock
        lock.acquire()
        try:
            if self._in_flight < self._max_concurrent:
                self._in_flight += 1
                self._occupancy -= self._clock()
                return
            rank = self._rank(priority)
            now = self._clock()
            evicted = self._make_room(rank, now)
            waiter = _ThreadWaiter(rank, now)
            self._push(waiter)
        finally:
            lock.release()
        if evicted is not None:
            evicted.wake()
        try:
            waiter.bell.acquire(timeout=self._wait_timeout)
        except BaseException:  # KeyboardInterrupt and friends: leave nothing behind
            self._abandon(waiter)
            raise
        self._settle(waiter)

    async def acquire_async(self, priority: Priority = "normal") -> None:
        """Take a slot, suspending this task while queued. Raises LoadShedError.

        Cancelling the task while it waits leaves no trace; if the cancellation lands
        after a slot was handed over, the slot is passed on before CancelledError
        propagates. The fast path never suspends.
        """
        if self._unlimited:
            return
        lock = self._lock
        lock.acquire()
        try:
            if self._in_flight < self._max_concurrent:
                self._in_flight += 1
                self._occupancy -= self._clock()
                return
            loop = asyncio.get_running_loop()
            rank = self._rank(priority)
            now = self._clock()
            evicted = self._make_room(rank, now)
            task_waiter = _TaskWaiter(rank, now, loop)
            self._push(task_waiter)
        finally:
            lock.release()
        if evicted is not None:
            evicted.wake()
        timer = loop.call_later(self._queue_timeout, _ring, task_waiter.future)
        try:
            await task_waiter.future
        except BaseException:
            self._abandon(task_waiter)
            raise
        finally:
            timer.cancel()
        self._settle(task_waiter)

    def try_acquire(self) -> bool:
        """Take a free slot without waiting; False when none is free (nothing is queued).

        The drivers' fast path: an async caller skips creating a coroutine when a slot is
        free. Waiters are only queued while every slot is taken, so this never barges.
        """
        if self._unlimited:
            return True
        lock = self._lock
        lock.acquire()
        try:
            if self._in_flight < self._max_concurrent:
                self._in_flight += 1
                self._occupancy -= self._clock()
                return True
            return False
        finally:
            lock.release()

    def release(self) -> None:
        """Give back a slot: to the best waiter if anyone waits, else to the pool.

        Raises RuntimeError when no slot is held: a count that drifted would silently
        admit more than ``max_concurrent`` from then on.
        """
        if self._unlimited:
            return
        lock = self._lock
        lock.acquire()
        try:
            if not self._queued:
                if self._in_flight <= 0:
                    raise RuntimeError(f"limiter {self.name!r}: release() without acquire()")
                self._in_flight -= 1
                self._occupancy += self._clock()
                self._done += 1
                return
            waiter = self._hand_off()
        finally:
            lock.release()
        self._wake_holder(waiter)

    def slot(self, priority: Priority = "normal") -> _Slot:
        """``with limiter.slot(priority):`` holds a slot for the block."""
        return self._slots[priority]

    def async_slot(self, priority: Priority = "normal") -> _Slot:
        """``async with limiter.async_slot(priority):`` holds a slot for the block."""
        return self._slots[priority]

    # --- decisions, all called with the lock held ---------------------------------------

    @staticmethod
    def _rank(priority: str) -> int:
        try:
            return _RANK[priority]
        except KeyError:
            allowed = ", ".join(_PRIORITIES)
            raise ValueError(f"priority must be one of {allowed}; got {priority!r}") from None

    def _make_room(self, rank: int, now: float) -> _Waiter | None:
        """No slot is free: make room in the queue for a ``rank`` arrival, or raise.

        Returns the waiter evicted to make room, for the caller to wake once unlocked.
        """
        if self._fail_fast:
            self._rejected += 1
            raise self._shed_error("no free slot", now, 0.0)
        if self._queued < self._max_queue:
            return None
        # Push out the newest waiter of the lowest priority below the arrival's: it has
        # waited least, and keeping older waiters keeps the queue's promises to them.
        for lower in range(_LOWEST, rank, -1):
            queue = self._queues[lower]
            if queue:
                evicted = queue.pop()
                evicted.state = _EVICTED
                self._evicted += 1
                self._queued -= 1
                return evicted
        self._rejected += 1
        raise self._shed_error("queue full", now, 0.0)

    def _push(self, waiter: _Waiter) -> None:
        self._queues[waiter.rank].append(waiter)
        self._queued += 1

    def _hand_off(self) -> _Waiter:
        """Pass the releasing caller's slot to the best waiter (``_queued > 0``)."""
        # Hand-offs happen only under saturation, exactly when a 503 may soon need an
        # estimate, and the wake-up costs far more than this: keep the average fresh.
        self._done += 1
        self._fold(self._clock())
        for queue in self._queues:
            if queue:
                waiter = queue.popleft()
                break
        else:  # pragma: no cover - _queued counts exactly what the queues hold
            raise AssertionError("limiter queue count out of step")
        self._queued -= 1
        waiter.state = _GRANTED
        # The slot never goes idle, so occupancy is unchanged: the releaser's +now and
        # the new holder's -now cancel out. Only the completed hold is counted (above).
        return waiter

    def _pass_on(self) -> _Waiter | None:
        """Release a slot: to the best waiter (returned, to be woken), else to the pool."""
        if self._queued:
            return self._hand_off()
        self._in_flight -= 1
        self._occupancy += self._clock()
        self._done += 1
        return None

    def _fold(self, now: float) -> None:
        """Fold the holds completed since the last fold into the hold-time average."""
        done = self._done
        if not done:
            return
        area = self._occupancy + self._in_flight * now
        # ``done`` releases count as ``done`` EWMA steps; ``_hold_weight`` corrects the
        # bias towards the initial 0 the way Adam's moment estimates do.
        step = 1.0 - _KEEP**done
        self._hold += step * (area / done - self._hold)
        self._hold_weight += step * (1.0 - self._hold_weight)
        self._occupancy -= area
        self._released += done
        self._done = 0

    def _hold_time(self) -> float:
        return self._hold / self._hold_weight if self._hold_weight else 0.0

    def _retry_after_locked(self, now: float) -> float:
        if self._unlimited:
            return 1.0
        self._fold(now)
        hold = self._hold_time()
        if self._in_flight:
            # After a fold the area restarts at 0; otherwise it is what the current holders
            # have used since the last completion, and their mean age bounds the hold time.
            hold = max(hold, (self._occupancy + self._in_flight * now) / self._in_flight)
        wait = hold * (self._queued + 1) / self._max_concurrent
        return float(min(max(math.ceil(wait), 1), MAX_RETRY_AFTER))

    def _shed_error(self, reason: str, now: float, elapsed: float) -> LoadShedError:
        return LoadShedError(
            f"{self.name}: load shed, {reason} ({self._in_flight}/{self._max_concurrent}"
            f" in flight, {self._queued} queued)",
            upstream=self.name,
            retry_after=self._retry_after_locked(now),
            attempts=0,
            elapsed=elapsed,
        )

    # --- after a wait: shared by both drivers, each takes the lock itself -------------

    def _settle(self, waiter: _Waiter) -> None:
        """After the wait: return if the waiter holds a slot, raise if it was shed."""
        with self._lock:
            state = waiter.state
            if state == _GRANTED:
                return
            now = self._clock()
            if state == _WAITING:  # its own timer fired before any hand-off
                self._queues[waiter.rank].remove(waiter)
                self._queued -= 1
                waiter.state = _GONE
                self._timed_out += 1
                raise self._shed_error(
                    f"no slot within {self._queue_timeout:g}s", now, now - waiter.since
                )
            raise self._shed_error("evicted by a higher-priority caller", now, now - waiter.since)

    def _abandon(self, waiter: _Waiter) -> None:
        """The waiting caller is gone (cancelled, interrupted): leave nothing behind."""
        with self._lock:
            state = waiter.state
            waiter.state = _GONE
            if state == _WAITING:
                self._queues[waiter.rank].remove(waiter)
                self._queued -= 1
                self._cancelled += 1
                return
            if state != _GRANTED:
                return
            # It was handed a slot it will never use: pass it on as release() would.
            self._cancelled += 1
            successor = self._pass_on()
        self._wake_holder(successor)

    def _wake_holder(self, waiter: _Waiter | None) -> None:
        """Wake a waiter that now holds a slot. Called unlocked: waking may take locks."""
        while waiter is not None and not waiter.wake():
            # Its loop is closed, so it can never take the slot: count the grant as a
            # (short) hold, which keeps the hold-time accounting exact, and pass it on.
            with self._lock:
                if waiter.state != _GRANTED:
                    return  # its coroutine was closed meanwhile and gave the slot back
                waiter.state = _GONE
                self._cancelled += 1
                waiter = self._pass_on()


class _Slot:
    """Holds a slot for a ``with`` / ``async with`` block; shared, so it keeps no state."""

    __slots__ = ("_limiter", "_priority")

    def __init__(self, limiter: ConcurrencyLimiter, priority: Priority) -> None:
        self._limiter = limiter
        self._priority = priority

    def __enter__(self) -> None:
        self._limiter.acquire(self._priority)

    def __exit__(self, *exc_info: object) -> None:
        self._limiter.release()

    async def __aenter__(self) -> None:
        await self._limiter.acquire_async(self._priority)

    async def __aexit__(self, *exc_info: object) -> None:
        self._limiter.release()


class TokenLimiter:
    """A fail-fast limiter (no queue) that takes no lock: one token per slot in a deque.

    ``deque.pop()`` and ``deque.append()`` are atomic (thread-safe in CPython, with or
    without the GIL), so taking and giving back a slot is one C call each, with no lock
    round trip and no clock read: this sits on every outbound call's path. It has the
    driver API of :class:`ConcurrencyLimiter`; what it gives up is the hold-time estimate,
    so a shed says ``Retry-After: 1`` (a fail-fast bulkhead's slots turn over within one
    upstream call, and a caller that finds it full again is shed again at no cost).
    """

    __slots__ = ("_max_concurrent", "_rejected", "_released", "_tokens", "name")

    def __init__(self, name: str, max_concurrent: int) -> None:
        if max_concurrent <= 0:
            raise ValueError(f"max_concurrent must be > 0, got {max_concurrent}")
        self.name = name
        self._max_concurrent = max_concurrent
        self._tokens: deque[None] = deque([None] * max_concurrent)
        # itertools.count: next() is atomic, so these need no lock either.
        self._released = itertools.count()
        self._rejected = itertools.count()

    def __repr__(self) -> str:
        return f"<TokenLimiter {self.name!r} {self.in_flight}/{self._max_concurrent} in flight>"

    @property
    def max_concurrent(self) -> int:
        return self._max_concurrent

    @property
    def max_queue(self) -> int:
        return 0

    @property
    def queue_timeout(self) -> float:
        return 0.0

    @property
    def unlimited(self) -> bool:
        return False

    @property
    def in_flight(self) -> int:
        return self._max_concurrent - len(self._tokens)

    @property
    def queued(self) -> int:
        return 0

    def retry_after(self) -> float:
        return 1.0

    def _shed(self) -> LoadShedError:
        next(self._rejected)
        return LoadShedError(
            f"{self.name}: all {self._max_concurrent} slots are taken",
            upstream=self.name,
            retry_after=1.0,
        )

    def try_acquire(self) -> bool:
        try:
            self._tokens.pop()
        except IndexError:
            return False
        return True

    def acquire(self, priority: Priority = "normal") -> None:
        try:
            self._tokens.pop()
        except IndexError:
            raise self._shed() from None

    async def acquire_async(self, priority: Priority = "normal") -> None:
        try:
            self._tokens.pop()
        except IndexError:
            raise self._shed() from None

    def release(self) -> None:
        tokens = self._tokens
        if len(tokens) >= self._max_concurrent:
            raise RuntimeError(f"limiter {self.name!r}: release() without acquire()")
        tokens.append(None)
        next(self._released)

    def slot(self, priority: Priority = "normal") -> _TokenSlot:
        return _TokenSlot(self)

    def async_slot(self, priority: Priority = "normal") -> _TokenSlot:
        return _TokenSlot(self)

    def snapshot(self) -> LimiterSnapshot:
        released = _peek(self._released)
        in_flight = self.in_flight
        return LimiterSnapshot(
            name=self.name,
            max_concurrent=self._max_concurrent,
            max_queue=0,
            queue_timeout=0.0,
            in_flight=in_flight,
            queued=0,
            queued_by_priority=dict.fromkeys(_PRIORITIES, 0),
            admitted=released + in_flight,
            released=released,
            rejected=_peek(self._rejected),
            evicted=0,
            timed_out=0,
            cancelled=0,
            hold_time=0.0,
            retry_after=1.0,
        )


def _peek(counter: itertools.count[int]) -> int:
    """The next value of an itertools.count without consuming it (metrics only)."""
    return int(repr(counter)[6:-1])


class _TokenSlot:
    __slots__ = ("_limiter",)

    def __init__(self, limiter: TokenLimiter) -> None:
        self._limiter = limiter

    def __enter__(self) -> None:
        self._limiter.acquire()

    def __exit__(self, *exc_info: object) -> None:
        self._limiter.release()

    async def __aenter__(self) -> None:
        await self._limiter.acquire_async()

    async def __aexit__(self, *exc_info: object) -> None:
        self._limiter.release()


Limiter: TypeAlias = "ConcurrencyLimiter | TokenLimiter"


def bulkhead(
    name: str, policy: BulkheadPolicy, *, clock: Callable[[], float] = time.monotonic
) -> Limiter:
    """The outbound limiter of upstream ``name``.

    ``max_wait == 0`` fails fast: a call that finds every slot taken is shed at once.
    ``max_wait > 0`` queues callers FIFO for up to ``max_wait`` seconds, at most
    :data:`BULKHEAD_QUEUE_FACTOR` per slot. The queue is bounded because each waiter pins
    a request, its memory and (for sync clients) a thread: an unbounded queue turns an
    overloaded upstream into unbounded latency and memory. Four per slot is about four
    hold times of backlog; a caller further back would mostly wait out ``max_wait`` and
    fail anyway, only later and after holding resources the whole time.
    """
    if policy.max_wait <= 0:
        if policy.max_concurrent == 0:
            return ConcurrencyLimiter(name, 0, 0, 0.0, clock=clock)
        return TokenLimiter(name, policy.max_concurrent)
    max_queue = max(policy.max_concurrent, 1) * BULKHEAD_QUEUE_FACTOR
    return ConcurrencyLimiter(name, policy.max_concurrent, max_queue, policy.max_wait, clock=clock)


def shedder(
    name: str, policy: ShedPolicy, *, clock: Callable[[], float] = time.monotonic
) -> ConcurrencyLimiter:
    """The inbound limiter for the ``[shed]`` settings (app-wide or a route's override)."""
    return ConcurrencyLimiter(
        name, policy.max_concurrent, policy.max_queue, policy.queue_timeout, clock=clock
    )


class InboundShedding:
    """The app-wide inbound limiter plus optional per-route ones.

    ``routes`` maps a route's key (its index or name in the settings, see
    :data:`RouteKey`) to its limiter. It is built once at startup, so its size is fixed by
    the settings; raw request paths never become keys. A route without its own limiter
    (or ``route_key=None`` when no route matched) is limited by the app's alone. Exempt
    paths are the caller's business: it simply does not call :meth:`admit`.

    A request takes its route's slot first, then the app's: while it waits for the
    route's, it holds nothing the rest of the app needs. A request admitted by
    :meth:`admit` / :meth:`admit_async` must be released with :meth:`release` and the
    same key. The two waits add up: the worst case is the route's ``queue_timeout``
    plus the app's.
    """

    __slots__ = ("app", "routes")

    def __init__(
        self,
        app: ConcurrencyLimiter,
        routes: Mapping[RouteKey, ConcurrencyLimiter] | None = None,
    ) -> None:
        self.app = app
        # Unlimited route limiters are dropped so such routes skip a call on every request.
        self.routes: dict[RouteKey, ConcurrencyLimiter] = {
            key: limiter for key, limiter in (routes or {}).items() if not limiter.unlimited
        }

    @classmethod
    def from_policies(
        cls,
        app: ShedPolicy,
        routes: Mapping[RouteKey, ShedPolicy | None] | None = None,
        *,
        name: str = "inbound",
        clock: Callable[[], float] = time.monotonic,
    ) -> InboundShedding:
        """Build the limiters: ``name`` for the app, ``name[key]`` for each route.

        ``routes`` maps each route's key to its effective shed policy, ``None`` (or a
        disabled policy) for routes without their own limit.
        """
        return cls(
            shedder(name, app, clock=clock),
            {
                key: shedder(f"{name}[{key}]", policy, clock=clock)
                for key, policy in (routes or {}).items()
                if policy is not None and policy.enabled
            },
        )

    def admit(self, route_key: RouteKey | None, priority: Priority = "normal") -> None:
        """Take the route's slot (if it has a limiter), then the app's. Raises LoadShedError."""
        route = self.routes.get(route_key) if route_key is not None else None
        if route is None:
            self.app.acquire(priority)
            return
        route.acquire(priority)
        try:
            self.app.acquire(priority)
        except BaseException:
            route.release()
            raise

    def try_admit(self, route_key: RouteKey | None) -> bool:
        """Admit at once if the route's and the app's limiters both have a free slot.

        False (holding nothing) means the caller must go through :meth:`admit_async` /
        :meth:`admit`, which queue or shed.
        """
        route = self.routes.get(route_key) if route_key is not None else None
        if route is None:
            return self.app.try_acquire()
        if not route.try_acquire():
            return False
        if self.app.try_acquire():
            return True
        route.release()
        return False

    async def admit_async(self, route_key: RouteKey | None, priority: Priority = "normal") -> None:
        """Like :meth:`admit`, suspending instead of blocking while queued."""
        route = self.routes.get(route_key) if route_key is not None else None
        if route is None:
            await self.app.acquire_async(priority)
            return
        await route.acquire_async(priority)
        try:
            await self.app.acquire_async(priority)
        except BaseException:
            route.release()
            raise

    def release(self, route_key: RouteKey | None) -> None:
        """Give back what :meth:`admit` took for ``route_key``."""
        self.app.release()
        if route_key is not None:
            route = self.routes.get(route_key)
            if route is not None:
                route.release()

    @contextmanager
    def admitted(self, route_key: RouteKey | None, priority: Priority = "normal") -> Iterator[None]:
        """``with shedding.admitted(key, priority):`` for callers off the hot path."""
        self.admit(route_key, priority)
        try:
            yield
        finally:
            self.release(route_key)

    @asynccontextmanager
    async def admitted_async(
        self, route_key: RouteKey | None, priority: Priority = "normal"
    ) -> AsyncIterator[None]:
        await self.admit_async(route_key, priority)
        try:
            yield
        finally:
            self.release(route_key)
