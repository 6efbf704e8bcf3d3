"""The gateway_guard demo: a FastAPI shop whose catalog service misbehaves on demand.

    make demo                               # or: python examples/demo.py
    open http://127.0.0.1:8000/
    python examples/demo.py mode hang       # another terminal: the catalog stops answering
    python examples/demo.py mode ok

It runs the misbehaving upstream (:mod:`gateway_guard.testing.upstream`, in this process,
data on 9101 and control on 9102) and ``examples/fastapi_app.py`` under uvicorn (a child
process, on 8000), prints the URLs and the commands that switch the upstream's mode, and
waits. Ctrl-C, SIGTERM or closing the terminal stops both. Everything binds 127.0.0.1.

``--port``, ``--upstream-port`` and ``--control-port`` move it elsewhere (0: any free
port); ``make demo PORT=... UPSTREAM_PORT=... CONTROL_PORT=...`` passes them on. This
file needs only the standard library and gateway_guard; the app it starts needs FastAPI
and uvicorn (``make demo`` installs them).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

# examples/upstream.py, beside this file (a script's directory is first on sys.path).
from upstream import (
    DEFAULT_CONTROL_PORT,
    DEFAULT_PORT,
    ControlError,
    control,
    stop_event,
    switch_help,
)

from gateway_guard.testing.upstream import MisbehavingUpstream, Mode

HERE = Path(__file__).resolve().parent
HOST = "127.0.0.1"
DEFAULT_APP_PORT = 8000
# Importing FastAPI and starting uvicorn takes about a second; a loaded CI machine, more.
STARTUP_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0

_MODE_OPTIONS = (
    "delay_ms",
    "status",
    "retry_after",
    "body",
    "failure_percent",
    "failure_status",
    "seed",
)

_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python examples/demo.py",
        description="Run the gateway_guard FastAPI demo, or switch its upstream's mode.",
    )
    parser.add_argument(
        "--port", type=int, default=DEFAULT_APP_PORT, help="the app's port (default 8000)"
    )
    parser.add_argument(
        "--upstream-port", type=int, default=DEFAULT_PORT, help="upstream data port (9101)"
    )
    parser.add_argument(
        "--control-port",
        type=int,
        default=DEFAULT_CONTROL_PORT,
        help="upstream control port (9102)",
    )
    parser.add_argument("--mode", choices=[m.value for m in Mode], default="ok")
    commands = parser.add_subparsers(dest="command", metavar="{mode}")
    mode = commands.add_parser(
        "mode",
        help="switch the running demo's upstream to MODE (without MODE: show it)",
        description="Switch the running demo's upstream to MODE; without MODE, show it.",
    )
    mode.add_argument(
        "mode",
        nargs="?",
        choices=[m.value for m in Mode],
        metavar="MODE",
        help=f"one of {', '.join(m.value for m in Mode)}",
    )
    mode.add_argument(
        "--control-port", type=int, default=DEFAULT_CONTROL_PORT, help="(default 9102)"
    )
    mode.add_argument("--delay-ms", type=float, help="wait before answering (slow...)")
    mode.add_argument("--status", type=int, help="status to answer (status mode; 503)")
    mode.add_argument("--retry-after", help="Retry-After to send with it")
    mode.add_argument("--body", help="text body to send with it")
    mode.add_argument("--failure-percent", type=float, help="flaky: percent failing")
    mode.add_argument("--failure-status", type=int, help="flaky: their status (503)")
    mode.add_argument("--seed", type=int, help="flaky: random seed")
    args = parser.parse_args(argv)
    if args.command == "mode":
        return switch_mode(args)
    return run(args.port, args.upstream_port, args.control_port, args.mode)


def switch_mode(args: argparse.Namespace) -> int:
    control_url = f"http://{HOST}:{args.control_port}"
    try:
        if args.mode is None:
            shown = {"mode": control(control_url, "/mode"), "stats": control(control_url, "/stats")}
            print(json.dumps(shown, indent=2))
            return 0
        payload: dict[str, Any] = {"mode": args.mode}
        for key in _MODE_OPTIONS:
            if getattr(args, key) is not None:
                payload[key] = getattr(args, key)
        result = control(control_url, "/mode", payload)
    except ControlError as exc:
        print(f"demo.py mode: {exc}", file=sys.stderr)
        return 1
    print(f"upstream mode: {json.dumps(result)}")
    return 0


def run(port: int, upstream_port: int, control_port: int, mode: str) -> int:
    # Signals first: a Ctrl-C during startup must still stop whatever was started.
    stop = stop_event()
    # Every port is checked before anything starts, so a busy one is named with the flag
    # (and the make variable) that moves it, instead of surfacing as a bare EADDRINUSE.
    busy = _busy_ports(
        ("the app's port", port, "--port", "PORT"),
        ("the upstream's data port", upstream_port, "--upstream-port", "UPSTREAM_PORT"),
        ("the upstream's control port", control_port, "--control-port", "CONTROL_PORT"),
    )
    if busy:
        print("\n".join(busy), file=sys.stderr)
        return 1
    port = port or _free_port()
    upstream = MisbehavingUpstream(port=upstream_port, control_port=control_port, mode=mode)
    try:
        upstream.start()
    except RuntimeError as exc:
        # Taken between the check and now (a race), or refused for another reason.
        print(
            f"cannot start the upstream on ports {upstream_port}/{control_port}: "
            f"{exc.__cause__ or exc}; move them with --upstream-port and --control-port "
            "(make demo UPSTREAM_PORT=... CONTROL_PORT=...)",
            file=sys.stderr,
        )
        return 1
    app: subprocess.Popen[bytes] | None = None
    try:
        app = _start_app(port, upstream)
        app_url = f"http://{HOST}:{port}/"
        if not _wait_ready(app, app_url + "healthz", stop):
            if stop.is_set():
                return 0
            print(
                f"the FastAPI example did not start (exit code {app.poll()}); see its messages "
                "above. It needs `pip install fastapi uvicorn` (`make demo` installs them).",
                file=sys.stderr,
            )
            return 1
        actual = upstream.control_port
        flags = "" if actual == DEFAULT_CONTROL_PORT else f" --control-port {actual}"
        print(
            "\ngateway_guard demo\n"
            f"    app:       {app_url}   <- open this\n"
            f"    upstream:  {upstream.url}   (mode {upstream.mode.value})\n"
            f"    control:   {upstream.control_url}\n\n"
            f"{switch_help(upstream.control_url, demo_flags=flags)}\n\n"
            "Ctrl-C to stop.",
            flush=True,
        )
        while not stop.wait(0.5):  # until a signal, or the app dying on its own
            if app.poll() is not None:
                print(f"the app exited (code {app.returncode}); stopping", file=sys.stderr)
                return 1
        print("stopping...", flush=True)
        return 0
    finally:
        if app is not None:
            _stop_app(app)
        upstream.stop()


def _start_app(port: int, upstream: MisbehavingUpstream) -> subprocess.Popen[bytes]:
    env = {**os.environ, "UPSTREAM_CONTROL_URL": upstream.control_url}
    command = [
        sys.executable,
        str(HERE / "fastapi_app.py"),
        "--port",
        str(port),
        "--upstream-url",
        upstream.url,
    ]
    # Its own process group: a Ctrl-C in the terminal reaches only this process, which
    # then stops the app once, gracefully (a second SIGINT would make uvicorn force-quit).
    extra: dict[str, Any] = {"process_group": 0} if os.name == "posix" else {}
    return subprocess.Popen(command, env=env, **extra)


def _wait_ready(app: subprocess.Popen[bytes], url: str, stop: threading.Event) -> bool:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline and app.poll() is None and not stop.is_set():
        try:
            with _opener.open(url, timeout=1.0) as response:
                if response.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        stop.wait(0.1)
    return False


def _stop_app(app: subprocess.Popen[bytes]) -> None:
    if app.poll() is None:
        app.terminate()  # SIGTERM: uvicorn shuts down gracefully, the lifespan closes clients
        try:
            app.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            app.kill()
            app.wait(STOP_TIMEOUT)


def _busy_ports(*ports: tuple[str, int, str, str]) -> list[str]:
    """One line for each port that is taken: what it is, and how to move it."""
    return [
        f"port {number} ({what}) is in use; pick another with {flag} "
        f"(make demo {variable}=...), or 0 for any free port"
        for what, number, flag, variable in ports
        if number and not _port_free(number)
    ]


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        # As uvicorn does: a port held only by TIME_WAIT leftovers is free to use.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


if __name__ == "__main__":
    raise SystemExit(main())
