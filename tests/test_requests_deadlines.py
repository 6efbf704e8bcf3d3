"""The requests driver's socket wrapper (``gateway_guard._urllib3_deadlines``) on real
socket pairs: every read and write of a guarded call stops at the call's deadline, with
the attempt's own timeout as long as the deadline is further away than that timeout.

``test_requests_driver.py`` checks the same end to end (slow-drip upstreams end at the
deadline); here each path of the wrapper is driven on its own: time to spare, the deadline
near, the deadline past, a trickle, a peer that stops reading, a plain float timeout, and
a socket whose file is not a ``SocketIO``.
"""

from __future__ import annotations

import io
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from requests.structures import CaseInsensitiveDict

import gateway_guard as gg
from gateway_guard._call import Call
from gateway_guard._httpx_deadlines import Bound
from gateway_guard._urllib3_deadlines import DeadlineExceeded, _Socket
from gateway_guard.testing import FakeClock


def make_call(clock: Callable[[], float], deadline: float) -> Call:
    # The policy's own timeouts play no part: each test hands the wrapper its own.
    settings = {
        "base_url": "http://up.test",
        "deadline": deadline,
        "connect_timeout": 0.1,
        "read_timeout": 0.1,
    }
    guard = gg.Guard({"upstreams": {"up": settings}}, clock=clock)
    return Call(guard.runtime("up"), "GET", CaseInsensitiveDict(), False)


def bound(value: float, call: Call) -> Bound:
    timeout = Bound(value)
    timeout.call = call
    return timeout


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    ours, peer = socket.socketpair()
    yield ours, peer
    ours.close()
    peer.close()


def test_with_time_to_spare_the_attempts_timeout_applies_as_given(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, peer = pair
    clock = FakeClock()
    sock = _Socket(ours)
    timeout = bound(0.1, make_call(clock, deadline=10.0))
    sock.settimeout(timeout)
    assert sock.gettimeout() is timeout
    assert ours.gettimeout() == 0.1
    sock.sendall(b"ping")
    assert peer.recv(4) == b"ping"
    peer.sendall(b"HTTP/1.1 200 OK\r\n")
    file = sock.makefile("rb")
    assert file.readline() == b"HTTP/1.1 200 OK\r\n"
    # A silent peer trips the read timeout, reported as such (not as the deadline), and
    # the file refuses further reads, as a socket's own file does.
    with pytest.raises(TimeoutError) as info:
        file.readline()
    assert not isinstance(info.value, DeadlineExceeded)
    with pytest.raises(OSError, match="timed out object"):
        file.read(1)
    file.close()


def test_near_the_deadline_a_read_waits_only_for_what_is_left(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, _ = pair
    clock = FakeClock()
    sock = _Socket(ours)
    sock.settimeout(bound(30.0, make_call(clock, deadline=10.0)))
    clock.advance(9.8)  # 0.2 s left of the deadline, less than the 30 s read timeout
    file = sock.makefile("rb")
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        file.read(1)
    assert 0.15 <= time.monotonic() - started < 5.0
    assert ours.gettimeout() == pytest.approx(0.2)


def test_past_the_deadline_reads_and_writes_fail_at_once(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, peer = pair
    clock = FakeClock()
    sock = _Socket(ours)
    sock.settimeout(bound(30.0, make_call(clock, deadline=10.0)))
    file = sock.makefile("rb")
    peer.sendall(b"late")
    clock.advance(10.0)
    with pytest.raises(DeadlineExceeded, match="deadline of upstream 'up' exhausted"):
        file.read(4)
    with pytest.raises(DeadlineExceeded):
        sock.sendall(b"never sent")
    peer.setblocking(False)
    with pytest.raises(BlockingIOError):
        peer.recv(16)
    file.close()


def test_a_trickle_that_never_trips_the_read_timeout_ends_at_the_deadline(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, peer = pair
    stop = threading.Event()

    def trickle() -> None:
        for _ in range(300):  # at most 6 s
            if stop.wait(0.02):
                return
            peer.sendall(b"x")

    sender = threading.Thread(target=trickle)
    sender.start()
    try:
        sock = _Socket(ours)
        sock.settimeout(bound(0.3, make_call(time.monotonic, deadline=0.6)))
        file = sock.makefile("rb")
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded):
            file.read()  # to the end, which never comes
        elapsed = time.monotonic() - started
    finally:
        stop.set()
        sender.join()
    assert 0.5 <= elapsed < 3.0, elapsed


def test_a_write_to_a_peer_that_stopped_reading_ends_at_the_deadline(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, _ = pair
    sock = _Socket(ours)
    sock.settimeout(bound(30.0, make_call(time.monotonic, deadline=0.4)))
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        sock.sendall(b"x" * (64 << 20))  # far more than the socket buffers hold
    assert 0.3 <= time.monotonic() - started < 3.0


def test_a_plain_timeout_passes_straight_through(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, peer = pair
    sock = _Socket(ours)
    sock.settimeout(0.1)
    assert (sock.gettimeout(), ours.gettimeout()) == (0.1, 0.1)
    sock.sendall(b"ping")
    assert peer.recv(4) == b"ping"
    with pytest.raises(TimeoutError) as info:
        sock.makefile("rb").read(1)
    assert not isinstance(info.value, DeadlineExceeded)
    sock.settimeout(None)
    assert ours.gettimeout() is None


def test_the_real_sockets_fileno_shutdown_and_close(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, peer = pair
    sock = _Socket(ours)
    poll = select.poll()
    poll.register(sock)  # urllib3's liveness check
    assert sock.fileno() == ours.fileno()
    assert sock.family == socket.AF_UNIX  # anything else is the real socket's too
    peer.sendall(b"body")
    file = sock.makefile("rb")
    sock.close()
    # The response's file counts as a reference: the socket closes when it is closed.
    assert ours.fileno() != -1
    assert file.read(4) == b"body"
    file.close()
    assert ours.fileno() == -1


class _OtherRaw(io.RawIOBase):
    def __init__(self, sock: socket.socket) -> None:
        super().__init__()
        self._sock = sock

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        return self._sock.recv_into(buffer)


class _OtherSocket:
    """A socket whose file is not a ``SocketIO`` (as another TLS library's might be)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def gettimeout(self) -> float | None:
        return self._sock.gettimeout()

    def settimeout(self, timeout: float | None) -> None:
        self._sock.settimeout(timeout)

    def makefile(self, mode: str, buffering: int | None = None) -> io.RawIOBase:
        return _OtherRaw(self._sock)


def test_a_file_that_is_not_a_socketio_is_bounded_too(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, peer = pair
    clock = FakeClock()
    sock = _Socket(_OtherSocket(ours))  # type: ignore[arg-type]
    sock.settimeout(bound(30.0, make_call(clock, deadline=10.0)))
    peer.sendall(b"head")
    file = sock.makefile("rb")
    assert file.read(4) == b"head"
    clock.advance(9.8)
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        file.read(1)
    assert 0.15 <= time.monotonic() - started < 5.0
    file.close()
