"""A bounded HTTP/1.1 load generator on raw asyncio streams, and the statistics of its samples.

httpx's client costs a few hundred µs of CPU per request, about what the server under test
spends; on a 2-core machine it would measure itself. This client writes a fixed request
and reads the status line, ``Content-Length`` (or chunks) and the bench's ``x-bench-us``
header, nothing else: tens of µs per request. Keep-alive connections are reused; one
that the server closed while idle (no byte of an answer came back) is retried once on a
fresh connection, as browsers do.

Two shapes of load, both bounded in count and in time:

- :func:`closed_loop`: ``workers`` clients, each sending its next request when the last
  one is answered (at most ``max_requests`` in all, until ``until``).
- :func:`open_loop`: requests started at a fixed ``rate`` whatever the answers, at most
  ``rate * seconds`` of them; when ``max_in_flight`` are outstanding, an arrival is not
  sent and is recorded as :data:`NOT_SENT` (a client that gave up at once).

Every request has a client timeout (recorded as :data:`TIMEOUT`); a closed-loop request
still unanswered when its load is stopped is recorded as :data:`CANCELLED` at that moment,
so a starved server's latencies show up (as lower bounds) instead of vanishing. A
:class:`Sample` keeps send and completion times (``time.monotonic``), the status and the
server-side time.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import statistics
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

ERROR = 0  # connection refused / reset / malformed answer
TIMEOUT = -1  # no answer within the client timeout
NOT_SENT = -2  # open loop: the in-flight cap was reached, the arrival was dropped
CANCELLED = -3  # closed loop stopped with this request still unanswered (a lower bound)

_READ_LIMIT = 1 << 20


def request_bytes(path: str, host: str = "127.0.0.1") -> bytes:
    # Accept: an API client; gateway_guard answers it problem+json.
    return (
        f"GET {path} HTTP/1.1\r\nHost: {host}\r\nAccept: application/json\r\n"
        "User-Agent: outage-bench\r\n\r\n"
    ).encode("ascii")


@dataclass(slots=True)
class Sample:
    route: str
    sent: float
    done: float
    status: int
    server_us: int  # x-bench-us, -1 when absent

    @property
    def latency(self) -> float:
        return self.done - self.sent


class _Stale(Exception):
    """A reused connection was closed before any byte of the answer came back."""


class _Conn:
    __slots__ = ("reader", "reused", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.reused = False

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.transport.abort()

    async def fetch(self, request: bytes) -> tuple[int, int, bool]:
        """Send ``request``; (status, server µs, keep-alive)."""
        reader = self.reader
        self.writer.write(request)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            if self.reused and not exc.partial:
                raise _Stale from None
            raise
        lines = head.split(b"\r\n")
        status = int(lines[0][9:12])
        keep_alive = lines[0].startswith(b"HTTP/1.1")
        length = -1
        chunked = False
        server_us = -1
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
            elif name == b"connection":
                keep_alive = b"close" not in value.lower()
            elif name == b"x-bench-us":
                server_us = int(value)
        if chunked:
            for _ in range(100_000):  # bounded: a body is a few chunks
                size = int((await reader.readuntil(b"\r\n")).split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    for _ in range(100):  # trailers, up to the blank line
                        if await reader.readuntil(b"\r\n") == b"\r\n":
                            break
                    break
                await reader.readexactly(size + 2)
        elif length >= 0:
            if length:
                await reader.readexactly(length)
        else:
            await reader.read()  # no framing: the body runs to the close
            keep_alive = False
        return status, server_us, keep_alive


class Pool:
    """Keep-alive connections to one server, at most ``max_connections`` at a time."""

    def __init__(self, host: str, port: int, max_connections: int) -> None:
        self.host = host
        self.port = port
        self.max_connections = max_connections
        self.in_flight = 0
        self._idle: list[_Conn] = []
        self._open: set[_Conn] = set()

    async def _connect(self) -> _Conn:
        reader, writer = await asyncio.open_connection(self.host, self.port, limit=_READ_LIMIT)
        conn = _Conn(reader, writer)
        self._open.add(conn)
        return conn

    def _drop(self, conn: _Conn | None) -> None:
        if conn is not None:
            conn.close()
            self._open.discard(conn)

    async def fetch(self, request: bytes, timeout: float) -> tuple[int, int]:
        """One request: (status, server µs); status ERROR or TIMEOUT when it failed."""
        self.in_flight += 1
        conn = self._idle.pop() if self._idle else None
        try:
            async with asyncio.timeout(timeout):
                if conn is None:
                    conn = await self._connect()
                try:
                    status, server_us, keep = await conn.fetch(request)
                except _Stale:
                    self._drop(conn)
                    conn = None
                    conn = await self._connect()
                    status, server_us, keep = await conn.fetch(request)
        except TimeoutError:
            self._drop(conn)
            return TIMEOUT, -1
        except (OSError, EOFError, ValueError, IndexError, asyncio.LimitOverrunError):
            # IncompleteReadError is an EOFError; ConnectionError an OSError.
            self._drop(conn)
            return ERROR, -1
        except BaseException:
            self._drop(conn)
            raise
        finally:
            self.in_flight -= 1
        if keep:
            conn.reused = True
            self._idle.append(conn)
        else:
            self._drop(conn)
        return status, server_us

    def close(self) -> None:
        for conn in list(self._open):
            conn.close()
        self._open.clear()
        self._idle.clear()


async def closed_loop(
    pool: Pool,
    route: str,
    path: str,
    *,
    workers: int,
    until: float,
    max_requests: int,
    timeout: float,
    samples: list[Sample],
    stop: asyncio.Event,
) -> None:
    """``workers`` clients back to back until ``until`` (monotonic) or ``stop``."""
    request = request_bytes(path)
    budget = [max_requests]
    clock = time.monotonic

    async def worker() -> None:
        while budget[0] > 0 and not stop.is_set():
            sent = clock()
            if sent >= until:
                return
            budget[0] -= 1
            left = until - sent
            try:
                status, server_us = await pool.fetch(request, min(timeout, left + 1.0))
            except asyncio.CancelledError:
                # Still waiting when the load stopped: its latency is at least this.
                samples.append(Sample(route, sent, clock(), CANCELLED, -1))
                raise
            samples.append(Sample(route, sent, clock(), status, server_us))
            if status == ERROR:
                # A refused or reset connection comes back at once: do not spin on it.
                await asyncio.sleep(0.001)

    await asyncio.gather(*(worker() for _ in range(workers)))


async def open_loop(
    pool: Pool,
    route: str,
    path: str,
    *,
    rate: float,
    start: float,
    seconds: float,
    timeout: float,
    max_in_flight: int,
    samples: list[Sample],
    stop: asyncio.Event,
) -> None:
    """Start ``rate`` requests a second from ``start`` for ``seconds`` (or until ``stop``).

    Requests still outstanding when it returns are cancelled by the caller's stop.
    """
    request = request_bytes(path)
    clock = time.monotonic
    tasks: set[asyncio.Task[None]] = set()
    interval = 1.0 / rate

    async def one(sent: float) -> None:
        status, server_us = await pool.fetch(request, timeout)
        samples.append(Sample(route, sent, clock(), status, server_us))

    try:
        for i in range(int(rate * seconds)):
            due = start + i * interval
            delay = due - clock()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await stop.wait()
            if stop.is_set():
                break
            now = clock()
            if pool.in_flight >= max_in_flight:
                samples.append(Sample(route, now, now, NOT_SENT, -1))
                continue
            task = asyncio.create_task(one(now))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await stop.wait()
    finally:
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


# --- statistics ------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100), linear between order statistics; NaN when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def median(values: Iterable[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return statistics.median(kept) if kept else math.nan


def in_window(samples: Iterable[Sample], route: str, t0: float, t1: float) -> list[Sample]:
    """The samples of ``route`` that completed in [t0, t1)."""
    return [s for s in samples if s.route == route and t0 <= s.done < t1]


def sent_in(samples: Iterable[Sample], route: str, t0: float, t1: float) -> list[Sample]:
    """The samples of ``route`` sent (or dropped) in [t0, t1)."""
    return [s for s in samples if s.route == route and t0 <= s.sent < t1]


def success_rate(samples: Sequence[Sample]) -> float:
    return sum(s.status == 200 for s in samples) / len(samples) if samples else math.nan


def latencies_ms(samples: Iterable[Sample], *, status: int | None = None) -> list[float]:
    """Latencies (ms) of answered or timed-out requests (never the NOT_SENT ones)."""
    return [
        s.latency * 1000.0
        for s in samples
        if s.status != NOT_SENT and (status is None or s.status == status)
    ]


def recovery_time(
    samples: Sequence[Sample],
    route: str,
    switch: float,
    end: float,
    *,
    window: float = 1.0,
    step: float = 0.05,
    threshold: float = 0.99,
) -> float | None:
    """Seconds from ``switch`` until client-seen success stays >= ``threshold``.

    Requests are placed by their send time. Windows of ``window`` seconds start every
    ``step`` from ``switch``; the answer is the start of the first window from which
    every later window (ending by ``end``) is at or above the threshold. None if even
    the last window is below it.
    """
    mine = sorted(
        (s.sent, s.status == 200) for s in samples if s.route == route and s.sent >= switch
    )
    starts = []
    t = switch
    for _ in range(int((end - switch) / step) + 1):
        if t + window > end:
            break
        starts.append(t)
        t += step
    recovered: float | None = None
    for t in reversed(starts):
        inside = [ok for sent, ok in mine if t <= sent < t + window]
        if not inside or sum(inside) / len(inside) < threshold:
            break
        recovered = t - switch
    return recovered
