"""A real HTTP/1.1 upstream that misbehaves on purpose, for chaos-testing gateway_guard apps.

HTTP libraries refuse to send garbage, truncate bodies or reset connections, so this server
speaks HTTP/1.1 over raw asyncio streams. It has two listeners, both on ``127.0.0.1`` only:
the **data** listener your app calls as its upstream, and a **control** listener that
switches the data listener's behaviour at runtime. Only the standard library is used.

In tests, run it on its own event loop in a background thread::

    from gateway_guard.testing.upstream import MisbehavingUpstream

    with MisbehavingUpstream() as up:          # ephemeral ports
        httpx.get(up.url + "/anything")        # 200, JSON echo of the request
        up.set_mode("status", status=503, retry_after="2")
        up.set_mode("slow", delay_ms=200)
        assert up.stats().requests == 1

As a program (Ctrl-C stops it)::

    python -m gateway_guard.testing.upstream --port 9000 --control-port 9001 --mode ok

Modes
-----
Each request on the data listener is answered according to the mode in force when the
request was fully received. ``delay_ms`` makes the server wait before answering in every
mode but ``hang`` and ``refuse``.

``ok``
    200 with a JSON body: ``method``, ``path`` (with the query), ``headers`` (lower-cased
    names; repeated headers joined with ``", "``), ``raw_headers`` (``[name, value]`` pairs
    exactly as received), ``body_length``, ``request_number`` (1, 2, 3... over the server's
    life; not reset with the statistics) and ``mode``. Connections are kept alive.
``slow``
    ``ok`` after ``delay_ms`` milliseconds.
``hang``
    Read the request and never answer, until the client gives up, the server stops, or
    ``hang_timeout`` seconds (default 600) pass; then close without answering.
``refuse``
    Close the data listener so new connections get ``ECONNREFUSED``, and drop the open
    data connections (an upstream that died). The port stays reserved, and switching to any
    other mode listens again on the same port. The control listener stays up.
``reset``
    Read the request, then abort the connection with a TCP RST.
``garbage``
    Answer bytes that are not HTTP, then close.
``truncated``
    Answer a status line and headers announcing ``Content-Length: 1000``, send fewer bytes,
    then close.
``status``
    Answer ``status`` (default 503) with ``Retry-After: <retry_after>`` if given (seconds
    or an HTTP-date, sent verbatim) and ``body`` as ``text/plain`` if given, else the
    ``ok`` JSON echo.
``drip_headers``
    Answer a status line, then one header line every ``drip_ms`` milliseconds (default
    250), never ending the head: each read a client makes completes well inside any read
    timeout, so only a wall-clock deadline stops it. Ends like ``hang``.
``drip_body``
    Answer ``drip_status`` (default 200) with headers announcing a ``Content-Length`` of
    1,000,000 bytes at once, then send one body byte every ``drip_ms`` milliseconds, until
    the client gives up or ``hang_timeout`` passes; then close.
``flaky``
    ``failure_percent`` percent of requests are answered like ``status`` with
    ``failure_status`` (default 503, with ``retry_after`` and ``body`` as above); the rest
    like ``ok``. The draws come from ``random.Random(seed)``, reseeded each time the mode
    is set, so a given seed fails the same requests in the same order.

Control API (plain HTTP on ``control_url``, JSON in and out)
------------------------------------------------------------
``GET /mode``
    The mode in force: ``{"mode": "ok", "delay_ms": 0.0, "status": 503,
    "retry_after": null, "body": null, "failure_percent": 0.0, "failure_status": 503,
    "seed": null, "drip_ms": 250.0, "drip_status": 200}``.
``POST /mode``
    Set the mode. The body is a JSON object with ``mode`` and any of the other keys above;
    keys left out take their defaults (the previous mode's options are not kept). Answers
    the new mode like ``GET /mode``, or 400 with ``{"error": "..."}`` on a bad key or value.
    The switch is complete when the answer arrives (for ``refuse``, the port is closed).
``GET /stats``
    ``{"connections": 3, "requests": 7, "methods": {"GET": 6, "POST": 1}}``: data
    connections accepted (TLS: handshakes completed) and requests received in full,
    whatever the mode did with them.
``POST /stats/reset``
    Zero the statistics, atomically; answers the counts it cleared.

From Python the same operations are :meth:`MisbehavingUpstream.set_mode`,
:attr:`~MisbehavingUpstream.config`, :meth:`~MisbehavingUpstream.stats` and
:meth:`~MisbehavingUpstream.reset_stats`.

TLS: pass ``tls=ssl_context`` (a server context with a certificate loaded) to serve the
data listener over TLS (``url`` becomes ``https://...``); the control listener stays plain.
A plain listener answers a TLS ClientHello with an HTTP 400 at once, as real servers do,
so a client speaking TLS to it fails fast with a TLS protocol error.

Everything binds 127.0.0.1 only. To run on an event loop you own instead of a thread,
``await up.serve()`` (cancel it to stop).

Limits: request heads up to ``max_header_bytes`` (431 beyond), bodies up to
``max_body_bytes`` (413 beyond; ``Content-Length`` and chunked bodies are both read),
``max_connections`` concurrent data connections (more are closed at once), and idle
keep-alive connections are closed after ``idle_timeout`` seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import enum
import http
import json
import math
import random
import re
import signal
import socket
import ssl
import struct
import threading
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, Final

__all__ = ["MisbehavingUpstream", "Mode", "UpstreamStats"]

HOST: Final = "127.0.0.1"

_MAX_DELAY_MS: Final = 600_000.0
_MAX_RETRY_AFTER_CHARS: Final = 64
_MAX_STATUS_BODY_CHARS: Final = 65_536
_MAX_HEADER_LINES: Final = 128
_MAX_METHOD_CHARS: Final = 32
# Method names come from clients; past this many distinct ones the rest share "OTHER", so
# the statistics cannot grow without bound.
_MAX_METHOD_KEYS: Final = 32
_MAX_CONTROL_BODY: Final = 65_536
_READ_CHUNK: Final = 65_536
_TRUNCATED_LENGTH: Final = 1000
_TRUNCATED_SENT: Final = 100
_DRIP_LENGTH: Final = 1_000_000
# Below this a drip is a busy loop rather than a slow upstream.
_MIN_DRIP_MS: Final = 1.0
_GARBAGE: Final = b"SPAM! this is not HTTP\r\n\x00\x01\x02\xff\r\n\r\n"
# A loop operation run from another thread (mode switch, stats) finishes in microseconds
# unless the machine is badly overloaded; past this, something is wrong and we say so.
_CROSS_THREAD_TIMEOUT: Final = 10.0
_CLOSE_TIMEOUT: Final = 2.0
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


class Mode(enum.StrEnum):
    """How the data listener answers. See the module docstring."""

    OK = "ok"
    SLOW = "slow"
    HANG = "hang"
    REFUSE = "refuse"
    RESET = "reset"
    GARBAGE = "garbage"
    TRUNCATED = "truncated"
    STATUS = "status"
    FLAKY = "flaky"
    DRIP_HEADERS = "drip_headers"
    DRIP_BODY = "drip_body"


def _number(value: object, name: str) -> float:
    # bool is an int subclass, and True as a delay is a typo rather than an intent.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name}: must be a number, got {value!r}")
    return float(value)


def _integer(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}: must be an integer, got {value!r}")
    return value


@dataclass(frozen=True, slots=True)
class ModeConfig:
    """A mode and its options. Invalid values raise ``ValueError`` naming the field."""

    mode: Mode = Mode.OK
    delay_ms: float = 0.0
    status: int = 503
    retry_after: str | None = None
    body: str | None = None
    failure_percent: float = 0.0
    failure_status: int = 503
    seed: int | None = None
    drip_ms: float = 250.0
    drip_status: int = 200

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "mode", Mode(self.mode))
        except ValueError:
            choices = ", ".join(m.value for m in Mode)
            raise ValueError(f"mode: must be one of {choices}, got {self.mode!r}") from None
        delay = _number(self.delay_ms, "delay_ms")
        if not (math.isfinite(delay) and 0 <= delay <= _MAX_DELAY_MS):
            raise ValueError(f"delay_ms: must be between 0 and {_MAX_DELAY_MS:g}, got {delay}")
        drip = _number(self.drip_ms, "drip_ms")
        if not (math.isfinite(drip) and _MIN_DRIP_MS <= drip <= _MAX_DELAY_MS):
            raise ValueError(
                f"drip_ms: must be between {_MIN_DRIP_MS:g} and {_MAX_DELAY_MS:g}, got {drip}"
            )
        for name in ("status", "failure_status", "drip_status"):
            code = _integer(getattr(self, name), name)
            # 1xx are interim responses: answering one as final would hang the client in a
            # way no real upstream does.
            if not 200 <= code <= 599:
                raise ValueError(f"{name}: must be between 200 and 599, got {code}")
        percent = _number(self.failure_percent, "failure_percent")
        if not (math.isfinite(percent) and 0 <= percent <= 100):
            raise ValueError(f"failure_percent: must be between 0 and 100, got {percent}")
        if self.retry_after is not None:
            # Sent verbatim as a header value: visible ASCII only, so no header injection.
            value = self.retry_after
            if (
                not isinstance(value, str)
                or not 0 < len(value) <= _MAX_RETRY_AFTER_CHARS
                or not all(" " <= ch <= "~" for ch in value)
            ):
                raise ValueError(
                    f"retry_after: must be 1 to {_MAX_RETRY_AFTER_CHARS} printable ASCII "
                    f"characters, got {value!r}"
                )
        if self.body is not None and (
            not isinstance(self.body, str) or len(self.body) > _MAX_STATUS_BODY_CHARS
        ):
            raise ValueError(f"body: must be a string of at most {_MAX_STATUS_BODY_CHARS} chars")
        if self.seed is not None:
            _integer(self.seed, "seed")

    @classmethod
    def from_mapping(cls, data: Mapping[str, object]) -> ModeConfig:
        """Build from decoded JSON (the control API); unknown keys are errors."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown keys {unknown}; allowed: {sorted(known)}")
        if "mode" not in data:
            raise ValueError("mode: required")
        mode = data["mode"]
        if not isinstance(mode, str):
            raise ValueError(f"mode: must be a string, got {mode!r}")
        retry_after = data.get("retry_after")
        # Seconds are naturally written as a JSON number; the header wants text.
        if isinstance(retry_after, int) and not isinstance(retry_after, bool):
            retry_after = str(retry_after)
        if retry_after is not None and not isinstance(retry_after, str):
            raise ValueError(f"retry_after: must be a string or integer, got {retry_after!r}")
        body = data.get("body")
        if body is not None and not isinstance(body, str):
            raise ValueError(f"body: must be a string, got {body!r}")
        seed = data.get("seed")
        return cls(
            mode=_parse_mode(mode),
            delay_ms=_number(data.get("delay_ms", 0.0), "delay_ms"),
            status=_integer(data.get("status", 503), "status"),
            retry_after=retry_after,
            body=body,
            failure_percent=_number(data.get("failure_percent", 0.0), "failure_percent"),
            failure_status=_integer(data.get("failure_status", 503), "failure_status"),
            seed=None if seed is None else _integer(seed, "seed"),
            drip_ms=_number(data.get("drip_ms", 250.0), "drip_ms"),
            drip_status=_integer(data.get("drip_status", 200), "drip_status"),
        )

    def to_dict(self) -> dict[str, object]:
        """The JSON form used by the control API."""
        return {
            "mode": self.mode.value,
            "delay_ms": self.delay_ms,
            "status": self.status,
            "retry_after": self.retry_after,
            "body": self.body,
            "failure_percent": self.failure_percent,
            "failure_status": self.failure_status,
            "seed": self.seed,
            "drip_ms": self.drip_ms,
            "drip_status": self.drip_status,
        }


def _parse_mode(value: str) -> Mode:
    try:
        return Mode(value)
    except ValueError:
        choices = ", ".join(m.value for m in Mode)
        raise ValueError(f"mode: must be one of {choices}, got {value!r}") from None


@dataclass(frozen=True, slots=True)
class UpstreamStats:
    """A snapshot of the data listener's counters."""

    connections: int
    requests: int
    methods: Mapping[str, int]

    def to_dict(self) -> dict[str, object]:
        return {
            "connections": self.connections,
            "requests": self.requests,
            "methods": dict(self.methods),
        }


@dataclass(frozen=True, slots=True)
class _Request:
    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]
    body: bytes
    body_length: int
    keep_alive: bool


class _BadRequest(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


_Answer = Callable[[_Request, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[bool]]


def _render(
    status: int,
    headers: Sequence[tuple[str, str]],
    body: bytes,
    *,
    request: _Request | None,
) -> bytes:
    """Serialize a response; ``request`` decides keep-alive and HEAD (``None``: close)."""
    try:
        reason = http.HTTPStatus(status).phrase
    except ValueError:
        reason = "Unknown"
    lines = [f"HTTP/1.1 {status} {reason}", "Server: gateway-guard-misbehaving-upstream"]
    lines.extend(f"{name}: {value}" for name, value in headers)
    # 204 and 304 carry no body and must not announce one.
    bodiless = status in (204, 304)
    if not bodiless:
        lines.append(f"Content-Length: {len(body)}")
    if request is None or not request.keep_alive:
        lines.append("Connection: close")
    elif request.version == "HTTP/1.0":
        lines.append("Connection: keep-alive")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    if bodiless or (request is not None and request.method == "HEAD"):
        return head
    return head + body


def _json_bytes(data: object) -> bytes:
    return json.dumps(data, separators=(",", ":")).encode()


def _bind(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        # Rebinding the same port after `refuse` must not fail on TIME_WAIT leftovers.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((HOST, port))
    except BaseException:
        sock.close()
        raise
    return sock


class MisbehavingUpstream:
    """A real HTTP/1.1 server on 127.0.0.1 whose behaviour is switched at runtime.

    ``port`` / ``control_port``: 0 (default) picks free ephemeral ports. ``mode``: the
    initial mode. ``tls``: a server ``ssl.SSLContext`` to serve the data listener over TLS.
    Use as a context manager (or :meth:`start` / :meth:`stop`); the server runs on its own
    event loop in a daemon thread.
    """

    def __init__(
        self,
        *,
        port: int = 0,
        control_port: int = 0,
        mode: Mode | str | ModeConfig = Mode.OK,
        tls: ssl.SSLContext | None = None,
        max_connections: int = 1000,
        max_header_bytes: int = 65_536,
        max_body_bytes: int = 16 * 1024 * 1024,
        idle_timeout: float = 30.0,
        hang_timeout: float = 600.0,
    ) -> None:
        self._config = mode if isinstance(mode, ModeConfig) else ModeConfig(_parse_mode(mode))
        self._rng = random.Random(self._config.seed)
        self._requested_port = port
        self._requested_control_port = control_port
        self._tls = tls
        self._max_connections = max_connections
        self._max_header_bytes = max_header_bytes
        self._max_body_bytes = max_body_bytes
        self._idle_timeout = idle_timeout
        self._hang_timeout = hang_timeout

        # Counters are written on the loop thread and read from any thread; the lock makes
        # a snapshot (and read-and-reset) consistent.
        self._lock = threading.Lock()
        self._connections = 0
        self._requests = 0
        self._methods: dict[str, int] = {}
        self._request_number = 0

        self._port = 0
        self._control_port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread_id: int | None = None
        self._stop_requested: asyncio.Event | None = None
        self._data_server: asyncio.Server | None = None
        self._control_server: asyncio.Server | None = None
        # While refusing, the port stays bound (not listening): nobody else can take it,
        # and the kernel never hands it out as an ephemeral port, so a client cannot end up
        # connected to itself.
        self._reserved: socket.socket | None = None
        self._data_conns: dict[asyncio.Task[Any], asyncio.StreamWriter] = {}
        self._control_conns: dict[asyncio.Task[Any], asyncio.StreamWriter] = {}
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._startup_error: BaseException | None = None

    # --- public surface ----------------------------------------------------------------

    @property
    def port(self) -> int:
        """The data port (known once started)."""
        return self._port

    @property
    def control_port(self) -> int:
        return self._control_port

    @property
    def url(self) -> str:
        """Base URL of the data listener, e.g. ``http://127.0.0.1:54321``."""
        scheme = "https" if self._tls is not None else "http"
        return f"{scheme}://{HOST}:{self._port}"

    @property
    def control_url(self) -> str:
        return f"http://{HOST}:{self._control_port}"

    @property
    def config(self) -> ModeConfig:
        """The mode in force and its options."""
        return self._config

    @property
    def mode(self) -> Mode:
        return self._config.mode

    def set_mode(
        self,
        mode: Mode | str,
        *,
        delay_ms: float = 0.0,
        status: int = 503,
        retry_after: str | None = None,
        body: str | None = None,
        failure_percent: float = 0.0,
        failure_status: int = 503,
        seed: int | None = None,
        drip_ms: float = 250.0,
        drip_status: int = 200,
    ) -> None:
        """Switch mode; returns once the switch is complete. Options not given are reset."""
        self.apply(
            ModeConfig(
                mode=_parse_mode(mode),
                delay_ms=delay_ms,
                status=status,
                retry_after=retry_after,
                body=body,
                failure_percent=failure_percent,
                failure_status=failure_status,
                seed=seed,
                drip_ms=drip_ms,
                drip_status=drip_status,
            )
        )

    def apply(self, config: ModeConfig) -> None:
        """Switch to ``config`` (what :meth:`set_mode` builds); returns once complete."""
        loop = self._loop
        if loop is None or loop.is_closed():
            self._config = config
            self._rng = random.Random(config.seed)
            return
        if threading.get_ident() == self._loop_thread_id:
            raise RuntimeError("apply()/set_mode() would deadlock on the server's own loop")
        asyncio.run_coroutine_threadsafe(self._apply(config), loop).result(_CROSS_THREAD_TIMEOUT)

    def stats(self) -> UpstreamStats:
        with self._lock:
            return UpstreamStats(self._connections, self._requests, dict(self._methods))

    def reset_stats(self) -> UpstreamStats:
        """Zero the counters; returns what they held (read and reset atomically)."""
        with self._lock:
            cleared = UpstreamStats(self._connections, self._requests, dict(self._methods))
            self._connections = 0
            self._requests = 0
            self._methods = {}
        return cleared

    def start(self, timeout: float = 10.0) -> None:
        """Start on a background thread; returns once both listeners accept connections."""
        if self._thread is not None:
            raise RuntimeError("a MisbehavingUpstream can be started only once")
        self._thread = threading.Thread(
            target=self._thread_main, name="misbehaving-upstream", daemon=True
        )
        self._thread.start()
        if not self._started.wait(timeout):
            raise RuntimeError(f"upstream server did not start within {timeout} s")
        if self._startup_error is not None:
            self._thread.join(timeout)
            raise RuntimeError("upstream server failed to start") from self._startup_error

    def stop(self, timeout: float = 10.0) -> None:
        """Close both listeners and every connection (hung ones too); join the thread."""
        thread = self._thread
        loop, stop_requested = self._loop, self._stop_requested
        if thread is None or not thread.is_alive():
            return
        if loop is not None and stop_requested is not None:
            with contextlib.suppress(RuntimeError):  # the loop already closed on its own
                loop.call_soon_threadsafe(stop_requested.set)
        thread.join(timeout)
        if thread.is_alive():
            raise RuntimeError(f"upstream server did not stop within {timeout} s")

    def __enter__(self) -> MisbehavingUpstream:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<MisbehavingUpstream {self.url} mode={self._config.mode.value}>"

    # --- lifecycle (loop thread) -------------------------------------------------------

    def _thread_main(self) -> None:
        try:
            asyncio.run(self.serve(self._started.set))
        except BaseException as exc:
            self._startup_error = exc
        finally:
            # Unblocks start() if serving failed before the listeners were up.
            self._started.set()

    async def serve(self, on_ready: Callable[[], None] | None = None) -> None:
        """Serve on the running loop until :meth:`stop` (or cancellation); then clean up.

        ``on_ready`` is called once both listeners accept connections. Most callers want
        the context manager instead; this is for running on a loop you own.
        """
        self._loop = asyncio.get_running_loop()
        self._loop_thread_id = threading.get_ident()
        self._stop_requested = asyncio.Event()
        try:
            await self._open()
            if on_ready is not None:
                on_ready()
            await self._stop_requested.wait()
        finally:
            await self._close()

    async def _open(self) -> None:
        data_sock = _bind(self._requested_port)
        self._port = data_sock.getsockname()[1]
        if self._config.mode is Mode.REFUSE:
            self._reserved = data_sock
        else:
            self._data_server = await self._listen(data_sock)
        control_sock = _bind(self._requested_control_port)
        self._control_port = control_sock.getsockname()[1]
        self._control_server = await asyncio.start_server(
            self._on_control_connection, sock=control_sock, limit=self._max_header_bytes
        )

    async def _listen(self, sock: socket.socket) -> asyncio.Server:
        tls_options: dict[str, Any] = {}
        if self._tls is not None:
            tls_options = {"ssl": self._tls, "ssl_handshake_timeout": 10.0}
        return await asyncio.start_server(
            self._on_data_connection,
            sock=sock,
            limit=self._max_header_bytes,
            backlog=512,
            **tls_options,
        )

    async def _close(self) -> None:
        for server in (self._data_server, self._control_server):
            if server is not None:
                server.close()
        self._data_server = self._control_server = None
        if self._reserved is not None:
            self._reserved.close()
            self._reserved = None
        await self._drop(self._data_conns)
        await self._drop(self._control_conns)

    async def _drop(self, conns: dict[asyncio.Task[Any], asyncio.StreamWriter]) -> None:
        tasks = list(conns)
        for task, writer in list(conns.items()):
            writer.transport.abort()
            task.cancel()
        if tasks:
            # Waiting for the handlers guarantees the aborted sockets are really closed by
            # the time a mode switch or stop() returns.
            await asyncio.wait(tasks, timeout=_CLOSE_TIMEOUT)

    async def _apply(self, config: ModeConfig) -> None:
        refusing = self._config.mode is Mode.REFUSE
        self._config = config
        self._rng = random.Random(config.seed)
        if config.mode is Mode.REFUSE and not refusing:
            if self._data_server is not None:
                self._data_server.close()
                self._data_server = None
            self._reserved = _bind(self._port)
            await self._drop(self._data_conns)
        elif config.mode is not Mode.REFUSE and refusing and self._reserved is not None:
            sock, self._reserved = self._reserved, None
            self._data_server = await self._listen(sock)

    # --- connections -------------------------------------------------------------------

    # Connection callbacks are plain functions that start their own task: given a coroutine,
    # Python 3.11's start_server calls task.exception() on it when done, which raises (and
    # logs a spurious traceback) for the handlers we cancel on shutdown. Fixed in 3.12.

    def _on_data_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        if len(self._data_conns) >= self._max_connections:
            writer.transport.abort()
            return
        with self._lock:
            self._connections += 1
        self._spawn(reader, writer, self._data_conns, self._answer_data, keep_body=False)

    def _on_control_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self._spawn(reader, writer, self._control_conns, self._answer_control, keep_body=True)

    def _spawn(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        conns: dict[asyncio.Task[Any], asyncio.StreamWriter],
        answer: _Answer,
        *,
        keep_body: bool,
    ) -> None:
        task = asyncio.get_running_loop().create_task(
            self._handle(reader, writer, answer, keep_body=keep_body)
        )
        # The dict is also what keeps the task alive: the loop holds tasks only weakly.
        conns[task] = writer

        def done(task: asyncio.Task[None]) -> None:
            conns.pop(task, None)
            if not task.cancelled() and (exc := task.exception()) is not None:
                task.get_loop().call_exception_handler(
                    {"message": "upstream connection handler failed", "exception": exc}
                )

        task.add_done_callback(done)

    async def _handle(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        answer: _Answer,
        *,
        keep_body: bool,
    ) -> None:
        try:
            # Bounded: each turn waits at most idle_timeout for the next request.
            while True:
                try:
                    request = await self._read_request(reader, writer, keep_body=keep_body)
                except _BadRequest as exc:
                    await self._reject(reader, writer, exc)
                    return
                if request is None or not await answer(request, reader, writer):
                    return
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            # The client went away or stalled mid-request: nothing to answer.
            return
        finally:
            await _close(writer)

    async def _reject(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, exc: _BadRequest
    ) -> None:
        body = _json_bytes({"error": exc.reason})
        headers = [("Content-Type", "application/json")]
        writer.write(_render(exc.status, headers, body, request=None))
        await writer.drain()
        # Closing with unread input makes the kernel send an RST, which can destroy the
        # answer before the client reads it; so half-close, then discard what the client
        # still sends until it closes too (briefly: this is a courtesy).
        if writer.can_write_eof():
            writer.write_eof()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_CLOSE_TIMEOUT):
                while await reader.read(_READ_CHUNK):
                    pass

    async def _read_request(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, keep_body: bool
    ) -> _Request | None:
        """The next request, or ``None`` when the client closed or idled out between them."""
        try:
            async with asyncio.timeout(self._idle_timeout):
                first = await reader.read(1)
                if not first:
                    return None
                # Reject what cannot start a request line at once, as real servers do,
                # instead of waiting for a blank line that never comes: a TLS ClientHello
                # (first byte 0x16) then gets an HTTP answer, which the client's TLS layer
                # reports as a protocol error.
                if first not in (b"\r", b"\n") and not _TOKEN.fullmatch(first.decode("latin-1")):
                    raise _BadRequest(400, "not an HTTP/1.x request")
                head = first + await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return None
        except TimeoutError:
            return None
        except asyncio.LimitOverrunError:
            raise _BadRequest(431, "request head too large") from None
        # RFC 9112 section 2.2: tolerate empty lines before the request line.
        lines = head.lstrip(b"\r\n").decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3:
            raise _BadRequest(400, "malformed request line")
        method, target, version = parts
        if len(method) > _MAX_METHOD_CHARS or not _TOKEN.fullmatch(method) or not target:
            raise _BadRequest(400, "malformed request line")
        if version not in ("HTTP/1.1", "HTTP/1.0"):
            raise _BadRequest(505, "only HTTP/1.0 and HTTP/1.1 are spoken here")
        header_lines = [line for line in lines[1:] if line]
        if len(header_lines) > _MAX_HEADER_LINES:
            raise _BadRequest(431, "too many header lines")
        headers: list[tuple[str, str]] = []
        for line in header_lines:
            name, sep, value = line.partition(":")
            # Also rejects obsolete line folding (a line starting with whitespace).
            if not sep or not _TOKEN.fullmatch(name):
                raise _BadRequest(400, "malformed header line")
            headers.append((name, value.strip(" \t")))

        def values(wanted: str) -> list[str]:
            return [
                item.strip()
                for name, value in headers
                if name.lower() == wanted
                for item in value.split(",")
            ]

        connection = {token.lower() for token in values("connection")}
        keep_alive = (
            "close" not in connection if version == "HTTP/1.1" else "keep-alive" in connection
        )
        max_body = _MAX_CONTROL_BODY if keep_body else self._max_body_bytes
        transfer_coding = [token.lower() for token in values("transfer-encoding")]
        lengths = set(values("content-length"))
        if transfer_coding and lengths:
            # Both framings at once is the request-smuggling shape; refuse it.
            raise _BadRequest(400, "both Transfer-Encoding and Content-Length")
        if transfer_coding and transfer_coding[-1] != "chunked":
            raise _BadRequest(501, "only chunked transfer coding is supported")
        length = 0
        if lengths:
            if len(lengths) != 1 or not next(iter(lengths)).isdigit():
                raise _BadRequest(400, "invalid Content-Length")
            length = int(next(iter(lengths)))
            if length > max_body:
                raise _BadRequest(413, "request body too large")
        if (transfer_coding or length) and "100-continue" in {v.lower() for v in values("expect")}:
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        async with asyncio.timeout(self._idle_timeout):
            if transfer_coding:
                body, body_length = await _read_chunked(reader, max_body, keep=keep_body)
            else:
                body, body_length = await _read_exactly(reader, length, keep=keep_body)
        return _Request(method, target, version, headers, body, body_length, keep_alive)

    # --- answers -----------------------------------------------------------------------

    def _count(self, method: str) -> int:
        with self._lock:
            self._requests += 1
            self._request_number += 1
            if method not in self._methods and len(self._methods) >= _MAX_METHOD_KEYS:
                method = "OTHER"
            self._methods[method] = self._methods.get(method, 0) + 1
            return self._request_number

    def _echo(self, request: _Request, number: int, config: ModeConfig) -> bytes:
        joined: dict[str, str] = {}
        for name, value in request.headers:
            key = name.lower()
            joined[key] = f"{joined[key]}, {value}" if key in joined else value
        return _json_bytes(
            {
                "method": request.method,
                "path": request.target,
                "headers": joined,
                "raw_headers": [[name, value] for name, value in request.headers],
                "body_length": request.body_length,
                "request_number": number,
                "mode": config.mode.value,
            }
        )

    async def _answer_data(
        self, request: _Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        # Snapshot before any await, so a request is answered by the mode it arrived in and
        # flaky draws follow arrival order.
        config = self._config
        number = self._count(request.method)
        failing = config.mode is Mode.FLAKY and self._rng.random() * 100 < config.failure_percent
        if config.mode is Mode.REFUSE:
            # Only a connection that raced the switch gets here; refusing means no answer.
            writer.transport.abort()
            return False
        if config.mode is Mode.HANG:
            await self._hang(reader)
            return False
        if config.delay_ms:
            await asyncio.sleep(config.delay_ms / 1000)
        if config.mode is Mode.RESET:
            # Linger on with a zero timeout turns close() into an RST instead of a FIN.
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            return False
        if config.mode is Mode.GARBAGE:
            writer.write(_GARBAGE)
            await writer.drain()
            return False
        if config.mode is Mode.TRUNCATED:
            head = (
                "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                f"Content-Length: {_TRUNCATED_LENGTH}\r\n\r\n"
            ).encode()
            writer.write(head + b"x" * _TRUNCATED_SENT)
            await writer.drain()
            return False
        if config.mode is Mode.DRIP_HEADERS or config.mode is Mode.DRIP_BODY:
            await self._drip(reader, writer, config)
            return False
        if config.mode is Mode.STATUS or failing:
            status = config.status if config.mode is Mode.STATUS else config.failure_status
            headers: list[tuple[str, str]] = []
            if config.retry_after is not None:
                headers.append(("Retry-After", config.retry_after))
            if config.body is not None:
                headers.append(("Content-Type", "text/plain; charset=utf-8"))
                body = config.body.encode()
            else:
                headers.append(("Content-Type", "application/json"))
                body = self._echo(request, number, config)
            writer.write(_render(status, headers, body, request=request))
        else:
            body = self._echo(request, number, config)
            writer.write(
                _render(200, [("Content-Type", "application/json")], body, request=request)
            )
        await writer.drain()
        return request.keep_alive

    async def _hang(self, reader: asyncio.StreamReader) -> None:
        # Reading (and discarding) is how we notice the client giving up, which frees the
        # connection; the timeout keeps even a forgotten hang finite.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._hang_timeout):
                while await reader.read(_READ_CHUNK):
                    pass

    async def _drip(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, config: ModeConfig
    ) -> None:
        if config.mode is Mode.DRIP_HEADERS:
            writer.write(b"HTTP/1.1 200 OK\r\n")
        else:
            status = config.drip_status
            head = _render(
                status, [("Content-Type", "application/octet-stream")], b"", request=None
            )
            # _render announced the empty body; this answer's body is the drip.
            head = head.replace(b"Content-Length: 0", f"Content-Length: {_DRIP_LENGTH}".encode())
            writer.write(head)
        await writer.drain()
        interval = config.drip_ms / 1000
        loop = asyncio.get_running_loop()
        # Bounded three ways: hang_timeout, the announced length, and the client leaving
        # (reading is the wait between drops, and how we notice the client went away).
        give_up = loop.time() + self._hang_timeout
        for number in range(_DRIP_LENGTH):
            try:
                async with asyncio.timeout(interval):
                    if not await reader.read(_READ_CHUNK):
                        return
            except TimeoutError:
                pass
            if loop.time() >= give_up:
                return
            if config.mode is Mode.DRIP_HEADERS:
                writer.write(f"X-Drip-{number}: {number}\r\n".encode())
            else:
                writer.write(b"x")
            await writer.drain()

    async def _answer_control(
        self, request: _Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        path = request.target.partition("?")[0]
        routes: dict[str, tuple[str, ...]] = {
            "/mode": ("GET", "POST"),
            "/stats": ("GET",),
            "/stats/reset": ("POST",),
        }
        headers = [("Content-Type", "application/json")]
        status = 200
        payload: dict[str, object] = {}
        allowed = routes.get(path)
        method = "GET" if request.method == "HEAD" else request.method
        if allowed is None:
            status, payload = 404, {"error": f"no such endpoint; try {sorted(routes)}"}
        elif method not in allowed:
            status, payload = 405, {"error": f"allowed: {', '.join(allowed)}"}
            headers.append(("Allow", ", ".join(allowed)))
        elif path == "/mode" and method == "GET":
            payload = self._config.to_dict()
        elif path == "/mode":
            try:
                data = json.loads(request.body)
                if not isinstance(data, dict):
                    raise ValueError("the body must be a JSON object")
                config = ModeConfig.from_mapping(data)
            except ValueError as exc:  # json.JSONDecodeError is a ValueError too
                status, payload = 400, {"error": str(exc)}
            else:
                await self._apply(config)
                payload = config.to_dict()
        elif path == "/stats":
            payload = self.stats().to_dict()
        else:
            payload = self.reset_stats().to_dict()
        writer.write(_render(status, headers, _json_bytes(payload), request=request))
        await writer.drain()
        return request.keep_alive


async def _read_exactly(
    reader: asyncio.StreamReader, length: int, *, keep: bool
) -> tuple[bytes, int]:
    kept: list[bytes] = []
    remaining = length
    while remaining:  # bounded by length (already capped) and the caller's timeout
        chunk = await reader.read(min(remaining, _READ_CHUNK))
        if not chunk:
            raise asyncio.IncompleteReadError(b"", remaining)
        remaining -= len(chunk)
        if keep:
            kept.append(chunk)
    return b"".join(kept), length


async def _read_chunked(
    reader: asyncio.StreamReader, max_body: int, *, keep: bool
) -> tuple[bytes, int]:
    kept: list[bytes] = []
    total = 0
    while True:  # bounded: every chunk adds to total, capped by max_body
        size_line = await reader.readuntil(b"\r\n")
        size_text = size_line.split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            raise _BadRequest(400, "invalid chunk size") from None
        if size < 0:
            raise _BadRequest(400, "invalid chunk size")
        if size == 0:
            break
        total += size
        if total > max_body:
            raise _BadRequest(413, "request body too large")
        chunk, _ = await _read_exactly(reader, size, keep=keep)
        kept.append(chunk)
        if await reader.readexactly(2) != b"\r\n":
            raise _BadRequest(400, "chunk not followed by CRLF")
    for _ in range(_MAX_HEADER_LINES):  # trailer section, ignored
        if await reader.readuntil(b"\r\n") == b"\r\n":
            return b"".join(kept), total
    raise _BadRequest(431, "too many trailer lines")


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError, TimeoutError, asyncio.CancelledError):
        async with asyncio.timeout(_CLOSE_TIMEOUT):
            await writer.wait_closed()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m gateway_guard.testing.upstream``: serve until Ctrl-C or SIGTERM."""
    parser = argparse.ArgumentParser(
        prog="python -m gateway_guard.testing.upstream",
        description="A misbehaving HTTP/1.1 upstream on 127.0.0.1 for chaos tests.",
    )
    parser.add_argument("--port", type=int, default=0, help="data port (0: any free port)")
    parser.add_argument("--control-port", type=int, default=0, help="control port (0: any)")
    parser.add_argument("--mode", choices=[m.value for m in Mode], default=Mode.OK.value)
    parser.add_argument("--delay-ms", type=float, default=0.0)
    parser.add_argument("--status", type=int, default=503)
    parser.add_argument("--retry-after")
    parser.add_argument("--body")
    parser.add_argument("--failure-percent", type=float, default=0.0)
    parser.add_argument("--failure-status", type=int, default=503)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--drip-ms", type=float, default=250.0)
    parser.add_argument("--drip-status", type=int, default=200)
    parser.add_argument("--certfile", help="PEM certificate chain: serve data over TLS")
    parser.add_argument("--keyfile", help="PEM private key for --certfile")
    args = parser.parse_args(argv)
    try:
        config = ModeConfig(
            mode=_parse_mode(args.mode),
            delay_ms=args.delay_ms,
            status=args.status,
            retry_after=args.retry_after,
            body=args.body,
            failure_percent=args.failure_percent,
            failure_status=args.failure_status,
            seed=args.seed,
            drip_ms=args.drip_ms,
            drip_status=args.drip_status,
        )
    except ValueError as exc:
        parser.error(str(exc))
    tls = None
    if args.certfile:
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(args.certfile, args.keyfile)
    upstream = MisbehavingUpstream(
        port=args.port, control_port=args.control_port, mode=config, tls=tls
    )

    def ready() -> None:
        print(f"data:    {upstream.url}", flush=True)
        print(f"control: {upstream.control_url}", flush=True)
        print(f"mode:    {json.dumps(upstream.config.to_dict())}", flush=True)

    async def run() -> None:
        loop = asyncio.get_running_loop()
        serving = asyncio.ensure_future(upstream.serve(ready))
        # asyncio.run already turns Ctrl-C into cancellation; SIGTERM should be as clean.
        with contextlib.suppress(NotImplementedError):  # no signal handlers on Windows
            loop.add_signal_handler(signal.SIGTERM, serving.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await serving

    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        pass
    except OSError as exc:  # a port in use, most likely
        parser.exit(1, f"{parser.prog}: cannot listen: {exc}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
