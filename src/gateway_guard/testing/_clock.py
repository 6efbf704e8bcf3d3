"""FakeClock: monotonic time that moves only when a test says so."""

from __future__ import annotations

import threading

__all__ = ["FakeClock"]


class FakeClock:
    """A monotonic clock (seconds) that stands still until a test moves it.

    Give it to ``Guard(settings, clock=clock)``: deadlines, circuit breakers, retry
    budgets and load-shedding limiters all read that one clock, so a test moves time
    instead of sleeping::

        >>> import httpx
        >>> from gateway_guard import BreakerState, Guard
        >>> from gateway_guard.testing import FakeClock
        >>> clock = FakeClock()
        >>> guard = Guard(
        ...     {
        ...         "upstreams": {
        ...             "payments": {
        ...                 "base_url": "http://payments.test",
        ...                 "raise_on_failure_status": False,
        ...                 "retry": {"attempts": 1},
        ...                 "breaker": {"window_size": 1, "min_calls": 1, "open_seconds": 30},
        ...             }
        ...         }
        ...     },
        ...     clock=clock,
        ... )
        >>> down = httpx.MockTransport(lambda request: httpx.Response(503))
        >>> with guard.client("payments", transport=down) as client:
        ...     client.get("/charge").status_code
        503
        >>> guard.breaker("payments").state is BreakerState.OPEN
        True
        >>> clock.advance(30)
        >>> guard.breaker("payments").state is BreakerState.HALF_OPEN
        True

    Any callable returning monotonic seconds works as a clock; this one adds
    :meth:`advance`, :meth:`sleep` (a stand-in for ``time.sleep`` that moves the clock
    instead of waiting) and a settable :attr:`now`. Moving it is thread-safe, so threads
    of a concurrency test may each advance it.
    """

    __slots__ = ("_lock", "_now")

    def __init__(self, start: float = 1000.0) -> None:
        # Not 0.0: code under test may treat 0 as "never", and a clock that starts there
        # would hide that bug.
        self._now = float(start)
        self._lock = threading.Lock()

    def __call__(self) -> float:
        """The current time, in seconds (the clock's own epoch, like ``time.monotonic``)."""
        # A read needs no lock: rebinding a float attribute is atomic.
        return self._now

    @property
    def now(self) -> float:
        """The current time; assign to it to set the clock (backwards too, to test that)."""
        return self._now

    @now.setter
    def now(self, value: float) -> None:
        with self._lock:
            self._now = float(value)

    def advance(self, seconds: float) -> None:
        """Move the clock ``seconds`` forward."""
        if seconds < 0:
            raise ValueError(f"a monotonic clock does not go back: advance({seconds!r})")
        with self._lock:  # += reads then writes: two threads must not lose a step
            self._now += seconds

    def sleep(self, seconds: float) -> None:
        """Stand in for ``time.sleep``: move the clock instead of waiting."""
        self.advance(max(0.0, seconds))

    def __repr__(self) -> str:
        return f"FakeClock(now={self._now!r})"
