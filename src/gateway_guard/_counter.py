"""Reading an ``itertools.count`` without consuming it.

``next()`` on an ``itertools.count`` is one atomic C call, so the hot paths count with it
instead of ``+= 1`` under a lock. Reading one back is rarer (metrics, decisions off the hot
path) and ``repr`` is the only way to do it.
"""

from __future__ import annotations

import itertools

__all__ = ["peek"]


def peek(counter: itertools.count[int]) -> int:
    """The value ``next(counter)`` would return, without consuming it."""
    return int(repr(counter)[6:-1])
