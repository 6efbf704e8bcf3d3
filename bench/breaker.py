"""Per-call cost of a closed circuit breaker: gateway_guard against pybreaker, circuitbreaker
and purgatory, measured in one run on one machine.

    .venv/bin/python bench/breaker.py

Goal: ``admit()`` + ``record_success()`` on a closed count-window breaker costs at most
0.5 µs per call (CPython 3.11).

Every row is one admitted, successful call through a closed breaker. What each row does
(each library's cheapest path that still checks the state and records the outcome):

- gateway_guard: ``record_success(0.0, admit())``, the decision pair a transport makes; the
  duration is a constant because measuring time is the transport's job in every row.
- gateway_guard + call: the same around a no-op call, shaped like the libraries' rows,
  which always call the guarded function. Library ratios are against this row.
- pybreaker / circuitbreaker: ``breaker.call(noop)``. circuitbreaker's ``with breaker:``
  is not used: its ``__enter__`` does not check whether the circuit is open.
- purgatory: ``with breaker: pass`` on a breaker fetched once from the sync factory (its
  decorator would fetch it again on every call).

Method: ``timeit`` statements with the breaker's methods bound to locals in the setup, as
a driver's loop would hold them, so rows compare breakers and not attribute lookups. The
clock is the process's CPU time and the garbage collector stays on (see
``bench/_common.py`` for why). Rows are timed in interleaved rounds (each round times
every row once, in a shuffled order); a row's µs/call is the median over rounds, and its
ratio the median of the per-round ratios against its baseline timed in the same round.
"""

from __future__ import annotations

import time
import timeit
from collections.abc import Callable
from typing import Any

# As a script (`python bench/breaker.py`) bench/ is on sys.path; imported as
# `bench.breaker` (run_all, tests) the package path is.
try:
    from bench._common import compare, machine_note, text_table, version
except ImportError:
    from _common import (  # type: ignore[import-not-found,no-redef]
        compare,
        machine_note,
        text_table,
        version,
    )

GOAL_US = 0.5
ROUNDS = 7
MIN_ROUNDS = 3
TARGET_SECONDS = 0.2  # CPU time per row per round
WALL_BUDGET_SECONDS = 40.0  # no new round starts after this, once MIN_ROUNDS are done
_SETUP_GC = "import gc; gc.enable()\n"


def _noop() -> None:
    return None


def _gateway_guard(window: str) -> dict[str, Any]:
    from gateway_guard.breaker import CircuitBreaker
    from gateway_guard.policy import BreakerPolicy

    breaker = CircuitBreaker("bench", BreakerPolicy(window=window))  # type: ignore[arg-type]
    return {"breaker": breaker, "noop": _noop}


def _cases() -> list[tuple[str, str, str, str, Callable[[], dict[str, Any]]]]:
    """(library, distribution, operation, timeit setup + stmt, namespace factory)."""
    return [
        (
            "gateway_guard",
            "gateway-guard",
            "admit + record_success (count window)",
            "admit = breaker.admit; ok = breaker.record_success\n---\nok(0.0, admit())",
            lambda: _gateway_guard("count"),
        ),
        (
            "gateway_guard",
            "gateway-guard",
            "admit + record_success (time window)",
            "admit = breaker.admit; ok = breaker.record_success\n---\nok(0.0, admit())",
            lambda: _gateway_guard("time"),
        ),
        (
            "gateway_guard",
            "gateway-guard",
            "admit + noop() + record_success",
            "admit = breaker.admit; ok = breaker.record_success\n---\n"
            "probe = admit(); noop(); ok(0.0, probe)",
            lambda: _gateway_guard("count"),
        ),
        (
            "pybreaker",
            "pybreaker",
            "call(noop)",
            "call = breaker.call\n---\ncall(noop)",
            _pybreaker,
        ),
        (
            "circuitbreaker",
            "circuitbreaker",
            "call(noop)",
            "call = breaker.call\n---\ncall(noop)",
            _circuitbreaker,
        ),
        (
            "purgatory",
            "purgatory",
            "with breaker: pass (sync)",
            "brk = breaker\n---\nwith brk: pass",
            _purgatory,
        ),
    ]


def _pybreaker() -> dict[str, Any]:
    import pybreaker

    return {"breaker": pybreaker.CircuitBreaker(fail_max=5, reset_timeout=30), "noop": _noop}


def _circuitbreaker() -> dict[str, Any]:
    import circuitbreaker  # type: ignore[import-untyped]

    breaker = circuitbreaker.CircuitBreaker(failure_threshold=5, recovery_timeout=30)
    return {"breaker": breaker, "noop": _noop}


def _purgatory() -> dict[str, Any]:
    import purgatory

    factory = purgatory.SyncCircuitBreakerFactory(default_threshold=5, default_ttl=30)
    return {"breaker": factory.get_breaker("bench")}


def _timer(code: str, namespace: dict[str, Any], target: float) -> tuple[timeit.Timer, int]:
    """A timer for ``code`` (``setup\\n---\\nstmt``) and a loop count taking about ``target``."""
    setup, stmt = code.split("\n---\n")
    timer = timeit.Timer(stmt, _SETUP_GC + setup, timer=time.process_time, globals=namespace)
    number, elapsed = timer.autorange()
    return timer, max(1, int(number * target / max(elapsed, 1e-9)))


def run(
    rounds: int = ROUNDS,
    target_seconds: float = TARGET_SECONDS,
    budget: float = WALL_BUDGET_SECONDS,
) -> list[dict[str, Any]]:
    """Measure every case; rows for libraries that are not installed say so instead."""
    results: list[dict[str, Any]] = []
    timers: dict[str, tuple[timeit.Timer, int]] = {}
    for index, (library, distribution, operation, code, factory) in enumerate(_cases()):
        row: dict[str, Any] = {
            "bench": "breaker",
            "key": str(index),
            "library": library,
            "version": version(distribution),
            "operation": operation,
            "us_per_call": None,
            "best_us_per_call": None,
            "ratio": None,
            "ratio_min": None,
            "ratio_max": None,
            "rounds": 0,
            "error": None,
        }
        results.append(row)
        try:
            namespace = factory()
        except ImportError as exc:
            row["error"] = f"not installed ({exc.name})"
            continue
        timers[row["key"]] = _timer(code, namespace, target_seconds)

    keys = list(timers)
    samples: dict[str, list[float]] = {key: [] for key in keys}
    start = time.perf_counter()
    for r in range(rounds):
        if r >= MIN_ROUNDS and time.perf_counter() - start > budget:
            break
        shift = r % len(keys)
        for key in keys[shift:] + keys[:shift]:
            timer, number = timers[key]
            samples[key].append(timer.timeit(number) / number * 1e6)

    # Our own rows against the decision pair (row 0); libraries against our row that, like
    # them, calls the guarded function (row 2).
    ours, like_for_like = compare(samples, "0"), compare(samples, "2")
    for row in results:
        if row["key"] not in samples:
            continue
        own = row["library"] == "gateway_guard"
        c = (ours if own else like_for_like)[row["key"]]
        row.update(
            us_per_call=c.median_us,
            best_us_per_call=c.min_us,
            ratio=c.ratio_median,
            ratio_min=c.ratio_min,
            ratio_max=c.ratio_max,
            rounds=len(samples[row["key"]]),
        )
    decision = results[0]
    decision["goal_us"] = GOAL_US
    decision["goal_met"] = decision["us_per_call"] <= GOAL_US
    return results


def _table(results: list[dict[str, Any]]) -> str:
    rows = []
    for row in results:
        if row["us_per_call"] is None:
            rows.append([row["library"], row["version"], row["operation"], row["error"], ""])
            continue
        rows.append(
            [
                row["library"],
                row["version"],
                row["operation"],
                f"{row['us_per_call']:.3f}",
                f"{row['ratio']:.2f}x ({row['ratio_min']:.2f}-{row['ratio_max']:.2f})",
            ]
        )
    table = text_table(
        ["library", "version", "operation", "µs/call", "ratio (min-max)"], rows, align="<<<>>"
    )
    ours = results[0]
    verdict = "met" if ours["goal_met"] else "NOT met"
    return "\n".join(
        [
            table,
            "",
            "ratio: gateway_guard rows against the first row; library rows against",
            "'admit + noop() + record_success' (both call a no-op function).",
            f"goal admit + record_success (closed, count window): {ours['us_per_call']:.3f} µs"
            f" <= {GOAL_US} µs: {verdict}",
            f"median of {ours['rounds']} interleaved rounds, ~{TARGET_SECONDS} s CPU per row"
            f" per round; {machine_note()}",
        ]
    )


def main(*, quiet: bool = False) -> list[dict[str, Any]]:
    """Run the benchmark, print the table unless ``quiet``, return one dict per row."""
    results = run()
    if not quiet:
        print(_table(results))
    return results


if __name__ == "__main__":
    main()
