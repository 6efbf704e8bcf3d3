"""Waiters: a caller queued for a limiter's slot, and the doorbell that wakes it.

Waking is the only thing the sync and async drivers do differently: a thread blocks on a
private lock that the releaser unlocks; a task awaits a future that the releaser resolves
through its loop (``call_soon_threadsafe`` from another thread). Who owns a slot is decided
only under the limiter's lock, by the waiter's :attr:`Waiter.state`, never by whether the
wake-up arrived, so a timeout or a cancellation racing a hand-off either keeps the slot or
gives it back.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Final

__all__ = ["EVICTED", "GONE", "GRANTED", "WAITING", "TaskWaiter", "ThreadWaiter", "Waiter", "ring"]

# Waiter states. Only the limiter, under its lock, moves a waiter out of WAITING.
WAITING: Final = 0
GRANTED: Final = 1  # handed a slot (a token that never went back to the pool): it holds it
EVICTED: Final = 2  # pushed out of a full queue by a higher-priority arrival
GONE: Final = 3  # timed out or cancelled; it holds nothing


class Waiter:
    """A queued caller: its priority rank, since when it waits, and its state."""

    __slots__ = ("rank", "since", "state")

    def __init__(self, rank: int, since: float) -> None:
        self.rank = rank
        self.since = since
        self.state = WAITING

    def wake(self) -> bool:
        """Ring the waiter's doorbell; False when it can never hear it (its loop closed)."""
        raise NotImplementedError


class ThreadWaiter(Waiter):
    """A blocked thread; its doorbell is a lock that the waker releases."""

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


def ring(future: asyncio.Future[None]) -> None:
    # Both the hand-off and the queue timer may ring: the first one wins.
    if not future.done():
        future.set_result(None)


class TaskWaiter(Waiter):
    """A suspended task; its doorbell is a future resolved through the task's loop."""

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
                self.loop.call_soon(ring, self.future)
            else:
                self.loop.call_soon_threadsafe(ring, self.future)
        except RuntimeError:  # the loop is closed: nobody is left to take the slot
            return False
        return True
