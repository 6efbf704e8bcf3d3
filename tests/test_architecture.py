"""The layers of docs/architecture.md, held by the imports themselves.

A module imports (at run time, outside ``TYPE_CHECKING``) only from its own layer or the
layers below it; web frameworks only from the adapters; and the call core no client
library at all, so that every driver can share it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"
PACKAGE = SRC / "gateway_guard"

# Lowest first. The same table is drawn in docs/architecture.md ("The layers").
LAYERS: tuple[tuple[str, frozenset[str]], ...] = (
    (
        "leaves",
        frozenset(
            {
                "errors",
                "events",
                "headers",
                "context",
                "_schema",
                "_colours",
                "_copy",
                "_estimator",
                "_negotiate",
                "_languages",
                "_translations",
                "_waiters",
                "_matcher",
                "_hosts",
                "_fork",
                "log",
                "_sentry",
                "_recent",
                "testing._clock",
                "testing.upstream",
            }
        ),
    ),
    (
        "settings and policy",
        frozenset(
            {
                "_settings_load",
                "_settings_errors",
                "_settings_checks",
                "settings",
                "routing",
                "policy",
                "_hygiene",
            }
        ),
    ),
    (
        "decision cores",
        frozenset(
            {
                "breaker",
                "retry",
                "_concurrency",
                "_bulkhead",
                "_shedding",
                "limiter",
                "_call",
                "inbound",
                "inbound._admission",
                "inbound._endpoints",
                "inbound._ids",
                "inbound._errors",
                "inbound._response",
                "inbound._start",
                "render",
                "_bodies",
                "_body_cache",
                "_templates",
                "_status",
                "_status_page",
            }
        ),
    ),
    (
        "drivers",
        frozenset(
            {
                "transport",
                "_httpx_bodies",
                "_httpx_deadlines",
                "_requests",
                "_urllib3_deadlines",
                "_aiohttp",
            }
        ),
    ),
    ("runtime", frozenset({"guard", "_fleet", "metrics", "tracing"})),
    (
        "adapters",
        frozenset(
            {
                "asgi",
                "wsgi",
                "flask",
                "cli",
                "django",
                "django.apps",
                "django.checks",
                "django.conf",
                "django.decorators",
                "django.views",
                "django.middleware",
                "_instrument",
                "_instrument_httpx",
                "_instrument_requests",
                "_instrument_aiohttp",
            }
        ),
    ),
    ("public face", frozenset({"", "testing"})),
)
LAYER_OF = {module: i for i, (_, modules) in enumerate(LAYERS) for module in modules}
FRAMEWORKS = {"flask", "werkzeug", "django", "starlette", "fastapi", "asgiref"}
ADAPTERS = LAYERS[LAYER_OF["asgi"]][1]
CLIENT_LIBRARIES = {"httpx", "httpcore", "requests", "urllib3", "aiohttp"}


def _name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> tuple[set[str], set[str]]:
    """(our modules, third-party top-level packages) imported at run time by ``path``."""
    name = _name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    ours: set[str] = set()
    others: set[str] = set()

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue  # annotations only: never imported at run time
            if isinstance(node, ast.Try):
                visit(node.body)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    top = alias.name.split(".")[0]
                    if top == "gateway_guard":
                        ours.add(alias.name.removeprefix("gateway_guard").lstrip("."))
                    else:
                        others.add(top)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".") if package else []
                    base = base[: len(base) - (node.level - 1)]
                    target = ".".join([*base, *([node.module] if node.module else [])])
                elif node.module and node.module.split(".")[0] == "gateway_guard":
                    target = node.module.removeprefix("gateway_guard").lstrip(".")
                else:
                    others.add((node.module or "").split(".")[0])
                    continue
                for alias in node.names:
                    sub = f"{target}.{alias.name}" if target else alias.name
                    ours.add(sub if sub in LAYER_OF else target)

    visit(ast.parse(path.read_text(encoding="utf-8")).body)
    ours.discard(name)
    return ours, others


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_has_a_layer() -> None:
    missing = sorted(_name(p) for p in MODULES if _name(p) not in LAYER_OF)
    assert missing == [], "add these to LAYERS here and to docs/architecture.md"


@pytest.mark.parametrize("path", MODULES, ids=_name)
def test_imports_go_down_the_layers(path: Path) -> None:
    name = _name(path)
    ours, others = _imports(path)
    upward = sorted(m for m in ours if LAYER_OF[m] > LAYER_OF[name])
    assert upward == [], f"{name} ({LAYERS[LAYER_OF[name]][0]}) imports from a higher layer"
    if name not in ADAPTERS:
        assert others.isdisjoint(FRAMEWORKS), f"{name} imports a web framework"


def test_the_call_core_knows_no_client_library() -> None:
    _, others = _imports(PACKAGE / "_call.py")
    assert others.isdisjoint(CLIENT_LIBRARIES)


def test_the_layer_table_in_the_docs_matches() -> None:
    doc = (SRC.parent / "docs" / "architecture.md").read_text(encoding="utf-8")
    for layer, modules in LAYERS:
        assert f"**{layer}**" in doc, layer
        for module in modules:
            shown = f"`{(module or '__init__').replace('.', '/')}`"
            assert shown in doc, f"docs/architecture.md does not show {shown} ({layer})"
