"""ConcurrencyLimiter: slots as lock-free tokens, and a priority queue for the rest.

One accounting core, :class:`ConcurrencyLimiter`, serves threads and any number of event
loops at once. Free slots are tokens in a list, whose ``pop()`` and ``append()`` are
atomic (and, unlike a deque's, on C paths every program keeps warm in the CPU's caches),
so taking and giving back a free slot needs no lock and no clock read. Everything else
(the priority queue of waiters, hand-offs, eviction, timeouts) sits behind a
``threading.Lock`` held only for a handful of operations, never across a wait::

    acquire ──► nobody queued and a token to pop? ──yes──► admitted       (lock-free)
                   │ no
                   ▼  (under the lock)
               nobody queued and a token now? ──yes──► admitted
                   │ no
                   ▼
               queue room? ──yes──► join the priority queue, then drain ──► handed a slot
                   │ no                   │ timeout / evicted
                   ▼                      ▼
               evict a lower-priority  LoadShedError (503, connection_limit_reached)
               waiter, or LoadShedError

    release ──► anyone queued? ──no──► append a token; anyone queued now? ──yes──► drain
                   │ yes                                                        (lock-free)
                   ▼  (under the lock)
               hand the slot straight to the best waiter: no token is ever freed, so
               nobody can barge in ahead of the queue

"Drain" means: under the lock, while a token can be popped and someone waits, pop it and
hand it to the best waiter. It closes the one window the lock-free release opens, a
release that saw an empty queue racing a caller that is joining it: the releaser appends
its token *then* looks at the queue again, the joiner counts itself in ``queued`` *then*
drains. Whichever goes second sees the other's write, so the token reaches the queue.
(With the GIL every step is sequentially consistent; without it, the list's own lock
orders the append against the drain's pop, which is what the argument needs.) Hence the
invariant the whole design rests on: *a token is free only while nobody waits*, apart
from the few instructions between such an append and its drain. A newcomer takes the
lock-free path only after reading ``queued == 0``, so it cannot barge past a waiter that
was already queued when it arrived.

The queue serves ``critical`` before ``normal`` before ``sheddable``, FIFO within one
priority. When it is full, an arrival evicts the newest waiter of a strictly lower
priority, so ``sheddable`` requests are shed first and ``critical`` ones last.

Waiters and their wake-ups are in :mod:`gateway_guard._waiters`; the hold-time estimate
behind an honest ``Retry-After`` is in :mod:`gateway_guard._estimator`.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
import typing
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final

from . import _fork
from ._estimator import HoldTimeEstimator
from ._schema import Priority
from ._waiters import EVICTED, GONE, GRANTED, WAITING, TaskWaiter, ThreadWaiter, Waiter, ring
from .errors import LoadShedError

__all__ = [
    "MAX_RETRY_AFTER",
    "PRIORITIES",
    "ConcurrencyLimiter",
    "LimiterSnapshot",
    "TokenCount",
    "Tokens",
    "token_pool",
]

#: Upper bound of the ``retry_after`` estimate, in seconds.
MAX_RETRY_AFTER: Final = 60.0

#: The priorities, best first (as the schema lists them): the queue serves them in this order.
PRIORITIES: Final[tuple[Priority, ...]] = typing.get_args(Priority)
_RANK: Final[dict[str, int]] = {p: rank for rank, p in enumerate(PRIORITIES)}
_LOWEST: Final = len(PRIORITIES) - 1


#: Limits up to this many slots keep their free slots as a list of tokens (8 bytes each);
#: larger ones count them, so a limit costs the same memory whatever its size.
LIST_TOKENS_MAX: Final = 4096


class TokenCount:
    """Free slots as a number, for large limits: the list-of-tokens protocol (``pop()``
    raising IndexError when none is free, ``append(None)``, ``len``, truth) on a counter.

    Each operation takes a lock of its own, held for one integer update, to be as atomic
    as the list's C methods: a few hundred nanoseconds dearer than the list, paid only by
    limits too large for a list to be the cheap choice.
    """

    __slots__ = ("_free", "_lock")

    def __init__(self, free: int) -> None:
        self._free = free
        self._lock = threading.Lock()

    def pop(self) -> None:
        with self._lock:
            if self._free <= 0:
                raise IndexError("no free slot")
            self._free -= 1

    def append(self, token: None) -> None:
        with self._lock:
            self._free += 1

    def __len__(self) -> int:
        return self._free

    def __bool__(self) -> bool:
        return self._free > 0


Tokens: typing.TypeAlias = list[None] | TokenCount


def token_pool(free: int) -> Tokens:
    """``free`` free slots: a list of tokens when small, a :class:`TokenCount` when large."""
    return [None] * free if free <= LIST_TOKENS_MAX else TokenCount(free)


@dataclass(frozen=True, slots=True)
class LimiterSnapshot:
    """A copy of a limiter's numbers, for metrics.

    ``admitted`` counts every slot ever granted (``released + in_flight``). ``rejected``,
    ``evicted`` and ``timed_out`` are the three ways a caller is shed; ``cancelled``
    counts waiters whose caller gave up (task cancelled, thread interrupted).
    ``hold_time`` is the smoothed seconds a slot is held (0.0 before the first sample, see
    :meth:`ConcurrencyLimiter.retry_after`) and ``retry_after`` what a 503 would say right
    now. The numbers are taken under the limiter's lock, but the lock-free acquire and
    release do not take it: while calls are in progress ``admitted``/``released``/
    ``in_flight`` may be one call apart from each other; when none is, they are exact.
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


class ConcurrencyLimiter(HoldTimeEstimator):
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
    object may be used from threads and from several event loops at the same time. While a
    slot is free and nobody waits, acquire and release take no lock and read no clock.
    """

    __slots__ = (
        "__weakref__",
        "_cancelled",
        "_clock",
        "_evicted",
        "_fail_fast",
        "_lock",
        "_max_concurrent",
        "_max_queue",
        "_queue_timeout",
        "_queued",
        "_queues",
        "_rejected",
        "_released",
        "_slots",
        "_timed_out",
        "_tokens",
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
        # One token per free slot. A slot handed from a releaser to a waiter never becomes
        # a token, so ``max_concurrent - len(_tokens)`` is the number of slots held.
        self._tokens: Tokens = token_pool(max_concurrent)
        # Written only under the lock; read without it by the lock-free paths.
        self._queued = 0
        self._queues: tuple[deque[Waiter], ...] = (deque(), deque(), deque())
        # Ordinal of the next release. Taken with `n = _released; _released = n + 1`:
        # CPython 3.11 switches threads only at calls and backward jumps, never inside
        # those two statements, so each release gets its own ordinal; a free-threaded
        # interpreter could hand two releases one ordinal, which only blurs the hold-time
        # estimate (the tokens, which admission rests on, are a list either way). A plain
        # int, because next() on an itertools.count runs C code no hot path keeps warm.
        self._released = 0
        # Hold-time probes (see retry_after): armed at once, to time the very first hold.
        super().__init__(armed=not self._unlimited)
        self._rejected = 0
        self._evicted = 0
        self._timed_out = 0
        self._cancelled = 0
        # Context managers carry no per-use state, so one per priority serves all callers.
        self._slots = {p: _Slot(self, p) for p in PRIORITIES}
        if not self._unlimited:
            _fork.register(self)

    def _after_fork(self) -> None:
        # In a forked child (see _fork): the lock may be held by a thread that did not
        # follow, and the slots and queue places of such threads are never given back.
        self._lock = threading.Lock()
        self._queues = (deque(), deque(), deque())
        self._queued = 0
        self._tokens = token_pool(self._max_concurrent)

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
        """Slots held right now (always 0 when unlimited).

        A slot handed to a waiter counts from the hand-off, before the waiter wakes up.
        """
        return self._max_concurrent - len(self._tokens)

    @property
    def queued(self) -> int:
        """Callers waiting for a slot right now."""
        return self._queued

    def retry_after(self) -> float:
        """Whole seconds after which a shed caller may reasonably try again, 1 to 60.

        The time for the callers already waiting, plus one, to get a slot:
        ``hold_time * (queued + 1) / max_concurrent``, rounded up, at least 1 s
        (``Retry-After`` is whole seconds, and 0 invites an instant retry storm) and at
        most :data:`MAX_RETRY_AFTER` (beyond that the number says more about one
        long-lived stream than about the queue).

        ``hold_time`` is measured by *probes*, so that the lock-free acquire and release
        never read the clock. A probe starts at an acquisition, noting the time and the
        number ``k`` of slots then held, and ends at the ``k``-th release after it: the
        time the limiter took to turn over as many slots as were held, which is the mean
        hold time at that load by Little's law (and exactly the probed caller's hold when
        slots are released in the order they were taken). One probe runs at a time; the
        next is armed 128 releases after one ends, or at once whenever an estimate is
        asked for (this method, :meth:`snapshot`, every shed), which also starts one on
        the spot when slots are held and none runs. Each probe moves an exponentially
        weighted average as ``k`` releases would, weight 0.1 each. While a probe runs, its
        age is used if it is larger: a stuck upstream raises the estimate before its calls
        finish.
        """
        with self._lock:
            return self._retry_after_locked(self._clock())

    def snapshot(self) -> LimiterSnapshot:
        with self._lock:
            now = self._clock()
            retry_after = self._retry_after_locked(now)
            released = self._released
            in_flight = self.in_flight
            return LimiterSnapshot(
                name=self.name,
                max_concurrent=self._max_concurrent,
                max_queue=self.max_queue,
                queue_timeout=self._queue_timeout,
                in_flight=in_flight,
                queued=self._queued,
                queued_by_priority=dict(zip(PRIORITIES, map(len, self._queues), strict=True)),
                admitted=released + in_flight,
                released=released,
                rejected=self._rejected,
                evicted=self._evicted,
                timed_out=self._timed_out,
                cancelled=self._cancelled,
                hold_time=self._hold_time(),
                retry_after=retry_after,
            )

    def __repr__(self) -> str:
        limit = "unlimited" if self._unlimited else str(self._max_concurrent)
        return (
            f"<ConcurrencyLimiter {self.name!r} {self.in_flight}/{limit} in flight,"
            f" {self._queued}/{self.max_queue} queued>"
        )

    # --- drivers ------------------------------------------------------------------------
    # The lock-free paths are spelled out in each driver rather than shared through a
    # helper: a Python call costs about as much as the whole uncontended acquire does.
    # They read ``_queued`` before popping a token so that a newcomer never takes one
    # while a caller it could have seen waiting is queued (see the module docstring).

    def acquire(self, priority: Priority = "normal") -> None:
        """Take a slot, blocking this thread while queued. Raises LoadShedError."""
        if self._unlimited:
            return
        if not self._queued:
            try:
                self._tokens.pop()
            except IndexError:
                pass
            else:
                if self._arm:
                    self._start_probe()
                return
        with self._lock:
            if self._take_locked():
                return
            rank = self._rank(priority)
            now = self._clock()
            evicted = self._make_room(rank, now)
            waiter = ThreadWaiter(rank, now)
            self._push(waiter)
            granted = self._drain_locked()
        self._wake_others(evicted, granted, waiter)
        if waiter.state == GRANTED:  # a token freed as it joined the queue: it is ours
            return
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
        if not self._queued:
            try:
                self._tokens.pop()
            except IndexError:
                pass
            else:
                if self._arm:
                    self._start_probe()
                return
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._take_locked():
                return
            rank = self._rank(priority)
            now = self._clock()
            evicted = self._make_room(rank, now)
            waiter = TaskWaiter(rank, now, loop)
            self._push(waiter)
            granted = self._drain_locked()
        self._wake_others(evicted, granted, waiter)
        if waiter.state == GRANTED:  # a token freed as it joined the queue: it is ours
            return
        timer = loop.call_later(self._queue_timeout, ring, waiter.future)
        try:
            await waiter.future
        except BaseException:
            self._abandon(waiter)
            raise
        finally:
            timer.cancel()
        self._settle(waiter)

    def try_acquire(self) -> bool:
        """Take a free slot without waiting; False when none is free (nothing is queued).

        The drivers' fast path: an async caller skips creating a coroutine when a slot is
        free. It is lock-free, and False whenever anyone is queued, so it never barges.
        """
        if self._unlimited:
            return True
        if self._queued:
            return False
        try:
            self._tokens.pop()
        except IndexError:
            return False
        if self._arm:
            self._start_probe()
        return True

    def release(self) -> None:
        """Give back a slot: to the best waiter if anyone waits, else to the pool.

        Raises RuntimeError when no slot is held: a count that drifted would silently
        admit more than ``max_concurrent`` from then on. (Checked without the lock: two
        racing releases of one slot may go unnoticed; a correct release never trips it.)
        """
        if self._unlimited:
            return
        if self._queued == 0:  # (not ``not``: mypy would take the re-check below as dead)
            tokens = self._tokens
            if len(tokens) >= self._max_concurrent:
                raise RuntimeError(f"limiter {self.name!r}: release() without acquire()")
            # Counted before the slot can go to anyone, so that a probe started by whoever
            # gets it counts from after this release.
            n = self._released
            self._released = n + 1
            tokens.append(None)
            # Look again *after* the append: a caller that joined the queue meanwhile
            # either popped this token while draining or is seen here (module docstring).
            if self._queued:
                self._drain()
            if n >= self._mark:
                self._tick(n)
            return
        with self._lock:
            tokens = self._tokens
            if len(tokens) >= self._max_concurrent:
                raise RuntimeError(f"limiter {self.name!r}: release() without acquire()")
            n = self._released
            self._released = n + 1
            if n >= self._mark:
                self._reach_mark(n, self._clock)
            if self._queued:
                waiter: Waiter | None = self._grant_best()
            else:  # the queue emptied meanwhile (timeouts, cancellations)
                tokens.append(None)
                waiter = None
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
            allowed = ", ".join(PRIORITIES)
            raise ValueError(f"priority must be one of {allowed}; got {priority!r}") from None

    def _take_locked(self) -> bool:
        """Take a free token if nobody is queued (a release may have just returned one)."""
        if self._queued:
            return False
        try:
            self._tokens.pop()
        except IndexError:
            return False
        if self._arm:
            self._start_probe_locked(self._clock())
        return True

    def _make_room(self, rank: int, now: float) -> Waiter | None:
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
                evicted.state = EVICTED
                self._evicted += 1
                self._queued -= 1
                return evicted
        self._rejected += 1
        raise self._shed_error("queue full", now, 0.0)

    def _push(self, waiter: Waiter) -> None:
        self._queues[waiter.rank].append(waiter)
        self._queued += 1

    def _grant_best(self) -> Waiter:
        """Hand a slot (a releaser's, or a popped token) to the best waiter (``_queued``)."""
        for queue in self._queues:
            if queue:
                waiter = queue.popleft()
                break
        else:  # pragma: no cover - _queued counts exactly what the queues hold
            raise AssertionError("limiter queue count out of step")
        self._queued -= 1
        waiter.state = GRANTED
        if self._arm:
            self._start_probe_locked(self._clock())
        return waiter

    def _drain_locked(self) -> list[Waiter]:
        """Hand every free token to a waiter; returns the waiters to wake once unlocked.

        Free tokens while someone waits exist only for the instant between a lock-free
        release's append and its drain; whoever drains first serves the queue in order.
        """
        granted: list[Waiter] = []
        tokens = self._tokens
        while self._queued and tokens:
            try:
                tokens.pop()
            except IndexError:  # a lock-free acquirer got there first
                break
            granted.append(self._grant_best())
        return granted

    def _pass_on(self) -> Waiter | None:
        """Release a granted slot nobody will use: to the best waiter (returned, to be
        woken), else back to the pool as a token."""
        n = self._released
        self._released = n + 1
        if n >= self._mark:
            self._reach_mark(n, self._clock)
        if self._queued:
            return self._grant_best()
        self._tokens.append(None)
        return None

    # --- hold-time probes (see retry_after and ._estimator), under the lock --------------

    def _start_probe(self) -> None:
        """A lock-free acquirer found a probe armed: time from this acquisition."""
        with self._lock:
            if self._arm:
                self._start_probe_locked(self._clock())

    def _start_probe_locked(self, now: float) -> None:
        self._start_probe_at(now, self._max_concurrent - len(self._tokens), self._released)

    def _tick(self, n: int) -> None:
        with self._lock:
            self._reach_mark(n, self._clock)

    def _retry_after_locked(self, now: float) -> float:
        if self._unlimited:
            return 1.0
        self._refresh_probe(now, self.in_flight, self._released)
        wait = self._hold_estimate(now) * (self._queued + 1) / self._max_concurrent
        return float(min(max(math.ceil(wait), 1), MAX_RETRY_AFTER))

    def _shed_error(self, reason: str, now: float, elapsed: float) -> LoadShedError:
        return LoadShedError(
            f"{self.name}: load shed, {reason} ({self.in_flight}/{self._max_concurrent}"
            f" in flight, {self._queued} queued)",
            upstream=self.name,
            retry_after=self._retry_after_locked(now),
            attempts=0,
            elapsed=elapsed,
        )

    # --- around a wait: shared by both drivers, each takes the lock itself ------------

    def _drain(self) -> None:
        """A lock-free release found someone queued after returning its token."""
        with self._lock:
            granted = self._drain_locked()
        for waiter in granted:
            self._wake_holder(waiter)

    def _wake_others(self, evicted: Waiter | None, granted: list[Waiter], joiner: Waiter) -> None:
        """After joining the queue: wake whom the join evicted or drained a token to."""
        if evicted is not None:
            evicted.wake()
        for waiter in granted:
            if waiter is not joiner:
                self._wake_holder(waiter)

    def _settle(self, waiter: Waiter) -> None:
        """After the wait: return if the waiter holds a slot, raise if it was shed."""
        granted: list[Waiter] = []
        error: LoadShedError | None = None
        with self._lock:
            if waiter.state == WAITING and self._tokens:
                # Its time is up, but a slot is free right now (a lock-free release whose
                # drain is on its way): drain here rather than time out next to it.
                granted = self._drain_locked()
            state = waiter.state
            if state != GRANTED:
                now = self._clock()
                if state == WAITING:  # its own timer fired before any hand-off
                    self._queues[waiter.rank].remove(waiter)
                    self._queued -= 1
                    waiter.state = GONE
                    self._timed_out += 1
                    reason = f"no slot within {self._queue_timeout:g}s"
                else:
                    reason = "evicted by a higher-priority caller"
                error = self._shed_error(reason, now, now - waiter.since)
        for other in granted:
            if other is not waiter:
                self._wake_holder(other)
        if error is not None:
            raise error

    def _abandon(self, waiter: Waiter) -> None:
        """The waiting caller is gone (cancelled, interrupted): leave nothing behind."""
        with self._lock:
            state = waiter.state
            waiter.state = GONE
            if state == WAITING:
                self._queues[waiter.rank].remove(waiter)
                self._queued -= 1
                self._cancelled += 1
                return
            if state != GRANTED:
                return
            # It was handed a slot it will never use: pass it on as release() would.
            self._cancelled += 1
            successor = self._pass_on()
        self._wake_holder(successor)

    def _wake_holder(self, waiter: Waiter | None) -> None:
        """Wake a waiter that now holds a slot. Called unlocked: waking may take locks."""
        while waiter is not None and not waiter.wake():
            # Its loop is closed, so it can never take the slot: count the grant as a
            # (short) hold and pass it on.
            with self._lock:
                if waiter.state != GRANTED:
                    return  # its coroutine was closed meanwhile and gave the slot back
                waiter.state = GONE
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
