"""Fork safety: what a forked child inherits from threads that did not follow it.

``os.fork()`` copies one thread. A lock another thread held at that instant stays held
in the child for ever, and the slots, queue places and probes that other threads held
are never given back: under load every child deadlocked or shed everything. Each object
with a lock or such counts registers here when it is made, and in a forked child
:func:`_after_fork_in_child` calls its ``_after_fork()``, which makes new locks and
forgets what the vanished threads held. (The forking thread's own holdings are
forgotten too: nothing tells them apart. Fork from a thread that holds no slot, as
pre-forking servers do.)

The registry is a :class:`weakref.WeakSet`: it never keeps an object alive, it shrinks
as objects die, and its removal callbacks take no lock, so no finaliser does.
"""

from __future__ import annotations

import os
import weakref
from typing import Protocol

__all__ = ["register"]


class ForkAware(Protocol):
    def _after_fork(self) -> None: ...


_live: weakref.WeakSet[ForkAware] = weakref.WeakSet()


def register(obj: ForkAware) -> None:
    """Have ``obj._after_fork()`` run in every child forked while ``obj`` is alive."""
    _live.add(obj)


def _after_fork_in_child() -> None:
    # The child has one thread, so nothing else touches the registry while we walk it.
    for obj in list(_live):
        obj._after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
