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

# `import X as X`: re-exported for code written before this module was split; not API
# (docs/api.md lists what is), so not in __all__.
from ._bulkhead import BULKHEAD_QUEUE_FACTOR as BULKHEAD_QUEUE_FACTOR
from ._bulkhead import Limiter as Limiter
from ._bulkhead import TokenLimiter as TokenLimiter
from ._bulkhead import bulkhead as bulkhead
from ._concurrency import MAX_RETRY_AFTER as MAX_RETRY_AFTER
from ._concurrency import ConcurrencyLimiter
from ._concurrency import LimiterSnapshot as LimiterSnapshot
from ._shedding import InboundShedding as InboundShedding
from ._shedding import RouteKey as RouteKey
from ._shedding import shedder as shedder

__all__ = ["ConcurrencyLimiter"]
