"""An answered gateway error is visible to Sentry (#14).

sentry_sdk.init() patches frameworks process-wide, so each case runs in its own Python
process: a real uvicorn or cheroot server, sentry-sdk with its default integrations and an
in-memory transport (no network), and a guarded client calling the misbehaving upstream.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import sentry_sdk

from gateway_guard.testing import MisbehavingUpstream

SRC = Path(__file__).resolve().parent.parent / "src"
TESTS = Path(__file__).resolve().parent

SCRIPT = """
import json, logging, os, sys
import httpx, sentry_sdk
from sentry_sdk.transport import Transport

events = []

class Memory(Transport):
    def capture_envelope(self, envelope):
        event = envelope.get_event()
        if event is not None:
            events.append(event)

if os.environ["SENTRY"] == "on":
    sentry_sdk.init(dsn="https://key@sentry.invalid/1", transport=Memory)

import gateway_guard as gg
from servers import serve_asgi, serve_wsgi

guard = gg.Guard({
    "upstreams": {"payments": {"base_url": os.environ["UPSTREAM"], "retry": {"attempts": 1}}},
    "routes": [{"path": "/orders/{id}"}],
})

async def asgi_app(scope, receive, send):
    if scope["type"] != "http":
        return
    async with guard.async_client("payments") as payments:
        await payments.get("/charge")

def wsgi_app(environ, start_response):
    with guard.client("payments") as payments:
        payments.get("/charge")

if os.environ["SERVER"] == "uvicorn":
    server = serve_asgi(gg.GatewayGuardMiddleware(asgi_app, guard=guard))
else:
    server = serve_wsgi(gg.GatewayGuardWSGI(wsgi_app, guard=guard))
with server as url:
    statuses = [httpx.get(f"{url}/orders/{n}").status_code for n in range(3)]
if os.environ["SENTRY"] == "on":
    sentry_sdk.flush(timeout=5)
print(json.dumps({"statuses": statuses, "events": events}, default=str))
"""


def _run(up: MisbehavingUpstream, server: str, sentry: str) -> dict[str, object]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SRC), str(TESTS)]),
        "UPSTREAM": up.url,
        "SERVER": server,
        "SENTRY": sentry,
    }
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr.decode()
    result: dict[str, object] = json.loads(done.stdout.decode().strip().splitlines()[-1])
    return result


@pytest.mark.parametrize("server", ["uvicorn", "cheroot"])
def test_a_gateway_502_becomes_one_grouped_sentry_event(
    server: str, upstream: MisbehavingUpstream
) -> None:
    upstream.set_mode("refuse")
    result = _run(upstream, server, "on")
    assert result["statuses"] == [502, 502, 502]
    events = [e for e in result["events"] if isinstance(e, dict)]  # type: ignore[attr-defined]
    # Throttled like the log line: one a second per upstream and error type.
    assert len(events) == 1, events
    [event] = events
    assert event["fingerprint"] == ["gateway_guard", "payments", "connection_refused"]
    assert event["level"] == "error"
    tags = event["tags"]
    assert tags["gateway_guard.upstream"] == "payments"
    assert tags["gateway_guard.proxy_error"] == "connection_refused"
    assert tags["gateway_guard.route"] == "/orders/{id}"
    assert len(tags["request_id"]) == 32
    [exception] = [v for v in event["exception"]["values"] if v["type"] == "UpstreamConnectError"]
    assert exception["module"] == "gateway_guard.errors"
    assert event["contexts"]["gateway_guard"]["method"] == "GET"


def test_without_sentry_init_nothing_is_captured_and_nothing_breaks(
    upstream: MisbehavingUpstream,
) -> None:
    upstream.set_mode("refuse")
    result = _run(upstream, "uvicorn", "off")
    assert result["statuses"] == [502, 502, 502]
    assert result["events"] == []


def test_the_sentry_api_we_use_exists() -> None:
    # The subprocesses use it; a missing or too old sentry-sdk fails here, clearly.
    assert callable(sentry_sdk.get_client().is_active)
    assert callable(sentry_sdk.capture_exception)


def test_importing_gateway_guard_never_imports_sentry_sdk() -> None:
    code = "import sys, gateway_guard, gateway_guard.log; print('sentry_sdk' in sys.modules)"
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": str(SRC)},
        capture_output=True,
        check=True,
    )
    assert done.stdout.strip() == b"False"
