"""Every failure row of DESIGN §5, provoked for real on loopback with httpx's sync and async
clients, and classified.

What the real stacks taught us (and why classify walks ``args``): httpcore raises
``ConnectError(original_oserror)`` and its connection pool re-raises it ``from None``, so
the ``OSError`` is reachable only as ``args[0]``. The async (anyio) backend then hides the
errno one level deeper, under ``OSError("All connection attempts failed")``, and reports a
reset or EOF during the TLS handshake as a bare ``BrokenResourceError`` / ``EndOfStream``
with an empty message; the sync backend reports the same events with the OS's wording.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import httpcore
import httpx
import pytest
import trustme

from gateway_guard.errors import (
    CircuitOpenError,
    LoadShedError,
    UpstreamConfigError,
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamStatusError,
    UpstreamTimeout,
    classify,
    from_exception,
)
from gateway_guard.testing.upstream import MisbehavingUpstream

pytestmark = pytest.mark.e2e

PATIENCE = 5.0
SHORT = 0.2  # a timeout meant to expire
# A new httpx client loads the CA bundle (~20 ms, far more on a busy machine); a shared
# context makes them cheap. It trusts the system's roots where httpx would use certifi's:
# either way our private test CA stays untrusted unless a test says otherwise.
TRUST = ssl.create_default_context()


@pytest.fixture(params=["sync", "async"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def upstream() -> Iterator[MisbehavingUpstream]:
    with MisbehavingUpstream() as up:
        yield up


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def tls_upstream(ca: trustme.CA, name: str = "127.0.0.1") -> MisbehavingUpstream:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(name).configure_cert(context)
    return MisbehavingUpstream(tls=context)


@pytest.fixture
def closed_port() -> Iterator[int]:
    # Bound but not listening: connecting is refused, and the kernel will not hand this port
    # out as an ephemeral one, so the client can never connect to itself by accident.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def failure(kind: str, url: str, **client_kwargs: Any) -> Exception:
    """What a GET of ``url`` raises, with a new sync or async httpx client."""
    client_kwargs.setdefault("timeout", PATIENCE)
    client_kwargs.setdefault("verify", TRUST)
    if kind == "sync":
        with httpx.Client(**client_kwargs) as client:
            try:
                client.get(url)
            except Exception as exc:
                return exc
    else:

        async def attempt() -> Exception | None:
            async with httpx.AsyncClient(**client_kwargs) as client:
                try:
                    await client.get(url)
                except Exception as exc:
                    return exc
            return None

        raised = asyncio.run(attempt())
        if raised is not None:
            return raised
    pytest.fail(f"GET {url} succeeded")


def assert_classified(
    exc: BaseException, cls: type[UpstreamError], proxy_error: str, status: int
) -> None:
    assert classify(exc) == (cls, proxy_error), repr(exc)
    error = from_exception(exc, upstream="payments", attempts=3, elapsed=1.5)
    assert type(error) is cls
    assert (error.proxy_error, error.status) == (proxy_error, status)
    assert (error.upstream, error.attempts, error.elapsed) == ("payments", 3, 1.5)


# --- connecting ------------------------------------------------------------------------


def test_dns_error(kind: str) -> None:
    # .invalid is reserved (RFC 6761): it never resolves.
    exc = failure(kind, "http://nonexistent.invalid/")
    assert isinstance(exc, httpx.ConnectError)
    assert_classified(exc, UpstreamConnectError, "dns_error", 502)


def test_connection_refused(kind: str, closed_port: int) -> None:
    exc = failure(kind, f"http://127.0.0.1:{closed_port}/")
    assert isinstance(exc, httpx.ConnectError)
    assert_classified(exc, UpstreamConnectError, "connection_refused", 502)


def test_connection_refused_by_refuse_mode(kind: str, upstream: MisbehavingUpstream) -> None:
    upstream.set_mode("refuse")
    exc = failure(kind, upstream.url)
    assert_classified(exc, UpstreamConnectError, "connection_refused", 502)


def test_no_route_to_host(kind: str) -> None:
    # The kernel refuses a TCP connect to a multicast address with ENETUNREACH before
    # sending anything, so this is a real "unroutable" that never leaves the machine.
    exc = failure(kind, "http://224.0.0.1:80/")
    assert isinstance(exc, httpx.ConnectError)
    # On asyncio the message is only "All connection attempts failed": the errno had to be
    # dug out of the httpcore exception's args.
    assert_classified(exc, UpstreamConnectError, "destination_ip_unroutable", 502)


@pytest.fixture
def full_backlog() -> Iterator[int]:
    """A port whose accept queue is full: Linux drops further SYNs, so connects time out.

    listen(0) leaves room for one unaccepted connection; the fillers take it and queue up
    behind it. This is a real connect timeout on loopback, no packet filter needed.
    """
    listener = socket.socket()
    fillers: list[socket.socket] = []
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        for _ in range(3):
            filler = socket.socket()
            fillers.append(filler)
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
        yield port
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


def test_connect_timeout(kind: str, full_backlog: int) -> None:
    started = time.monotonic()
    exc = failure(
        kind, f"http://127.0.0.1:{full_backlog}/", timeout=httpx.Timeout(PATIENCE, connect=SHORT)
    )
    assert isinstance(exc, httpx.ConnectTimeout)
    assert time.monotonic() - started < PATIENCE
    assert_classified(exc, UpstreamTimeout, "connection_timeout", 504)


def test_tls_certificate_untrusted(kind: str, ca: trustme.CA) -> None:
    with tls_upstream(ca) as up:
        exc = failure(kind, up.url)  # the client trusts the usual roots, not our private CA
    assert isinstance(exc, httpx.ConnectError)
    assert_classified(exc, UpstreamConnectError, "tls_certificate_error", 502)


def test_tls_certificate_wrong_name(kind: str, ca: trustme.CA) -> None:
    trusting = ssl.create_default_context()
    ca.configure_trust(trusting)
    with tls_upstream(ca, name="payments.example") as up:
        exc = failure(kind, up.url, verify=trusting)
    assert_classified(exc, UpstreamConnectError, "tls_certificate_error", 502)


def test_tls_spoken_to_a_plain_http_port(kind: str, upstream: MisbehavingUpstream) -> None:
    # The upstream answers the ClientHello with an HTTP 400, as real servers do; the
    # client's TLS layer reads that as a record with a wrong version number.
    exc = failure(kind, upstream.url.replace("http://", "https://"))
    assert isinstance(exc, httpx.ConnectError)
    assert "WRONG_VERSION_NUMBER" in str(exc)
    assert_classified(exc, UpstreamConnectError, "tls_protocol_error", 502)


@pytest.fixture(params=["reset", "close"])
def drops_tls_handshakes(request: pytest.FixtureRequest) -> Iterator[int]:
    """A raw server that reads the ClientHello, then resets or closes the connection."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(PATIENCE)

    def serve_one() -> None:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(PATIENCE)
            conn.recv(65536)
            if request.param == "reset":
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    server = threading.Thread(target=serve_one)
    server.start()
    try:
        yield listener.getsockname()[1]
    finally:
        listener.close()
        server.join(PATIENCE)


def test_tls_handshake_dropped_by_the_peer(kind: str, drops_tls_handshakes: int) -> None:
    # Sync: ConnectionResetError or ssl.SSLEOFError. Async: anyio's BrokenResourceError
    # (caused by ConnectionResetError) or a bare EndOfStream, with an empty message. Either
    # way the TCP connection was made and TLS never completed.
    exc = failure(kind, f"https://127.0.0.1:{drops_tls_handshakes}/")
    assert isinstance(exc, httpx.ConnectError)
    assert_classified(exc, UpstreamConnectError, "tls_protocol_error", 502)


def test_plain_http_spoken_to_a_tls_port(kind: str, ca: trustme.CA) -> None:
    # The server's handshake fails and it closes without a byte the client could read: all
    # the client can honestly say is that the connection ended before any response.
    with tls_upstream(ca) as up:
        exc = failure(kind, up.url.replace("https://", "http://"))
    assert isinstance(exc, httpx.RemoteProtocolError)
    assert_classified(exc, UpstreamProtocolError, "connection_terminated", 502)


# --- after connecting --------------------------------------------------------------------


def test_read_timeout(kind: str, upstream: MisbehavingUpstream) -> None:
    upstream.set_mode("hang")
    exc = failure(kind, upstream.url, timeout=httpx.Timeout(PATIENCE, read=SHORT))
    assert isinstance(exc, httpx.ReadTimeout)
    assert_classified(exc, UpstreamTimeout, "connection_read_timeout", 504)


def test_deadline_exhausted(kind: str, upstream: MisbehavingUpstream) -> None:
    # A deadline around the whole call (asyncio.timeout, a future's result timeout) ends it
    # with a bare TimeoutError, before httpx's own per-phase timeouts fire.
    upstream.set_mode("hang")
    exc: BaseException | None = None
    if kind == "sync":
        with ThreadPoolExecutor(1) as pool:
            call = pool.submit(httpx.get, upstream.url, timeout=PATIENCE)
            try:
                call.result(timeout=SHORT)
            except FutureTimeout as raised:
                exc = raised
            upstream.stop()  # releases the hung call so the pool can shut down
    else:

        async def attempt() -> None:
            async with httpx.AsyncClient(timeout=PATIENCE) as client, asyncio.timeout(SHORT):
                await client.get(upstream.url)

        try:
            asyncio.run(attempt())
        except TimeoutError as raised:
            exc = raised
    assert isinstance(exc, TimeoutError)
    assert_classified(exc, UpstreamTimeout, "http_response_timeout", 504)


def test_malformed_response(kind: str, upstream: MisbehavingUpstream) -> None:
    upstream.set_mode("garbage")
    exc = failure(kind, upstream.url)
    assert isinstance(exc, httpx.RemoteProtocolError)
    assert_classified(exc, UpstreamProtocolError, "http_protocol_error", 502)


def test_truncated_response(kind: str, upstream: MisbehavingUpstream) -> None:
    upstream.set_mode("truncated")
    exc = failure(kind, upstream.url)
    assert isinstance(exc, httpx.RemoteProtocolError)
    assert_classified(exc, UpstreamProtocolError, "http_response_incomplete", 502)


def test_reset_mid_exchange(kind: str, upstream: MisbehavingUpstream) -> None:
    upstream.set_mode("reset")
    exc = failure(kind, upstream.url)
    # Sync says "[Errno 104] Connection reset by peer"; async says nothing at all.
    assert isinstance(exc, httpx.ReadError)
    assert_classified(exc, UpstreamProtocolError, "connection_terminated", 502)


def test_server_dies_while_the_client_waits(kind: str, upstream: MisbehavingUpstream) -> None:
    # Hang, then kill the server under the waiting client: it sees the connection end
    # with no response at all.
    upstream.set_mode("hang")

    def kill_soon() -> None:
        deadline = time.monotonic() + PATIENCE
        while upstream.stats().requests < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        upstream.stop()

    killer = threading.Thread(target=kill_soon)
    killer.start()
    try:
        exc = failure(kind, upstream.url)
    finally:
        killer.join(PATIENCE)
    assert isinstance(exc, httpx.RemoteProtocolError | httpx.ReadError)
    assert_classified(exc, UpstreamProtocolError, "connection_terminated", 502)


def test_failure_status_after_retries(upstream: MisbehavingUpstream) -> None:
    # Not a transport failure: the transport builds UpstreamStatusError from the answer, and
    # from_exception must keep it as it is, with no Proxy-Status error type of its own.
    upstream.set_mode("status", status=503, retry_after="3")
    with httpx.Client(verify=TRUST) as client:
        response = client.get(upstream.url)
    error = UpstreamStatusError(
        "payments answered 503", response=response, received_status=503, upstream="payments"
    )
    assert from_exception(error) is error
    assert (error.status, error.proxy_error, error.received_status) == (502, None, 503)
    assert error.response is not None
    assert error.response.headers["retry-after"] == "3"


# --- local causes ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    ["ftp://127.0.0.1/", "127.0.0.1:8080/path", "http://[::1/", "http:///no-host"],
)
def test_bad_url(kind: str, url: str) -> None:
    exc = failure(kind, url)
    assert isinstance(exc, httpx.UnsupportedProtocol | httpx.InvalidURL)
    assert_classified(exc, UpstreamConfigError, "proxy_configuration_error", 500)


def test_port_out_of_range_on_asyncio() -> None:
    # httpx does not range-check ports. The async stack lets asyncio's OverflowError escape
    # as a bare ExceptionGroup (no httpx exception at all); the sync one silently connects
    # to port % 65536 instead, so only settings validation can catch it there.
    exc = failure("async", "http://127.0.0.1:99999/")
    assert_classified(exc, UpstreamConfigError, "proxy_configuration_error", 500)


def test_pool_exhausted(kind: str, upstream: MisbehavingUpstream) -> None:
    # One connection allowed, held by a hung request: the next one waits for the pool.
    upstream.set_mode("hang")
    limits = httpx.Limits(max_connections=1)
    timeout = httpx.Timeout(PATIENCE, pool=SHORT)

    def first_request_arrived() -> bool:
        return upstream.stats().requests == 1

    if kind == "sync":
        with httpx.Client(limits=limits, timeout=timeout) as client, ThreadPoolExecutor(1) as bg:
            holder = bg.submit(client.get, upstream.url)
            wait_for(first_request_arrived)
            with pytest.raises(httpx.PoolTimeout) as caught:
                client.get(upstream.url)
            upstream.stop()  # ends the held request
            with pytest.raises(httpx.HTTPError):
                holder.result(PATIENCE)
        exc: BaseException = caught.value
    else:

        async def attempt() -> BaseException:
            async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
                holder = asyncio.create_task(client.get(upstream.url))
                async with asyncio.timeout(PATIENCE):
                    while not first_request_arrived():
                        await asyncio.sleep(0.01)
                try:
                    await client.get(upstream.url)
                except httpx.PoolTimeout as raised:
                    return raised
                finally:
                    holder.cancel()
                    await asyncio.gather(holder, return_exceptions=True)
                pytest.fail("no PoolTimeout")

        exc = asyncio.run(attempt())
    assert isinstance(exc, httpx.PoolTimeout)
    assert_classified(exc, LoadShedError, "connection_limit_reached", 503)


def wait_for(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + PATIENCE
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail("condition not met in time")
        time.sleep(0.01)


# --- nesting and chaining --------------------------------------------------------------


def test_task_group_failure_is_classified_by_its_member(closed_port: int) -> None:
    async def fan_out() -> None:
        async with httpx.AsyncClient() as client, asyncio.TaskGroup() as group:
            group.create_task(client.get(f"http://127.0.0.1:{closed_port}/"))
            group.create_task(asyncio.sleep(PATIENCE))  # cancelled by the failure

    with pytest.raises(ExceptionGroup) as caught:
        asyncio.run(fan_out())
    group = caught.value
    assert_classified(group, UpstreamConnectError, "connection_refused", 502)


def test_first_meaningful_group_member_wins(upstream: MisbehavingUpstream) -> None:
    upstream.set_mode("hang")
    timeout = failure("sync", upstream.url, timeout=httpx.Timeout(PATIENCE, read=SHORT))
    group = ExceptionGroup("many", [KeyError("noise"), ExceptionGroup("inner", [timeout])])
    assert_classified(group, UpstreamTimeout, "connection_read_timeout", 504)


def load_basket(url: str) -> None:
    """App code that hides the httpx error behind its own, ``from`` it."""
    try:
        httpx.get(url)
    except httpx.HTTPError as exc:
        raise RuntimeError("could not load the basket") from exc


def test_app_exception_raised_from_an_upstream_failure(upstream: MisbehavingUpstream) -> None:
    upstream.set_mode("truncated")
    with pytest.raises(RuntimeError) as caught:
        load_basket(upstream.url)
    assert_classified(caught.value, UpstreamProtocolError, "http_response_incomplete", 502)


def test_from_exception_chains_and_keeps_nested_upstream_errors(closed_port: int) -> None:
    exc = failure("sync", f"http://127.0.0.1:{closed_port}/")
    with pytest.raises(UpstreamConnectError) as caught:
        raise from_exception(exc, upstream="payments") from exc
    classified = caught.value
    assert classified.__cause__ is exc
    # Logs and debug pages get a useful message naming the upstream (not its host).
    assert "payments" in str(classified)
    assert "connection_refused" in str(classified)
    # An UpstreamError keeps its identity (and retry_after) through groups and causes.
    assert from_exception(classified) is classified
    shed = CircuitOpenError(retry_after=7.0, upstream="payments")
    assert from_exception(ExceptionGroup("g", [ValueError(), shed])) is shed
    wrapper = RuntimeError("wrapped")
    wrapper.__cause__ = shed
    assert from_exception(wrapper) is shed
    assert classify(shed) == (CircuitOpenError, "destination_unavailable")


def test_classification_survives_cycles() -> None:
    first, second = OSError("a"), ConnectionResetError("b")
    first.__cause__ = second
    second.__context__ = first
    assert classify(first) == (UpstreamProtocolError, "connection_terminated")


def test_mixed_connect_attempts_pick_the_most_specific() -> None:
    # The shape anyio builds when a name resolves to several addresses (::1, then
    # 127.0.0.1) and every attempt fails; built by hand because a real one would need a
    # second loopback family. The refusal says more than the unreachable IPv6 route,
    # whichever attempt came first.
    attempts = ExceptionGroup(
        "multiple connection attempts failed",
        [OSError(101, "Network is unreachable"), ConnectionRefusedError(111, "refused")],
    )
    anyio_error = OSError("All connection attempts failed")
    anyio_error.__cause__ = attempts
    core = httpcore.ConnectError(anyio_error)
    exc = httpx.ConnectError(str(core))
    exc.__cause__ = core
    assert_classified(exc, UpstreamConnectError, "connection_refused", 502)
