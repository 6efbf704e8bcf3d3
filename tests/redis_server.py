"""A real redis-server for tests: 127.0.0.1, a free port, no persistence, stopped after.

::

    with redis_server() as server:
        server.url            # "redis://127.0.0.1:PORT/0"
        server.stop(); server.start()   # the same port again: a restart mid-test

``redis-server`` is Debian's package (``tools/sysdeps.sh`` installs it, as CI does). When it
is missing the test skips with the install command, except under ``CI=true``, where it
fails: a fleet test that silently never ran would hide a broken store.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

START_TIMEOUT = 10.0
CANDIDATES = ("/usr/bin/redis-server", "/usr/local/bin/redis-server")


def redis_binary() -> str:
    """The redis-server path; skips (fails under CI=true) when it is not installed."""
    found = shutil.which("redis-server") or next(
        (path for path in CANDIDATES if os.access(path, os.X_OK)), None
    )
    if found is None:
        message = "redis-server is missing: run `bash tools/sysdeps.sh` (make test does)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return found


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RedisServer:
    """One redis-server process; :meth:`stop` and :meth:`start` keep its port."""

    def __init__(self, binary: str, directory: Path) -> None:
        self.binary = binary
        self.directory = directory
        self.port = _free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        command = [
            self.binary,
            "--bind",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.directory),
            "--logfile",
            str(self.directory / "redis.log"),
            "--protected-mode",
            "no",
        ]
        self.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.process.poll() is not None:
                log = (self.directory / "redis.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"redis-server exited at start:\n{log}")
            try:
                if self.command("PING") == "+PONG":
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("redis-server did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        process.kill()  # an outage is a crash, not a polite shutdown; and no save either
        process.wait(10)

    def command(self, *args: str) -> str:
        """One command over a plain socket (RESP), the first line of the reply."""
        payload = f"*{len(args)}\r\n".encode()
        for arg in args:
            data = arg.encode()
            payload += b"$%d\r\n%s\r\n" % (len(data), data)
        with socket.create_connection(("127.0.0.1", self.port), timeout=2.0) as sock:
            sock.sendall(payload)
            reply = b""
            while not reply.endswith(b"\r\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                reply += chunk
        return reply.decode(errors="replace").split("\r\n", 1)[0]

    def info(self, section: str) -> str:
        """The text of ``INFO section`` (for command statistics)."""
        args = ("INFO", section)
        payload = f"*{len(args)}\r\n".encode()
        for arg in args:
            data = arg.encode()
            payload += b"$%d\r\n%s\r\n" % (len(data), data)
        with socket.create_connection(("127.0.0.1", self.port), timeout=2.0) as sock:
            sock.sendall(payload)
            reply = b""
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                reply += chunk
                header, _, body = reply.partition(b"\r\n")
                if header.startswith(b"$") and len(body) >= int(header[1:]) + 2:
                    break
        return reply.decode(errors="replace").partition("\r\n")[2]

    def commands(self) -> dict[str, int]:
        """Commands served so far, by name (``INFO commandstats``; INFO itself included)."""
        counts: dict[str, int] = {}
        for line in self.info("commandstats").splitlines():
            if line.startswith("cmdstat_"):
                name, _, rest = line.partition(":")
                calls = rest.split(",")[0].partition("=")[2]
                counts[name.removeprefix("cmdstat_")] = int(calls)
        return counts


@contextmanager
def redis_server() -> Iterator[RedisServer]:
    """Start a redis-server on a free loopback port; stop it (and remove its dir) after."""
    binary = redis_binary()
    with tempfile.TemporaryDirectory(prefix="gg-redis-") as directory:
        server = RedisServer(binary, Path(directory))
        server.start()
        try:
            yield server
        finally:
            server.stop()
