from __future__ import annotations

from collections.abc import Iterator

import pytest

from gateway_guard.retry import testing
from gateway_guard.testing.upstream import MisbehavingUpstream


def pytest_configure(config: pytest.Config) -> None:
    # Registered here, not in pyproject.toml, so the marker travels with the tests.
    # `pytest -m "not implementation"` runs only what public behaviour promises; a test so
    # marked may be rewritten when the internals it reaches into move.
    config.addinivalue_line(
        "markers", "implementation: pins an implementation detail, not public behaviour"
    )


@pytest.fixture
def upstream() -> Iterator[MisbehavingUpstream]:
    """A real misbehaving HTTP upstream on 127.0.0.1 (see gateway_guard.testing.upstream)."""
    with MisbehavingUpstream() as up:
        yield up


@pytest.fixture
def no_backoff() -> Iterator[None]:
    """Retry waits become 0 (gateway_guard's documented testing mode)."""
    with testing():
        yield


@pytest.fixture(autouse=True)
def _fresh_log_throttle(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test logs as if first: the gateway-error log throttle is process-wide state."""
    from gateway_guard.inbound import _errors as inbound

    monkeypatch.setattr(inbound, "_throttle", inbound._Throttle())
