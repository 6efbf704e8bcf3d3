"""Shared helpers for the bench scripts: timing, interleaved rounds, medians, tables.

This machine is shared and noisy, so one candidate timed after another measures the
neighbours as much as the code. The bench scripts therefore time their candidates in
*interleaved rounds* (each round in a new shuffled order, seeded) and compare
each candidate with the baseline timed **in the same round**; what they report is the
median of those per-round ratios (with a confidence interval, and their minimum), never
a ratio of two medians taken minutes apart.

The order is shuffled, not rotated: rotating (A,B,C then B,C,A ...) keeps every
candidate behind the same neighbour in every round, and what ran just before shifts a
sample by itself. Measured on bench/transport.py with a second bare httpx client as a
control row (2026-12-08): rotated, the control came out at 1.015x the baseline (interval
1.004-1.027x); shuffled, 1.002x (0.990-1.011x). Two copies of the same guard code loaded
side by side differed by 1.4% when rotated.

Every loop here runs a fixed number of times. ``interleave`` can also stop early, after
a whole round, once a wall-clock budget is spent, so a script stays bounded on a machine
that is much slower than expected; the rows then say how many rounds they got.

Timing uses ``time.process_time`` by default: the CPU time of this process, which leaves
out the time the scheduler gives to other processes (the main noise on a shared box) but
keeps everything the measured code costs, the garbage collector included. On this
machine it gives confidence intervals several times narrower than wall time. GC stays on
while timing (unlike ``timeit``): a candidate that allocates more pays for its extra
collections, as it would in production. The young generations are collected between
rounds, untimed, so every round starts from the same GC state (a full collection would
cost tens of ms per round for nothing).

Many short rounds beat a few long ones here: with about 10 ms per sample, the two sides of
a pair run close together in time and the median has more rounds to work with (measured:
100 calls x 161 rounds gave a ratio interval about half as wide as 400 x 41).
"""

from __future__ import annotations

import asyncio
import contextvars
import gc
import math
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

__all__ = [
    "CLOCKS",
    "Comparison",
    "Rounds",
    "Timer",
    "async_timer",
    "compare",
    "count_instructions",
    "goal",
    "interleave",
    "machine_note",
    "markdown_table",
    "measure",
    "measure_async",
    "median_ci",
    "simulate_caches",
    "simulated_cycles",
    "sync_timer",
    "text_table",
    "valgrind",
    "version",
]

Timer = Callable[[int], float]
"""``timer(number)`` runs ``number`` calls and returns the seconds they took."""

CLOCKS: dict[str, Callable[[], float]] = {
    "cpu": time.process_time,
    "wall": time.perf_counter,
}


# --- one measurement ------------------------------------------------------------------------


def _loop(fn: Callable[[], object], number: int, clock: Callable[[], float]) -> float:
    # range() and a local call are the whole loop overhead, the same for every candidate.
    t0 = clock()
    for _ in range(number):
        fn()
    return clock() - t0


async def _aloop(
    fn: Callable[[], Awaitable[object]], number: int, clock: Callable[[], float]
) -> float:
    t0 = clock()
    for _ in range(number):
        await fn()
    return clock() - t0


def sync_timer(
    fn: Callable[[], object],
    *,
    context: contextvars.Context | None = None,
    clock: str = "cpu",
) -> Timer:
    """A :data:`Timer` calling ``fn()``; inside ``context`` when given (ContextVars set)."""
    tick = CLOCKS[clock]
    if context is None:
        return lambda number: _loop(fn, number, tick)
    return lambda number: context.run(_loop, fn, number, tick)


def async_timer(
    fn: Callable[[], Awaitable[object]],
    runner: asyncio.Runner,
    *,
    context: contextvars.Context | None = None,
    clock: str = "cpu",
) -> Timer:
    """A :data:`Timer` awaiting ``fn()`` ``number`` times inside one running loop.

    The loop belongs to ``runner`` and is reused for every measurement, so starting a loop
    is never timed; the clock is read inside the coroutine.
    """
    tick = CLOCKS[clock]

    def timer(number: int) -> float:
        return runner.run(_aloop(fn, number, tick), context=context)

    return timer


def measure(
    fn: Callable[[], object], *, number: int, repeat: int, clock: str = "cpu"
) -> list[float]:
    """Microseconds per call of ``fn()`` for each of ``repeat`` runs of ``number`` calls."""
    timer = sync_timer(fn, clock=clock)
    return [timer(number) / number * 1e6 for _ in range(repeat)]


def measure_async(
    fn: Callable[[], Awaitable[object]],
    *,
    number: int,
    repeat: int,
    runner: asyncio.Runner | None = None,
    clock: str = "cpu",
) -> list[float]:
    """Like :func:`measure` for ``await fn()``, each run inside one running event loop."""
    if runner is not None:
        timer = async_timer(fn, runner, clock=clock)
        return [timer(number) / number * 1e6 for _ in range(repeat)]
    with asyncio.Runner() as own:
        timer = async_timer(fn, own, clock=clock)
        return [timer(number) / number * 1e6 for _ in range(repeat)]


# --- interleaved rounds ---------------------------------------------------------------------


@dataclass
class Rounds:
    """Per-round samples: ``samples[name][i]`` is µs per call in round ``i``."""

    samples: dict[str, list[float]]
    number: int
    rounds: int
    elapsed: float
    stopped_early: bool = False


def interleave(
    timers: Mapping[str, Timer],
    *,
    number: int,
    rounds: int,
    warmup: int = 0,
    budget: float | None = None,
    min_rounds: int = 3,
) -> Rounds:
    """Time every timer once per round, ``rounds`` times, in a new shuffled order each
    round (seeded, so a run is repeatable; see the module doc for why not rotated).

    ``warmup`` calls of each timer come first and are not kept. With ``budget`` (seconds),
    no new round starts once that much wall time has passed, provided ``min_rounds`` are
    done: the result is then marked ``stopped_early``.
    """
    names = list(timers)
    if warmup:
        for name in names:
            timers[name](warmup)
    samples: dict[str, list[float]] = {name: [] for name in names}
    shuffler = random.Random(len(names) * 1_000_003 + rounds)
    start = time.perf_counter()
    done = 0
    stopped = False
    for _ in range(rounds):
        if budget is not None and done >= min_rounds and time.perf_counter() - start > budget:
            stopped = True
            break
        gc.collect(1)
        order = names[:]
        shuffler.shuffle(order)
        for name in order:
            samples[name].append(timers[name](number) / number * 1e6)
        done += 1
    return Rounds(samples, number, done, time.perf_counter() - start, stopped)


def median_ci(values: Sequence[float], z: float = 1.96) -> tuple[float, float]:
    """A distribution-free ~95% confidence interval of the median (order statistics).

    The median's rank in a sample is binomial(n, 1/2); the interval runs between the
    order statistics ``z`` standard deviations (sqrt(n)/2) either side of it, which needs
    no assumption about the noise. With 7 values or fewer it is their whole range.
    """
    ordered = sorted(values)
    n = len(ordered)
    k = max(0, math.floor((n - z * math.sqrt(n)) / 2))
    return ordered[k], ordered[n - 1 - k]


@dataclass
class Comparison:
    """One candidate against the baseline, from per-round pairs."""

    name: str
    median_us: float
    min_us: float
    ratio_median: float
    ratio_min: float
    ratio_max: float
    ratio_ci: tuple[float, float]  # ~95% interval of ratio_median (see median_ci)
    added_us: float  # median over rounds of (candidate - baseline), µs per call
    added_ci: tuple[float, float]
    ratios: list[float] = field(repr=False, default_factory=list)


def compare(samples: Mapping[str, Sequence[float]], baseline: str) -> dict[str, Comparison]:
    """Median and min of the per-round ratios (and differences) of each candidate."""
    base = samples[baseline]
    result: dict[str, Comparison] = {}
    for name, values in samples.items():
        ratios = [v / b for v, b in zip(values, base, strict=True)]
        added = [v - b for v, b in zip(values, base, strict=True)]
        result[name] = Comparison(
            name=name,
            median_us=statistics.median(values),
            min_us=min(values),
            ratio_median=statistics.median(ratios),
            ratio_min=min(ratios),
            ratio_max=max(ratios),
            ratio_ci=median_ci(ratios),
            added_us=statistics.median(added),
            added_ci=median_ci(added),
            ratios=ratios,
        )
    return result


def goal(label: str, value: float, limit: float, *, unit: str = "x", quiet: bool = False) -> bool:
    """Print ``label: value <= limit: met`` (or ``NOT met``) and return whether it is met."""
    met = value <= limit
    if not quiet:
        verdict = "met" if met else "NOT met"
        print(f"goal {label}: {value:.3f}{unit} <= {limit:g}{unit}: {verdict}")
    return met


# --- instruction counts -------------------------------------------------------------------
#
# Timing on a loaded machine cannot tell 1.03x from 1.04x; counting the instructions a call
# executes can, and the count does not depend on what else runs. valgrind's cachegrind
# counts every instruction of the process, start-up included, so a caller runs the same
# command for two call counts and divides the difference (see run_instructions in
# bench/transport.py). Instructions are not time (a cache miss costs more than an add), so
# counts complement the timed tables; they do not replace them.

_I_REFS = re.compile(r"I\s+refs:\s+([\d,]+)")
# cachegrind's summary lines with --cache-sim=yes --branch-sim=yes, e.g. "I1  misses: 1,234".
_SUMMARY = re.compile(
    r"==\d+== (I\s+refs|I1\s+misses|LLi misses|D1\s+misses|LLd misses|"
    r"Mispredicts):\s+([\d,]+)"
)
_SUMMARY_KEYS = {
    "I refs": "instructions",
    "I1 misses": "i1_misses",
    "LLi misses": "lli_misses",
    "D1 misses": "d1_misses",
    "LLd misses": "lld_misses",
    "Mispredicts": "mispredicts",
}


def valgrind() -> str | None:
    """The valgrind executable, or None when it is not installed."""
    return shutil.which("valgrind")


def _cachegrind(argv: Sequence[str], options: Sequence[str], timeout: float) -> str:
    exe = valgrind()
    if exe is None:
        raise FileNotFoundError("valgrind is not installed")
    env = dict(os.environ, PYTHONHASHSEED="0")
    done = subprocess.run(
        [exe, "--tool=cachegrind", *options, "--cachegrind-out-file=/dev/null", *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        check=False,
    )
    if done.returncode != 0 or _I_REFS.search(done.stderr) is None:
        raise RuntimeError(f"{' '.join(argv)} failed under valgrind:\n{done.stderr[-2000:]}")
    return done.stderr


def count_instructions(argv: Sequence[str], *, timeout: float = 600.0) -> int:
    """Instructions executed by ``argv`` (a whole process) under cachegrind.

    ``PYTHONHASHSEED`` is pinned so that dict and set layouts, and with them the counts,
    are the same from run to run.
    """
    match = _I_REFS.search(_cachegrind(argv, ["--cache-sim=no"], timeout))
    assert match is not None  # _cachegrind checked
    return int(match.group(1).replace(",", ""))


def simulate_caches(argv: Sequence[str], *, timeout: float = 600.0) -> dict[str, int]:
    """Instructions, cache misses and branch mispredictions of ``argv`` under cachegrind.

    What instruction counts leave out: inside a web request a middleware's code and data
    are cold, and its misses cost more than its instructions (measured for the transport
    and the middleware alike). The simulated caches are valgrind's model of this machine's,
    so the counts are the same from run to run, unlike a timer's. Keys: instructions,
    i1_misses, d1_misses, lli_misses, lld_misses, mispredicts.
    """
    out = _cachegrind(argv, ["--cache-sim=yes", "--branch-sim=yes"], timeout)
    counts = dict.fromkeys(_SUMMARY_KEYS.values(), 0)
    for name, value in _SUMMARY.findall(out):
        counts[_SUMMARY_KEYS[" ".join(name.split())]] = int(value.replace(",", ""))
    return counts


def simulated_cycles(counts: Mapping[str, float]) -> float:
    """A rough cost model for :func:`simulate_caches` counts, in cycles.

    One cycle an instruction, 10 an L1 miss, 100 a last-level miss, 15 a mispredicted
    branch: textbook latencies for a current x86 core. It ranks changes well (it is how
    the middleware's pieces were priced), but it is a model, not a clock: read it as
    shares, beside the timed table.
    """
    return (
        counts["instructions"]
        + 10 * (counts["i1_misses"] + counts["d1_misses"])
        + 100 * (counts["lli_misses"] + counts["lld_misses"])
        + 15 * counts["mispredicts"]
    )


# --- tables and notes -----------------------------------------------------------------------


def _cells(rows: Sequence[Sequence[Any]]) -> list[list[str]]:
    return [["" if cell is None else str(cell) for cell in row] for row in rows]


def text_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], *, align: str = "") -> str:
    """A fixed-width table; ``align`` holds one ``<`` or ``>`` per column (default ``<``)."""
    cells = _cells(rows)
    widths = [len(h) for h in headers]
    for row in cells:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    aligns = align.ljust(len(headers), "<")

    def line(values: Sequence[str]) -> str:
        return "  ".join(
            f"{v:{a}{w}}" for v, a, w in zip(values, aligns, widths, strict=True)
        ).rstrip()

    out = [line(headers), "  ".join("-" * w for w in widths)]
    out += [line(row) for row in cells]
    return "\n".join(out)


def markdown_table(
    headers: Sequence[str], rows: Sequence[Sequence[Any]], *, align: str = ""
) -> str:
    """A GitHub-flavoured markdown table; ``align`` as for :func:`text_table`."""
    aligns = align.ljust(len(headers), "<")
    rule = ["---:" if a == ">" else "---" for a in aligns]
    out = ["| " + " | ".join(headers) + " |", "| " + " | ".join(rule) + " |"]
    out += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in _cells(rows)]
    return "\n".join(out)


def version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "?"


def machine_note() -> str:
    """Python, platform, CPUs and load: the context a reader needs to judge the numbers."""
    try:
        load = "load " + " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        load = "load ?"
    return (
        f"Python {sys.version.split()[0]} ({platform.python_implementation()}), "
        f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, {load}"
    )
