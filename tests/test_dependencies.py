"""The dependency lists in pyproject.toml say exactly what the code imports.

A package imported but not declared works on a developer's machine (something else pulled
it in) and breaks a user's install; one declared but never imported is weight every user
installs for nothing. Both are checked from the source itself, by parsing imports.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import re
import sys
import tomllib
from importlib.metadata import distribution, packages_distributions
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src" / "gateway_guard"

# Optional adapters: their framework imports belong to their extra, not the core.
ADAPTER_EXTRAS = {
    "flask.py": "flask",
    "django": "django",
    # The drivers of optional clients, imported by Guard only when asked for.
    "_requests.py": "requests",
    "_urllib3_deadlines.py": "requests",
    "_aiohttp.py": "aiohttp",
    # The fleet store: imported by Guard only for [state] backend = "redis".
    "_fleet.py": "redis",
    # Optional integrations, imported only when the settings turn them on.
    "metrics.py": "prometheus",
    "tracing.py": "otel",
}
# Namespace packages whose modules come from several distributions: resolved per module.
NAMESPACES = {"opentelemetry"}
# Declared for a reason the imports cannot show.
NOT_IMPORTED_ON_PURPOSE = {
    # dev: type stubs (read by mypy), the test runner's plugins and the linters.
    "django-stubs",
    "types-requests",
    "pytest-timeout",
    "mypy",
    "ruff",
    # run as servers in subprocesses by the end-to-end tests and benchmarks.
    "uvicorn",
}

# Instrumentation of optional clients, imported only by gg.instrument(clients=...).
ADAPTER_EXTRAS.update({"_instrument_requests.py": "requests", "_instrument_aiohttp.py": "aiohttp"})


def _requirement_name(spec: str) -> str:
    match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", spec)
    assert match is not None, spec
    return _normal(match.group(0))


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _project() -> dict[str, object]:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    project = data["project"]
    assert isinstance(project, dict)
    return project


def _declared(group: str | None) -> set[str]:
    project = _project()
    if group is None:
        specs = project["dependencies"]
    else:
        extras = project["optional-dependencies"]
        assert isinstance(extras, dict)
        specs = extras[group]
    assert isinstance(specs, list)
    return {_requirement_name(spec) for spec in specs}


def _third_party_imports(paths: list[Path]) -> dict[str, set[str]]:
    """Distribution name -> the files that import it (stdlib and first-party left out)."""
    local = {"gateway_guard", "bench", "servers", "shop", "upstream", "_common", "conftest"}
    local |= {p.stem for p in (ROOT / "tests").glob("*.py")}
    local |= {p.stem for p in (ROOT / "examples").glob("*.py")}
    local |= {p.name for p in (ROOT / "examples").iterdir() if p.is_dir()}
    dists = packages_distributions()
    found: dict[str, set[str]] = {}
    for path in paths:
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
                if node.module in NAMESPACES:  # "from opentelemetry import trace"
                    names = [f"{node.module}.{alias.name}" for alias in node.names]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top in local or top == "__future__":
                    continue
                owners = dists.get(top, [top])
                if len(owners) > 1:  # a namespace package (opentelemetry): whose module?
                    owners = [_namespace_owner(name, tuple(owners))]
                for dist in owners:
                    found.setdefault(_normal(dist), set()).add(str(path.relative_to(ROOT)))
    return found


@functools.cache
def _namespace_owner(module: str, candidates: tuple[str, ...]) -> str:
    """The distribution that installed ``module``, among those sharing its namespace."""
    spec = importlib.util.find_spec(module)
    origin = Path(spec.origin).resolve() if spec is not None and spec.origin else None
    for dist in candidates:
        for file in distribution(dist).files or ():
            if origin is not None and Path(str(file.locate())).resolve() == origin:
                return dist
    raise AssertionError(f"no installed distribution provides {module}")


def _adapter_extra(path: Path) -> str | None:
    relative = path.relative_to(SRC)
    return ADAPTER_EXTRAS.get(relative.parts[0])


def test_core_imports_are_core_dependencies() -> None:
    core = [p for p in SRC.rglob("*.py") if _adapter_extra(p) is None]
    missing = {
        dist: files
        for dist, files in _third_party_imports(core).items()
        if dist not in _declared(None)
    }
    assert missing == {}, "imported by the core but not in [project] dependencies"


@pytest.mark.parametrize("extra", sorted(set(ADAPTER_EXTRAS.values())))
def test_adapter_imports_are_in_their_extra(extra: str) -> None:
    files = [p for p in SRC.rglob("*.py") if _adapter_extra(p) == extra]
    allowed = _declared(None) | _declared(extra)
    missing = {d: f for d, f in _third_party_imports(files).items() if d not in allowed}
    assert missing == {}, f"imported by the {extra} adapter but not in the {extra!r} extra"


def test_every_core_dependency_is_imported() -> None:
    used = set(_third_party_imports(list(SRC.rglob("*.py"))))
    unused = _declared(None) - used
    assert unused == set(), "declared in [project] dependencies but imported by nothing"


def test_tests_bench_and_examples_declare_what_they_import() -> None:
    paths = [
        *(ROOT / "tests").rglob("*.py"),
        *(ROOT / "bench").rglob("*.py"),
        *(ROOT / "examples").rglob("*.py"),
    ]
    allowed = _declared(None) | _declared("dev") | _declared("bench")
    for extra in ADAPTER_EXTRAS.values():
        allowed |= _declared(extra)
    missing = {d: f for d, f in _third_party_imports(paths).items() if d not in allowed}
    assert missing == {}, "imported by tests, bench or examples but declared nowhere"


def test_every_dev_and_bench_dependency_is_used() -> None:
    paths = [
        *SRC.rglob("*.py"),
        *(ROOT / "tests").rglob("*.py"),
        *(ROOT / "bench").rglob("*.py"),
        *(ROOT / "examples").rglob("*.py"),
    ]
    used = set(_third_party_imports(paths))
    declared = _declared("dev") | _declared("bench")
    unused = declared - used - NOT_IMPORTED_ON_PURPOSE
    assert unused == set(), "declared in the dev/bench extras but used by nothing"
