"""The README's code blocks stay valid: Python compiles, TOML validates as settings."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

import gateway_guard as gg
from gateway_guard.settings import load_settings

README = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
BLOCKS = re.findall(r"```(\w+)\n(.*?)```", README, flags=re.DOTALL)


def test_readme_shows_the_two_commands() -> None:
    assert "make test" in README
    assert "make demo" in README


@pytest.mark.parametrize(
    "code", [c for lang, c in BLOCKS if lang == "python"], ids=lambda c: c.splitlines()[0][:40]
)
def test_python_blocks_compile(code: str) -> None:
    compile(code, "README.md", "exec")


@pytest.mark.parametrize("code", [c for lang, c in BLOCKS if lang == "toml"])
def test_toml_blocks_are_valid_settings(code: str) -> None:
    load_settings(tomllib.loads(code), environ={})


def test_names_the_readme_uses_exist() -> None:
    for name in re.findall(r"\bgg\.([A-Za-z_]+)", README):
        assert hasattr(gg, name), name
    from gateway_guard.django import gateway_policy, get_guard
    from gateway_guard.flask import GatewayGuard

    assert callable(gateway_policy)
    assert callable(get_guard)
    assert callable(GatewayGuard)
