"""The public surface of DESIGN §3 stays importable, sorted and complete."""

from __future__ import annotations

import importlib.metadata
from types import ModuleType

import gateway_guard as gg

# DESIGN §3: names tests outside this repository rely on.
CONTRACT = {
    "BreakerState",
    "CircuitOpenError",
    "GatewayGuardError",
    "GatewayGuardMiddleware",
    "GatewayGuardWSGI",
    "Guard",
    "LoadShedError",
    "SettingsError",
    "UpstreamConnectError",
    "UpstreamError",
    "UpstreamProtocolError",
    "UpstreamStatusError",
    "UpstreamTimeout",
    "current_guard",
}


def test_all_is_sorted_and_importable() -> None:
    assert gg.__all__ == sorted(gg.__all__)
    for name in gg.__all__:
        assert hasattr(gg, name), name


def test_contract_names_are_exported() -> None:
    assert set(gg.__all__) >= CONTRACT


def test_every_public_attribute_is_in_all() -> None:
    # Submodules become package attributes once imported (in any order): not API names.
    public = {
        n for n, v in vars(gg).items() if not n.startswith("_") and not isinstance(v, ModuleType)
    }
    assert public <= set(gg.__all__), sorted(public - set(gg.__all__))


def test_version_comes_from_package_metadata() -> None:
    assert gg.__version__ == importlib.metadata.version("gateway-guard")


def test_exception_tree() -> None:
    assert issubclass(gg.SettingsError, ValueError)
    assert issubclass(gg.SettingsError, gg.GatewayGuardError)
    for cls, status in [
        (gg.UpstreamConnectError, 502),
        (gg.UpstreamTimeout, 504),
        (gg.UpstreamProtocolError, 502),
        (gg.UpstreamStatusError, 502),
        (gg.CircuitOpenError, 503),
        (gg.LoadShedError, 503),
    ]:
        assert issubclass(cls, gg.UpstreamError)
        error = cls("x")
        assert error.status == status
        for attr in ("proxy_error", "upstream", "attempts", "elapsed", "retry_after"):
            assert hasattr(error, attr)
        assert hasattr(error, "received_status")


def test_guard_api_names() -> None:
    for name in ("client", "async_client", "transport", "async_transport", "protect", "breaker"):
        assert callable(getattr(gg.Guard, name))
