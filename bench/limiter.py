"""Per-call cost of an uncontended concurrency limiter: gateway_guard's ConcurrencyLimiter
against the standard library's semaphores, measured in one run on one machine.

    .venv/bin/python bench/limiter.py

    .venv/bin/python bench/limiter.py --against HEAD   # also time the committed limiter

Every row is one acquire + release of a free slot (a limit of 8, nobody else around), the
pair a transport or middleware pays on every call while the upstream keeps up. The
limiter can queue (``max_queue`` 32, ``queue_timeout`` 1 s), like the inbound shedding
limiter that every request passes and a bulkhead with ``max_wait > 0``: an uncontended
pair on it takes no lock and reads no clock. Methods are bound to locals first, as a
driver's loop would hold them. Cases are interleaved (one run of each, then the next
repetition) so a machine that slows down midway skews every row alike; each row is the
median of the repetitions.

- ``--against REV``: the same rows for ``gateway_guard.limiter`` as of git revision
  ``REV`` (or a ``limiter.py`` file path), loaded as a separate package and interleaved
  with the current code in the same run: a before/after on one machine at one time.

- sync rows: ``timeit`` of the statement.
- async rows: a coroutine awaiting the pair ``number`` times inside one running loop;
  loop start-up is outside the timing.
- Time is the process's CPU time (``time.process_time``), not wall time: everything here
  runs on one thread without blocking, so the two agree on an idle machine, and CPU time
  stays put on a shared one where other processes steal whole time slices.
- "shed" rows: the price of saying no, i.e. an acquire on a full fail-fast limiter that
  raises LoadShedError, because under overload that path is the hot one.

Ratios compare each gateway_guard row with the standard library's semaphore of the same
kind (``threading.Semaphore`` or ``asyncio.Semaphore``), which is what a hand-rolled
bulkhead would use.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import timeit
from collections.abc import Callable, Coroutine
from pathlib import Path
from types import ModuleType
from typing import Any

GOAL_US = 0.4
REPEAT = 9
MIN_REPEAT = 3
WALL_BUDGET_SECONDS = 40.0
TARGET_SECONDS = 0.1
LIMIT = 8
QUEUE = 4 * LIMIT
QUEUE_TIMEOUT = 1.0
ROOT = Path(__file__).resolve().parent.parent

Runner = Callable[[int], float]  # number of executions -> seconds taken
_CLOCK = time.process_time


def _sync_runner(stmt: str, namespace: dict[str, Any]) -> Runner:
    timer = timeit.Timer(stmt, timer=_CLOCK, globals=namespace)
    return timer.timeit


def _async_runner(body: Callable[[int], Coroutine[Any, Any, float]]) -> Runner:
    return lambda number: asyncio.run(body(number))


def _load_limiter(against: str) -> ModuleType:
    """``gateway_guard.limiter`` as of git revision ``against`` (or the file at that path).

    A revision's whole package is loaded under another name, so that the private modules
    its ``limiter.py`` imports from (relatively) are that revision's too.
    """
    path = Path(against)
    if path.is_file():
        name = "_bench_limiter_baseline"
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None
        assert spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while building
        spec.loader.exec_module(module)
        return module
    root = Path(tempfile.mkdtemp())
    archive = subprocess.run(
        ["git", "archive", against, "src/gateway_guard"], cwd=ROOT, check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(root)], input=archive, check=True)
    # A bare package object: its modules load on demand, without running its __init__.
    package = ModuleType("_bench_gateway_guard_baseline")
    package.__path__ = [str(root / "src" / "gateway_guard")]
    sys.modules[package.__name__] = package
    return importlib.import_module(f"{package.__name__}.limiter")


def _pair_cases(module: Any, library: str) -> list[tuple[str, str, str, Runner]]:
    """The uncontended pairs on a queue-capable limiter built by ``module``."""
    limiter = module.ConcurrencyLimiter("bench", LIMIT, QUEUE, QUEUE_TIMEOUT)
    ns: dict[str, Any] = {
        "acquire": limiter.acquire,
        "try_acquire": limiter.try_acquire,
        "release": limiter.release,
        "slot": limiter.slot,
    }

    async def limiter_pair(number: int) -> float:
        acquire, release = limiter.acquire_async, limiter.release
        start = _CLOCK()
        for _ in range(number):
            await acquire()
            release()
        return _CLOCK() - start

    async def limiter_slot(number: int) -> float:
        slot = limiter.async_slot
        start = _CLOCK()
        for _ in range(number):
            async with slot():
                pass
        return _CLOCK() - start

    sync, aio = "sync", "async"
    return [
        (sync, library, "acquire() + release()", _sync_runner("acquire(); release()", ns)),
        (sync, library, "try_acquire() + release()", _sync_runner("try_acquire(); release()", ns)),
        (sync, library, "with slot(): pass", _sync_runner("with slot(): pass", ns)),
        (aio, library, "await acquire_async() + release()", _async_runner(limiter_pair)),
        (aio, library, "async with async_slot(): pass", _async_runner(limiter_slot)),
    ]


def _cases(against: str | None = None) -> list[tuple[str, str, str, Runner]]:
    """(kind, library, operation, runner)."""
    from gateway_guard import limiter as current
    from gateway_guard.errors import LoadShedError
    from gateway_guard.limiter import ConcurrencyLimiter

    unlimited = ConcurrencyLimiter("bench-unlimited", 0, 0, 0.0)
    full = ConcurrencyLimiter("bench-full", 1, 0, 0.0)
    full.acquire()
    semaphore = threading.Semaphore(LIMIT)
    lock = threading.Lock()
    ns: dict[str, Any] = {
        "u_acquire": unlimited.acquire,
        "u_release": unlimited.release,
        "f_acquire": full.acquire,
        "LoadShedError": LoadShedError,
        "s_acquire": semaphore.acquire,
        "s_release": semaphore.release,
        "l_acquire": lock.acquire,
        "l_release": lock.release,
    }

    async def limiter_shed(number: int) -> float:
        acquire = full.acquire_async
        shed = 0
        start = _CLOCK()
        for _ in range(number):
            try:
                await acquire()
            except LoadShedError:
                shed += 1
        elapsed = _CLOCK() - start
        assert shed == number
        return elapsed

    async def semaphore_pair(number: int) -> float:
        sem = asyncio.Semaphore(LIMIT)
        acquire, release = sem.acquire, sem.release
        start = _CLOCK()
        for _ in range(number):
            await acquire()
            release()
        return _CLOCK() - start

    async def semaphore_with(number: int) -> float:
        sem = asyncio.Semaphore(LIMIT)
        start = _CLOCK()
        for _ in range(number):
            async with sem:
                pass
        return _CLOCK() - start

    sync, aio = "sync", "async"
    ours = _pair_cases(current, "gateway_guard")
    cases = [
        *(c for c in ours if c[0] == sync),
        (
            sync,
            "gateway_guard",
            "unlimited acquire() + release()",
            _sync_runner("u_acquire(); u_release()", ns),
        ),
        (
            sync,
            "gateway_guard",
            "shed: acquire() raises LoadShedError",
            _sync_runner("try: f_acquire()\nexcept LoadShedError: pass", ns),
        ),
        (
            sync,
            "threading",
            "Semaphore acquire() + release()",
            _sync_runner("s_acquire(); s_release()", ns),
        ),
        (
            sync,
            "threading",
            "Lock acquire() + release() (floor)",
            _sync_runner("l_acquire(); l_release()", ns),
        ),
        *(c for c in ours if c[0] == aio),
        (aio, "gateway_guard", "shed: acquire_async() raises", _async_runner(limiter_shed)),
        (aio, "asyncio", "Semaphore await acquire() + release()", _async_runner(semaphore_pair)),
        (aio, "asyncio", "async with Semaphore: pass", _async_runner(semaphore_with)),
    ]
    if against is not None:
        cases += _pair_cases(_load_limiter(against), f"gateway_guard@{against}")
    return cases


def _calibrate(runner: Runner, target: float) -> int:
    number = 1000
    while True:
        elapsed = runner(number)
        if elapsed >= target / 10 or number >= 10_000_000:
            return max(1, int(number * target / max(elapsed, 1e-9)))
        number *= 10


def run(
    repeat: int = REPEAT, target_seconds: float = TARGET_SECONDS, against: str | None = None
) -> list[dict[str, Any]]:
    """Measure every case, interleaved; one dict per row (``against``: see the docstring)."""
    cases = _cases(against)
    numbers = [_calibrate(runner, target_seconds) for *_, runner in cases]
    samples: list[list[float]] = [[] for _ in cases]
    # CPU time is what is measured, but wall time is what a caller waits for: on a
    # crowded machine stop repeating early rather than run past the budget.
    deadline = time.monotonic() + WALL_BUDGET_SECONDS
    for done in range(repeat):
        if done >= MIN_REPEAT and time.monotonic() > deadline:
            break
        for i, (*_, runner) in enumerate(cases):
            samples[i].append(runner(numbers[i]) / numbers[i] * 1e6)

    results: list[dict[str, Any]] = []
    for (kind, library, operation, _), runs in zip(cases, samples, strict=True):
        results.append(
            {
                "bench": "limiter",
                "kind": kind,
                "library": library,
                "operation": operation,
                "us_per_call": statistics.median(runs),
                "us_min": min(runs),
                "us_max": max(runs),
                "ratio": None,
                "repeat": len(runs),
                "seconds_per_repeat": target_seconds,
            }
        )
    baseline = {
        "sync": next(r for r in results if r["operation"].startswith("Semaphore acquire")),
        "async": next(r for r in results if r["operation"].startswith("Semaphore await")),
    }
    for row in results:
        row["ratio"] = row["us_per_call"] / baseline[row["kind"]]["us_per_call"]
    ours = results[0]
    ours["goal_us"] = GOAL_US
    ours["goal_met"] = ours["us_per_call"] <= GOAL_US
    return results


def _table(results: list[dict[str, Any]]) -> str:
    width = max(14, *(len(row["library"]) for row in results))
    lines = [
        f"{'kind':<6} {'library':<{width}} {'operation':<40} {'µs/call':>8} {'min-max':>13}"
        f" {'ratio':>6}",
        "-" * (78 + width),
    ]
    for row in results:
        spread = f"{row['us_min']:.3f}-{row['us_max']:.3f}"
        lines.append(
            f"{row['kind']:<6} {row['library']:<{width}} {row['operation']:<40} "
            f"{row['us_per_call']:8.3f} {spread:>13} {row['ratio']:5.2f}x"
        )
    ours = results[0]
    verdict = "met" if ours["goal_met"] else "NOT met"
    lines += [
        "",
        "ratio: against the standard library's semaphore of the same kind.",
        f"goal: uncontended sync acquire() + release() <= {GOAL_US} µs: "
        f"{ours['us_per_call']:.3f} µs, {verdict}",
    ]
    current = {(r["kind"], r["operation"]): r for r in results if r["library"] == "gateway_guard"}
    for row in results:
        now = current.get((row["kind"], row["operation"]))
        if row["library"].startswith("gateway_guard@") and now is not None:
            lines.append(
                f"before/after, {row['kind']} {row['operation']}: {row['us_per_call']:.3f}"
                f" -> {now['us_per_call']:.3f} µs"
                f" ({row['us_per_call'] / now['us_per_call']:.2f}x faster)"
            )
    lines.append(
        f"Python {sys.version.split()[0]}, median of {ours['repeat']} interleaved repetitions "
        f"of ~{ours['seconds_per_repeat']} s of CPU time each"
    )
    return "\n".join(lines)


def main(*, quiet: bool = False, against: str | None = None) -> list[dict[str, Any]]:
    """Run the benchmark, print the table unless ``quiet``, return one dict per row."""
    results = run(against=against)
    if not quiet:
        print(_table(results))
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--against",
        metavar="REV",
        help="also time gateway_guard.limiter as of this git revision (or a limiter.py file)",
    )
    main(against=parser.parse_args().against)
