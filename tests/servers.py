"""Real servers on loopback for end-to-end tests: uvicorn (ASGI) and cheroot (WSGI).

Each runs in a background thread of the test process, bound to 127.0.0.1 on an ephemeral
port, and is stopped with bounded waits. The network is never faked here. Servers that
need processes of their own (gunicorn's workers) run through :func:`server_process`, and
:func:`listening_url` waits until one logs its URL and answers there.
"""

from __future__ import annotations

import queue
import re
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import httpx
import uvicorn
from cheroot import wsgi as cheroot_wsgi

START_TIMEOUT = 15.0


@contextmanager
def server_process(
    command: Sequence[str],
    *,
    cwd: Any,
    env: dict[str, str],
    log: list[str] | None = None,
    pass_fds: Sequence[int] = (),
) -> Iterator[tuple[subprocess.Popen[str], queue.Queue[str]]]:
    """A server in its own process, with its stderr lines queued as they come (a thread
    drains the pipe, so a chatty server never blocks on it); stopped with bounded waits,
    also when the body raises (a server that did not start).

    ``log``, if given, also gets every line, for a test that checks what the server logged
    over its whole run (the queue is consumed while waiting for it to start). ``pass_fds``
    goes to :class:`subprocess.Popen`: a listening socket the test bound for the server.
    """
    process = subprocess.Popen(
        list(command),
        cwd=cwd,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
        errors="replace",
        pass_fds=pass_fds,
    )
    lines: queue.Queue[str] = queue.Queue()

    def drain() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            lines.put(line)
            if log is not None:
                log.append(line)

    reader = threading.Thread(target=drain, name="server-stderr", daemon=True)
    reader.start()
    try:
        yield process, lines
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
        reader.join(10)
        if process.stderr is not None:
            process.stderr.close()


GUNICORN_LISTENING = re.compile(r"Listening at: (http://127\.0\.0\.1:\d+)")


def answers(url: str, *, deadline: float, any_status: bool = False) -> bool:
    """Whether ``url`` answers 200 (any status, with ``any_status``) before ``deadline``
    (a :func:`time.monotonic` value), polled every 50 ms."""
    while time.monotonic() < deadline:
        try:
            response = httpx.get(url, timeout=2.0)
        except httpx.TransportError:
            response = None
        if response is not None and (any_status or response.status_code == 200):
            return True
        time.sleep(0.05)
    return False


def listening_url(
    process: subprocess.Popen[str],
    lines: queue.Queue[str],
    *,
    listening: re.Pattern[str] = GUNICORN_LISTENING,
    probe: str = "/healthz",
    any_status: bool = False,
    timeout: float = START_TIMEOUT,
    what: str = "gunicorn",
) -> str:
    """The base URL a :func:`server_process` logs on stderr (``listening``'s group 1), once
    ``probe`` there answers as :func:`answers` says, all within ``timeout`` seconds.

    Not started in time, or exited: :class:`RuntimeError` "<what> did not start" with the
    last stderr lines, which is all a failed start in CI has to go on.
    """
    deadline = time.monotonic() + timeout
    seen: list[str] = []
    while time.monotonic() < deadline and process.poll() is None:
        try:
            line = lines.get(timeout=0.2)
        except queue.Empty:
            continue
        seen.append(line)
        match = listening.search(line)
        # A gunicorn worker boots after the arbiter listens: wait until it answers.
        if match and answers(match.group(1) + probe, deadline=deadline, any_status=any_status):
            return match.group(1)
    # With what came after the listening line: a worker's traceback, when one did not boot.
    raise RuntimeError(f"{what} did not start:\n" + "".join([*seen, *queued(lines)][-30:]))


def queued(lines: queue.Queue[str]) -> list[str]:
    """The lines queued so far, taken off the queue; no more than were there when called,
    so a server that keeps writing cannot keep this going."""
    taken: list[str] = []
    for _ in range(lines.qsize()):
        try:
            taken.append(lines.get_nowait())
        except queue.Empty:
            break
    return taken


@contextmanager
def serve_asgi(app: Any) -> Iterator[str]:
    """Serve an ASGI app with uvicorn; yield its base URL."""
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=0,
        log_level="error",
        lifespan="on",
        access_log=False,
        timeout_graceful_shutdown=2,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + START_TIMEOUT
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@contextmanager
def serve_wsgi(app: Callable[..., Any], *, threads: int = 16) -> Iterator[str]:
    """Serve a WSGI app with cheroot (a production, thread-pool WSGI server)."""
    server = cheroot_wsgi.Server(("127.0.0.1", 0), app, numthreads=threads, timeout=10)
    server.prepare()
    port = server.bind_addr[1]
    thread = threading.Thread(target=server.serve, name="cheroot-test", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()
        thread.join(10)
