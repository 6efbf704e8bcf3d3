"""The misbehaving upstream itself: every mode over real loopback sockets, the control API,
exact statistics under concurrency, and clean shutdown."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import queue
import random
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
import trustme

from gateway_guard.testing.upstream import MisbehavingUpstream, Mode, ModeConfig, UpstreamStats

pytestmark = pytest.mark.e2e

# Generous: these bound waits that normally take milliseconds, on a noisy shared machine.
PATIENCE = 5.0
# A new httpx client loads the CA bundle: ~20 ms, far more on a busy machine. Sharing one
# context makes clients nearly free, and these tests build hundreds.
TRUST = ssl.create_default_context()


def new_client(**kwargs: Any) -> httpx.Client:
    return httpx.Client(verify=TRUST, **kwargs)


def get(url: str, **kwargs: Any) -> httpx.Response:
    with new_client() as c:
        return c.get(url, **kwargs)


def post(url: str, **kwargs: Any) -> httpx.Response:
    with new_client() as c:
        return c.post(url, **kwargs)


@pytest.fixture
def upstream() -> Iterator[MisbehavingUpstream]:
    with MisbehavingUpstream() as up:
        yield up


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def wait_until(condition: Callable[[], bool], timeout: float = PATIENCE) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail("condition not met in time")
        time.sleep(0.01)


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=PATIENCE)


def read_to_eof(sock: socket.socket) -> bytes:
    chunks: list[bytes] = []
    deadline = time.monotonic() + PATIENCE
    while time.monotonic() < deadline:
        chunk = sock.recv(65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
    pytest.fail("the server did not close the connection")


def exchange(port: int, data: bytes) -> bytes:
    """Send raw bytes, return everything the server sends until it closes."""
    with connect(port) as sock:
        sock.sendall(data)
        return read_to_eof(sock)


def assert_dropped(sock: socket.socket) -> None:
    """The server closed this connection; an abort shows up as EOF or as a reset."""
    with contextlib.suppress(ConnectionResetError):
        assert sock.recv(100) == b""


GET = b"GET /x HTTP/1.1\r\nHost: upstream\r\nConnection: close\r\n\r\n"


# --- modes ------------------------------------------------------------------------------


def test_ok_echoes_the_request(upstream: MisbehavingUpstream) -> None:
    with new_client(base_url=upstream.url) as client:
        first = client.get("/orders/7?expand=items&x=1", headers={"X-Request-ID": "abc"})
        second = client.post("/orders", content=b"hello world")
    assert first.status_code == 200
    assert first.headers["content-type"] == "application/json"
    echo = first.json()
    assert echo["method"] == "GET"
    assert echo["path"] == "/orders/7?expand=items&x=1"
    assert echo["headers"]["x-request-id"] == "abc"
    assert ["X-Request-ID", "abc"] in echo["raw_headers"]
    assert echo["body_length"] == 0
    assert echo["mode"] == "ok"
    assert second.json()["body_length"] == 11
    assert second.json()["request_number"] == echo["request_number"] + 1
    # httpx reused its connection: keep-alive works.
    assert upstream.stats() == UpstreamStats(1, 2, {"GET": 1, "POST": 1})


def test_chunked_request_body_is_read(upstream: MisbehavingUpstream) -> None:
    def parts() -> Iterator[bytes]:
        yield b"a" * 1000
        yield b"b" * 24

    with new_client() as client:
        response = client.put(upstream.url + "/upload", content=parts())
        assert response.request.headers["transfer-encoding"] == "chunked"
        # The connection is still usable afterwards, so the chunked framing was consumed.
        again = client.get(upstream.url)
    assert response.json()["body_length"] == 1024
    assert again.status_code == 200
    assert upstream.stats().connections == 1


def test_head_gets_headers_only(upstream: MisbehavingUpstream) -> None:
    with connect(upstream.port) as sock:
        sock.sendall(b"HEAD / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        raw = read_to_eof(sock)
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK")
    assert b"Content-Length: " in head
    assert body == b""


def test_pipelined_requests_are_answered_in_order(upstream: MisbehavingUpstream) -> None:
    one = b"GET /one HTTP/1.1\r\nHost: x\r\n\r\n"
    raw = exchange(upstream.port, one + GET)
    assert raw.count(b"HTTP/1.1 200 OK") == 2
    assert raw.index(b'"path":"/one"') < raw.index(b'"path":"/x"')


def test_http10_closes_unless_asked_to_keep_alive(upstream: MisbehavingUpstream) -> None:
    raw = exchange(upstream.port, b"GET / HTTP/1.0\r\n\r\n")
    assert b"Connection: close" in raw
    with connect(upstream.port) as sock:
        sock.sendall(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        head = sock.recv(65536)
        assert b"Connection: keep-alive" in head


def test_slow_waits_before_answering(upstream: MisbehavingUpstream) -> None:
    upstream.set_mode("slow", delay_ms=200)
    started = time.monotonic()
    response = get(upstream.url)
    # Only a lower bound: an upper one would be flaky on a loaded machine.
    assert time.monotonic() - started >= 0.2
    assert response.status_code == 200
    assert response.json()["mode"] == "slow"


def test_hang_never_answers(upstream: MisbehavingUpstream) -> None:
    upstream.set_mode(Mode.HANG)
    with pytest.raises(httpx.ReadTimeout):
        get(upstream.url, timeout=httpx.Timeout(PATIENCE, read=0.2))
    assert upstream.stats().requests == 1


def _drops(sock: socket.socket, seconds: float) -> list[tuple[float, bytes]]:
    """What arrives on ``sock`` within ``seconds``, each piece with when it came."""
    pieces: list[tuple[float, bytes]] = []
    started = time.monotonic()
    sock.settimeout(0.1)
    while time.monotonic() - started < seconds:
        with contextlib.suppress(TimeoutError):
            chunk = sock.recv(65536)
            if not chunk:
                break
            pieces.append((time.monotonic() - started, chunk))
    return pieces


def test_drip_headers_sends_a_header_line_at_a_time_and_never_ends_the_head(
    upstream: MisbehavingUpstream,
) -> None:
    upstream.set_mode(Mode.DRIP_HEADERS, drip_ms=100)
    with connect(upstream.port) as sock:
        sock.sendall(GET)
        pieces = _drops(sock, 0.75)
    data = b"".join(chunk for _, chunk in pieces)
    assert data.startswith(b"HTTP/1.1 200 OK\r\nX-Drip-0: 0\r\n")
    assert b"\r\n\r\n" not in data
    # Every read gets something soon (so no read timeout fires), yet the head never ends.
    assert len(pieces) >= 4
    assert max(b - a for (a, _), (b, _) in itertools.pairwise(pieces)) < 0.5
    assert upstream.stats().requests == 1


def test_drip_body_sends_the_head_at_once_then_a_byte_at_a_time(
    upstream: MisbehavingUpstream,
) -> None:
    upstream.set_mode(Mode.DRIP_BODY, drip_ms=100, drip_status=503)
    with connect(upstream.port) as sock:
        sock.sendall(GET)
        pieces = _drops(sock, 0.75)
    head, _, body = b"".join(chunk for _, chunk in pieces).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert b"Content-Length: 1000000" in head
    assert pieces[0][0] < 0.1  # the head comes at once
    assert 3 <= len(body) <= 10 and set(body) == {ord("x")}


def test_drip_stops_when_the_client_leaves(upstream: MisbehavingUpstream) -> None:
    upstream.set_mode(Mode.DRIP_BODY, drip_ms=20)
    with httpx.Client() as client, client.stream("GET", upstream.url) as response:
        assert response.status_code == 200
        assert set(next(response.iter_raw())) == {ord("x")}
    # The handler noticed the client going away: no connection left behind.
    wait_until(lambda: not upstream._data_conns)


def test_refuse_closes_the_port_and_ok_reopens_the_same_one(
    upstream: MisbehavingUpstream,
) -> None:
    port = upstream.port
    with new_client(base_url=upstream.url) as client:
        assert client.get("/").status_code == 200  # leaves a pooled keep-alive connection
        upstream.set_mode("refuse")
        with pytest.raises(ConnectionRefusedError):
            connect(port).close()
        # The pooled connection was dropped too, so the client cannot sneak through it.
        with pytest.raises(httpx.ConnectError):
            client.get("/")
        # The control port is unaffected.
        assert get(upstream.control_url + "/mode").json()["mode"] == "refuse"
        upstream.set_mode("ok")
        assert upstream.port == port
        assert client.get("/").status_code == 200


def test_refuse_while_requests_hang_then_reopen(upstream: MisbehavingUpstream) -> None:
    upstream.set_mode("hang")
    hung = [connect(upstream.port) for _ in range(3)]
    try:
        for sock in hung:
            sock.sendall(GET)
        wait_until(lambda: upstream.stats().requests == 3)
        upstream.set_mode("refuse")
        for sock in hung:
            assert_dropped(sock)
        upstream.set_mode("ok")
        assert get(upstream.url).status_code == 200
    finally:
        for sock in hung:
            sock.close()


def test_starting_in_refuse_mode_reserves_the_port() -> None:
    with MisbehavingUpstream(mode="refuse") as up:
        assert up.port != 0
        with pytest.raises(ConnectionRefusedError):
            connect(up.port).close()
        up.set_mode("ok")
        assert get(up.url).status_code == 200


def test_reset_aborts_with_rst(upstream: MisbehavingUpstream) -> None:
    upstream.set_mode("reset")
    with connect(upstream.port) as sock:
        sock.sendall(GET)
        with pytest.raises(ConnectionResetError):
            read_to_eof(sock)
    assert upstream.stats().requests == 1


def test_garbage_is_not_http(upstream: MisbehavingUpstream) -> None:
    upstream.set_mode("garbage")
    raw = exchange(upstream.port, GET)
    assert raw
    assert not raw.startswith(b"HTTP/")
    with pytest.raises(httpx.RemoteProtocolError):
        get(upstream.url)


def test_truncated_body_is_shorter_than_announced(upstream: MisbehavingUpstream) -> None:
    upstream.set_mode("truncated")
    raw = exchange(upstream.port, GET)
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert b"Content-Length: 1000" in head
    assert 0 < len(body) < 1000


@pytest.mark.parametrize("retry_after", ["2", "Wed, 21 Oct 2015 07:28:00 GMT"])
def test_status_answers_code_retry_after_and_body(
    upstream: MisbehavingUpstream, retry_after: str
) -> None:
    upstream.set_mode("status", status=503, retry_after=retry_after, body="down for a bit")
    response = get(upstream.url)
    assert response.status_code == 503
    assert response.headers["retry-after"] == retry_after
    assert response.text == "down for a bit"


def test_status_without_body_echoes(upstream: MisbehavingUpstream) -> None:
    upstream.set_mode("status", status=429)
    response = get(upstream.url + "/p")
    assert response.status_code == 429
    assert "retry-after" not in response.headers
    assert response.json()["path"] == "/p"


def test_status_204_has_no_body(upstream: MisbehavingUpstream) -> None:
    upstream.set_mode("status", status=204)
    with new_client() as client:
        assert client.get(upstream.url).status_code == 204
        assert client.get(upstream.url).status_code == 204  # framing stayed in sync


def flaky_statuses(up: MisbehavingUpstream, n: int) -> list[int]:
    with new_client() as client:
        return [client.get(up.url).status_code for _ in range(n)]


def test_flaky_is_deterministic_for_a_seed(upstream: MisbehavingUpstream) -> None:
    upstream.set_mode("flaky", failure_percent=30, failure_status=502, seed=7)
    first = flaky_statuses(upstream, 60)
    upstream.set_mode("flaky", failure_percent=30, failure_status=502, seed=7)
    second = flaky_statuses(upstream, 60)
    assert first == second
    assert set(first) == {200, 502}
    rng = random.Random(7)
    assert first.count(502) == sum(rng.random() * 100 < 30 for _ in range(60))


@pytest.mark.parametrize(("percent", "expected"), [(0, {200}), (100, {503})])
def test_flaky_extremes(upstream: MisbehavingUpstream, percent: float, expected: set[int]) -> None:
    upstream.set_mode("flaky", failure_percent=percent)
    assert set(flaky_statuses(upstream, 10)) == expected


def test_delay_applies_to_other_answers(upstream: MisbehavingUpstream) -> None:
    upstream.set_mode("status", status=503, delay_ms=150)
    started = time.monotonic()
    assert get(upstream.url).status_code == 503
    assert time.monotonic() - started >= 0.15


def test_tls(ca: trustme.CA) -> None:
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    with MisbehavingUpstream(tls=server_context) as up:
        assert up.url.startswith("https://127.0.0.1:")
        with httpx.Client(verify=client_context) as client:
            assert client.get(up.url).json()["mode"] == "ok"
            up.set_mode("truncated")
            with pytest.raises(httpx.RemoteProtocolError):
                client.get(up.url)
        # The control listener stays plain HTTP.
        assert get(up.control_url + "/stats").json()["requests"] == 2


# --- malformed and oversized requests --------------------------------------------------


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"NOT-A-REQUEST\r\n\r\n", b"400"),
        (b"GET\r\n\r\n", b"400"),
        (b"GET / HTTP/2.0\r\n\r\n", b"505"),
        (b"GET / HTTP/1.1\r\nbad header\r\n\r\n", b"400"),
        (b"GET / HTTP/1.1\r\nX: " + b"a" * 70_000 + b"\r\n\r\n", b"431"),
        (b"POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n", b"400"),
        (b"POST / HTTP/1.1\r\nContent-Length: 99999999999\r\n\r\n", b"413"),
        # A TLS ClientHello starts with 0x16: rejected at once, not waited on.
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", b"400"),
    ],
)
def test_bad_requests_get_an_error_and_close(
    upstream: MisbehavingUpstream, request_bytes: bytes, status: bytes
) -> None:
    raw = exchange(upstream.port, request_bytes)
    assert raw.startswith(b"HTTP/1.1 " + status)
    assert b"Connection: close" in raw
    assert upstream.stats().requests == 0


def test_excess_connections_are_closed() -> None:
    with MisbehavingUpstream(max_connections=2) as up:
        held = [connect(up.port) for _ in range(2)]
        try:
            wait_until(lambda: up.stats().connections == 2)
            with connect(up.port) as extra:
                extra.sendall(GET)
                assert_dropped(extra)
            held[0].sendall(GET)
            assert read_to_eof(held[0]).startswith(b"HTTP/1.1 200")
        finally:
            for sock in held:
                sock.close()


# --- control API ----------------------------------------------------------------------


def test_control_mode_round_trip(upstream: MisbehavingUpstream) -> None:
    with new_client(base_url=upstream.control_url) as control:
        assert control.get("/mode").json() == ModeConfig().to_dict()
        answer = control.post("/mode", json={"mode": "status", "status": 503, "retry_after": 2})
        assert answer.status_code == 200
        assert answer.json()["retry_after"] == "2"
        assert control.get("/mode").json()["mode"] == "status"
    assert upstream.config == ModeConfig(Mode.STATUS, status=503, retry_after="2")
    response = get(upstream.url)
    assert (response.status_code, response.headers["retry-after"]) == (503, "2")


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b"[]",
        b'{"status": 503}',
        b'{"mode": "sideways"}',
        b'{"mode": "slow", "delay": 5}',
        b'{"mode": "status", "status": 99}',
        b'{"mode": "status", "status": true}',
        b'{"mode": "status", "retry_after": "2\\r\\nX-Evil: 1"}',
        b'{"mode": "flaky", "failure_percent": 101}',
        b'{"mode": "drip_body", "drip_ms": 0}',
        b'{"mode": "drip_body", "drip_status": 100}',
    ],
)
def test_control_rejects_bad_modes(upstream: MisbehavingUpstream, body: bytes) -> None:
    response = post(upstream.control_url + "/mode", content=body)
    assert response.status_code == 400
    assert response.json()["error"]
    assert upstream.mode is Mode.OK


def test_control_stats_and_reset(upstream: MisbehavingUpstream) -> None:
    with new_client() as client:
        client.get(upstream.url)
        client.delete(upstream.url)
    with new_client(base_url=upstream.control_url) as control:
        expected = {"connections": 1, "requests": 2, "methods": {"GET": 1, "DELETE": 1}}
        assert control.get("/stats").json() == expected
        assert control.post("/stats/reset").json() == expected
        assert control.get("/stats").json() == {"connections": 0, "requests": 0, "methods": {}}
    # Control traffic is not counted.
    assert upstream.stats().requests == 0


def test_control_unknown_path_and_method(upstream: MisbehavingUpstream) -> None:
    with new_client(base_url=upstream.control_url) as control:
        assert control.get("/nope").status_code == 404
        wrong = control.delete("/mode")
        assert wrong.status_code == 405
        assert wrong.headers["allow"] == "GET, POST"


def test_python_api_validates(upstream: MisbehavingUpstream) -> None:
    with pytest.raises(ValueError, match="mode: must be one of"):
        upstream.set_mode("sideways")
    with pytest.raises(ValueError, match="delay_ms"):
        upstream.set_mode("slow", delay_ms=-1)
    with pytest.raises(ValueError, match="retry_after"):
        upstream.set_mode("status", retry_after="1\r\nX: y")
    assert upstream.mode is Mode.OK


def test_reset_stats_is_read_and_reset(upstream: MisbehavingUpstream) -> None:
    get(upstream.url)
    assert upstream.reset_stats().requests == 1
    assert upstream.stats() == UpstreamStats(0, 0, {})
    # request_number keeps counting over the server's life.
    assert get(upstream.url).json()["request_number"] == 2


# --- concurrency and lifecycle ---------------------------------------------------------


def test_stats_are_exact_under_concurrency(upstream: MisbehavingUpstream) -> None:
    workers = 50

    def work(_: int) -> list[int]:
        with new_client(base_url=upstream.url, timeout=PATIENCE) as client:
            return [
                client.get("/").json()["request_number"],
                client.get("/").json()["request_number"],
                client.post("/", content=b"x").json()["request_number"],
                client.put("/", content=b"y").json()["request_number"],
            ]

    with ThreadPoolExecutor(workers) as pool:
        numbers = [n for batch in pool.map(work, range(workers)) for n in batch]
    assert sorted(numbers) == list(range(1, 4 * workers + 1))
    stats = upstream.stats()
    assert stats.requests == 4 * workers
    assert stats.methods == {"GET": 2 * workers, "POST": workers, "PUT": workers}
    assert stats.connections == workers


def test_switching_modes_under_load_answers_every_request(upstream: MisbehavingUpstream) -> None:
    stop = threading.Event()

    def hammer() -> list[int]:
        codes = []
        with new_client(base_url=upstream.url) as client:
            while not stop.is_set():
                codes.append(client.get("/").status_code)
        return codes

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(hammer) for _ in range(4)]
        for mode in ("status", "ok", "flaky", "ok"):
            upstream.set_mode(mode, failure_percent=50)
            time.sleep(0.05)
        stop.set()
        codes = [code for future in futures for code in future.result(PATIENCE)]
    assert set(codes) <= {200, 503}
    assert upstream.stats().requests == len(codes)


def test_stop_closes_hung_connections_promptly() -> None:
    up = MisbehavingUpstream(mode="hang")
    up.start()
    port = up.port
    hung = [connect(port) for _ in range(5)]
    for sock in hung:
        sock.sendall(GET)
    errors: list[BaseException] = []

    def client_call() -> None:
        try:
            get(up.url, timeout=30)
        except httpx.HTTPError as exc:
            errors.append(exc)

    caller = threading.Thread(target=client_call)
    caller.start()
    try:
        wait_until(lambda: up.stats().requests == 6)
        started = time.monotonic()
        up.stop()
        assert time.monotonic() - started < PATIENCE
        assert not any(t.name == "misbehaving-upstream" for t in threading.enumerate())
        caller.join(PATIENCE)
        assert not caller.is_alive()
        assert errors  # the hung httpx call failed instead of waiting out its 30 s
        for sock in hung:
            assert_dropped(sock)
        with pytest.raises(ConnectionRefusedError):
            connect(port).close()
    finally:
        for sock in hung:
            sock.close()


def test_set_mode_before_start_applies_at_start() -> None:
    up = MisbehavingUpstream()
    up.set_mode("status", status=418)
    with up:
        assert get(up.url).status_code == 418


def test_cannot_start_twice(upstream: MisbehavingUpstream) -> None:
    with pytest.raises(RuntimeError, match="only once"):
        upstream.start()


def test_fixed_ports() -> None:
    # Reserve two free ports, then hand them over (SO_REUSEADDR on both sides).
    with socket.socket() as a, socket.socket() as b:
        a.bind(("127.0.0.1", 0))
        b.bind(("127.0.0.1", 0))
        port, control_port = a.getsockname()[1], b.getsockname()[1]
    with MisbehavingUpstream(port=port, control_port=control_port) as up:
        assert up.url == f"http://127.0.0.1:{port}"
        assert up.control_url == f"http://127.0.0.1:{control_port}"
        assert get(up.url).status_code == 200


def test_start_fails_loudly_on_a_busy_port(upstream: MisbehavingUpstream) -> None:
    with pytest.raises(RuntimeError, match="failed to start"):
        MisbehavingUpstream(port=upstream.control_port).start()


# --- as a program ------------------------------------------------------------------------


def read_lines(proc: subprocess.Popen[str], count: int) -> list[str]:
    # A thread, because a select() on a buffered text pipe misses lines already buffered.
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line.strip())

    threading.Thread(target=pump, daemon=True).start()
    try:
        return [lines.get(timeout=PATIENCE * 2) for _ in range(count)]
    except queue.Empty:
        pytest.fail("the program did not print its URLs in time")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_runs_as_a_program_and_stops_on_signal(sig: signal.Signals) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway_guard.testing.upstream", "--mode", "status"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        data, control, mode = read_lines(proc, 3)
        data_url = data.split()[-1]
        control_url = control.split()[-1]
        assert json.loads(mode.partition(" ")[2].strip())["mode"] == "status"
        assert get(data_url).status_code == 503
        post(control_url + "/mode", json={"mode": "ok"})
        assert get(data_url).status_code == 200
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=PATIENCE * 2)
        assert proc.returncode == 0, stderr
        assert "Traceback" not in stderr
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
