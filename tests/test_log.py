"""Log lines that name the request (#14, #16): the filter, the setups, the gateway-error line.

Real loggers throughout: records go through real handlers (caplog's, or a server's own
stderr), apps run under real uvicorn and cheroot servers, and the upstream is the
misbehaving one on loopback.
"""

from __future__ import annotations

import asyncio
import contextvars
import io
import json
import logging
import logging.config
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import gateway_guard as gg
from gateway_guard.log import FORMAT, RequestContextFilter, dict_config, install, safe_path
from gateway_guard.testing import MisbehavingUpstream
from servers import serve_asgi, serve_wsgi

SRC = Path(__file__).resolve().parent.parent / "src"


@pytest.fixture
def request_filter(caplog: pytest.LogCaptureFixture) -> Iterator[RequestContextFilter]:
    """caplog's handler with the filter on it, as a user's handler would have it."""
    request_filter = RequestContextFilter()
    caplog.handler.addFilter(request_filter)
    caplog.set_level(logging.INFO)
    try:
        yield request_filter
    finally:
        caplog.handler.removeFilter(request_filter)


def _fields(record: logging.LogRecord) -> tuple[str, str, str]:
    return (record.request_id, record.route, record.upstream)  # type: ignore[attr-defined]


def _records(caplog: pytest.LogCaptureFixture, name: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == name]


# --- the filter -------------------------------------------------------------------------------


def test_outside_a_request_every_field_is_a_dash(
    caplog: pytest.LogCaptureFixture, request_filter: RequestContextFilter
) -> None:
    logging.getLogger("shop").warning("boot")
    [record] = _records(caplog, "shop")
    assert _fields(record) == ("-", "-", "-")


def test_a_field_the_record_already_has_is_kept(
    caplog: pytest.LogCaptureFixture, request_filter: RequestContextFilter
) -> None:
    logging.getLogger("shop").warning("mine", extra={"upstream": "search"})
    [record] = _records(caplog, "shop")
    assert record.upstream == "search"  # type: ignore[attr-defined]


def _asgi_shop(up: MisbehavingUpstream) -> gg.GatewayGuardMiddleware:
    """An ASGI app that logs from the request, a copied-context thread and a task."""
    guard = gg.Guard(
        {
            "upstreams": {"payments": {"base_url": up.url, "retry": {"attempts": 1}}},
            "routes": [{"path": "/orders/{id}", "name": "orders"}],
        }
    )
    log = logging.getLogger("shop")

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        log.info("before the call")
        async with guard.async_client("payments") as payments:
            await payments.get("/charge")
        log.info("after the call")
        context = contextvars.copy_context()
        thread = threading.Thread(target=context.run, args=(log.info, "from a thread"))
        thread.start()
        thread.join(5)
        await asyncio.create_task(_log_later(log))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    return gg.GatewayGuardMiddleware(app, guard=guard)


async def _log_later(log: logging.Logger) -> None:
    await asyncio.sleep(0)
    log.info("from a task")


def test_records_of_an_asgi_request_name_it_in_threads_and_tasks(
    caplog: pytest.LogCaptureFixture,
    request_filter: RequestContextFilter,
    upstream: MisbehavingUpstream,
) -> None:
    with serve_asgi(_asgi_shop(upstream)) as url:
        response = httpx.get(f"{url}/orders/7", headers={"X-Request-ID": "req-asgi-1"})
    assert response.status_code == 200
    by_message = {r.getMessage(): _fields(r) for r in _records(caplog, "shop")}
    assert by_message == {
        "before the call": ("req-asgi-1", "orders", "-"),
        "after the call": ("req-asgi-1", "orders", "payments"),
        "from a thread": ("req-asgi-1", "orders", "payments"),
        "from a task": ("req-asgi-1", "orders", "payments"),
    }
    # httpx's own line, logged inside the guarded call, names the upstream too.
    [httpx_line] = [r for r in _records(caplog, "httpx") if "/charge" in r.getMessage()]
    assert _fields(httpx_line) == ("req-asgi-1", "orders", "payments")


def test_records_of_a_wsgi_request_name_it(
    caplog: pytest.LogCaptureFixture,
    request_filter: RequestContextFilter,
    upstream: MisbehavingUpstream,
) -> None:
    guard = gg.Guard({"upstreams": {"payments": {"base_url": upstream.url}}})
    log = logging.getLogger("shop")

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        log.info("in the view")
        with guard.client("payments") as payments:
            payments.get("/charge")
        log.info("after the call")
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    with serve_wsgi(gg.GatewayGuardWSGI(app, guard=guard)) as url:
        response = httpx.get(f"{url}/raw/path", headers={"X-Request-ID": "req-wsgi-1"})
    assert response.status_code == 200
    by_message = {r.getMessage(): _fields(r) for r in _records(caplog, "shop")}
    # Outside every [[routes]] entry: the raw path.
    assert by_message == {
        "in the view": ("req-wsgi-1", "/raw/path", "-"),
        "after the call": ("req-wsgi-1", "/raw/path", "payments"),
    }


def test_install_adds_the_filter_once_and_keeps_the_handlers_formatter() -> None:
    logger = logging.getLogger("gateway-guard-test-install")
    handler = logging.StreamHandler()
    formatter = logging.Formatter("%(message)s")
    handler.setFormatter(formatter)
    logger.addHandler(handler)
    try:
        first = install(logger)
        assert install(logger) is first
        assert handler.filters == [first]
        assert handler.formatter is formatter
        install(logger, format=FORMAT)
        assert handler.formatter is not None and handler.formatter._fmt == FORMAT
    finally:
        logger.removeHandler(handler)


def test_dict_config_is_plain_json_and_applies(tmp_path: Path) -> None:
    config = dict_config("DEBUG", loggers={"shop": {"level": "WARNING"}})
    assert json.loads(json.dumps(config)) == config  # uvicorn --log-config takes JSON
    assert config["loggers"]["shop"] == {"level": "WARNING"}
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        logging.config.dictConfig(config)
        [handler] = [h for h in root.handlers if h.name == "gateway_guard"]
        assert any(isinstance(f, RequestContextFilter) for f in handler.filters)
    finally:
        for handler in root.handlers[:]:
            if handler not in saved[0]:
                root.removeHandler(handler)
                handler.close()
        root.setLevel(saved[1])


def test_safe_path_escapes_and_bounds() -> None:
    assert safe_path("/orders/7") == "/orders/7"
    assert safe_path("/a\r\nFAKE LINE\x1b[31m") == "/a\\r\\nFAKE LINE\\x1b[31m"
    long = safe_path("/" + "x" * 5000)
    assert len(long) == 200 and long.endswith("\u2026")


# --- the gateway-error line -------------------------------------------------------------------


def test_gateway_error_is_one_warning_without_traceback_naming_the_route(
    caplog: pytest.LogCaptureFixture, upstream: MisbehavingUpstream
) -> None:
    caplog.set_level(logging.INFO, logger="gateway_guard")
    upstream.set_mode("refuse")
    with serve_asgi(_asgi_shop(upstream)) as url:
        response = httpx.get(f"{url}/orders/7", headers={"X-Request-ID": "req-502"})
    assert response.status_code == 502
    [record] = [r for r in _records(caplog, "gateway_guard") if "gateway error" in r.msg]
    assert record.levelno == logging.WARNING
    assert record.exc_info is None
    message = record.getMessage()
    assert message.startswith("gateway error 502 connection_refused on GET orders ")
    assert "(upstream payments, request req-502, 1 attempt(s)" in message
    assert (record.method, record.route, record.path) == ("GET", "orders", "/orders/7")  # type: ignore[attr-defined]


def test_unguarded_client_outside_routes_names_method_raw_path_and_host(
    caplog: pytest.LogCaptureFixture, upstream: MisbehavingUpstream
) -> None:
    caplog.set_level(logging.INFO, logger="gateway_guard")
    upstream.set_mode("refuse")
    guard = gg.Guard({})

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        async with httpx.AsyncClient() as plain:  # not guarded
            await plain.get(f"{upstream.url}/x")

    evil = "/search/%0d%0aINJECTED" + "/y" * 400
    with serve_asgi(gg.GatewayGuardMiddleware(app, guard=guard)) as url:
        response = httpx.get(f"{url}{evil}")
    assert response.status_code == 502
    [record] = [r for r in _records(caplog, "gateway_guard") if "gateway error" in r.msg]
    message = record.getMessage()
    assert "\n" not in message and "\r" not in message
    assert message.startswith(
        "gateway error 502 connection_refused on GET /search/\\r\\nINJECTED/y"
    )
    host = upstream.url.removeprefix("http://")
    assert f"(upstream - at {host}, request " in message
    assert len(record.path) == 200  # type: ignore[attr-defined]
    assert record.exc_info is None


def test_debug_keeps_the_traceback(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gateway_guard")
    error = gg.UpstreamConnectError("refused", upstream="up", proxy_error="connection_refused")

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            raise error

    with serve_asgi(gg.GatewayGuardMiddleware(app, settings={"debug": True})) as url:
        assert httpx.get(f"{url}/x").status_code == 502
    [record] = [r for r in _records(caplog, "gateway_guard") if "gateway error" in r.msg]
    assert record.levelno == logging.WARNING
    assert record.exc_info is not None and record.exc_info[1] is error


# --- real server output -----------------------------------------------------------------------

UVICORN_APP = """
import logging, os
import gateway_guard as gg

guard = gg.Guard({
    "upstreams": {"payments": {"base_url": os.environ["UPSTREAM"]}},
    "routes": [{"path": "/orders/{id}"}],
})
log = logging.getLogger("shop")

async def shop(scope, receive, send):
    if scope["type"] != "http":
        return
    log.warning("charging the order")
    async with guard.async_client("payments") as payments:
        await payments.get("/charge")
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})

app = gg.GatewayGuardMiddleware(shop, guard=guard)
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _uvicorn_output(directory: Path, upstream: MisbehavingUpstream, *extra: str) -> str:
    """Run the app under a real uvicorn process, make one failing request, return stderr."""
    (directory / "shop_app.py").write_text(UVICORN_APP, encoding="utf-8")
    port = _free_port()
    path = os.pathsep.join([str(directory), str(SRC)])
    env = {**os.environ, "PYTHONPATH": path, "UPSTREAM": upstream.url}
    command = [sys.executable, "-m", "uvicorn", "shop_app:app", "--port", str(port), *extra]
    process = subprocess.Popen(
        command, cwd=directory, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                response = httpx.get(
                    f"http://127.0.0.1:{port}/orders/7", headers={"X-Request-ID": "req-uv-1"}
                )
                break
            except httpx.TransportError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise
                time.sleep(0.1)
        assert response.status_code == 502
    finally:
        process.terminate()
        try:
            _, err = process.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            _, err = process.communicate(timeout=10)
    return err.decode("utf-8", "replace")


def test_uvicorn_without_logging_setup_prints_one_line_and_no_traceback(
    tmp_path: Path, upstream: MisbehavingUpstream
) -> None:
    upstream.set_mode("refuse")
    output = _uvicorn_output(tmp_path, upstream)
    assert "Traceback" not in output, output
    lines = [line for line in output.splitlines() if "gateway error" in line]
    assert lines == [
        line for line in lines if line.startswith("gateway error 502 connection_refused on GET ")
    ]
    assert len(lines) == 1, output
    assert "/orders/{id}" in lines[0] and "upstream payments" in lines[0]


def test_uvicorn_log_config_from_the_cli_names_each_line_s_request(
    tmp_path: Path, upstream: MisbehavingUpstream
) -> None:
    upstream.set_mode("refuse")
    config = subprocess.run(
        [sys.executable, "-m", "gateway_guard.cli", "log-config"],
        env={**os.environ, "PYTHONPATH": str(SRC)},
        capture_output=True,
        check=True,
    ).stdout
    (tmp_path / "logging.json").write_bytes(config)
    output = _uvicorn_output(tmp_path, upstream, "--log-config", "logging.json")
    assert "Traceback" not in output, output
    app_line = re.search(r"WARNING \[(\S+) (\S+) (\S+)\] shop: charging the order", output)
    assert app_line is not None, output
    assert app_line.groups() == ("req-uv-1", "/orders/{id}", "-")
    error_line = re.search(
        r"WARNING \[req-uv-1 /orders/\{id\} payments\] gateway_guard: gateway error 502 "
        r"connection_refused on GET /orders/\{id\}",
        output,
    )
    assert error_line is not None, output
    # uvicorn's own lines go through the same handler: outside a request, dashes.
    assert re.search(r"INFO \[- - -\] uvicorn.error: Application startup complete", output)

    access = re.search(r"INFO \[req-uv-1 /orders/\{id\} payments\] uvicorn.access: ", output)
    assert access is not None, output


# --- the documented snippets run as written -----------------------------------------------------

DOC = Path(__file__).resolve().parent.parent / "docs" / "logging.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), re.DOTALL)


def test_the_documented_setups_run_and_attach_the_filter() -> None:
    django_block, flask_block, anything_block = _python_blocks()
    namespace: dict[str, Any] = {}
    exec(compile(django_block, "logging.md:django", "exec"), namespace)
    logging_config = namespace["LOGGING"]
    handler = logging_config["handlers"]["gateway_guard"]
    assert logging_config["filters"][handler["filters"][0]]["()"] == (
        "gateway_guard.log.RequestContextFilter"
    )

    namespace = {"__name__": "docs_flask_app"}
    exec(compile(flask_block, "logging.md:flask", "exec"), namespace)
    app = namespace["app"]
    [flask_handler] = app.logger.handlers
    assert any(isinstance(f, RequestContextFilter) for f in flask_handler.filters)
    try:
        flask_handler.stream = io.StringIO()

        @app.get("/hello")
        def hello() -> str:
            app.logger.warning("hello from the view")
            return "ok"

        # Closed, as a server closes it: the request context ends with the body.
        app.test_client().get("/hello", headers={"X-Request-ID": "req-flask-doc"}).close()
        line = flask_handler.stream.getvalue()
        assert "WARNING [req-flask-doc /hello -] docs_flask_app: hello from the view" in line
    finally:
        flask_handler.stream = sys.stderr
        for f in list(flask_handler.filters):
            flask_handler.removeFilter(f)

    root = logging.getLogger()
    saved = root.handlers[:]
    try:
        exec(compile(anything_block, "logging.md:any", "exec"), {})
        assert all(
            any(isinstance(f, RequestContextFilter) for f in h.filters) for h in root.handlers
        )
    finally:
        for h in root.handlers[:]:
            for f in [f for f in h.filters if isinstance(f, RequestContextFilter)]:
                h.removeFilter(f)
            if h not in saved:
                root.removeHandler(h)


def test_a_configuration_error_is_ours_error_with_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="gateway_guard")
    error = gg.UpstreamConfigError("bad base_url", upstream="up")

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            raise error

    with serve_asgi(gg.GatewayGuardMiddleware(app, settings={})) as url:
        assert httpx.get(f"{url}/x").status_code == 500
    [record] = [r for r in _records(caplog, "gateway_guard") if "gateway error" in r.msg]
    assert record.levelno == logging.ERROR
    assert record.exc_info is not None and record.exc_info[1] is error
