"""The README's quickstart settings against a hung or busy upstream, on real servers (#15).

"Never worse than no guard" starts with the settings people copy: the TOML quickstart
(FastAPI under uvicorn, and Flask under gunicorn with ONE sync worker, where every second
a request hangs is a second no other visitor is served) and the Django quickstart's
defaults-only dict. With them, a visitor of a hung upstream gets the error page within
5 s, and an upstream's ``Retry-After`` that does not fit is handed to the visitor at once
instead of being waited out.

The settings are read from README.md itself, so the README cannot drift from what is
measured here. Everything listens on 127.0.0.1; every wait and loop is bounded.
"""

from __future__ import annotations

import ast
import os
import queue
import re
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

import gateway_guard as gg
from gateway_guard.testing.upstream import MisbehavingUpstream
from servers import START_TIMEOUT, serve_asgi

pytestmark = pytest.mark.e2e

README = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
# The visitor's patience the defaults are chosen for, and the sync worker's budget.
VISITOR_WAIT = 5.0
BREAKER_OPEN_WITHIN = 10.0
CLIENT_TIMEOUT = 15.0  # far above both: a hang of the app fails the test, not the run


def quickstart_toml(base_url: str) -> str:
    """The README's TOML quickstart, its payments upstream pointed at ``base_url``."""
    (block,) = [
        code
        for lang, code in re.findall(r"```(\w+)\n(.*?)```", README, flags=re.DOTALL)
        if lang == "toml" and "[upstreams.payments]" in code
    ]
    return re.sub(r'(?m)^base_url = "[^"\n]*"$', f'base_url = "{base_url}"', block)


def quickstart_settings(kind: str, base_url: str) -> dict[str, Any]:
    """``toml``: the TOML quickstart; ``django``: the Django quickstart's dict (defaults)."""
    if kind == "toml":
        return tomllib.loads(quickstart_toml(base_url))
    (literal,) = re.findall(r"(?m)^GATEWAY_GUARD = (\{.*\})$", README)
    settings: dict[str, Any] = ast.literal_eval(literal)
    settings["upstreams"]["payments"]["base_url"] = base_url
    return settings


# --- FastAPI under uvicorn, as in the README -------------------------------------------------


def fastapi_app(guard: gg.Guard) -> FastAPI:
    app = FastAPI()
    app.add_middleware(gg.GatewayGuardMiddleware, guard=guard)

    @app.get("/orders/{order_id}")
    async def order(order_id: str) -> Any:
        async with gg.current_guard().async_client("payments") as payments:
            return (await payments.get(f"/orders/{order_id}")).json()

    return app


@contextmanager
def fastapi_quickstart(kind: str, up: MisbehavingUpstream) -> Iterator[str]:
    guard = gg.Guard(quickstart_settings(kind, up.url))
    with serve_asgi(fastapi_app(guard)) as url:
        yield url


def timed_get(url: str, **kwargs: Any) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    response = httpx.get(url, timeout=CLIENT_TIMEOUT, **kwargs)
    return response, time.monotonic() - started


@pytest.fixture
def upstream() -> Iterator[MisbehavingUpstream]:
    with MisbehavingUpstream(hang_timeout=30.0) as up:
        yield up


@pytest.mark.parametrize("kind", ["toml", "django"])
def test_a_hung_upstream_gives_the_visitor_a_504_within_5_s(
    kind: str, upstream: MisbehavingUpstream
) -> None:
    upstream.set_mode("hang")
    with fastapi_quickstart(kind, upstream) as url:
        response, elapsed = timed_get(f"{url}/orders/42")

    assert response.status_code == 504
    assert elapsed < VISITOR_WAIT, f"the visitor waited {elapsed:.1f} s"


def test_an_upstream_retry_after_that_does_not_fit_is_handed_to_the_visitor(
    upstream: MisbehavingUpstream,
) -> None:
    # Before #15 this waited 5 s twice, then told the visitor to try again in 5 seconds.
    upstream.set_mode("status", status=503, retry_after="5")
    with fastapi_quickstart("toml", upstream) as url:
        upstream.reset_stats()
        response, elapsed = timed_get(f"{url}/orders/42", headers={"Accept": "text/html"})

    assert elapsed < 1.5, f"the visitor waited {elapsed:.1f} s"
    assert response.status_code in (502, 503)
    assert response.headers["retry-after"] == "5"
    assert "5 seconds" in response.text
    assert upstream.stats().requests == 1


# --- Flask under gunicorn, one sync worker ---------------------------------------------------

FLASK_APP = """
import os

from flask import Flask

from gateway_guard.flask import GatewayGuard

app = Flask(__name__)
app.config["GATEWAY_GUARD"] = os.environ["QUICKSTART_SETTINGS"]
ext = GatewayGuard(app)


@app.get("/orders/<order_id>")
def order(order_id):
    with ext.guard.client("payments") as payments:
        return payments.get(f"/orders/{order_id}").json()


@app.get("/healthz")
def healthz():
    return "ok"
"""


@contextmanager
def gunicorn_quickstart(up: MisbehavingUpstream, directory: Path) -> Iterator[str]:
    """The Flask quickstart under gunicorn with one sync worker; yields its base URL."""
    # A dev dependency (pyproject.toml): missing, this fails rather than skips, as every
    # end-to-end server must under CI.
    import gunicorn  # noqa: F401

    (directory / "quickstart_flask.py").write_text(FLASK_APP, encoding="utf-8")
    settings = directory / "gateway_guard.toml"
    settings.write_text(quickstart_toml(up.url), encoding="utf-8")
    path = os.pathsep.join(p for p in (str(directory), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path, "QUICKSTART_SETTINGS": str(settings)}
    command = [sys.executable, "-m", "gunicorn", "--workers", "1", "--worker-class", "sync"]
    command += ["--bind", "127.0.0.1:0", "--timeout", "60", "quickstart_flask:app"]
    process = subprocess.Popen(
        command, cwd=directory, env=env, stderr=subprocess.PIPE, text=True, errors="replace"
    )
    lines: queue.Queue[str] = queue.Queue()

    def drain() -> None:  # also keeps the pipe from filling up while the server runs
        assert process.stderr is not None
        for line in process.stderr:
            lines.put(line)

    reader = threading.Thread(target=drain, name="gunicorn-stderr", daemon=True)
    reader.start()
    try:
        url = _listening_url(lines, process)
        yield url
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


def _listening_url(lines: queue.Queue[str], process: subprocess.Popen[str]) -> str:
    deadline = time.monotonic() + START_TIMEOUT
    seen: list[str] = []
    while time.monotonic() < deadline and process.poll() is None:
        try:
            line = lines.get(timeout=0.2)
        except queue.Empty:
            continue
        seen.append(line)
        match = re.search(r"Listening at: (http://127\.0\.0\.1:\d+)", line)
        if match:
            # The worker boots after the arbiter listens: wait until it answers.
            url = match.group(1)
            while time.monotonic() < deadline:
                try:
                    if httpx.get(f"{url}/healthz", timeout=2.0).status_code == 200:
                        return url
                except httpx.TransportError:
                    time.sleep(0.05)
    raise RuntimeError("gunicorn did not start:\n" + "".join(seen[-20:]))


def test_gunicorn_sync_worker_gives_the_visitor_a_504_within_5_s(
    upstream: MisbehavingUpstream, tmp_path: Path
) -> None:
    with gunicorn_quickstart(upstream, tmp_path) as url:
        upstream.set_mode("hang")
        response, elapsed = timed_get(f"{url}/orders/42")

    assert response.status_code == 504
    assert elapsed < VISITOR_WAIT, f"the visitor waited {elapsed:.1f} s"


def test_gunicorn_sync_worker_breaker_opens_within_10_s(
    upstream: MisbehavingUpstream, tmp_path: Path
) -> None:
    with gunicorn_quickstart(upstream, tmp_path) as url:
        upstream.set_mode("hang")
        started = time.monotonic()
        opened_after: float | None = None
        # One visitor after another (one sync worker serves them one at a time anyway),
        # until the breaker answers for the upstream, or the budget is clearly spent.
        while opened_after is None and time.monotonic() - started < BREAKER_OPEN_WITHIN + 1:
            response, _ = timed_get(f"{url}/orders/42")
            if "destination_unavailable" in response.headers.get("proxy-status", ""):
                opened_after = time.monotonic() - started
            else:
                assert response.status_code == 504
        # Open, the worker is free again at once for a route that calls no upstream.
        healthz, healthz_elapsed = timed_get(f"{url}/healthz")

    assert opened_after is not None and opened_after < BREAKER_OPEN_WITHIN, (
        f"the breaker was not open after {time.monotonic() - started:.1f} s"
    )
    assert healthz.status_code == 200 and healthz_elapsed < 0.5
