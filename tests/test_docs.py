"""docs/settings.md must document every setting, and its TOML examples must be valid.

A new settings key (or a new settings table) without a row in the reference fails here,
and so does a documented default that no longer matches the code, or an example that no
longer loads. Error examples are marked with ``<!-- invalid -->`` before their block;
they must fail, and when a ``text`` block follows, it must be the exact error message.
"""

from __future__ import annotations

import re
import tomllib
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from gateway_guard import SettingsError
from gateway_guard._schema import (
    HealthSettings,
    MetricsSettings,
    StatusSettings,
    TracingSettings,
)
from gateway_guard.policy import compile_policies
from gateway_guard.settings import (
    BrandSettings,
    BreakerSettings,
    BulkheadSettings,
    CallSettings,
    RetrySettings,
    RouteSettings,
    Settings,
    ShedSettings,
    StateSettings,
    UpstreamSettings,
    load_settings,
)

DOC = Path(__file__).parent.parent / "docs" / "settings.md"

# Each settings model is documented under these headings (the exact heading text, without
# the leading #s). A model reachable from Settings that is missing here fails
# test_every_settings_model_has_a_section.
SECTIONS: dict[str, type[BaseModel]] = {
    "Top-level keys": Settings,
    "`[brand]`": BrandSettings,
    "`[defaults]`": CallSettings,
    "`[defaults.retry]`": RetrySettings,
    "`[defaults.breaker]`": BreakerSettings,
    "`[defaults.bulkhead]`": BulkheadSettings,
    "`[upstreams.NAME]`": UpstreamSettings,
    "`[shed]`": ShedSettings,
    "`[[routes]]`": RouteSettings,
    "Route `retry`": RetrySettings,
    "Route `shed`": ShedSettings,
    "`[status]`": StatusSettings,
    "`[health]`": HealthSettings,
    "`[state]`": StateSettings,
    "`[metrics]`": MetricsSettings,
    "`[tracing]`": TracingSettings,
}

_HEADING = re.compile(r"^(#{1,6}) +(.+?) *$")
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.MULTILINE | re.DOTALL)
_INVALID_MARK = re.compile(r"<!--\s*invalid\s*-->\s*$")
_LITERAL_CELL = re.compile(r"^`([^`]+)`$")


def _doc() -> str:
    return DOC.read_text(encoding="utf-8")


def _prose_lines(text: str) -> list[str]:
    """The document's lines with fenced code blocks blanked (``# comment`` is no heading)."""
    lines = text.splitlines()
    inside = False
    for i, line in enumerate(lines):
        if line.startswith("```"):
            inside = not inside
            lines[i] = ""
        elif inside:
            lines[i] = ""
    return lines


def _section(heading: str) -> list[str]:
    """The lines under ``heading``, up to the next heading (of any level)."""
    lines = _prose_lines(_doc())
    for start, line in enumerate(lines):
        m = _HEADING.match(line)
        if m and m.group(2) == heading:
            end = next(
                (j for j in range(start + 1, len(lines)) if _HEADING.match(lines[j])), len(lines)
            )
            return lines[start + 1 : end]
    raise AssertionError(f"docs/settings.md has no heading {heading!r}")


def _table_rows(lines: list[str]) -> dict[str, list[str]]:
    """Table rows keyed by their first cell when it is a single `key`: {key: cells}."""
    rows: dict[str, list[str]] = {}
    for line in lines:
        if not line.startswith("|"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        m = _LITERAL_CELL.match(cells[0])
        if m:
            rows[m.group(1)] = cells
    return rows


def _models(annotation: Any) -> list[type[BaseModel]]:
    """The settings models inside an annotation (through Optional, list, dict, Annotated)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    origin = typing.get_origin(annotation)
    if origin is None:
        return []
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        args = args[:1]
    found: list[type[BaseModel]] = []
    for arg in args:
        found.extend(_models(arg))
    return found


def _reachable_models() -> set[type[BaseModel]]:
    seen: set[type[BaseModel]] = set()
    todo: list[type[BaseModel]] = [Settings]
    while todo:
        model = todo.pop()
        if model in seen:
            continue
        seen.add(model)
        for field in model.model_fields.values():
            todo.extend(_models(field.annotation))
    return seen


def test_every_settings_model_has_a_section() -> None:
    missing = _reachable_models() - set(SECTIONS.values())
    assert not missing, f"settings models without a section in SECTIONS: {missing}"


@pytest.mark.parametrize(("heading", "model"), SECTIONS.items(), ids=list(SECTIONS))
def test_every_key_has_a_table_row_in_its_section(heading: str, model: type[BaseModel]) -> None:
    rows = _table_rows(_section(heading))
    missing = [key for key in model.model_fields if key not in rows]
    assert not missing, f"{heading}: no table row for {missing} in docs/settings.md"
    # A row for a key the model does not have is a stale or misspelt entry.
    extra = [key for key in rows if key not in model.model_fields]
    assert not extra, f"{heading}: table rows for unknown keys {extra}"


# Default cells that describe inheritance instead of a value.
_INHERITED = re.compile(r"^(inherited|from `\[[a-z.]+\]`|—)$")


@pytest.mark.parametrize(("heading", "model"), SECTIONS.items(), ids=list(SECTIONS))
def test_documented_defaults_match_the_code(heading: str, model: type[BaseModel]) -> None:
    """The default column: a `literal` equal to the real default, "unset", "required",
    "see ..." (a nested table) or an inheritance note ("inherited", "from `[defaults]`")."""
    rows = _table_rows(_section(heading))
    for key, field in model.model_fields.items():
        if key not in rows:
            continue  # reported by test_every_key_has_a_table_row_in_its_section
        cell = rows[key][2]
        if cell == "required":
            assert field.is_required(), f"{heading} {key}: documented as required"
        elif cell == "unset":
            assert field.default is None, f"{heading} {key}: documented as unset"
        elif m := _LITERAL_CELL.match(cell):
            assert field.default is not PydanticUndefined, f"{heading} {key}: is required"
            documented = tomllib.loads(f"v = {m.group(1)}")["v"]
            actual = field.default
            assert documented == actual, f"{heading} {key}: doc {documented!r}, code {actual!r}"
            # 1 == True in Python; a boolean documented as 1 (or the reverse) is still wrong.
            assert isinstance(documented, bool) == isinstance(actual, bool), f"{heading} {key}"
            # 2 == 2.0 too; show a float default as 2.0 so the type is clear.
            assert isinstance(documented, float) == isinstance(actual, float), f"{heading} {key}"
        else:
            nested = isinstance(field.default, BaseModel)
            assert (nested and cell.startswith("see ")) or _INHERITED.match(cell), (
                f"{heading} {key}: default cell {cell!r} is neither a `literal`, 'unset', "
                "'required', 'see ...' for a table, nor an inheritance note"
            )


@dataclass
class _Block:
    line: int
    lang: str
    body: str
    invalid: bool


def _blocks() -> list[_Block]:
    text = _doc()
    blocks = []
    for m in _FENCE.finditer(text):
        before = text[: m.start()].rstrip("\n")
        blocks.append(
            _Block(
                line=text.count("\n", 0, m.start()) + 1,
                lang=m.group(1),
                body=m.group(2),
                invalid=bool(_INVALID_MARK.search(before)),
            )
        )
    return blocks


def _toml_blocks() -> list[tuple[_Block, _Block | None]]:
    """Each TOML block, with the ``text`` block right after it when there is one."""
    blocks = _blocks()
    result = []
    for i, block in enumerate(blocks):
        if block.lang != "toml":
            continue
        following = blocks[i + 1] if i + 1 < len(blocks) else None
        result.append((block, following if following and following.lang == "text" else None))
    return result


TOML_BLOCKS = _toml_blocks()


def test_the_doc_has_examples() -> None:
    assert len(TOML_BLOCKS) >= 12
    assert any(block.invalid for block, _ in TOML_BLOCKS)
    assert all(block.lang in ("toml", "text", "python", "sh") for block in _blocks())


def _load(raw: dict[str, Any], cwd: Path) -> Settings:
    # brand.template_dir must name an existing directory (relative to the working
    # directory): provide it, so examples can show the key without depending on the repo.
    template_dir = raw.get("brand", {}).get("template_dir")
    if isinstance(template_dir, str) and not Path(template_dir).is_absolute():
        (cwd / template_dir).mkdir(parents=True, exist_ok=True)
    return load_settings(raw, environ={})


@pytest.mark.parametrize(
    ("block", "message"), TOML_BLOCKS, ids=[f"line {b.line}" for b, _ in TOML_BLOCKS]
)
def test_toml_examples_are_valid_on_their_own(
    block: _Block, message: _Block | None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    raw = tomllib.loads(block.body)
    if not block.invalid:
        _load(raw, tmp_path)
        return
    with pytest.raises(SettingsError) as info:
        _load(raw, tmp_path)
    if message is not None:
        assert str(info.value) == message.body.rstrip("\n"), "the documented error is stale"


def test_retry_budget_arithmetic_uses_the_real_defaults() -> None:
    """The retry-budget arithmetic in the text uses the real defaults."""
    retry = RetrySettings()
    window = 10
    assert retry.budget_ratio * 1000 + retry.budget_min_per_second * window == 200
    assert "0.1 \N{MULTIPLICATION SIGN} 1,000 + 10 \N{MULTIPLICATION SIGN} 10 = 200" in _doc()


def test_sections_are_unique() -> None:
    headings = [
        m.group(2) for line in _prose_lines(_doc()) if (m := _HEADING.match(line)) is not None
    ]
    duplicated = {h for h in headings if headings.count(h) > 1}
    assert not duplicated, f"duplicate headings make the section lookup ambiguous: {duplicated}"


_SERVING = re.compile(r"^`(?P<upstream>[^`]+)`, (?:outside a route|serving `(?P<request>[^`]+)`)$")


def test_the_worked_layering_example_is_right() -> None:
    """The table of effective values under "A worked example" is what the code computes."""
    lines = _section("A worked example")
    example = next(b for b, _ in TOML_BLOCKS if "[[routes]]" in b.body and "/reports/" in b.body)
    policies = compile_policies(load_settings(tomllib.loads(example.body), environ={}))
    header: list[str] = []
    checked = 0
    for line in lines:
        if not line.startswith("|") or set(line) <= set("|-"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not header:
            header = [c.strip("`") for c in cells]
            continue
        m = _SERVING.match(cells[0])
        assert m, f"unexpected row label {cells[0]!r}"
        calls = policies.calls
        if m["request"]:
            method, _, path = m["request"].rpartition(" ")
            route = policies.routes.resolve(method or "GET", path)[1]
            assert route is not None, m["request"]
            calls = route.calls
        policy = calls[m["upstream"]]
        for key, cell in zip(header[1:], cells[1:], strict=True):
            actual: Any = policy
            for part in key.split("."):
                actual = getattr(actual, part)
            documented = float(cell.split()[0])
            assert documented == actual, f"{cells[0]} {key}: doc {documented}, code {actual}"
            checked += 1
    assert checked >= 20
