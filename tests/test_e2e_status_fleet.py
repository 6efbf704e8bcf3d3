"""The status page of a fleet (#14): gunicorn sync workers sharing one real Redis.

One worker answers a gateway error from the misbehaving upstream; the status page, asked
again and again on new connections (so whichever worker takes each one answers), finds
the visitor's reference every time and lists every live worker. With Redis killed the
page still answers, with the answering worker's numbers and a note. Then headless
Chromium renders the Fleet section (screenshots, console, axe-core). Everything listens
on 127.0.0.1; every wait and loop is bounded.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from browser import Browser, chromium
from gateway_guard.testing.upstream import MisbehavingUpstream
from redis_server import RedisServer, redis_server
from servers import listening_url, server_process

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(120)]
STARTUP = 60.0
WORKERS = 3
STATUS = "/_gateway_guard"
JSON = {"Accept": "application/json"}

SETTINGS = """
service = "shop"

[status]
path = "{status}"

[state]
backend = "redis"
redis_url = "{redis}"
key_prefix = "gateway_guard:e2e-status"

[upstreams.up]
base_url = "{upstream}"

[upstreams.up.retry]
attempts = 1
"""

APP = """
import json
import os
from flask import Flask
from gateway_guard.flask import GatewayGuard

app = Flask(__name__)
app.config["GATEWAY_GUARD"] = os.environ["FLEET_SETTINGS"]
ext = GatewayGuard(app)
client = ext.guard.client("up")


@app.get("/call")
def call():
    return client.get("/x").text


@app.get("/healthz")
def healthz():
    return "ok"
"""


@dataclass
class Site:
    url: str
    arbiter: int
    redis: RedisServer
    upstream: MisbehavingUpstream

    def workers(self) -> set[int]:
        """The arbiter's live worker processes, as the kernel knows them."""
        path = Path(f"/proc/{self.arbiter}/task/{self.arbiter}/children")
        return {int(pid) for pid in path.read_text().split()}


def _until(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.05)


@contextmanager
def _gunicorn(directory: Path, env: dict[str, str]) -> Iterator[tuple[str, int]]:
    command = [
        *(sys.executable, "-m", "gunicorn", "--workers", str(WORKERS)),
        *("--worker-class", "sync", "--bind", "127.0.0.1:0"),
        *("--timeout", "30", "--graceful-timeout", "2", "fleet_status_app:app"),
    ]
    with server_process(command, cwd=directory, env=env) as (process, lines):
        yield (
            listening_url(process, lines, timeout=STARTUP),
            process.pid,
        )


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    import gunicorn  # noqa: F401 - a dev dependency: missing, this fails rather than skips

    directory = tmp_path_factory.mktemp("fleet-status")
    (directory / "fleet_status_app.py").write_text(APP, encoding="utf-8")
    with ExitStack() as stack:
        redis = stack.enter_context(redis_server())
        upstream = stack.enter_context(MisbehavingUpstream())
        settings = directory / "gateway_guard.toml"
        settings.write_text(
            SETTINGS.format(status=STATUS, redis=redis.url, upstream=upstream.url),
            encoding="utf-8",
        )
        path = os.pathsep.join(p for p in (str(directory), os.environ.get("PYTHONPATH")) if p)
        env = {**os.environ, "PYTHONPATH": path, "FLEET_SETTINGS": str(settings)}
        url, arbiter = stack.enter_context(_gunicorn(directory, env))
        site = Site(url, arbiter, redis, upstream)
        _until(lambda: len(site.workers()) == WORKERS, STARTUP, "every worker forked")
        _until(lambda: _healthy(url), STARTUP, "the app answering")
        _every_worker_seen(site, 15.0)
        yield site


def _fresh(url: str, headers: dict[str, str] | None = None) -> httpx.Response:
    """One GET on a new connection: whichever worker accepts it answers."""
    with httpx.Client(timeout=10.0) as client:
        return client.get(url, headers=headers)


def _healthy(url: str) -> bool:
    try:
        return _fresh(f"{url}/healthz").status_code == 200
    except httpx.TransportError:
        return False


def _lists_every_worker(site: Site) -> bool:
    data = _fresh(f"{site.url}{STATUS}", JSON).json()
    return {p["pid"] for p in data["fleet"]["processes"]} == site.workers()


def _every_worker_seen(site: Site, timeout: float) -> None:
    # Every worker's store connected and seen by the one that answered; then one more
    # heartbeat (1 s), after which every worker's own view has read every other's entry.
    _until(lambda: _lists_every_worker(site), timeout, "every worker in the fleet view")
    time.sleep(1.2)


def test_every_worker_finds_the_reference_and_lists_the_fleet(site: Site) -> None:
    site.upstream.set_mode("status", status=503)
    try:
        answered = _fresh(f"{site.url}/call", JSON)
    finally:
        site.upstream.set_mode("ok")
    assert answered.status_code == 502
    reference = answered.headers["x-request-id"]
    time.sleep(0.3)  # the recording worker's thread shares it within 100 ms

    def ask(_: int) -> tuple[int, dict[str, Any], httpx.Response]:
        data = _fresh(f"{site.url}{STATUS}", JSON).json()
        return data["process"]["pid"], data, _fresh(f"{site.url}{STATUS}/errors/{reference}", JSON)

    answers: dict[int, int] = {}
    workers = site.workers()
    # Three at a time, so a busy worker leaves the next connection to another; bounded.
    with ThreadPoolExecutor(3) as pool:
        for _ in range(10):
            for pid, data, lookup in pool.map(ask, range(6)):
                answers[pid] = answers.get(pid, 0) + 1
                assert lookup.status_code == 200, (pid, lookup.text)
                assert lookup.json()["reference"] == reference
                assert data["recent_errors_scope"] == "fleet"
                assert reference in [e["reference"] for e in data["recent_errors"]]
                assert data["fleet"]["available"] is True
                assert {p["pid"] for p in data["fleet"]["processes"]} == workers, json.dumps(data)
                assert data["upstreams"]["up"]["fleet"]["processes"] == WORKERS
            if len(answers) == WORKERS:
                break
    print(f"status page answers by worker: {answers}")
    assert set(answers) <= workers
    assert len(answers) >= 2, answers  # different workers answered, and agreed


def test_with_redis_killed_the_page_answers_with_local_data(site: Site) -> None:
    site.redis.stop()
    try:
        time.sleep(1.5)  # a heartbeat: every worker's store has noticed
        for _ in range(6):
            started = time.perf_counter()
            page = _fresh(f"{site.url}{STATUS}", JSON)
            took = time.perf_counter() - started
            assert page.status_code == 200
            data = page.json()
            assert data["fleet"]["available"] is False
            assert "fleet data unavailable" in data["note"]
            assert f"(pid {data['process']['pid']}) only" in data["note"]
            assert data["recent_errors_scope"] == "process"
            assert data["upstreams"]["up"]["state"] in ("closed", "open")
            assert took < 1.0, took
    finally:
        site.redis.start()
    _every_worker_seen(site, 10.0)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with chromium() as b:
        yield b


def test_the_fleet_section_in_chromium(site: Site, browser: Browser) -> None:
    url = f"{site.url}{STATUS}"
    workers = site.workers()
    for size in ((1280, 800), (390, 844)):
        browser.open(url, size=size)

        def rendered() -> bool:
            text = str(browser.driver.find_element("id", "processes").text)
            return all(str(pid) in text for pid in workers)

        _until(rendered, 10.0, "every worker in the processes table")
        fleet = browser.driver.find_element("id", "fleet-upstreams").text
        assert fleet.startswith("up")
        scope = browser.driver.find_element("id", "scope").text
        assert scope.startswith("Answered by process")
        assert browser.console_errors(url) == []
        violations = browser.axe_violations()
        assert violations == [], [(v["id"], v["impact"], v["help"]) for v in violations]
        browser.screenshot(f"status-page-fleet-{size[0]}w")
