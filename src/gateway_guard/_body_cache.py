"""The body cache: each distinct page rendered once, kept as a ``bytes`` %-format.

A body is rendered with random *markers* where the request id and the time go; the
markers are then turned into ``%b`` slots, so that a request costs one ``%``. A second
set of markers, of another length, tells whether a template used the values as opaque
text (``{{ request_id }}``) or looked inside them (``{{ request_id[:8] }}``, ``|upper``):
only the first kind can be substituted exactly, the second is rendered per request.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from ._copy import Page
from ._negotiate import Media

__all__ = ["Entry", "Markers", "remember"]

_CACHE_SIZE = 256
_SLOT_NAMES = ("rid", "ts", "iso")

K = TypeVar("K")


@dataclass(frozen=True, slots=True)
class Entry:
    """A cached response: static headers and the body as a %-format of its per-request slots."""

    status: int
    media: Media
    headers: tuple[tuple[str, str], ...]
    page: Page
    fmt: bytes | None  # None: the template uses the per-request values in ways we cannot cache
    slots: tuple[int, ...]  # indexes into (request id, time, ISO time)


def remember(cache: dict[K, Entry], key: K, entry: Entry) -> Entry:
    """Put ``entry`` in ``cache``, which never holds more than 256 entries.

    An outage with ever-changing Retry-After values (breaker countdowns) must not grow
    memory. Clearing all is crude but cheap, and refilling costs one render per distinct
    page. Concurrent threads at worst render an entry twice.
    """
    if len(cache) >= _CACHE_SIZE:
        cache.clear()
    cache[key] = entry
    return entry


def _markers(prefix: str) -> tuple[str, str, str]:
    # Letters and digits only: unchanged by HTML escaping, JSON encoding and our plain-text
    # cleaning, so every body keeps them intact.
    return (prefix + "rid", prefix + "ts", prefix + "iso")


class Markers:
    """The stand-ins for (request id, time, ISO time) while a body is rendered for the cache."""

    __slots__ = ("_re", "first", "second")

    def __init__(self) -> None:
        prefix = "ggA" + secrets.token_hex(10)
        self.first = _markers(prefix)
        self.second = _markers("ggB" + secrets.token_hex(14))
        self._re = re.compile(prefix.encode() + rb"(rid|ts|iso)")

    def to_format(self, body: bytes) -> tuple[bytes, tuple[int, ...]]:
        """``body`` (rendered with :attr:`first`) as a %-format and the order of its slots."""
        slots: list[int] = []

        def slot(match: re.Match[bytes]) -> bytes:
            slots.append(_SLOT_NAMES.index(match[1].decode()))
            return b"%b"

        return self._re.sub(slot, body.replace(b"%", b"%%")), tuple(slots)

    def exact(self, body: bytes, render: Callable[[str, str, str], bytes]) -> bool:
        """Whether ``render`` with :attr:`second` gives ``body`` with the markers swapped."""
        values = dict(zip((b"rid", b"ts", b"iso"), (m.encode() for m in self.second), strict=True))
        expected = self._re.sub(lambda m: values[m[1]], body)
        return render(*self.second) == expected
