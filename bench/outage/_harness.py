"""Processes for the outage scenarios: the misbehaving upstream and the app servers.

Every process is started in its own session (its own process group), with its output
going to a temporary file rather than a pipe (a pipe nobody reads would block a chatty
server), and is stopped by :meth:`Proc.stop`: SIGTERM to the group, then SIGKILL if it
has not gone within a couple of seconds. :class:`Procs` stops everything it started on
the way out of its ``with`` block, errors and Ctrl-C included. Everything listens on
127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

HOST = "127.0.0.1"
ROOT = Path(__file__).resolve().parents[2]
APPS = Path(__file__).resolve().parent / "apps.py"
# How long a server may take to start listening (imports included) on a loaded machine.
START_TIMEOUT = 30.0
STOP_GRACE = 2.0
APP_GRACE = 0.5


def _die_with_parent() -> None:
    """In the child: get SIGTERM if the bench process dies (Linux), so that even a
    SIGKILLed bench leaves no server behind. Elsewhere, stop() in ``finally`` must do."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


_PR_SET_PDEATHSIG = 1


def free_port() -> int:
    """A port that was free a moment ago (the OS picks it; a race is possible, not likely)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


class Proc:
    """One child process in its own process group, output in a temporary file."""

    def __init__(self, name: str, argv: list[str], port: int, grace: float = STOP_GRACE) -> None:
        self.name = name
        self.port = port
        # A server that is still draining hung requests after this is killed: the bench
        # has what it needs from it.
        self.grace = grace
        self.started = time.monotonic()
        # Closed in stop(): the file outlives this method, so no `with` here.
        self._log = tempfile.TemporaryFile(prefix=f"outage-{name}-")  # noqa: SIM115
        self.popen = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            # Started from the main thread, with no other thread running.
            preexec_fn=_die_with_parent,  # noqa: PLW1509
        )

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def output(self, limit: int = 4000) -> str:
        self._log.flush()
        self._log.seek(0)
        text = self._log.read().decode("utf-8", "replace")
        return text[-limit:]

    def wait_ready(self, probe_path: str, timeout: float = START_TIMEOUT) -> None:
        """Poll ``probe_path`` until it answers 200 (bounded by ``timeout``)."""
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=1.0) as client:
            for _ in range(int(timeout / 0.05) + 1):
                if self.popen.poll() is not None:
                    raise RuntimeError(
                        f"{self.name} exited with {self.popen.returncode}:\n{self.output()}"
                    )
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(self.url + probe_path).status_code == 200:
                        return
                if time.monotonic() > deadline:
                    break
                time.sleep(0.05)
        raise RuntimeError(f"{self.name} did not start within {timeout:g} s:\n{self.output()}")

    def stop(self) -> None:
        """SIGTERM the process group, then SIGKILL it if it lingers. Idempotent."""
        try:
            if self.popen.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGTERM)
                try:
                    self.popen.wait(self.grace)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(self.popen.pid, signal.SIGKILL)
                    self.popen.wait(STOP_GRACE)
            else:
                # The leader is gone; make sure nothing else of its group is left.
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
        finally:
            self._log.close()


class Procs:
    """Starts upstreams and apps; ``with Procs() as procs:`` stops them all on exit."""

    def __init__(self) -> None:
        self._procs: list[Proc] = []

    def __enter__(self) -> Procs:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop_all()

    def stop_all(self) -> None:
        while self._procs:
            proc = self._procs.pop()
            with contextlib.suppress(Exception):
                proc.stop()

    def stop(self, proc: Proc) -> None:
        if proc in self._procs:
            self._procs.remove(proc)
        proc.stop()

    def _start(self, name: str, argv: list[str], port: int, grace: float = STOP_GRACE) -> Proc:
        proc = Proc(name, argv, port, grace)
        self._procs.append(proc)
        return proc

    def upstream(self) -> Upstream:
        """Start the project's misbehaving upstream (mode ok) and wait until it answers."""
        port, control = free_port(), free_port()
        argv = [
            sys.executable,
            "-m",
            "gateway_guard.testing.upstream",
            "--port",
            str(port),
            "--control-port",
            str(control),
            "--mode",
            "ok",
        ]
        up = Upstream(self._start("upstream", argv, port), control)
        up.wait_ready()
        return up

    def app(self, config: dict[str, Any], *, wait: bool = True) -> Proc:
        """Start ``apps.py`` with ``config`` (see apps.AppConfig); ``wait`` for /healthy."""
        port = free_port()
        argv = [sys.executable, str(APPS), json.dumps({**config, "port": port})]
        proc = self._start(f"app-{config['kind']}-{config['variant']}", argv, port, APP_GRACE)
        if wait:
            proc.wait_ready("/healthy")
        return proc


class Upstream:
    """The upstream process and a small client of its control API."""

    def __init__(self, proc: Proc, control_port: int) -> None:
        self.proc = proc
        self.control_url = f"http://{HOST}:{control_port}"

    @property
    def url(self) -> str:
        return self.proc.url

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        with httpx.Client(timeout=1.0) as client:
            for _ in range(int(START_TIMEOUT / 0.05) + 1):
                if self.proc.popen.poll() is not None:
                    raise RuntimeError(f"upstream exited:\n{self.proc.output()}")
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(self.control_url + "/mode").status_code == 200:
                        return
                if time.monotonic() > deadline:
                    break
                time.sleep(0.05)
        raise RuntimeError(f"upstream did not start:\n{self.proc.output()}")

    def set_mode(self, mode: str, **options: Any) -> None:
        """Switch mode (synchronously: only between measurements)."""
        with httpx.Client(timeout=5.0) as client:
            r = client.post(self.control_url + "/mode", json={"mode": mode, **options})
            r.raise_for_status()


class Control:
    """Async control of one upstream and one app's bench endpoints, used while load runs."""

    def __init__(self, upstream: Upstream, app: Proc) -> None:
        self._up = upstream.control_url
        self._app = app.url
        self._client = httpx.AsyncClient(timeout=httpx.Timeout(5.0))

    async def aclose(self) -> None:
        await self._client.aclose()

    async def set_mode(self, mode: str, **options: Any) -> None:
        r = await self._client.post(self._up + "/mode", json={"mode": mode, **options})
        r.raise_for_status()

    async def upstream_requests(self, *, reset: bool = False) -> int:
        """Requests the upstream received in full since the last reset (then reset)."""
        if reset:
            r = await self._client.post(self._up + "/stats/reset")
        else:
            r = await self._client.get(self._up + "/stats")
        r.raise_for_status()
        requests: int = r.json()["requests"]
        return requests

    async def app_stats(self, timeout: float = 1.0) -> dict[str, Any] | None:
        """The app's counters (inbound /dep, outbound attempts), None if it cannot answer."""
        return await self._get_json(self._app + "/_bench/stats", timeout)

    async def breaker(self, timeout: float = 0.5) -> dict[str, Any] | None:
        """The app's breaker state ({"state": ...}); None if the app cannot answer."""
        return await self._get_json(self._app + "/_bench/breaker", timeout)

    async def _get_json(self, url: str, timeout: float) -> dict[str, Any] | None:
        try:
            r = await self._client.get(url, timeout=timeout)
        except httpx.HTTPError:
            return None
        if r.status_code != 200:
            return None
        data: dict[str, Any] = r.json()
        return data
