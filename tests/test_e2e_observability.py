"""Metrics and traces after a real outage: real servers, the misbehaving upstream.

- uvicorn (in-process) serving an ASGI app behind GatewayGuardMiddleware with
  ``[metrics] path``: after the upstream fails, ``/metrics`` (parsed by prometheus_client's
  parser) shows the breaker open and the calls by outcome.
- gunicorn with 2 sync workers in prometheus_client's multiprocess mode: the same, with
  ``/metrics`` adding up both workers (each worker's successes reach its file within 1 s).
- uvicorn with ``[tracing] enabled``: the SDK's in-memory exporter sees one call span and
  three attempt spans (``http.request.resend_count`` 1 and 2) for a call retried twice.
"""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.trace import SpanKind
from prometheus_client.parser import text_string_to_metric_families

import gateway_guard as gg
from gateway_guard.testing import MisbehavingUpstream
from servers import GUNICORN_LISTENING, serve_asgi, server_process
from test_tracing import EXPORTER

pytestmark = pytest.mark.e2e

START_TIMEOUT = 30.0
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


def families(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            # Multiprocess "liveall"-style samples carry a pid label: summed away here.
            labels = tuple(sorted((k, v) for k, v in s.labels.items() if k != "pid"))
            found[(s.name, labels)] = found.get((s.name, labels), 0.0) + s.value
    return found


def sample(all_samples: dict[Any, float], name: str, **labels: str) -> float:
    return all_samples.get((name, tuple(sorted(labels.items()))), 0.0)


def settings(upstream_url: str, name: str, **more: Any) -> dict[str, Any]:
    return {
        "metrics": {"path": "/metrics"},
        "upstreams": {
            name: {
                "base_url": upstream_url,
                "retry": {"attempts": 1},
                "breaker": {
                    "min_calls": 2,
                    "window_size": 4,
                    "failure_rate": 0.5,
                    "open_seconds": 60.0,
                },
            }
        },
        **more,
    }


def make_app(guard: gg.Guard, upstream: str) -> Any:
    client = guard.async_client(upstream)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await client.aclose()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        response = await client.get("/item")
        await send({"type": "http.response.start", "status": response.status_code, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    return gg.GatewayGuardMiddleware(app, guard=guard)


def test_uvicorn_metrics_after_an_outage() -> None:
    name = "e2e_uvicorn"
    with MisbehavingUpstream() as up:
        guard = gg.Guard(settings(up.url, name))
        with serve_asgi(make_app(guard, name)) as url, httpx.Client(base_url=url) as client:
            for _ in range(3):
                assert client.get("/").status_code == 200
            up.set_mode("refuse")
            statuses = [client.get("/").status_code for _ in range(4)]
            assert statuses[:2] == [502, 502] and statuses[-1] == 503, statuses
            text = client.get("/metrics").text
    s = families(text)
    assert sample(s, "gateway_guard_breaker_state", upstream=name, state="open") == 1
    assert sample(s, "gateway_guard_breaker_state", upstream=name, state="closed") == 0
    assert sample(s, "gateway_guard_upstream_calls_total", upstream=name, outcome="success") == 3
    assert sample(s, "gateway_guard_upstream_calls_total", upstream=name, outcome="failure") == 2
    assert sample(s, "gateway_guard_upstream_calls_total", upstream=name, outcome="rejected") == 2
    errors = {"upstream": name, "proxy_error": "connection_refused", "status": ""}
    assert sample(s, "gateway_guard_upstream_failures_total", **errors) == 2
    transition = {"upstream": name, "from_state": "closed", "to_state": "open"}
    assert (
        sample(s, "gateway_guard_breaker_transitions_total", **transition, reason="failure_rate")
        == 1
    )


# --- gunicorn, 2 workers, multiprocess mode ---------------------------------------------------

GUNICORN_APP = """
import json, os

import httpx

import gateway_guard as gg

guard = gg.Guard(json.loads(os.environ["E2E_SETTINGS"]))
client = guard.client("multi")


def inner(environ, start_response):
    if environ["PATH_INFO"] == "/healthz":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]
    response = client.get("/item")
    start_response(f"{response.status_code} X", [("Content-Type", "text/plain")])
    return [b"ok"]


app = gg.GatewayGuardWSGI(inner, guard=guard)
"""

GUNICORN_CONFIG = """
from prometheus_client import multiprocess


def child_exit(server, worker):
    multiprocess.mark_process_dead(worker.pid)
"""


@contextmanager
def gunicorn(directory: Path, env: dict[str, str]) -> Iterator[str]:
    import gunicorn as _  # noqa: F401 - a dev dependency: missing, this fails, never skips

    (directory / "e2e_metrics_app.py").write_text(GUNICORN_APP, encoding="utf-8")
    (directory / "gunicorn_conf.py").write_text(GUNICORN_CONFIG, encoding="utf-8")
    path = os.pathsep.join(p for p in (str(directory), os.environ.get("PYTHONPATH")) if p)
    command = [sys.executable, "-m", "gunicorn", "--workers", "2", "--worker-class", "sync"]
    command += ["--bind", "127.0.0.1:0", "--timeout", "60", "-c", "gunicorn_conf.py"]
    command += ["e2e_metrics_app:app"]
    with server_process(command, cwd=directory, env={**os.environ, **env, "PYTHONPATH": path}) as (
        process,
        lines,
    ):
        yield _listening(lines, process)


def _listening(lines: queue.Queue[str], process: subprocess.Popen[str]) -> str:
    deadline = time.monotonic() + START_TIMEOUT
    seen: list[str] = []
    booted = 0
    url = None
    while time.monotonic() < deadline and process.poll() is None:
        try:
            line = lines.get(timeout=0.2)
        except queue.Empty:
            if url is not None and booted >= 2:
                break
            continue
        seen.append(line)
        match = GUNICORN_LISTENING.search(line)
        if match:
            url = match.group(1)
        booted += "Booting worker" in line
    if url is not None and booted >= 2:
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/healthz", timeout=2.0).status_code == 200:
                    return url
            except httpx.TransportError:
                time.sleep(0.05)
    raise RuntimeError("gunicorn did not start:\n" + "".join(seen[-20:]))


def test_gunicorn_two_workers_multiprocess_metrics(tmp_path: Path) -> None:
    import json

    metrics_dir = tmp_path / "prometheus"
    metrics_dir.mkdir()
    with MisbehavingUpstream() as up:
        env = {
            "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
            "E2E_SETTINGS": json.dumps(settings(up.url, "multi")),
        }
        with gunicorn(tmp_path, env) as url, httpx.Client(base_url=url, timeout=10.0) as client:
            # Concurrent and slow, so that both sync workers must take some: each worker
            # then writes its own counter file, and a scrape must add them up.
            up.set_mode("slow", delay_ms=300)
            with ThreadPoolExecutor(6) as pool:
                codes = list(pool.map(lambda _: httpx.get(f"{url}/", timeout=10.0), range(6)))
            ok = sum(r.status_code == 200 for r in codes)
            up.set_mode("refuse")
            outage = [client.get("/").status_code for _ in range(16)]
            # A worker's successes reach its file within a second (the one that answers
            # the scrape adds its own at once): wait that out, as a scrape interval does.
            time.sleep(1.0)
            first = families(client.get("/metrics").text)
            second = families(client.get("/metrics").text)
            pids = {p.name for p in metrics_dir.iterdir()}
    assert ok == 6
    assert set(outage) <= {502, 503} and 503 in outage
    # Whichever worker answers the scrape, it shows both workers' files: the same sums.
    for s in (first, second):
        assert sample(s, "gateway_guard_breaker_state", upstream="multi", state="open") == 1
        assert (
            sample(s, "gateway_guard_upstream_calls_total", upstream="multi", outcome="success")
            == 6
        )
        failed = sample(
            s, "gateway_guard_upstream_calls_total", upstream="multi", outcome="failure"
        )
        rejected = sample(
            s, "gateway_guard_upstream_calls_total", upstream="multi", outcome="rejected"
        )
        assert failed + rejected == 16 and failed >= 2 and rejected >= 1
        assert sample(s, "gateway_guard_upstream_attempts_total", upstream="multi") == 6 + failed
    assert len([p for p in pids if p.startswith("counter_")]) == 2  # one file per worker


# --- OpenTelemetry ---------------------------------------------------------------------------


def test_uvicorn_traces_a_call_retried_twice() -> None:
    EXPORTER.clear()
    name = "e2e_traced"
    with MisbehavingUpstream() as up:
        up.set_mode("status", status=503)
        guard = gg.Guard(
            {
                "tracing": {"enabled": True},
                "upstreams": {
                    name: {"base_url": up.url, "retry": {"attempts": 3, "backoff_initial": 0.01}}
                },
            }
        )
        traceparent = f"00-{TRACE_ID}-00f067aa0ba902b7-01"
        with serve_asgi(make_app(guard, name)) as url:
            response = httpx.get(url, headers={"traceparent": traceparent}, timeout=10.0)
        assert response.status_code == 502
    ours = [
        s
        for s in EXPORTER.get_finished_spans()
        if (s.attributes or {}).get("gateway_guard.upstream") == name
    ]
    calls = [s for s in ours if s.kind == SpanKind.INTERNAL]
    attempts = sorted(
        (s for s in ours if s.kind == SpanKind.CLIENT), key=lambda s: s.start_time or 0
    )
    assert len(calls) == 1 and len(attempts) == 3
    [call] = calls
    assert format(call.context.trace_id, "032x") == TRACE_ID  # the visitor's trace, continued
    assert all(a.parent is not None and a.parent.span_id == call.context.span_id for a in attempts)
    assert [(a.attributes or {}).get("http.request.resend_count") for a in attempts] == [None, 1, 2]
