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


def test_the_sample_response_shows_only_what_the_product_sends() -> None:
    """The README's sample 504: its status and headers are those of a real 504 (no
    Retry-After, which no 504 without a known wait carries), its body a real one's start."""
    from gateway_guard.errors import UpstreamTimeout
    from gateway_guard.render import ErrorRenderer

    (sample,) = [c for lang, c in BLOCKS if lang == "text" and c.startswith("HTTP/1.1 ")]
    head, _, body = sample.partition("\n\n")
    status_line, *fields = head.splitlines()
    shown = dict(field.split(": ", 1) for field in fields)
    error = UpstreamTimeout("read timed out", proxy_error="connection_read_timeout")
    settings = load_settings({"service": "shop"}, environ={})
    real = ErrorRenderer(settings).render(
        error, request_id=shown["x-request-id"], accept="application/problem+json"
    )
    assert status_line == f"HTTP/1.1 {real.status} Gateway Timeout"
    sent = dict(real.headers)
    for name, value in shown.items():
        assert sent.get(name) == value, (name, value, sent.get(name))
    assert set(sent) - set(shown) <= {"content-length"}  # all but the length is shown
    assert body.rstrip().removesuffix(", ...}") in real.body.decode()


def test_every_quickstart_is_marked_and_complete() -> None:
    """The e2e tests find each quickstart by its marker; each web one is a whole file."""
    names = re.findall(r"<!-- quickstart: (\w+) -->\n```", README)
    assert names == ["settings", "python", "fastapi", "wsgi", "flask", "django"]
    assert "pip install gateway-guard" not in README  # not on the index yet
