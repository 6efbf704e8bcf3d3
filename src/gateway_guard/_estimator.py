"""The hold-time estimator: how long a limiter's slot is held, measured by probes.

A shed caller is told when to come back (``Retry-After``), which needs the mean time a
slot is held. Timing every hold would put two clock reads on the lock-free acquire and
release, so holds are sampled by *probes*. A probe starts at an acquisition, noting the
time and the number ``k`` of slots then held, and ends at the ``k``-th release after it:
the time the limiter took to turn over as many slots as were held, which is the mean hold
time at that load by Little's law (and exactly the probed caller's hold when slots are
released in the order they were taken). One probe runs at a time; the next is armed 128
releases after one ends, or at once whenever an estimate is asked for. Each probe moves
an exponentially weighted average as ``k`` releases would, weight 0.1 each.

Releases are counted by the limiter (its release *ordinal*); the estimator is told the
ordinal, the slots held and the time, and keeps two flags the lock-free paths test:
``_arm`` (the next acquisition starts a probe) and ``_mark`` (the release ordinal at which
the running probe ends, or, between probes, the one at which the next is armed).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Final

__all__ = ["HoldTimeEstimator"]

# Each release a hold-time sample stands for moves the average this far towards it: about
# the last ten releases matter, enough to follow an upstream that just slowed down within
# a second or two, smooth enough that one odd request does not swing the estimate.
_ALPHA: Final = 0.1
_KEEP: Final = 1.0 - _ALPHA

# After a hold-time probe ends, this many releases pass before the next one is armed, so
# an uncontended limiter reads the clock twice per ~this many acquire/release pairs.
_PROBE_GAP: Final = 128
# A release ordinal no count reaches: "no probe to finish or arm".
_NEVER: Final = sys.maxsize


class HoldTimeEstimator:
    """Probe state and the smoothed hold time. Every method runs under the owner's lock.

    :class:`~gateway_guard._concurrency.ConcurrencyLimiter` inherits it rather than holding
    one, so that its lock-free paths test ``_arm`` and ``_mark`` as attributes of its own:
    one attribute load instead of two, on a pair that costs ~0.2 µs in all
    (bench/limiter.py, uncontended acquire() + release()).
    """

    __slots__ = ("_arm", "_hold", "_hold_weight", "_mark", "_probe_k", "_probe_since")

    def __init__(self, *, armed: bool) -> None:
        self._probe_since: float | None = None
        self._probe_k = 0
        self._arm = armed
        self._mark = _NEVER
        self._hold = 0.0
        self._hold_weight = 0.0

    def _start_probe_at(self, now: float, held: int, released: int) -> None:
        """Start a probe at an acquisition: ``held`` slots are held, ``released`` counted."""
        self._arm = False
        self._probe_since = now
        self._probe_k = held
        # It ends at the release that makes ``held`` of them since now.
        self._mark = released + held - 1

    def _reach_mark(self, n: int, clock: Callable[[], float]) -> None:
        """Release ordinal ``n`` reached ``_mark``: end the running probe or arm the next."""
        if n < self._mark:
            return  # another release got here first
        if self._probe_since is None:
            self._arm = True
            self._mark = _NEVER
        else:
            self._finish_probe(clock(), n)

    def _finish_probe(self, now: float, n: int) -> None:
        since = self._probe_since
        assert since is not None
        # A probe over k releases is worth k steps of the average, as k releases
        # folded one by one would be; ``_hold_weight`` corrects the bias towards the
        # initial 0 the way Adam's moment estimates do.
        step = 1.0 - _KEEP**self._probe_k
        self._hold += step * (now - since - self._hold)
        self._hold_weight += step * (1.0 - self._hold_weight)
        self._probe_since = None
        self._mark = n + _PROBE_GAP

    def _refresh_probe(self, now: float, held: int, released: int) -> None:
        """An estimate is wanted: make sure a probe is running or armed."""
        if self._probe_since is not None:
            last = released - 1
            if last < self._mark:
                return  # still running
            # Its last release did not see the mark (a lock-free race): end it now.
            self._finish_probe(now, last)
        if held:
            self._start_probe_at(now, held, released)
        else:
            self._arm = True
            self._mark = _NEVER

    def _hold_time(self) -> float:
        """The smoothed seconds a slot is held; 0.0 before the first probe ends."""
        return self._hold / self._hold_weight if self._hold_weight else 0.0

    def _hold_estimate(self, now: float) -> float:
        """:meth:`_hold_time`, or the running probe's age when that is larger.

        The slots the running probe waits for have been held at least that long: a stuck
        upstream raises the estimate before its calls finish.
        """
        hold = self._hold_time()
        since = self._probe_since
        if since is not None:
            hold = max(hold, now - since)
        return hold
