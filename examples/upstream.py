"""Run the misbehaving upstream that the examples call as their ``catalog`` service.

    python examples/upstream.py                        # data on 9101, control on 9102
    python examples/upstream.py --port 9201 --control-port 9202 --mode flaky

Ctrl-C (or SIGTERM) stops it. The server is :mod:`gateway_guard.testing.upstream` (this is a
thin launcher with the examples' ports; ``python -m gateway_guard.testing.upstream --help``
has every option, TLS included). Everything binds 127.0.0.1 only.

Switch its behaviour while it runs, from another terminal::

    python examples/demo.py mode hang                  # or: refuse, reset, garbage, ...
    curl -s -X POST http://127.0.0.1:9102/mode -d '{"mode": "hang"}'

:func:`control` and :func:`switch_help` are also used by ``examples/demo.py``.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

from gateway_guard.testing.upstream import MisbehavingUpstream, Mode

DEFAULT_PORT = 9101
DEFAULT_CONTROL_PORT = 9102
CONTROL_TIMEOUT = 5.0

# Loopback only, so proxies from the environment (http_proxy...) must not apply.
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class ControlError(Exception):
    """The control API could not be reached, or refused the request."""


def control(control_url: str, path: str, payload: dict[str, Any] | None = None) -> Any:
    """Call the upstream's control API: GET ``path``, or POST ``payload`` as JSON."""
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(
        control_url + path,
        data=data,
        method="GET" if data is None else "POST",
        headers={"Content-Type": "application/json"},
    )
    try:
        with _opener.open(request, timeout=CONTROL_TIMEOUT) as response:
            return json.load(response)
    except urllib.error.HTTPError as exc:  # 400: a bad mode or option, with the reason
        with exc:
            try:
                reason = json.load(exc).get("error", exc.reason)
            except ValueError:
                reason = exc.reason
        raise ControlError(f"the upstream refused: {reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise ControlError(
            f"cannot reach the upstream's control API at {control_url} ({exc}); is it running?"
        ) from None


def switch_help(control_url: str, *, demo_flags: str = "") -> str:
    """The commands that switch the upstream's mode, for a banner."""
    modes = ", ".join(m.value for m in Mode)
    return f"""\
Switch the upstream's mode ({modes}):
    python examples/demo.py mode hang{demo_flags}
    python examples/demo.py mode status --status 503 --retry-after 5{demo_flags}
    python examples/demo.py mode ok{demo_flags}
or with curl:
    curl -s {control_url}/mode
    curl -s -X POST {control_url}/mode -H 'content-type: application/json' -d '{{"mode": "hang"}}'
    curl -s -X POST {control_url}/mode -H 'content-type: application/json' \\
         -d '{{"mode": "flaky", "failure_percent": 50}}'
    curl -s {control_url}/stats"""


def stop_event() -> threading.Event:
    """An event set by SIGINT (Ctrl-C), SIGTERM or SIGHUP (the terminal closed), so all
    of them shut down the same clean way. Call it from the main thread."""
    stop = threading.Event()

    def handler(signum: int, frame: object) -> None:
        stop.set()

    for name in ("SIGINT", "SIGTERM", "SIGHUP"):
        if hasattr(signal, name):  # no SIGHUP on Windows
            signal.signal(getattr(signal, name), handler)
    return stop


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python examples/upstream.py",
        description="The misbehaving upstream the gateway_guard examples call (127.0.0.1).",
    )
    parser.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help=f"data port (default {DEFAULT_PORT})"
    )
    parser.add_argument(
        "--control-port",
        type=int,
        default=DEFAULT_CONTROL_PORT,
        help=f"control port (default {DEFAULT_CONTROL_PORT})",
    )
    parser.add_argument(
        "--mode", choices=[m.value for m in Mode], default="ok", help="initial mode (default ok)"
    )
    args = parser.parse_args(argv)
    stop = stop_event()
    upstream = MisbehavingUpstream(port=args.port, control_port=args.control_port, mode=args.mode)
    try:
        upstream.start()
    except RuntimeError as exc:
        print(f"cannot start the upstream: {exc.__cause__ or exc}", file=sys.stderr)
        return 1
    try:
        port = upstream.control_port
        flags = "" if port == DEFAULT_CONTROL_PORT else f" --control-port {port}"
        print(
            f"misbehaving upstream, mode {upstream.mode.value}\n"
            f"    data:    {upstream.url}\n"
            f"    control: {upstream.control_url}\n\n"
            f"{switch_help(upstream.control_url, demo_flags=flags)}\n\n"
            "Ctrl-C to stop.",
            flush=True,
        )
        while not stop.wait(1.0):  # until a signal; the timeout only keeps signals prompt
            pass
    finally:
        upstream.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
