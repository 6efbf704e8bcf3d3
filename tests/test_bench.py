"""bench/run_all.py: the runner that writes docs/benchmarks.md.

The slow sections are replaced by stubs returning rows shaped like each script's, so
the doc's machinery (summary, tables, goals, notes, budget, skips) is checked in well
under a second; one test runs the two fastest real scripts in quick mode. Every doc goes
to tmp_path: nothing here writes to docs/.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def run_all(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    # The bench scripts import each other as `bench.<name>` from the repository root;
    # monkeypatch puts sys.path back afterwards (middleware.py adds bench/ to it).
    monkeypatch.syspath_prepend(str(ROOT))
    return importlib.import_module("bench.run_all")


# --- rows shaped like each script's ----------------------------------------------------------


def _transport_row(level: str, mode: str, candidate: str, ratio: float) -> dict[str, Any]:
    baseline = "bare httpx" if level == "client" else "MockTransport alone"
    is_goal = level == "client" and candidate == "gateway_guard"
    return {
        "level": level,
        "mode": mode,
        "candidate": candidate,
        "baseline": baseline,
        "version": "1.0",
        "us_per_call": 80.0 * ratio,
        "ratio": ratio,
        "ratio_ci": (ratio - 0.01, ratio + 0.01),
        "added_us": 80.0 * (ratio - 1),
        "goal_ratio": 1.03 if is_goal else None,
        "goal_met": ratio <= 1.03 if is_goal else None,
        "rounds": 41,
        "number": 50,
        "seconds": 1.2,
        "stopped_early": False,
        "clock": "cpu",
    }


def transport_rows(quick: bool) -> list[dict[str, Any]]:
    rows = []
    for mode in ("sync", "async"):
        rows += [
            _transport_row("client", mode, "bare httpx", 1.0),
            _transport_row("client", mode, "gateway_guard", 1.02),
            _transport_row("client", mode, "tenacity", 1.25),
        ]
    for mode in ("sync", "async"):
        rows += [
            _transport_row("transport", mode, "MockTransport alone", 1.0),
            _transport_row("transport", mode, "gateway_guard", 1.2),
        ]
    for row in rows:
        if row["goal_ratio"]:
            row.update(transport_added_us=2.0, floor_ratio=1.025)
    return rows


def clients_rows(quick: bool) -> list[dict[str, Any]]:
    def row(mode: str, candidate: str, ratio: float, goal: float | None) -> dict[str, Any]:
        return {
            "mode": mode,
            "candidate": candidate,
            "baseline": f"bare {mode}",
            "version": "1.0",
            "us_per_call": 200.0 * ratio,
            "ratio": ratio,
            "ratio_ci": (ratio - 0.01, ratio + 0.01),
            "added_us": 200.0 * (ratio - 1),
            "goal_ratio": goal,
            "goal_met": ratio <= goal if goal else None,
            "rounds": 21,
            "number": 20,
            "clock": "cpu",
        }

    return [
        row("requests", "bare requests", 1.0, None),
        row("requests", "urllib3 Retry(total=3)", 1.01, None),
        row("requests", "gateway_guard", 1.02, 1.03),
        row("aiohttp", "bare aiohttp", 1.0, None),
        row("aiohttp", "gateway_guard", 1.04, 1.05),
    ]


def middleware_rows(quick: bool) -> list[dict[str, Any]]:
    return [
        {"candidate": "bare", "median_us": 7.0, "added_us": 0.0, "added_ci": "0.00-0.00"},
        {
            "candidate": "gateway_guard",
            "median_us": 9.5,
            "added_us": 2.5,
            "added_ci": "-0.10-3.20",
            "ratio": 1.357,
            "goal_met": True,
        },
        {
            "candidate": "asgi-correlation-id",
            "median_us": 12.0,
            "added_us": 5.0,
            "added_ci": "4.50-5.50",
            "ratio": 1.714,
            "goal_met": None,
        },
        {"candidate": "render error page", "median_us": 2.8, "goal_met": True},
    ]


def breaker_rows(quick: bool) -> list[dict[str, Any]]:
    ours = {
        "library": "gateway_guard",
        "version": "1.0",
        "operation": "admit + record_success (count window)",
        "us_per_call": 0.26,
        "ratio": 1.0,
        "ratio_min": 1.0,
        "ratio_max": 1.0,
        "rounds": 7,
        "error": None,
        "goal_us": 0.5,
        "goal_met": True,
    }
    missing = {
        "library": "purgatory",
        "version": "?",
        "operation": "with breaker: pass (sync)",
        "us_per_call": None,
        "rounds": 0,
        "error": "not installed (purgatory)",
    }
    return [ours, missing]


def limiter_rows(quick: bool) -> list[dict[str, Any]]:
    row = {
        "kind": "sync",
        "library": "gateway_guard",
        "operation": "acquire() + release()",
        "us_per_call": 0.39,
        "us_min": 0.38,
        "us_max": 0.41,
        "ratio": 0.44,
        "repeat": 9,
    }
    return [{**row, "goal_us": 0.4, "goal_met": True}, {**row, "library": "threading"}]


def render_rows(quick: bool) -> list[dict[str, Any]]:
    row = {"operation": "cached HTML (browser)", "us_per_call": 2.9, "us_min": 2.8}
    return [{**row, "us_max": 3.0, "repeat": 7, "goal_us": 50.0, "goal_met": True}]


OUTAGE_MISS = "overload at 3x capacity"
RECOVERY = "5 recovery (upstream answers 503, then ok)"


def outage_rows(quick: bool) -> list[dict[str, Any]]:
    def row(
        scenario: str, variant: str, metric: str, value: float, goal: str | None, met: bool | None
    ) -> dict[str, Any]:
        return {
            "scenario": scenario,
            "variant": variant,
            "metric": metric,
            "value": value,
            "goal": goal,
            "met": met,
        }

    return [
        row("upstream hangs", "async", "dependent p99 ms (breaker open)", 3.2, "≤ 10 ms", True),
        row("upstream hangs", "threaded", "healthy throughput / no-outage", 0.97, "≥ 0.95", True),
        row("upstream hangs", "async", "requests", 12000, None, None),
        row(
            "upstream refuses",
            "gateway_guard",
            "upstream calls / request",
            1.05,
            "≤ 1.1 + floor",
            True,
        ),
        row("50% 503s", "gateway_guard", "upstream calls / request", 1.08, "≤ 1.1 + floor", True),
        row("50% 503s", "tenacity", "upstream calls / request", 1.5, "3.0", None),
        row("100% 503s", "gateway_guard", "upstream calls / request", 1.01, "≤ 1.1 + floor", True),
        row("partly fails (50% 503)", "gateway_guard", "success %", 61.0, "≥ 60", True),
        row(OUTAGE_MISS, "async", "served p99 / at capacity", 2.4, "≤ 2x", False),
        row(OUTAGE_MISS, "async", "shed answer p99 ms", 0.4, "≤ 1 ms", True),
        # "recovery" wins over "503" when a scenario's name has both.
        row(RECOVERY, "gateway_guard", "recovery s", 3.6, "≤ open_seconds + 1 s", True),
        row(RECOVERY, "plain", "recovery s (not yet)", math.inf, None, None),
    ]


def fleet_rows(quick: bool) -> list[dict[str, Any]]:
    def row(figure: str, value: float, goal: str, met: bool) -> dict[str, Any]:
        return {"figure": figure, "value": value, "detail": "", "goal": goal, "goal_met": met}

    return [
        row("Redis commands per guarded call (steady state)", 0.0004, "≤ 0.005 (0.00)", True),
        row("guarded call, Redis backend / local", 1.004, "≤ 1.01x", True),
        row("state change seen by another process, p50", 3.1, "≤ 100 ms", True),
        row("state change seen by another process, p99", 12.0, "≤ 1000 ms", True),
    ]


STUBS: dict[str, Callable[[bool], list[dict[str, Any]]]] = {
    "transport": transport_rows,
    "clients": clients_rows,
    "middleware": middleware_rows,
    "breaker": breaker_rows,
    "outage": outage_rows,
    "fleet": fleet_rows,
    "limiter": limiter_rows,
    "render": render_rows,
}


def stubbed(run_all: ModuleType, **overrides: Callable[[bool], list[dict[str, Any]]]) -> list[Any]:
    runs = {**STUBS, **overrides}
    return [dataclasses.replace(s, run=runs[s.key]) for s in run_all.SECTIONS]


def summary_of(doc: str) -> str:
    return doc.split("## Summary", 1)[1].split("\n## ", 1)[0]


# --- the doc --------------------------------------------------------------------------------


def test_every_section_has_a_stub(run_all: ModuleType) -> None:
    assert {s.key for s in run_all.SECTIONS} == set(STUBS)
    measured = {goal for s in run_all.SECTIONS for goal in s.goals}
    assert measured == {goal.id for goal in run_all.GOALS}


def test_notes_are_keyed_by_section_or_outage_scenario(run_all: ModuleType) -> None:
    keys = {s.key for s in run_all.SECTIONS} - {"outage"}
    for key, paragraphs in run_all.NOTES.items():
        assert key in keys or key.startswith("outage: "), key
        assert paragraphs and all(isinstance(p, str) and p for p in paragraphs), key


def test_doc_has_the_summary_and_every_goal(run_all: ModuleType, tmp_path: Path) -> None:
    output = tmp_path / "benchmarks.md"
    notes = {"outage: " + OUTAGE_MISS: ["The load generator shares the two CPUs."]}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(run_all, "NOTES", notes)
        outcomes = run_all.main(
            True, output=output, sections=stubbed(run_all), log=lambda line: None
        )
    assert [o.status for o in outcomes] == ["ok"] * len(STUBS)
    doc = output.read_text(encoding="utf-8")

    assert doc.startswith("# Benchmarks\n")
    assert "generated by `make bench`" in doc
    assert "## Method" in doc and "Interleaved rounds" in doc and "Loopback only" in doc
    summary = summary_of(doc)
    assert "| goal | measured | target | result |" in summary
    for goal in run_all.GOALS:
        assert f"| {goal.text} |" in summary, goal.id
    assert "not measured" not in summary.split("|", 1)[1]
    assert "21 goal figures met, 1 NOT met, 0 goals not measured; 1 reference figures." in summary
    assert (
        "|  | 50% 503s / tenacity: upstream calls / request = 1.50 | 3.0 | reference |" in summary
    )
    # The outage miss is NOT met in the summary and in its scenario's table, and the
    # scenario's Notes section carries the human-written note.
    assert summary.count("**NOT met**") == 1
    assert f"{OUTAGE_MISS} / async: served p99 / at capacity = 2.40" in summary
    scenario = doc.split(f"### {OUTAGE_MISS}\n", 1)[1].split("\n### ", 1)[0]
    assert "| async | served p99 / at capacity | 2.40 | ≤ 2x | **NOT met** |" in scenario
    assert "#### Notes\n\nThe load generator shares the two CPUs." in scenario
    # Supporting goals are in the summary too, marked as such.
    assert "limiter: uncontended sync acquire() + release() (supporting)" in summary
    # Every figure with a goal says it; the baseline rows have none.
    assert (
        "| sync | gateway_guard | 1.0 | 81.60 | 1.020x | 1.010 to 1.030 | +1.60 | ≤ 1.03x | met |"
        in doc
    )
    assert "| gateway_guard | 9.50 | +2.50 | -0.10 to +3.20 | 1.357x | ≤ 3 µs added | met |" in doc
    assert "| purgatory | ? | with breaker: pass (sync) | not installed (purgatory) |" in doc
    assert doc.count("#### Notes") == 7 + len({r["scenario"] for r in outage_rows(True)})

    data = json.loads(output.with_suffix(".json").read_text(encoding="utf-8"))
    assert data["quick"] is True
    assert [s["key"] for s in data["sections"]] == list(STUBS)
    assert data["sections"][4]["rows"][:-1] == outage_rows(True)[:-1]
    assert data["sections"][4]["rows"][-1]["value"] == "inf"  # strict JSON has no Infinity
    recovery = next(line for line in summary.splitlines() if line.startswith("| recovery"))
    assert f"| {RECOVERY} / gateway_guard: recovery s = 3.60 |" in recovery
    assert "| plain | recovery s (not yet) | inf |  |  |" in doc


def test_a_miss_without_a_note_says_so(
    run_all: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(run_all, "NOTES", {})
    output = tmp_path / "b.md"
    run_all.main(False, output=output, sections=stubbed(run_all), log=lambda line: None)
    scenario = output.read_text(encoding="utf-8").split(f"### {OUTAGE_MISS}\n", 1)[1]
    assert "_No note yet._ 1 goal(s) here are **NOT met**" in scenario.split("\n### ", 1)[0]


def test_render_only_rewrites_the_doc_from_the_json(
    run_all: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    output = tmp_path / "b.md"
    monkeypatch.setattr(run_all, "NOTES", {})
    run_all.main(False, output=output, sections=stubbed(run_all), log=lambda line: None)
    before = output.read_text(encoding="utf-8")
    note = "Explained after the run."
    monkeypatch.setattr(run_all, "NOTES", {"outage: " + OUTAGE_MISS: [note]})
    run_all.render_only(output, stubbed(run_all))
    after = output.read_text(encoding="utf-8")
    assert note not in before and note in after
    expected = before.replace(
        "_No note yet._ 1 goal(s) here are **NOT met** and nobody has explained why: add a "
        "note to `NOTES` in `bench/run_all.py`.",
        note,
    )
    assert after == expected  # the same run: header, summary and tables unchanged


@pytest.mark.parametrize(
    ("module", "reason"),
    [
        # None in sys.modules makes `import bench.outage` fail as if it were not there.
        (None, "bench/outage is not there yet"),
        (ModuleType("bench.outage"), "bench/outage is not finished yet"),
    ],
    ids=["missing", "no-main"],
)
def test_missing_outage_package_is_skipped_and_its_goals_not_measured(
    run_all: ModuleType,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    module: ModuleType | None,
    reason: str,
) -> None:
    monkeypatch.setitem(sys.modules, "bench.outage", module)
    output = tmp_path / "b.md"
    sections = stubbed(run_all, outage=run_all.run_outage)
    outcomes = run_all.main(True, output=output, sections=sections, log=lambda line: None)
    outage = next(o for o in outcomes if o.section.key == "outage")
    assert outage.status == "skipped"
    assert reason in outage.reason
    summary = summary_of(output.read_text(encoding="utf-8"))
    outage_goals = [g for g in run_all.GOALS if g.section == "outage"]
    assert f"{len(outage_goals)} goals not measured" in summary
    for goal in outage_goals:
        line = next(line for line in summary.splitlines() if line.startswith(f"| {goal.text} |"))
        assert f"not measured: section skipped: {reason}" in line


def test_a_failing_section_is_reported_and_the_rest_still_run(
    run_all: ModuleType, tmp_path: Path
) -> None:
    def broken(quick: bool) -> list[dict[str, Any]]:
        raise RuntimeError("boom")

    output = tmp_path / "b.md"
    outcomes = run_all.main(
        True, output=output, sections=stubbed(run_all, breaker=broken), log=lambda line: None
    )
    assert [o.status for o in outcomes].count("failed") == 1
    doc = output.read_text(encoding="utf-8")
    assert "not measured: section failed: RuntimeError: boom" in summary_of(doc)
    assert "**Not measured in this run**: failed: RuntimeError: boom." in doc
    assert "### Concurrency limiter" in doc  # after the failure


def test_sections_that_no_longer_fit_the_budget_are_skipped(
    run_all: ModuleType, tmp_path: Path
) -> None:
    def slow(quick: bool) -> list[dict[str, Any]]:
        time.sleep(0.2)
        return transport_rows(quick)

    sections = [
        dataclasses.replace(s, seconds=(0.2, 0.2)) for s in stubbed(run_all, transport=slow)
    ]
    output = tmp_path / "b.md"
    outcomes = run_all.main(
        True, output=output, budget=0.3, sections=sections, log=lambda line: None
    )
    assert [o.status for o in outcomes] == ["ok"] + ["skipped"] * (len(sections) - 1)
    assert "this section usually takes 0 s" in outcomes[1].reason
    assert "budget" in outcomes[1].reason
    assert "- Run time: 0 s (budget 0 s)" in output.read_text(encoding="utf-8")


@pytest.mark.implementation
def test_command_line(run_all: ModuleType, tmp_path: Path) -> None:
    args = run_all._parse(["--quick", "--output", str(tmp_path / "x.md"), "--budget", "60"])
    assert (args.quick, args.output, args.budget) == (True, tmp_path / "x.md", 60.0)
    args = run_all._parse([])
    assert (args.quick, args.output, args.budget) == (False, ROOT / "docs" / "benchmarks.md", 600.0)


# --- the real scripts, quick ----------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.timeout(30)
def test_quick_run_of_the_middleware_and_breaker_benchmarks(
    run_all: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # bench/breaker.py has no quick mode of its own: the runner's quick mode calls its
    # run() with fewer, shorter rounds.
    sections = [s for s in run_all.SECTIONS if s.key in ("middleware", "breaker")]
    output = tmp_path / "b.md"
    start = time.perf_counter()
    outcomes = run_all.main(True, output=output, sections=sections, log=lambda line: None)
    assert time.perf_counter() - start < 20
    assert [(o.section.key, o.status) for o in outcomes] == [
        ("middleware", "ok"),
        ("breaker", "ok"),
    ]
    middleware, breaker = (o.rows for o in outcomes)
    ours = next(r for r in middleware if r["candidate"] == "gateway_guard")
    assert ours["median_us"] > 0 and isinstance(ours["goal_met"], bool)
    assert breaker[0]["us_per_call"] > 0 and isinstance(breaker[0]["goal_met"], bool)
    assert {r["library"] for r in breaker} >= {"gateway_guard", "pybreaker"}
    doc = output.read_text(encoding="utf-8")
    summary = summary_of(doc)
    for goal in run_all.GOALS:
        line = next(line for line in summary.splitlines() if line.startswith(f"| {goal.text} |"))
        if goal.section in ("middleware", "breaker"):
            # Measured: "met" or "**NOT met**", whichever this machine gives.
            assert line.endswith((" met |", " **NOT met** |")), line
        else:
            assert "not measured: no section measures it" in line, line
    assert "middleware overhead" in capsys.readouterr().out  # the script's own table


@pytest.mark.e2e
@pytest.mark.timeout(60)
def test_quick_run_of_the_clients_benchmark(capsys: pytest.CaptureFixture[str]) -> None:
    clients = importlib.import_module("bench.clients")
    rows = clients.main(quick=True)
    ours = {r["mode"]: r for r in rows if r["candidate"] == "gateway_guard"}
    assert set(ours) == {"requests", "aiohttp"}
    for row in ours.values():
        assert row["us_per_call"] > 0 and isinstance(row["goal_met"], bool)
    assert {r["candidate"] for r in rows} >= {"bare requests", "urllib3 Retry(total=3)"}
    assert "gateway_guard" in capsys.readouterr().out


# --- the simulated-cache view (bench/middleware.py --cachegrind) ---------------------------

# The summary cachegrind prints with --cache-sim=yes --branch-sim=yes (abridged).
_CACHEGRIND_SUMMARY = """\
==4242== I   refs:      1,000,000
==4242== I1  misses:        2,000
==4242== LLi misses:           30
==4242== D   refs:        400,000
==4242== D1  misses:        5,000  (   4,000 rd   +   1,000 wr)
==4242== LLd misses:           70  (      60 rd   +      10 wr)
==4242== Branches:        150,000  (   140,000 cond +  10,000 ind)
==4242== Mispredicts:       3,000  (     2,500 cond +     500 ind)
"""


@pytest.mark.implementation
def test_simulated_cache_counts_are_read_from_cachegrinds_summary(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.syspath_prepend(str(ROOT))
    common = importlib.import_module("bench._common")
    monkeypatch.setattr(common, "_cachegrind", lambda argv, options, timeout: _CACHEGRIND_SUMMARY)
    counts = common.simulate_caches(["python", "-c", "pass"])
    assert counts == {
        "instructions": 1_000_000,
        "i1_misses": 2_000,
        "lli_misses": 30,
        "d1_misses": 5_000,
        "lld_misses": 70,
        "mispredicts": 3_000,
    }
    # 1 cycle an instruction, 10 an L1 miss, 100 a last-level miss, 15 a misprediction.
    assert common.simulated_cycles(counts) == 1_000_000 + 70_000 + 10_000 + 45_000


def test_middleware_child_serves_requests_through_each_candidate(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.syspath_prepend(str(ROOT))
    middleware = importlib.import_module("bench.middleware")
    for kind in middleware.CACHEGRIND_KINDS:
        middleware.child(kind, 3)  # what valgrind runs; must not raise


def test_middleware_cachegrind_rows_are_per_request_differences(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.syspath_prepend(str(ROOT))
    middleware = importlib.import_module("bench.middleware")
    n1, n2 = middleware.CACHEGRIND_REQUESTS

    def fake(argv: list[str]) -> dict[str, int]:
        kind, requests = argv[-2], int(argv[-1])
        per = 2 if kind == "gateway_guard" else 1  # the guarded app costs twice as much
        base = {"instructions": 1000, "i1_misses": 0, "d1_misses": 0}
        base.update(lli_misses=0, lld_misses=0, mispredicts=0)
        return {
            k: v + per * requests * (100 if k == "instructions" else 1) for k, v in base.items()
        }

    monkeypatch.setattr(middleware, "simulate_caches", fake)
    monkeypatch.setattr(middleware.subprocess, "run", lambda *a, **k: None)
    rows = {r["candidate"]: r for r in middleware.run_cachegrind()}
    assert rows["bare"]["instructions"] == 100  # start-up (1000) cancels out
    assert rows["gateway_guard"]["instructions"] == 200
    assert rows["gateway_guard"]["cycles"] == 200 + 2 * (10 + 10 + 100 + 100 + 15)
    assert rows["bare"]["ratio"] == 1.0
    assert rows["gateway_guard"]["ratio"] == 2.0
    assert "simulated cycles" in middleware.format_cachegrind(list(rows.values()))
    assert n2 > n1
