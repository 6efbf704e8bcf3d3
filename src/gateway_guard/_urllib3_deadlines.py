"""Wall-clock deadlines under requests/urllib3: a guarded call's socket reads and writes
stop at its deadline, however the upstream paces its bytes.

requests has no total timeout, and urllib3's read timeout bounds one socket read: an
upstream that sends a header line or a body byte every 0.25 s never trips it. As for httpx
(:mod:`gateway_guard._httpx_deadlines`), the call rides in the attempt's timeouts: the
driver gives urllib3 a connect and read timeout that are a
:class:`~gateway_guard._httpx_deadlines.Bound` (a float that carries the call), urllib3
hands them to the socket with ``settimeout``, and the connections of a guarded adapter's
pools wrap their socket (after TLS) in :class:`_Socket`, once per connection. The wrapper
notes when an operation with that timeout could outlast the call's deadline; until then
every read and write runs with the timeout as given, after that each one is clipped to
what is left of the deadline. A read the deadline cut short raises
:class:`DeadlineExceeded`, a ``TimeoutError`` (``socket.timeout``), so urllib3 and
requests report it as the read timeout it is, chained to this one.

A plain float timeout (a request that is not a guarded call's) passes straight through.
"""

from __future__ import annotations

import errno
import io
import socket
import time
from collections.abc import Callable
from typing import Any, cast

from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from ._httpx_deadlines import Bound

__all__ = ["POOL_CLASSES", "DeadlineExceeded", "deadline_hit"]

_NEVER = float("inf")
# What SocketIO.readinto answers with None (a non-blocking socket with nothing to read).
_BLOCKING_ERRNOS = frozenset({errno.EAGAIN, errno.EWOULDBLOCK})
# The real socket's methods urllib3 and http.client call on every request (``fileno`` for
# the pool's liveness poll, ``shutdown`` saved for the response) or at the end (``close``):
# copied onto the wrapper once, as slots, so that they skip ``__getattr__``, which runs
# only after the normal lookup has failed and built an AttributeError: -9,100
# instructions a call (cachegrind, 400 minus 100 calls of bench/clients.py, 2026-12-07).
_PASSED_THROUGH = ("close", "fileno", "shutdown")


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


class _Socket:
    """A connected (maybe TLS) socket whose reads and writes stop at the call's deadline.

    Everything but the timeout and the I/O http.client does (``makefile``, ``sendall``) is
    the real socket's, so urllib3's liveness checks (``fileno`` for ``poll``),
    ``getpeercert`` and ``close`` behave as before.

    ``settimeout`` gives the real socket the timeout as it comes and notes ``_until``, the
    clock reading after which an operation with that timeout could end past the deadline.
    Before it (the whole call, unless the deadline is near) a read or write costs one clock
    read and a comparison on top of the real socket's; after it, each one is clipped to
    what is left. Against clipping every operation (two Python calls each): -5,800
    instructions a call (cachegrind, 400 minus 100 calls of bench/clients.py, 2026-12-07).
    """

    __slots__ = (
        "_applied",
        "_clock",
        "_inner",
        "_timeout",
        "_until",
        "close",
        "fileno",
        "shutdown",
    )

    close: Callable[[], None]
    fileno: Callable[[], int]
    shutdown: Callable[[int], None]

    def __init__(self, inner: socket.socket) -> None:
        self._inner = inner
        self._timeout: float | None = inner.gettimeout()
        self._applied = self._timeout
        self._until = _NEVER
        self._clock: Callable[[], float] = time.monotonic
        for name in _PASSED_THROUGH:
            method = getattr(inner, name, None)
            if method is not None:
                setattr(self, name, method)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def settimeout(self, timeout: float | None) -> None:
        self._timeout = timeout
        if type(timeout) is Bound:
            call = timeout.call
            self._until = call.deadline_at - timeout
            self._clock = call.rt.clock
        else:
            self._until = _NEVER
        if timeout != self._applied:
            # A syscall (ioctl): only when the value changes.
            self._inner.settimeout(timeout)
            self._applied = timeout

    def gettimeout(self) -> float | None:
        return self._timeout

    def _clip(self) -> None:
        """Past ``_until``: give the real socket what is left of the deadline, or raise."""
        call = cast(Bound, self._timeout).call
        clock = self._clock
        remaining = call.deadline_at - clock()
        if remaining <= 0.0:
            raise DeadlineExceeded(f"deadline of upstream {call.rt.name!r} exhausted")
        self._inner.settimeout(remaining)
        self._applied = remaining

    def sendall(self, data: Any, flags: int = 0) -> None:
        # The clock read into a local: CPython 3.11 cannot specialise a method-style call
        # of an instance attribute (self._clock()), and this runs on every write and read.
        clock = self._clock
        clipped = clock() > self._until
        if clipped:
            self._clip()
        try:
            self._inner.sendall(data, flags)
        except TimeoutError as exc:
            if clipped:
                raise DeadlineExceeded(str(exc)) from exc
            raise

    def makefile(self, mode: str = "r", buffering: int | None = None, **kwargs: Any) -> Any:
        if "r" not in mode or "b" not in mode:
            return self._inner.makefile(mode, buffering, **kwargs)  # type: ignore[call-overload]
        # The real socket's own file (it counts as a reference, so closing the socket
        # while a response is still read defers the close), read through our limits.
        raw: io.RawIOBase = self._inner.makefile("rb", buffering=0)
        if type(raw) is socket.SocketIO:
            # Its class swapped for ours (same layout), whose readinto is SocketIO's with the
            # deadline check: one Python frame a read, as for a bare socket, not two, and
            # no RawIOBase of our own to build: -12,200 instructions a call against
            # wrapping it (_Wrapped) (cachegrind, 400 minus 100 calls of bench/clients.py,
            # 2026-12-07).
            raw.__class__ = _Reader
            raw._owner = self  # type: ignore[attr-defined]  # (typing.cast is a call)
        else:
            raw = _Wrapped(self, raw)
        if buffering == 0:
            return raw
        if buffering is None or buffering < 0:
            buffering = io.DEFAULT_BUFFER_SIZE
        return io.BufferedReader(raw, buffering)


class _Reader(socket.SocketIO):
    """The real socket's ``SocketIO`` (``socket``, ``ssl`` and urllib3's own TLS sockets all
    make one), its reads bounded by the call's deadline."""

    # SocketIO's own (set by its __init__), and ours (set by _Socket.makefile).
    _sock: socket.socket
    _timeout_occurred: bool
    _owner: _Socket

    def readinto(self, b: Any) -> int | None:
        self._checkClosed()
        if self._timeout_occurred:
            raise OSError("cannot read from timed out object")
        owner = self._owner
        clock = owner._clock  # as in _Socket.sendall
        clipped = clock() > owner._until
        if clipped:
            owner._clip()
        try:
            return self._sock.recv_into(b)
        except TimeoutError as exc:
            self._timeout_occurred = True
            if clipped:
                raise DeadlineExceeded(str(exc)) from exc
            raise
        except OSError as exc:
            if exc.errno in _BLOCKING_ERRNOS:
                return None
            raise


class _Wrapped(io.RawIOBase):
    """Any other raw file a socket makes, its reads bounded by the call's deadline."""

    def __init__(self, owner: _Socket, raw: Any) -> None:
        super().__init__()
        self._owner = owner
        self._raw = raw

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int | None:
        owner = self._owner
        clock = owner._clock  # as in _Socket.sendall
        clipped = clock() > owner._until
        if clipped:
            owner._clip()
        try:
            return self._raw.readinto(buffer)  # type: ignore[no-any-return]
        except TimeoutError as exc:
            if clipped:
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


#: A guarded adapter's pools use these (``PoolManager.pool_classes_by_scheme``).
POOL_CLASSES: dict[str, type[HTTPConnectionPool]] = {"http": _Pool, "https": _HTTPSPool}
