"""Concurrency limiters: outbound bulkheads and inbound load shedding.

The names other modules import, each from the private module that holds one concern:

- :class:`ConcurrencyLimiter` (:mod:`._concurrency`): slots as lock-free tokens and a
  priority queue of waiters behind a lock, for threads and event loops at once; its
  waiters are in :mod:`._waiters`, its hold-time estimate (``Retry-After``) in
  :mod:`._estimator`.
- :func:`bulkhead` and :class:`TokenLimiter` (:mod:`._bulkhead`): an upstream's outbound
  limit, fail-fast and lock-free by default.
- :func:`shedder` and :class:`InboundShedding` (:mod:`._shedding`): the app-wide inbound
  limiter plus per-route ones.
"""

from __future__ import annotations

from ._bulkhead import BULKHEAD_QUEUE_FACTOR, Limiter, TokenLimiter, bulkhead
from ._concurrency import MAX_RETRY_AFTER, ConcurrencyLimiter, LimiterSnapshot
from ._shedding import InboundShedding, RouteKey, shedder

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
