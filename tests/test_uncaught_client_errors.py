"""Uncaught errors of unguarded clients become gateway errors (``as_upstream_error``), from
real exceptions raised by real sockets: requests, urllib3, aiohttp and httpx transport
failures, and ``raise_for_status()`` for a 5xx (a 4xx stays the app's error).
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
from collections.abc import Iterator

import aiohttp
import httpx
import pytest
import requests

import gateway_guard as gg
from gateway_guard.context import RequestContext
from gateway_guard.inbound import as_upstream_error
from gateway_guard.inbound._errors import log_gateway_error
from gateway_guard.testing.upstream import MisbehavingUpstream

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def upstream() -> Iterator[MisbehavingUpstream]:
    with MisbehavingUpstream() as up:
        yield up


def requests_error(url: str, raise_for_status: bool = False) -> BaseException:
    try:
        response = requests.get(url, timeout=5)
        if raise_for_status:
            response.raise_for_status()
    except Exception as exc:
        return exc
    pytest.fail("no error")


def aiohttp_error(url: str, raise_for_status: bool = False) -> BaseException:
    async def go() -> BaseException | None:
        async with aiohttp.ClientSession() as s:
            try:
                async with s.get(url) as r:
                    if raise_for_status:
                        r.raise_for_status()
                    await r.read()
            except Exception as exc:
                return exc
        return None

    exc = asyncio.run(go())
    assert exc is not None
    return exc


@pytest.mark.parametrize(
    ("mode", "proxy_error"),
    [
        ("refuse", "connection_refused"),
        ("reset", "connection_terminated"),
        ("garbage", "http_protocol_error"),
        ("truncated", "http_response_incomplete"),
    ],
)
@pytest.mark.parametrize("client", ["requests", "aiohttp"])
def test_transport_failures_are_gateway_errors(
    upstream: MisbehavingUpstream, client: str, mode: str, proxy_error: str
) -> None:
    upstream.set_mode(mode)
    try:
        exc = (requests_error if client == "requests" else aiohttp_error)(upstream.url)
    finally:
        upstream.set_mode("ok")
    error = as_upstream_error(exc)
    assert error is not None, repr(exc)
    assert (error.status, error.proxy_error) == (502, proxy_error)
    assert error.__cause__ is exc


@pytest.mark.parametrize("client", ["requests", "aiohttp", "httpx"])
def test_raise_for_status_5xx_is_a_gateway_error_4xx_is_not(
    upstream: MisbehavingUpstream, client: str
) -> None:
    def raised(status: int) -> BaseException:
        upstream.set_mode("status", status=status, retry_after="4")
        try:
            if client == "requests":
                return requests_error(upstream.url, raise_for_status=True)
            if client == "aiohttp":
                return aiohttp_error(upstream.url, raise_for_status=True)
            try:
                httpx.get(upstream.url).raise_for_status()
            except httpx.HTTPStatusError as exc:
                return exc
            pytest.fail("no error")
        finally:
            upstream.set_mode("ok")

    error = as_upstream_error(raised(503))
    assert isinstance(error, gg.UpstreamStatusError)
    assert (error.status, error.proxy_error, error.received_status) == (502, None, 503)
    assert error.retry_after == 4.0
    assert as_upstream_error(raised(404)) is None


def test_an_app_error_is_not_ours() -> None:
    assert as_upstream_error(ValueError("boom")) is None
    assert as_upstream_error(requests.exceptions.InvalidJSONError("bad json")) is None


def test_recognising_them_imports_nothing() -> None:
    code = (
        "import sys; from gateway_guard.inbound import as_upstream_error as a; "
        "assert a(ValueError()) is None; "
        "assert not {'requests', 'urllib3', 'aiohttp'} & set(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


class NamingGuard(gg.Guard):
    """A Guard with ``upstream_for_url`` (issue #12's host matching, built elsewhere)."""

    def upstream_for_url(self, url: str) -> str | None:
        return "payments" if "127.0.0.1" in url else None


def test_the_log_line_names_the_upstream_where_the_url_is_ones(
    upstream: MisbehavingUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    guard = NamingGuard({"upstreams": {"payments": {"base_url": upstream.url}}})
    upstream.set_mode("status", status=502)
    try:
        exc = requests_error(upstream.url + "/charges", raise_for_status=True)
    finally:
        upstream.set_mode("ok")
    error = as_upstream_error(exc)
    assert error is not None
    # The gateway-error line is a WARNING (#14): an upstream failing is expected.
    with caplog.at_level(logging.WARNING, logger="gateway_guard"):
        log_gateway_error(RequestContext(guard=guard, request_id="r1"), error)
    assert error.upstream == "payments"
    assert [r.upstream for r in caplog.records] == ["payments"]  # type: ignore[attr-defined]
