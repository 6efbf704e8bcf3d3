"""Outbound bulkheads: which limiter an upstream gets, and the fail-fast TokenLimiter.

A bulkhead caps the calls in flight to one upstream, so a slow upstream cannot take every
thread or connection. With ``max_wait == 0`` (the default) it fails fast, and is a
:class:`TokenLimiter`: no queue, no lock, one C call to take a slot. With ``max_wait > 0``
callers may queue, and it is a :class:`~gateway_guard._concurrency.ConcurrencyLimiter`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Final, TypeAlias

from . import _fork
from ._concurrency import PRIORITIES, ConcurrencyLimiter, LimiterSnapshot, Tokens, token_pool
from ._schema import Priority
from .errors import LoadShedError
from .policy import BulkheadPolicy

__all__ = ["BULKHEAD_QUEUE_FACTOR", "Limiter", "TokenLimiter", "bulkhead"]

#: A bulkhead with ``max_wait > 0`` queues at most this many callers per slot.
BULKHEAD_QUEUE_FACTOR: Final = 4


class TokenLimiter:
    """A fail-fast limiter (no queue) that takes no lock: one token per slot in a list.

    ``list.pop()`` and ``list.append()`` are atomic (thread-safe in CPython, with or
    without the GIL), so taking and giving back a slot is one C call each, with no lock
    round trip and no clock read: this sits on every outbound call's path. (A list, not a
    deque: the list's C paths are the ones every Python program keeps hot in the CPU's
    caches, and inside a real request that measurably matters.) It has the
    driver API of :class:`ConcurrencyLimiter`; what it gives up is the hold-time estimate,
    so a shed says ``Retry-After: 1`` (a fail-fast bulkhead's slots turn over within one
    upstream call, and a caller that finds it full again is shed again at no cost).

    The guarded transports drive it inline, without a method call: ``tokens.pop()`` takes
    a slot (``IndexError``: none is free, raise :meth:`refused`), and ``tokens.append(None)``
    then ``released += 1`` gives it back. That protocol is for drivers whose every take is
    paired with exactly one give-back by construction (a ``try``/``finally``); everyone
    else uses :meth:`acquire` / :meth:`release`, which check the pairing.
    """

    __slots__ = ("__weakref__", "_max_concurrent", "_rejected", "name", "released", "tokens")

    def __init__(self, name: str, max_concurrent: int) -> None:
        if max_concurrent <= 0:
            raise ValueError(f"max_concurrent must be > 0, got {max_concurrent}")
        self.name = name
        self._max_concurrent = max_concurrent
        # A list up to LIST_TOKENS_MAX slots, then a counter with the same protocol.
        self.tokens: Tokens = token_pool(max_concurrent)
        # Statistics only. CPython 3.11 does not switch threads inside a `+= 1` on an
        # attribute, so they are exact there; elsewhere they could undercount, never more.
        self.released = 0
        self._rejected = 0
        _fork.register(self)

    def _after_fork(self) -> None:
        # In a forked child (see _fork): slots held by threads that did not follow are
        # never given back. The transports read ``tokens`` afresh on every call.
        self.tokens = token_pool(self._max_concurrent)

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
        return self._max_concurrent - len(self.tokens)

    @property
    def queued(self) -> int:
        return 0

    def retry_after(self) -> float:
        return 1.0

    def refused(self) -> LoadShedError:
        """Count a caller that found every slot taken; the error to raise for it."""
        self._rejected += 1
        return LoadShedError(
            f"{self.name}: all {self._max_concurrent} slots are taken",
            upstream=self.name,
            retry_after=1.0,
        )

    def try_acquire(self) -> bool:
        try:
            self.tokens.pop()
        except IndexError:
            return False
        return True

    def acquire(self, priority: Priority = "normal") -> None:
        try:
            self.tokens.pop()
        except IndexError:
            raise self.refused() from None

    async def acquire_async(self, priority: Priority = "normal") -> None:
        try:
            self.tokens.pop()
        except IndexError:
            raise self.refused() from None

    def release(self) -> None:
        tokens = self.tokens
        if len(tokens) >= self._max_concurrent:
            raise RuntimeError(f"limiter {self.name!r}: release() without acquire()")
        tokens.append(None)
        self.released += 1

    def slot(self, priority: Priority = "normal") -> _TokenSlot:
        return _TokenSlot(self)

    def async_slot(self, priority: Priority = "normal") -> _TokenSlot:
        return _TokenSlot(self)

    def snapshot(self) -> LimiterSnapshot:
        released = self.released
        in_flight = self.in_flight
        return LimiterSnapshot(
            name=self.name,
            max_concurrent=self._max_concurrent,
            max_queue=0,
            queue_timeout=0.0,
            in_flight=in_flight,
            queued=0,
            queued_by_priority=dict.fromkeys(PRIORITIES, 0),
            admitted=released + in_flight,
            released=released,
            rejected=self._rejected,
            evicted=0,
            timed_out=0,
            cancelled=0,
            hold_time=0.0,
            retry_after=1.0,
        )


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


#: Either kind of limiter :func:`bulkhead` returns.
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
