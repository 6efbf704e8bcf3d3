"""The requests driver (``guard.session`` / ``guard.requests_adapter``) against real sockets.

Every rule of the outbound guard is checked through a real ``requests.Session`` talking to
the misbehaving upstream on loopback: breaker, retry budget, Retry-After, idempotency,
bulkhead, deadlines (the slow-drip modes end at the deadline), ``stream=True`` outcomes
settled at the body's end, connection reuse across retries. Each failure row of DESIGN §5
is provoked for real, once raised by bare requests (classified by ``errors.classify``,
which knows requests' and urllib3's exceptions by name) and once through the guard.
"""

from __future__ import annotations

import gc
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import requests
import trustme
from urllib3.util import Retry

import gateway_guard as gg
from gateway_guard.breaker import BreakerState
from gateway_guard.context import RequestContext, reset_context, set_context
from gateway_guard.errors import from_exception
from gateway_guard.testing.upstream import MisbehavingUpstream
from servers import serve_wsgi

pytestmark = pytest.mark.e2e

FAST_RETRY = {"attempts": 3, "backoff_initial": 0.001, "backoff_max": 0.002, "jitter": False}


@pytest.fixture(scope="module")
def upstream() -> Iterator[MisbehavingUpstream]:
    with MisbehavingUpstream() as up:
        yield up


@pytest.fixture(autouse=True)
def _fresh(upstream: MisbehavingUpstream) -> None:
    upstream.set_mode("ok")
    upstream.reset_stats()


def make_guard(upstream: MisbehavingUpstream, **overrides: Any) -> gg.Guard:
    settings: dict[str, Any] = {
        "base_url": upstream.url,
        "connect_timeout": 1.0,
        "read_timeout": 1.0,
        "deadline": 2.0,
        "retry": dict(FAST_RETRY),
    }
    settings.update(overrides)
    return gg.Guard({"upstreams": {"up": settings}})


@pytest.fixture
def guard(upstream: MisbehavingUpstream) -> gg.Guard:
    return make_guard(upstream)


@pytest.fixture
def session(guard: gg.Guard) -> Iterator[requests.Session]:
    with guard.session("up") as s:
        yield s


# --- the happy path ---------------------------------------------------------------------------


def test_relative_urls_resolve_against_base_url(session: requests.Session) -> None:
    response = session.get("/orders/7", params={"q": "1"})
    assert response.status_code == 200
    assert response.json()["path"] == "/orders/7?q=1"


def test_base_url_with_a_path_keeps_it(upstream: MisbehavingUpstream) -> None:
    guard = make_guard(upstream, base_url=upstream.url + "/api/")
    with guard.session("up") as s:
        assert s.get("charges").json()["path"] == "/api/charges"
        assert s.get("/charges").json()["path"] == "/api/charges"


def test_session_kwargs_set_session_attributes(guard: gg.Guard) -> None:
    with guard.session("up", headers={"X-Team": "shop"}, params={"v": "2"}) as s:
        echoed = s.get("/").json()
    assert echoed["headers"]["x-team"] == "shop"
    assert echoed["path"] == "/?v=2"
    with pytest.raises(TypeError, match="colour"):
        guard.session("up", colour="red")


def test_adapter_mounts_on_an_existing_session(
    guard: gg.Guard, upstream: MisbehavingUpstream
) -> None:
    upstream.set_mode("status", status=503)
    with requests.Session() as s:
        s.mount(upstream.url + "/", guard.requests_adapter("up"))
        with pytest.raises(gg.UpstreamStatusError) as info:
            s.get(upstream.url + "/x")
    assert info.value.attempts == 3
    assert upstream.stats().requests == 3


def test_request_id_and_trace_are_propagated(guard: gg.Guard, session: requests.Session) -> None:
    inbound = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    token = set_context(RequestContext(guard=guard, request_id="req-42", traceparent=inbound))
    try:
        headers = session.get("/").json()["headers"]
    finally:
        reset_context(token)
    assert headers["x-request-id"] == "req-42"
    # The inbound traceparent is passed on as it came; none is invented without one.
    assert headers["traceparent"] == inbound
    token = set_context(RequestContext(guard=guard, request_id="req-43"))
    try:
        headers = session.get("/").json()["headers"]
    finally:
        reset_context(token)
    assert headers["x-request-id"] == "req-43"
    assert "traceparent" not in headers


def test_import_gateway_guard_does_not_import_requests() -> None:
    code = "import sys, gateway_guard; assert 'requests' not in sys.modules; assert 'urllib3' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_a_missing_extra_names_the_install_command() -> None:
    code = (
        "import sys; sys.modules['requests'] = None; sys.modules['aiohttp'] = None\n"
        "import gateway_guard as gg\n"
        "g = gg.Guard({'upstreams': {'up': {'base_url': 'http://up.test'}}})\n"
        "for make in (g.session, g.aiohttp_session):\n"
        "    try:\n"
        "        make('up')\n"
        "    except ModuleNotFoundError as exc:\n"
        "        print(exc)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], check=True, timeout=60, capture_output=True, text=True
    )
    assert "pip install 'gateway-guard[requests]'" in done.stdout
    assert "pip install 'gateway-guard[aiohttp]'" in done.stdout


# --- retries, idempotency, Retry-After --------------------------------------------------------


def test_status_retried_then_raised_with_the_response(
    session: requests.Session, upstream: MisbehavingUpstream
) -> None:
    upstream.set_mode("status", status=503, body="down for maintenance")
    with pytest.raises(gg.UpstreamStatusError) as info:
        session.get("/")
    error = info.value
    assert (error.status, error.received_status, error.attempts) == (502, 503, 3)
    assert isinstance(error.response, requests.Response)
    assert error.response.content == b"down for maintenance"
    # Every attempt on the one connection: failure bodies are drained, not dropped.
    assert upstream.stats().connections == 1


def test_post_without_idempotency_key_is_sent_once(
    session: requests.Session, upstream: MisbehavingUpstream
) -> None:
    upstream.set_mode("status", status=503)
    with pytest.raises(gg.UpstreamStatusError):
        session.post("/charges", json={"amount": 1})
    assert upstream.stats().methods == {"POST": 1}


def test_post_with_idempotency_key_is_retried(
    session: requests.Session, upstream: MisbehavingUpstream
) -> None:
    upstream.set_mode("status", status=503)
    with pytest.raises(gg.UpstreamStatusError):
        session.post("/charges", json={"amount": 1}, headers={"Idempotency-Key": "k1"})
    assert upstream.stats().methods == {"POST": 3}


def test_post_whose_read_timed_out_is_not_retried(
    session: requests.Session, upstream: MisbehavingUpstream
) -> None:
    upstream.set_mode("hang")
    with pytest.raises(gg.UpstreamTimeout):
        session.post("/charges", data=b"x")
    assert upstream.stats().methods == {"POST": 1}


def test_streamed_request_body_is_never_retried(
    session: requests.Session, upstream: MisbehavingUpstream
) -> None:
    upstream.set_mode("status", status=503)
    with pytest.raises(gg.UpstreamStatusError):
        session.put("/blob", data=iter([b"a", b"b"]))
    assert upstream.stats().methods == {"PUT": 1}


def test_post_whose_connect_failed_is_retried(guard: gg.Guard) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        s = guard.session("up", base_url=f"http://127.0.0.1:{port}")
        with s, pytest.raises(gg.UpstreamConnectError) as info:
            s.post("/charges", data=b"x")
    assert info.value.proxy_error == "connection_refused"
    assert info.value.attempts == 3


def test_retry_after_is_waited(upstream: MisbehavingUpstream) -> None:
    guard = make_guard(upstream, connect_timeout=0.5, deadline=3.0)
    upstream.set_mode("status", status=503, retry_after="1")
    started = time.monotonic()
    with guard.session("up") as s, pytest.raises(gg.UpstreamStatusError) as info:
        s.get("/")
    # Three attempts, each but the last followed by the upstream's one second.
    assert info.value.retry_after == 1.0
    assert 1.9 <= time.monotonic() - started < 3.0
    assert upstream.stats().requests == 3


def test_retry_budget_caps_retries(upstream: MisbehavingUpstream) -> None:
    retry = dict(FAST_RETRY, budget_ratio=0.0, budget_min_per_second=0.0)
    guard = make_guard(upstream, retry=retry)
    upstream.set_mode("status", status=503)
    with guard.session("up") as s, pytest.raises(gg.UpstreamStatusError) as info:
        s.get("/")
    assert info.value.attempts == 1


# --- breaker and bulkhead ---------------------------------------------------------------------


def test_breaker_opens_and_fails_fast(upstream: MisbehavingUpstream) -> None:
    breaker = {"min_calls": 2, "window_size": 2, "failure_rate": 0.5, "open_seconds": 30.0}
    guard = make_guard(upstream, retry={"attempts": 1}, breaker=breaker)
    upstream.set_mode("status", status=502)
    with guard.session("up") as s:
        for _ in range(2):
            with pytest.raises(gg.UpstreamStatusError):
                s.get("/")
        assert guard.breaker("up").state is BreakerState.OPEN
        with pytest.raises(gg.CircuitOpenError) as info:
            s.get("/")
    assert info.value.status == 503
    assert upstream.stats().requests == 2


def test_bulkhead_sheds_when_full(upstream: MisbehavingUpstream) -> None:
    guard = make_guard(upstream, bulkhead={"max_concurrent": 1})
    upstream.set_mode("slow", delay_ms=500)
    with guard.session("up") as s:
        first: dict[str, Any] = {}
        holder = threading.Thread(target=lambda: first.setdefault("r", s.get("/")))
        holder.start()
        deadline = time.monotonic() + 5
        while guard.bulkhead("up").in_flight < 1 and time.monotonic() < deadline:
            time.sleep(0.005)
        with pytest.raises(gg.LoadShedError):
            s.get("/")
        holder.join(5)
    assert first["r"].status_code == 200
    assert guard.bulkhead("up").in_flight == 0


# --- deadlines --------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["hang", "drip_headers", "drip_body"])
@pytest.mark.parametrize("stream", [False, True])
def test_slow_upstreams_end_at_the_deadline(
    upstream: MisbehavingUpstream, mode: str, stream: bool
) -> None:
    # A byte every 50 ms never trips the 0.4 s read timeout; only the deadline ends it.
    guard = make_guard(upstream, read_timeout=0.4, deadline=1.0)
    upstream.set_mode(mode, drip_ms=50)
    started = time.monotonic()

    def read_all() -> None:
        with guard.session("up") as s:
            for _ in s.get("/", stream=stream).iter_content(1024):
                pass

    with pytest.raises(gg.UpstreamTimeout) as info:
        read_all()
    elapsed = time.monotonic() - started
    assert 0.9 <= elapsed < 1.6, elapsed
    assert info.value.status == 504
    if mode != "hang":
        assert info.value.proxy_error == "http_response_timeout"


def test_inbound_deadline_clips_the_call(guard: gg.Guard, upstream: MisbehavingUpstream) -> None:
    upstream.set_mode("drip_headers", drip_ms=50)
    token = set_context(
        RequestContext(guard=guard, request_id="r", deadline_at=guard.clock() + 0.5)
    )
    started = time.monotonic()
    try:
        with guard.session("up") as s, pytest.raises(gg.UpstreamTimeout) as info:
            s.get("/")
    finally:
        reset_context(token)
    assert time.monotonic() - started < 1.0
    assert info.value.proxy_error == "http_response_timeout"


def test_callers_timeout_is_replaced_by_the_policy(
    session: requests.Session, upstream: MisbehavingUpstream
) -> None:
    upstream.set_mode("slow", delay_ms=300)
    assert session.get("/", timeout=0.01).status_code == 200


# --- streamed responses -----------------------------------------------------------------------


def test_streamed_body_outcome_is_recorded_at_its_end(
    guard: gg.Guard, session: requests.Session
) -> None:
    response = session.get("/", stream=True)
    assert guard.breaker("up").snapshot().calls == 0
    assert response.json()["method"] == "GET"
    assert guard.breaker("up").snapshot().calls == 1
    assert guard.breaker("up").snapshot().failures == 0


def test_streamed_body_that_breaks_off_is_one_failure(
    guard: gg.Guard, session: requests.Session, upstream: MisbehavingUpstream
) -> None:
    # stream=True, like httpx's client.stream(): the caller reads the body as it comes and
    # may have used part of it, so it is never fetched again.
    upstream.set_mode("truncated")
    response = session.get("/", stream=True)
    with pytest.raises(gg.UpstreamProtocolError) as info:
        response.content  # noqa: B018
    assert info.value.proxy_error == "http_response_incomplete"
    snapshot = guard.breaker("up").snapshot()
    assert (snapshot.calls, snapshot.failures) == (1, 1)
    assert upstream.stats().requests == 1


# --- bodies read within the attempt (stream=False) ---------------------------------------------


def outcomes(guard: gg.Guard) -> list[tuple[str, str | None]]:
    """Each attempt's (outcome, proxy_error), as the guard's events report them."""
    seen: list[tuple[str, str | None]] = []
    guard.on(gg.events.AttemptEnded, lambda e: seen.append((e.outcome, e.proxy_error)))
    return seen


def heal_after_first_attempt(guard: gg.Guard, upstream: MisbehavingUpstream) -> None:
    """The upstream answers ``ok`` from the first retry on (switched before its wait)."""
    guard.on(gg.events.RetryScheduled, lambda e: upstream.set_mode("ok"))


@pytest.mark.parametrize(
    ("method", "headers"),
    [("GET", {}), ("PUT", {}), ("POST", {"Idempotency-Key": "order-1"})],
)
def test_body_that_breaks_off_is_retried(
    upstream: MisbehavingUpstream, method: str, headers: dict[str, str]
) -> None:
    # Issue #12: with stream=False the body is read within the attempt, as httpx's
    # client.get() does, so one that breaks off is a failed attempt, retried.
    guard = make_guard(upstream)
    attempts = outcomes(guard)
    heal_after_first_attempt(guard, upstream)
    upstream.set_mode("truncated")  # Content-Length: 1000, 100 bytes sent, closed
    with guard.session("up") as s:
        response = s.request(method, "/orders", headers=headers, data=b"{}")
    assert response.status_code == 200
    assert response.json()["method"] == method  # the whole body of the second answer
    assert upstream.stats().requests == 2
    assert attempts == [("failure", "http_response_incomplete"), ("success", None)]
    snapshot = guard.breaker("up").snapshot()
    assert (snapshot.calls, snapshot.failures) == (1, 0)  # judged by its last attempt
    assert guard.bulkhead("up").in_flight == 0


def test_body_that_keeps_breaking_off_fails_after_every_attempt(
    guard: gg.Guard, session: requests.Session, upstream: MisbehavingUpstream
) -> None:
    upstream.set_mode("truncated")
    with pytest.raises(gg.UpstreamProtocolError) as info:
        session.get("/")
    assert (info.value.proxy_error, info.value.attempts) == ("http_response_incomplete", 3)
    assert upstream.stats().requests == 3
    snapshot = guard.breaker("up").snapshot()
    assert (snapshot.calls, snapshot.failures) == (1, 1)


def test_post_whose_body_breaks_off_is_not_retried(
    guard: gg.Guard, session: requests.Session, upstream: MisbehavingUpstream
) -> None:
    # Without an Idempotency-Key the POST may have taken effect: never sent twice.
    upstream.set_mode("truncated")
    with pytest.raises(gg.UpstreamProtocolError) as info:
        session.post("/charges", json={"amount": 1})
    assert info.value.attempts == 1
    assert upstream.stats().methods == {"POST": 1}
    snapshot = guard.breaker("up").snapshot()
    assert (snapshot.calls, snapshot.failures) == (1, 1)


@pytest.mark.parametrize(("limit", "requests_seen"), [(0, 1), (999, 1), (1000, 3)])
def test_buffer_body_bytes_caps_the_bodies_read_within_the_attempt(
    upstream: MisbehavingUpstream, limit: int, requests_seen: int
) -> None:
    # The truncated answer says Content-Length: 1000. Above the limit (or with 0: never)
    # the body is read after the call, and breaking off is one failure, not retried.
    guard = make_guard(upstream, retry=dict(FAST_RETRY, buffer_body_bytes=limit))
    attempts = outcomes(guard)
    upstream.set_mode("truncated")
    with guard.session("up") as s, pytest.raises(gg.UpstreamProtocolError) as info:
        s.get("/")
    assert info.value.proxy_error == "http_response_incomplete"
    assert info.value.attempts == upstream.stats().requests == requests_seen
    if requests_seen == 1:
        # The attempt itself succeeded (its headers came); the body failed after it.
        assert attempts == [("success", None)]
    assert guard.breaker("up").snapshot().failures == 1


def test_body_with_no_attempt_left_is_read_after_the_call(upstream: MisbehavingUpstream) -> None:
    # attempts = 1: no retry could replace the body, so it is read as before, after the
    # call; breaking off is one failure.
    guard = make_guard(upstream, retry={"attempts": 1})
    attempts = outcomes(guard)
    upstream.set_mode("truncated")
    with guard.session("up") as s, pytest.raises(gg.UpstreamProtocolError) as info:
        s.get("/")
    assert info.value.proxy_error == "http_response_incomplete"
    assert attempts == [("success", None)]
    assert upstream.stats().requests == 1
    snapshot = guard.breaker("up").snapshot()
    assert (snapshot.calls, snapshot.failures) == (1, 1)


def _event_stream_that_breaks_off(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
    # No Content-Length: cheroot sends it chunked, and the connection closes before the
    # last chunk.
    start_response("200 OK", [("Content-Type", "text/event-stream")])
    yield b"data: 1\n\n"
    raise ConnectionAbortedError("the upstream went away mid-body")


def test_body_of_unknown_length_is_not_read_within_the_attempt() -> None:
    # A body of unknown length (server-sent events, a chunked download) may never end: it is
    # not held for a retry, so breaking off is one failure.
    seen: list[str] = []

    def app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        seen.append(environ["PATH_INFO"])
        return _event_stream_that_breaks_off(environ, start_response)

    with serve_wsgi(app) as url:
        guard = gg.Guard({"upstreams": {"up": {"base_url": url, "retry": dict(FAST_RETRY)}}})
        with guard.session("up") as s, pytest.raises(gg.UpstreamProtocolError):
            s.get("/events")
    assert seen == ["/events"]
    snapshot = guard.breaker("up").snapshot()
    assert (snapshot.calls, snapshot.failures) == (1, 1)


def test_corrupt_content_encoding_is_one_failure_never_retried() -> None:
    # Read within the attempt (it has a small Content-Length), but decoding the same bytes
    # again would fail the same way: one failure, as with httpx.
    seen: list[str] = []

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        seen.append(environ["PATH_INFO"])
        body = b"not gzip at all"
        start_response("200 OK", [("Content-Encoding", "gzip"), ("Content-Length", str(len(body)))])
        return [body]

    with serve_wsgi(app) as url:
        guard = gg.Guard({"upstreams": {"up": {"base_url": url, "retry": dict(FAST_RETRY)}}})
        with guard.session("up") as s, pytest.raises(gg.UpstreamProtocolError) as info:
            s.get("/report")
    assert (info.value.status, info.value.proxy_error) == (502, "http_response_content_coding")
    assert info.value.attempts == 1
    assert seen == ["/report"]
    snapshot = guard.breaker("up").snapshot()
    assert (snapshot.calls, snapshot.failures) == (1, 1)


def test_body_that_stalls_is_retried(upstream: MisbehavingUpstream) -> None:
    # A byte every 600 ms: each attempt's body read times out after 0.3 s, well inside the
    # deadline, and the next attempt asks again.
    guard = make_guard(upstream, read_timeout=0.3, deadline=5.0)
    attempts = outcomes(guard)
    upstream.set_mode("drip_body", drip_ms=600)
    with guard.session("up") as s, pytest.raises(gg.UpstreamTimeout) as info:
        s.get("/")
    assert (info.value.status, info.value.proxy_error) == (504, "connection_read_timeout")
    assert info.value.attempts == upstream.stats().requests == 3
    # The last attempt has no retry behind it: its body is read after the call, as before.
    assert attempts == [("failure", "connection_read_timeout")] * 2 + [("success", None)]
    snapshot = guard.breaker("up").snapshot()
    assert (snapshot.calls, snapshot.failures) == (1, 1)


def test_body_that_drips_past_the_deadline_ends_there(upstream: MisbehavingUpstream) -> None:
    # A byte every 50 ms never trips the 0.4 s read timeout: the deadline ends the attempt
    # reading it, and leaves no time for another.
    guard = make_guard(upstream, read_timeout=0.4, deadline=1.0)
    attempts = outcomes(guard)
    upstream.set_mode("drip_body", drip_ms=50)
    started = time.monotonic()
    with guard.session("up") as s, pytest.raises(gg.UpstreamTimeout) as info:
        s.get("/")
    assert 0.9 <= time.monotonic() - started < 1.6
    assert (info.value.status, info.value.proxy_error) == (504, "http_response_timeout")
    assert attempts == [("failure", "http_response_timeout")]
    assert upstream.stats().requests == 1
    snapshot = guard.breaker("up").snapshot()
    assert (snapshot.calls, snapshot.failures) == (1, 1)


@contextmanager
def probing(upstream: MisbehavingUpstream) -> Iterator[tuple[gg.Guard, requests.Session]]:
    """A guarded session whose breaker a 502 has opened, now due to admit one half-open
    probe (its open time is 50 ms)."""
    breaker_settings = {
        "min_calls": 1,
        "window_size": 1,
        "open_seconds": 0.05,
        "half_open_calls": 1,
    }
    guard = make_guard(upstream, retry={"attempts": 1}, breaker=breaker_settings)
    with guard.session("up") as s:
        upstream.set_mode("status", status=502)
        with pytest.raises(gg.UpstreamStatusError):
            s.get("/")
        assert guard.breaker("up").state is BreakerState.OPEN
        time.sleep(0.1)
        yield guard, s


def test_streamed_body_closed_early_gives_back_a_probe(upstream: MisbehavingUpstream) -> None:
    with probing(upstream) as (guard, s):
        breaker = guard.breaker("up")
        upstream.set_mode("drip_body", drip_ms=50)
        response = s.get("/", stream=True)
        assert breaker.snapshot().probes_in_flight == 1
        response.close()
        assert breaker.snapshot().probes_in_flight == 0
        upstream.set_mode("ok")
        assert s.get("/").status_code == 200  # the next probe is admitted, and closes it
    assert breaker.state is BreakerState.CLOSED


def test_streamed_body_dropped_unread_gives_back_a_probe(upstream: MisbehavingUpstream) -> None:
    with probing(upstream) as (guard, s):
        breaker = guard.breaker("up")
        upstream.set_mode("drip_body", drip_ms=50)
        response = s.get("/", stream=True)
        del response
        gc.collect()
        upstream.set_mode("ok")
        assert s.get("/").status_code == 200
    assert breaker.snapshot().probes_in_flight == 0


class _Interrupted(BaseException):
    """Raised by a signal handler in the middle of a body read, as KeyboardInterrupt is."""


@contextmanager
def interrupted_after(seconds: float) -> Iterator[None]:
    """Expect the block to be interrupted by a signal handler raising ``_Interrupted`` in
    this thread after ``seconds`` (as Ctrl-C or a worker's timeout signal would)."""

    def interrupt(signum: int, frame: object) -> None:
        raise _Interrupted

    previous = signal.signal(signal.SIGUSR1, interrupt)
    timer = threading.Timer(seconds, signal.pthread_kill, (threading.get_ident(), signal.SIGUSR1))
    timer.start()
    try:
        with pytest.raises(_Interrupted):
            yield
    finally:
        timer.cancel()
        timer.join()
        signal.signal(signal.SIGUSR1, previous)


def test_body_read_interrupted_gives_back_a_probe(upstream: MisbehavingUpstream) -> None:
    # With stream=False the adapter reads the body itself: an interruption there (Ctrl-C,
    # a worker's timeout signal) says nothing about the upstream, but frees the probe slot.
    with probing(upstream) as (guard, s):
        breaker = guard.breaker("up")
        upstream.set_mode("drip_body", drip_ms=50)
        with interrupted_after(0.3):
            s.get("/")
        assert breaker.snapshot().probes_in_flight == 0
        upstream.set_mode("ok")
        assert s.get("/").status_code == 200  # the next probe is admitted, and closes it
    assert breaker.state is BreakerState.CLOSED


def test_body_read_within_the_attempt_interrupted_counts_nothing(
    upstream: MisbehavingUpstream,
) -> None:
    # Interrupted while the body is read within the attempt (attempts left): nothing is
    # held against the upstream, and the bulkhead slot is given back.
    guard = make_guard(upstream)
    attempts = outcomes(guard)
    with guard.session("up") as s:
        upstream.set_mode("drip_body", drip_ms=50)
        with interrupted_after(0.3):
            s.get("/")
        assert attempts == [("cancelled", None)]
        snapshot = guard.breaker("up").snapshot()
        assert (snapshot.calls, snapshot.failures) == (0, 0)
        assert guard.bulkhead("up").in_flight == 0
        upstream.set_mode("ok")
        assert s.get("/").status_code == 200
    assert upstream.stats().requests == 2


def test_connections_are_reused(session: requests.Session, upstream: MisbehavingUpstream) -> None:
    for _ in range(3):
        session.get("/")
    with session.get("/", stream=True) as response:
        response.content  # noqa: B018
    assert upstream.stats().connections == 1


# --- classification: every row, for real --------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def tls_upstream(ca: trustme.CA, name: str = "127.0.0.1") -> MisbehavingUpstream:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(name).configure_cert(context)
    return MisbehavingUpstream(tls=context)


def bare_failure(url: str, **kwargs: Any) -> Exception:
    """What a bare requests GET of ``url`` raises (no retries: requests' default)."""
    kwargs.setdefault("timeout", 5.0)
    try:
        requests.get(url, **kwargs)
    except Exception as exc:
        return exc
    pytest.fail(f"GET {url} succeeded")


def guarded_failure(url: str, **settings: Any) -> gg.UpstreamError:
    guard = gg.Guard({"upstreams": {"up": {"base_url": url, "retry": {"attempts": 1}, **settings}}})
    with guard.session("up") as s:
        try:
            s.get("/")
        except gg.UpstreamError as exc:
            return exc
    pytest.fail(f"GET {url} succeeded")


def assert_row(
    url: str, cls: type[gg.UpstreamError], proxy_error: str, status: int, **kw: Any
) -> None:
    bare = from_exception(bare_failure(url, **kw.pop("bare", {})))
    assert (type(bare), bare.proxy_error, bare.status) == (cls, proxy_error, status), repr(
        bare.__cause__
    )
    guarded = guarded_failure(url, **kw)
    assert (type(guarded), guarded.proxy_error, guarded.status) == (cls, proxy_error, status)


def test_row_dns_error() -> None:
    assert_row("http://nonexistent.invalid", gg.UpstreamConnectError, "dns_error", 502)


def test_row_connection_refused(upstream: MisbehavingUpstream) -> None:
    upstream.set_mode("refuse")
    assert_row(upstream.url, gg.UpstreamConnectError, "connection_refused", 502)


def test_row_no_route_to_host() -> None:
    assert_row("http://224.0.0.1:80", gg.UpstreamConnectError, "destination_ip_unroutable", 502)


def test_row_connect_timeout() -> None:
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
        assert_row(
            f"http://127.0.0.1:{port}",
            gg.UpstreamTimeout,
            "connection_timeout",
            504,
            connect_timeout=0.2,
            bare={"timeout": (0.2, 5.0)},
        )
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


def test_row_tls_certificate_untrusted(ca: trustme.CA) -> None:
    with tls_upstream(ca) as up:
        assert_row(up.url, gg.UpstreamConnectError, "tls_certificate_error", 502)


def test_row_tls_spoken_to_a_plain_port(upstream: MisbehavingUpstream) -> None:
    url = upstream.url.replace("http://", "https://")
    assert_row(url, gg.UpstreamConnectError, "tls_protocol_error", 502)


@pytest.mark.parametrize("stream", [False, True])
def test_a_trickle_over_tls_ends_at_the_deadline(ca: trustme.CA, stream: bool) -> None:
    # The socket wrapper reads through the TLS socket's own file: same deadline.
    with tls_upstream(ca) as up, ca.cert_pem.tempfile() as bundle:
        up.set_mode("drip_body", drip_ms=50)
        guard = make_guard(up, read_timeout=0.4, deadline=1.0)
        started = time.monotonic()
        with guard.session("up") as s, pytest.raises(gg.UpstreamTimeout) as info:
            for _ in s.get("/", stream=stream, verify=bundle).iter_content(1024):
                pass
        assert 0.9 <= time.monotonic() - started < 1.6
        assert info.value.proxy_error == "http_response_timeout"


def test_tls_upstream_trusted_by_verify(ca: trustme.CA) -> None:
    with tls_upstream(ca) as up, ca.cert_pem.tempfile() as bundle:
        guard = gg.Guard({"upstreams": {"up": {"base_url": up.url}}})
        # Per request: requests lets REQUESTS_CA_BUNDLE win over a session's verify.
        with guard.session("up") as s:
            assert s.get("/", verify=bundle).status_code == 200


def test_row_read_timeout(upstream: MisbehavingUpstream) -> None:
    upstream.set_mode("hang")
    assert_row(
        upstream.url,
        gg.UpstreamTimeout,
        "connection_read_timeout",
        504,
        read_timeout=0.2,
        bare={"timeout": (5.0, 0.2)},
    )


def test_row_malformed_response(upstream: MisbehavingUpstream) -> None:
    upstream.set_mode("garbage")
    assert_row(upstream.url, gg.UpstreamProtocolError, "http_protocol_error", 502)


def test_row_truncated_response(upstream: MisbehavingUpstream) -> None:
    upstream.set_mode("truncated")
    assert_row(upstream.url, gg.UpstreamProtocolError, "http_response_incomplete", 502)


def test_row_reset_mid_exchange(upstream: MisbehavingUpstream) -> None:
    upstream.set_mode("reset")
    assert_row(upstream.url, gg.UpstreamProtocolError, "connection_terminated", 502)


def test_row_bad_url() -> None:
    exc = bare_failure("http://[::1")
    error = from_exception(exc)
    assert (error.status, error.proxy_error) == (500, "proxy_configuration_error")


def test_row_failure_status(upstream: MisbehavingUpstream) -> None:
    upstream.set_mode("status", status=503)
    error = guarded_failure(upstream.url)
    assert isinstance(error, gg.UpstreamStatusError)
    assert (error.status, error.proxy_error, error.received_status) == (502, None, 503)


# --- urllib3's own retries stay off -------------------------------------------------------------


def test_urllib3_retries_are_off(guard: gg.Guard) -> None:
    adapter = guard.requests_adapter("up")
    assert isinstance(adapter.max_retries, Retry)
    assert adapter.max_retries.total == 0
