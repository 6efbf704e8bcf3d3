"""The public surface of DESIGN §3 stays importable, sorted and complete."""

from __future__ import annotations

import importlib
import importlib.metadata
import pkgutil
import re
from pathlib import Path
from types import ModuleType
from typing import ParamSpec, TypeVar

import pytest

import gateway_guard as gg
import gateway_guard.django
import gateway_guard.flask
import gateway_guard.testing

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


def test_guard_client_driver_names() -> None:
    # DESIGN §6: the requests and aiohttp drivers (their extras are imported on first use).
    for name in ("session", "requests_adapter", "aiohttp_session", "aiohttp_middleware"):
        assert callable(getattr(gg.Guard, name))


# --- the declared public surface (docs/api.md) ----------------------------------------------

PUBLIC_MODULES = (
    "gateway_guard",
    "gateway_guard.events",
    "gateway_guard.metrics",
    "gateway_guard.tracing",
    "gateway_guard.flask",
    "gateway_guard.django",
    "gateway_guard.log",
    "gateway_guard.testing",
)
API_DOC = Path(__file__).resolve().parent.parent / "docs" / "api.md"


def _public_names() -> dict[str, list[str]]:
    return {name: list(importlib.import_module(name).__all__) for name in PUBLIC_MODULES}


def _documented() -> dict[str, set[str]]:
    """The names in the first column of each module's table in docs/api.md."""
    documented: dict[str, set[str]] = {}
    current: str | None = None
    for line in API_DOC.read_text(encoding="utf-8").splitlines():
        if line.startswith("## "):
            current = line[3:].strip().strip("`")
            documented[current] = set()
        elif current is not None and (m := re.match(r"\| `([A-Za-z_][A-Za-z0-9_]*)` \|", line)):
            documented[current].add(m.group(1))
    return documented


@pytest.mark.parametrize("module", PUBLIC_MODULES)
def test_each_public_module_is_complete_and_documented(module: str) -> None:
    mod = importlib.import_module(module)
    names = list(mod.__all__)  # sorted by ruff (RUF022)
    public = {
        n for n, v in vars(mod).items() if not n.startswith("_") and not isinstance(v, ModuleType)
    }
    # What the module defines itself (or its own submodules do): names it merely uses,
    # imported from elsewhere in the package or from its framework, are not its API.
    ours = {
        n
        for n in public
        if not isinstance(vars(mod)[n], TypeVar | ParamSpec)
        and (
            getattr(vars(mod)[n], "__module__", "") == module
            or getattr(vars(mod)[n], "__module__", "").startswith(module + ".")
        )
    }
    assert ours <= set(names), sorted(ours - set(names))
    assert _documented()[module] == set(names)


def test_no_other_module_declares_a_name_that_is_not_public() -> None:
    public = set().union(*map(set, _public_names().values()))
    offenders: dict[str, list[str]] = {}
    for info in pkgutil.walk_packages(gg.__path__, "gateway_guard."):
        if any(part.startswith("_") for part in info.name.split(".")[1:]):
            continue  # a private module: its names are implementation by its name
        module = importlib.import_module(info.name)
        declared = getattr(module, "__all__", None)
        assert declared is not None, f"{info.name} has no __all__"
        extra = sorted(set(declared) - public)
        if extra:
            offenders[info.name] = extra
    assert offenders == {}, "module __all__s may list only names on docs/api.md"
