"""Instrumentation of requests and aiohttp, against the misbehaving upstream on loopback.

The guarded pieces are the drivers' (``guard.requests_adapter``, ``guard.aiohttp_middleware``);
the instrumentation only routes calls to them. Where this build has no such driver,
``gg.instrument`` says so and patches nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
import requests

import gateway_guard as gg
from gateway_guard.testing import MisbehavingUpstream


@pytest.fixture(autouse=True)
def _clean() -> Iterator[None]:
    gg.uninstrument()
    yield
    gg.uninstrument()


def guard_for(up: MisbehavingUpstream) -> gg.Guard:
    return gg.Guard(
        {
            "defaults": {
                "read_timeout": 0.5,
                "deadline": 2.0,
                "retry": {"attempts": 3, "backoff_initial": 0.0, "jitter": False},
                "breaker": {"min_calls": 1000, "window_size": 1000},
            },
            "upstreams": {"up": {"base_url": up.url}},
        }
    )


# --- requests ----------------------------------------------------------------------------


def test_requests_calls_to_an_upstream_are_guarded_once(upstream: MisbehavingUpstream) -> None:
    send = requests.adapters.HTTPAdapter.__dict__["send"]
    guard = guard_for(upstream)
    gg.instrument(guard, clients=("requests",))
    gg.instrument(guard, clients=("requests",))  # idempotent
    upstream.set_mode("status", status=503)
    upstream.reset_stats()
    with pytest.raises(gg.UpstreamStatusError):
        requests.get(upstream.url + "/x", timeout=30)
    assert upstream.stats().requests == 3
    upstream.reset_stats()
    with pytest.raises(gg.UpstreamStatusError):
        requests.post(upstream.url + "/x", json={}, timeout=30)
    assert upstream.stats().requests == 1  # a POST without Idempotency-Key: once
    # An explicitly guarded session is not guarded twice.
    upstream.reset_stats()
    with guard.session("up") as session, pytest.raises(gg.UpstreamStatusError):
        session.get("/x")
    assert upstream.stats().requests == 3
    # Another host (the same server by another name): untouched.
    upstream.reset_stats()
    other = upstream.url.replace("127.0.0.1", "localhost")
    assert requests.get(other + "/x", timeout=30).status_code == 503
    assert upstream.stats().requests == 1
    # A hang ends at the deadline.
    upstream.set_mode("hang")
    with pytest.raises(gg.UpstreamTimeout):
        requests.get(upstream.url + "/x", timeout=60)
    gg.uninstrument()
    assert requests.adapters.HTTPAdapter.__dict__["send"] is send


# --- aiohttp -----------------------------------------------------------------------------


def test_aiohttp_calls_to_an_upstream_are_guarded_once(upstream: MisbehavingUpstream) -> None:
    original = aiohttp.ClientSession.__dict__["_request"]
    guard = guard_for(upstream)
    gg.instrument(guard, clients=("aiohttp",))
    upstream.set_mode("status", status=503)

    async def main() -> dict[str, Any]:
        seen: dict[str, Any] = {}
        async with aiohttp.ClientSession(base_url=upstream.url) as session:
            upstream.reset_stats()
            with pytest.raises(gg.UpstreamStatusError):
                async with session.get("/x"):
                    pass
            seen["get"] = upstream.stats().requests
            upstream.reset_stats()
            with pytest.raises(gg.UpstreamStatusError):
                async with session.post("/x", json={}):
                    pass
            seen["post"] = upstream.stats().requests
        async with guard.aiohttp_session("up") as session:
            upstream.reset_stats()
            with pytest.raises(gg.UpstreamStatusError):
                async with session.get("/x"):
                    pass
            seen["explicit"] = upstream.stats().requests
        other = upstream.url.replace("127.0.0.1", "localhost")
        async with aiohttp.ClientSession() as session:
            upstream.reset_stats()
            async with session.get(other + "/x") as response:
                seen["other"] = (response.status, upstream.stats().requests)
        return seen

    assert asyncio.run(main()) == {"get": 3, "post": 1, "explicit": 3, "other": (503, 1)}
    gg.uninstrument()
    assert aiohttp.ClientSession.__dict__["_request"] is original
