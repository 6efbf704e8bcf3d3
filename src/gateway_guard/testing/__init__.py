"""Helpers for testing apps that use gateway_guard (and gateway_guard itself).

- :func:`set_testing` / :func:`testing`: retry backoff waits become 0 (like stamina's
  ``set_testing``), optionally capping attempts, so a test suite never sleeps::

      from gateway_guard.testing import testing

      with testing():              # or set_testing(True) in a conftest.py fixture
          client.get("/orders/1")  # retried without waiting

- :class:`~gateway_guard.testing.upstream.MisbehavingUpstream`: a real HTTP server that
  refuses, hangs, resets, truncates, answers garbage or a given status on command.
- :class:`FakeClock`: give it to ``Guard(settings, clock=clock)``; deadlines, breakers,
  budgets and limiters all read that clock, so a test moves time instead of sleeping::

      clock = FakeClock()
      guard = Guard(settings, clock=clock)
      clock.advance(30)            # the breaker's open_seconds have passed
"""

from __future__ import annotations

from gateway_guard.retry import is_testing, set_testing, testing

from ._clock import FakeClock
from .upstream import MisbehavingUpstream, Mode, UpstreamStats

__all__ = [
    "FakeClock",
    "MisbehavingUpstream",
    "Mode",
    "UpstreamStats",
    "is_testing",
    "set_testing",
    "testing",
]
