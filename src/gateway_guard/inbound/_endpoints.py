"""Endpoints the middleware answers itself, before routing and shedding (``[metrics] path``).

``guard.endpoints`` maps an exact path to a function of the method that returns what to
send (:class:`Served`); adapters look the path up (an empty dict when none is set: one
truth test per request) and translate the answer into their own response. The functions
belong to the integrations (``gateway_guard.metrics.endpoint``).
"""

from __future__ import annotations

from typing import NamedTuple

__all__: list[str] = []


class Served(NamedTuple):
    """A whole response: status, header fields, body."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes
