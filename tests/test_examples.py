"""The runnable examples as a user runs them: ``examples/demo.py`` and ``examples/upstream.py``.

The demo runs as a real subprocess on free ports (127.0.0.1 only); its own output tells
where it listens. Stopping it must leave no process behind: its children are listed
(psutil when installed, else /proc) while it runs and checked after it exits. Every wait
is bounded.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import http_sf
import httpx
import pytest

pytestmark = pytest.mark.e2e

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
DEMO = EXAMPLES / "demo.py"
UPSTREAM = EXAMPLES / "upstream.py"
# Starting the demo imports FastAPI and starts uvicorn: about a second, more on a loaded
# machine. The demo's own startup bound is 30 s; this one is a little longer.
START_TIMEOUT = 40.0
STOP_TIMEOUT = 20.0
COMMAND_TIMEOUT = 20.0
BANNER = re.compile(r"^\s+(app|upstream|control):\s+(http://127\.0\.0\.1:\d+)/?\s")


def run_python(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
        check=False,
    )


# --- processes ------------------------------------------------------------------------------


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid``."""
    try:
        psutil: Any = importlib.import_module("psutil")
    except ImportError:
        return _proc_descendants(pid)
    try:
        return {child.pid for child in psutil.Process(pid).children(recursive=True)}
    except psutil.NoSuchProcess:
        return set()


def _proc_descendants(pid: int) -> set[int]:
    if not Path("/proc/self/stat").exists():
        pytest.skip("needs psutil or /proc to list child processes")
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # exited while we looked
            continue
        # The command name, in parentheses, may contain spaces: parse after the last ")".
        ppid = int(stat.rpartition(")")[2].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found: set[int] = set()
    todo = [pid]
    while todo:  # bounded: each pid is visited once
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pid: int) -> bool:
    """Running, or exited but never reaped: either way, left behind."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def accepts(url: str) -> bool:
    host, _, port = url.removeprefix("http://").partition(":")
    try:
        with socket.create_connection((host, int(port.rstrip("/"))), timeout=1.0):
            return True
    except OSError:
        return False


# --- the demo as a subprocess ---------------------------------------------------------------


@dataclass
class Demo:
    process: subprocess.Popen[str]
    urls: dict[str, str]
    lines: list[str]
    stderr: IO[str]
    # Listed once it is up: after it exits, orphans are no longer its descendants.
    children: set[int] = field(default_factory=set)

    @property
    def control_port(self) -> str:
        return self.urls["control"].rpartition(":")[2]

    def output(self) -> str:
        self.stderr.seek(0)
        return "stdout:\n" + "".join(self.lines) + "\nstderr:\n" + self.stderr.read()[-5000:]


@contextlib.contextmanager
def running_demo() -> Iterator[Demo]:
    command = [
        sys.executable,
        str(DEMO),
        "--port",
        "0",
        "--upstream-port",
        "0",
        "--control-port",
        "0",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with (
        tempfile.TemporaryFile("w+") as stderr,
        subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env
        ) as process,
    ):
        assert process.stdout is not None
        stdout = process.stdout
        lines_q: queue.Queue[str | None] = queue.Queue()

        def pump() -> None:
            for line in stdout:  # ends at EOF: once the demo and its children are gone
                lines_q.put(line)
            lines_q.put(None)

        reader = threading.Thread(target=pump, name="demo-stdout", daemon=True)
        reader.start()
        demo = Demo(process, {}, [], stderr)
        try:
            deadline = time.monotonic() + START_TIMEOUT
            while "Ctrl-C to stop." not in "".join(demo.lines):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    pytest.fail(f"the demo did not start in {START_TIMEOUT} s\n{demo.output()}")
                try:
                    line = lines_q.get(timeout=remaining)
                except queue.Empty:
                    continue
                if line is None:
                    pytest.fail(f"the demo exited ({process.wait(5)})\n{demo.output()}")
                demo.lines.append(line)
                if match := BANNER.match(line):
                    demo.urls[match.group(1)] = match.group(2)
            assert set(demo.urls) == {"app", "upstream", "control"}, demo.output()
            demo.children = descendants(process.pid)
            yield demo
        finally:
            # Whatever happened, leave nothing running (and so let the reader see EOF).
            leftovers = demo.children | descendants(process.pid)
            if process.poll() is None:
                process.kill()
            for pid in leftovers:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            process.wait(STOP_TIMEOUT)
            reader.join(STOP_TIMEOUT)


def proxy_error(response: httpx.Response) -> str:
    parsed: Any = http_sf.parse(response.headers["proxy-status"].encode(), tltype="list")
    [(_, params)] = parsed
    return str(params["error"])


# --- tests ----------------------------------------------------------------------------------


def test_upstream_script_help() -> None:
    result = run_python(UPSTREAM, "--help")
    assert result.returncode == 0, result.stderr
    for flag in ("--port", "--control-port", "--mode", "9101", "9102"):
        assert flag in result.stdout


def test_demo_mode_command_without_a_running_demo_says_so() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: connections are refused
        result = run_python(DEMO, "mode", "hang", "--control-port", str(port))
    assert result.returncode == 1
    assert "cannot reach the upstream's control API" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_demo_serves_switches_modes_and_stops_cleanly(signum: signal.Signals) -> None:
    with running_demo() as demo, httpx.Client(timeout=10.0, trust_env=False) as http:
        app = demo.urls["app"]
        landing = http.get(app + "/", headers={"accept": "text/html"})
        assert landing.status_code == 200, demo.output()
        assert "gateway_guard FastAPI demo" in landing.text
        # Not the default control port, so the page's commands name the one in use.
        assert f"--control-port {demo.control_port}" in landing.text
        assert http.get(app + "/api/items").status_code == 200
        assert demo.children, "the app should run as a child process"

        switched = run_python(DEMO, "mode", "garbage", "--control-port", demo.control_port)
        assert switched.returncode == 0, switched.stderr
        assert '"mode": "garbage"' in switched.stdout
        broken = http.get(app + "/api/items", headers={"accept": "application/json"})
        assert broken.status_code == 502
        assert proxy_error(broken) == "http_protocol_error"
        shown = run_python(DEMO, "mode", "--control-port", demo.control_port)
        assert shown.returncode == 0, shown.stderr
        assert '"mode": "garbage"' in shown.stdout

        demo.process.send_signal(signum)
        assert demo.process.wait(STOP_TIMEOUT) == 0, demo.output()
        left = {pid for pid in demo.children if alive(pid)}
        assert not left, f"processes left behind: {left}"
        for url in demo.urls.values():
            assert not accepts(url), f"{url} still listening"


@pytest.mark.parametrize(
    ("flag", "variable"),
    [("--port", "PORT"), ("--upstream-port", "UPSTREAM_PORT"), ("--control-port", "CONTROL_PORT")],
)
def test_demo_names_the_flag_that_moves_a_busy_port(flag: str, variable: str) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        # The other two ports: 0, any free one, so only the busy one can be refused.
        ports = {"--port": "0", "--upstream-port": "0", "--control-port": "0", flag: port}
        result = run_python(DEMO, *(part for item in ports.items() for part in item))
    assert result.returncode == 1
    assert f"port {port} " in result.stderr
    assert flag in result.stderr and f"make demo {variable}=" in result.stderr
    assert "Traceback" not in result.stderr


def test_make_demo_passes_its_ports_on() -> None:
    makefile = (EXAMPLES.parent / "Makefile").read_text(encoding="utf-8")
    for flag, variable in [
        ("--port", "PORT"),
        ("--upstream-port", "UPSTREAM_PORT"),
        ("--control-port", "CONTROL_PORT"),
    ]:
        assert f"{flag} $({variable})" in makefile
        assert re.search(rf"^{variable}\s*\?=", makefile, re.MULTILINE), variable
