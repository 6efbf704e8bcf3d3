"""The recent gateway errors, looked up by the reference a visitor quotes from our page.

The reference shown on an error page is the request id. A fixed-size ring (a ``deque``
with ``maxlen``): appending is one atomic operation under the GIL, so no lock is taken,
and a finaliser or a signal handler that answers an error can never deadlock here. A
lookup scans the ring (512 entries at most, on an operator's request, not a visitor's).

With ``[state] backend = "redis"`` the fleet store sets :attr:`RecentErrors.sink`: each
record is handed to it too (a bounded ``deque`` append, no lock, no I/O), and the store's
background thread shares it, so a reference is found whichever worker is asked.
"""

from __future__ import annotations

import collections
import itertools
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

from .log import safe_path

if TYPE_CHECKING:
    from .context import RequestContext
    from .errors import UpstreamError

__all__ = ["ErrorRecord", "RecentErrors"]

#: How many gateway errors the status page remembers.
DEFAULT_SIZE = 512


class ErrorRecord(NamedTuple):
    """One answered gateway error, as the status page shows it."""

    reference: str
    upstream: str | None
    route: str | None
    method: str
    path: str
    status: int
    proxy_error: str | None
    received_status: int | None
    attempts: int
    elapsed: float
    time: float
    response_started: bool

    def as_json(self) -> dict[str, Any]:
        fields = self._asdict()
        fields["elapsed"] = round(self.elapsed, 6)
        fields["time"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.time))
        return fields


class RecentErrors:
    """The last ``size`` gateway errors; thread-safe without a lock."""

    __slots__ = ("_ring", "sink")

    def __init__(self, size: int = DEFAULT_SIZE) -> None:
        self._ring: collections.deque[ErrorRecord] = collections.deque(maxlen=size)
        #: Also handed every record (the fleet store's queue); must not block or lock.
        self.sink: Callable[[ErrorRecord], None] | None = None

    def add(self, ctx: RequestContext, error: UpstreamError, started: bool = False) -> None:
        route = ctx.route
        record = ErrorRecord(
            reference=ctx.request_id,
            upstream=error.upstream,
            route=route.name if route is not None else None,
            method=ctx.method,
            path=safe_path(ctx.path),
            status=error.status,
            proxy_error=error.proxy_error,
            received_status=error.received_status,
            attempts=error.attempts,
            elapsed=error.elapsed,
            time=time.time(),
            response_started=started,
        )
        self._ring.append(record)
        sink = self.sink
        if sink is not None:
            sink(record)

    def find(self, reference: str) -> ErrorRecord | None:
        """The newest error answered with ``reference``, or None."""
        for record in reversed(self._ring.copy()):
            if record.reference == reference:
                return record
        return None

    def latest(self, count: int = 20) -> list[ErrorRecord]:
        """The newest ``count`` errors, newest first."""
        return list(itertools.islice(reversed(self._ring.copy()), count))

    def __len__(self) -> int:
        return len(self._ring)
