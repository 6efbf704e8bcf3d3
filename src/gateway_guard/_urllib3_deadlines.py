"""Wall-clock deadlines under requests/urllib3: a guarded call's socket reads and writes
stop at its deadline, however the upstream paces its bytes.

requests has no total timeout, and urllib3's read timeout bounds one socket read: an
upstream that sends a header line or a body byte every 0.25 s never trips it. As for httpx
(:mod:`gateway_guard._httpx_deadlines`), the call rides in the attempt's timeouts: the
driver gives urllib3 a connect and read timeout that are a
:class:`~gateway_guard._httpx_deadlines.Bound` (a float that carries the call), urllib3
hands them to the socket with ``settimeout``, and the connections of a guarded adapter's
pools wrap their socket (after TLS) in :class:`_Socket`, which remembers that timeout and
clips every read and write to what is left of the call's deadline. A read the deadline
cut short raises :class:`DeadlineExceeded`, a ``TimeoutError`` (``socket.timeout``), so
urllib3 and requests report it as the read timeout it is, chained to this one.

A plain float timeout (a request that is not a guarded call's) passes straight through.
"""

from __future__ import annotations

import io
import socket
from typing import Any

from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from ._httpx_deadlines import Bound

__all__ = ["POOL_CLASSES", "DeadlineExceeded", "deadline_hit"]


class DeadlineExceeded(TimeoutError):
    """The call's deadline passed during a socket read or write."""


def deadline_hit(exc: BaseException) -> bool:
    """Whether ``exc`` (a requests/urllib3 error) was a read or write the deadline ended."""
    seen = 0
    current: BaseException | None = exc
    pending: list[BaseException] = []
    while current is not None and seen < 32:
        seen += 1
        if isinstance(current, DeadlineExceeded):
            return True
        pending.extend(arg for arg in current.args if isinstance(arg, BaseException))
        for inner in (current.__cause__, current.__context__, getattr(current, "reason", None)):
            if isinstance(inner, BaseException):
                pending.append(inner)
        current = pending.pop() if pending else None
    return False


def _limit(timeout: float | None) -> tuple[float | None, bool]:
    """One socket operation's timeout, and whether the call's deadline is what set it."""
    if type(timeout) is not Bound:
        return timeout, False
    call = timeout.call
    remaining = call.deadline_at - call.rt.clock()
    if remaining <= 0.0:
        raise DeadlineExceeded(f"deadline of upstream {call.rt.name!r} exhausted")
    if timeout <= remaining:
        return timeout, False
    return remaining, True


class _Socket:
    """A connected (maybe TLS) socket whose reads and writes stop at the call's deadline.

    Everything but the timeout and the I/O http.client does (``makefile``, ``sendall``) is
    the real socket's, so urllib3's liveness checks (``fileno`` for ``poll``),
    ``getpeercert`` and ``close`` behave as before.
    """

    __slots__ = ("_applied", "_inner", "_timeout")

    def __init__(self, inner: socket.socket) -> None:
        self._inner = inner
        self._timeout: float | None = inner.gettimeout()
        self._applied = self._timeout

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def settimeout(self, timeout: float | None) -> None:
        self._timeout = timeout

    def gettimeout(self) -> float | None:
        return self._timeout

    def _apply(self) -> bool:
        limit, deadline = _limit(self._timeout)
        if limit != self._applied:
            # settimeout is a syscall (fcntl): only when the value changes, which with
            # time to spare is once per attempt at most.
            self._inner.settimeout(limit)
            self._applied = limit
        return deadline

    def sendall(self, data: Any, flags: int = 0) -> None:
        deadline = self._apply()
        try:
            self._inner.sendall(data, flags)
        except TimeoutError as exc:
            if deadline:
                raise DeadlineExceeded(str(exc)) from exc
            raise

    def makefile(self, mode: str = "r", buffering: int | None = None, **kwargs: Any) -> Any:
        if "r" not in mode or "b" not in mode:
            return self._inner.makefile(mode, buffering, **kwargs)  # type: ignore[call-overload]
        # The real socket's own file (it counts as a reference, so closing the socket
        # while a response is still read defers the close), read through our limits.
        raw = _Reader(self, self._inner.makefile("rb", buffering=0))
        if buffering == 0:
            return raw
        return io.BufferedReader(raw, buffering or io.DEFAULT_BUFFER_SIZE)


class _Reader(io.RawIOBase):
    def __init__(self, sock: _Socket, raw: Any) -> None:
        super().__init__()
        self._sock = sock
        self._raw = raw

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int | None:
        deadline = self._sock._apply()
        try:
            return self._raw.readinto(buffer)  # type: ignore[no-any-return]
        except TimeoutError as exc:
            if deadline:
                raise DeadlineExceeded(str(exc)) from exc
            raise

    def close(self) -> None:
        if not self.closed:
            self._raw.close()
        super().close()


class _Connection(HTTPConnection):
    def connect(self) -> None:
        super().connect()
        self.sock = _Socket(self.sock)


class _HTTPSConnection(HTTPSConnection):
    def connect(self) -> None:
        super().connect()
        self.sock = _Socket(self.sock)


class _Pool(HTTPConnectionPool):
    ConnectionCls = _Connection


class _HTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _HTTPSConnection


#: A guarded adapter's pool managers use these (``PoolManager.pool_classes_by_scheme``).
POOL_CLASSES: dict[str, type[HTTPConnectionPool]] = {"http": _Pool, "https": _HTTPSPool}
