"""Per-response cost of rendering a gateway error, measured in one run on one machine.

    .venv/bin/python bench/render.py

During an outage every failing request renders an error response, thousands a second, so
the row that matters is a **cached** render: the same situation as the previous request,
a new request id. Rows:

- cached HTML / problem+json / plain text: ``ErrorRenderer.render`` with a browser's,
  an API client's and curl's Accept header (the goal applies to the HTML row);
- HEAD: the same, without a body;
- render_status: an app-returned 503 branded (``brand_app_errors``);
- uncached HTML: a different Retry-After every call, so every call is a cache miss (the
  price of the first error of each kind, and of a breaker's countdown seconds);
- debug HTML: debug mode renders every response afresh with the error's internals;
- negotiate: parsing Chrome's Accept header without the renderer's negotiation cache.

Time is CPU time (``time.process_time``); cases are interleaved, each row is the median
of the repetitions, as in bench/limiter.py.
"""

from __future__ import annotations

import statistics
import sys
import time
import timeit
from collections.abc import Callable
from typing import Any

GOAL_US = 50.0
REPEAT = 7
MIN_REPEAT = 3
WALL_BUDGET_SECONDS = 40.0
TARGET_SECONDS = 0.1
_CLOCK = time.process_time

CHROME = (
    "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,"
    "image/apng,*/*;q=0.8,application/signed-exchange;v=b3;q=0.7"
)

Runner = Callable[[int], float]


def _cases() -> list[tuple[str, Runner]]:
    from gateway_guard.errors import CircuitOpenError, UpstreamTimeout
    from gateway_guard.render import ErrorRenderer, negotiate
    from gateway_guard.settings import BrandSettings, Settings

    brand = BrandSettings(
        name="Acme Shop",
        logo_url="/static/logo.svg",
        accent_color="#5b21b6",
        support_url="https://acme.example/support",
        status_url="https://status.acme.example",
    )
    renderer = ErrorRenderer(Settings(service="shop", brand=brand))
    debug = ErrorRenderer(Settings(service="shop", debug=True, brand=brand))
    error = UpstreamTimeout("read timed out", upstream="payments", attempts=3, elapsed=2.5)
    countdown = [CircuitOpenError(retry_after=float(s)) for s in range(1, 10_001)]
    # Ids as the middleware makes them (headers.new_request_id): 32 hex characters.
    rid = "4bf92f3577b34da6a3ce929d0e0e4736"
    ns: dict[str, Any] = {
        "render": renderer.render,
        "render_status": renderer.render_status,
        "debug_render": debug.render,
        "negotiate": negotiate,
        "error": error,
        "rid": rid,
        "CHROME": CHROME,
        "countdown": countdown,
        "n": len(countdown),
    }

    def stmt(code: str) -> Runner:
        return timeit.Timer(code, timer=_CLOCK, globals=ns).timeit

    def uncached(number: int) -> float:
        # A fresh Retry-After each call: cycles through 10,000 values, beyond the cache.
        render, errors, size = renderer.render, countdown, len(countdown)
        start = _CLOCK()
        for i in range(number):
            render(errors[i % size], request_id=rid, accept=CHROME)
        return _CLOCK() - start

    return [
        ("cached HTML (browser)", stmt("render(error, request_id=rid, accept=CHROME)")),
        (
            "cached problem+json",
            stmt("render(error, request_id=rid, accept='application/json')"),
        ),
        ("cached text/plain (curl */*)", stmt("render(error, request_id=rid, accept='*/*')")),
        (
            "cached HTML, HEAD",
            stmt("render(error, request_id=rid, accept=CHROME, method='HEAD')"),
        ),
        ("render_status(503), HTML", stmt("render_status(503, request_id=rid, accept=CHROME)")),
        ("uncached HTML (cache miss)", uncached),
        ("debug HTML (never cached)", stmt("debug_render(error, request_id=rid, accept=CHROME)")),
        ("negotiate(Chrome's Accept)", stmt("negotiate(CHROME)")),
    ]


def _calibrate(runner: Runner, target: float) -> int:
    number = 100
    while True:
        elapsed = runner(number)
        if elapsed >= target / 10 or number >= 10_000_000:
            return max(1, int(number * target / max(elapsed, 1e-9)))
        number *= 10


def run(repeat: int = REPEAT, target_seconds: float = TARGET_SECONDS) -> list[dict[str, Any]]:
    """Measure every case, interleaved; one dict per row."""
    cases = _cases()
    numbers = [_calibrate(runner, target_seconds) for _, runner in cases]
    samples: list[list[float]] = [[] for _ in cases]
    deadline = time.monotonic() + WALL_BUDGET_SECONDS
    for done in range(repeat):
        if done >= MIN_REPEAT and time.monotonic() > deadline:
            break
        for i, (_, runner) in enumerate(cases):
            samples[i].append(runner(numbers[i]) / numbers[i] * 1e6)
    results = [
        {
            "bench": "render",
            "operation": operation,
            "us_per_call": statistics.median(runs),
            "us_min": min(runs),
            "us_max": max(runs),
            "repeat": len(runs),
            "seconds_per_repeat": target_seconds,
        }
        for (operation, _), runs in zip(cases, samples, strict=True)
    ]
    ours = results[0]
    ours["goal_us"] = GOAL_US
    ours["goal_met"] = ours["us_per_call"] <= GOAL_US
    return results


def _table(results: list[dict[str, Any]]) -> str:
    lines = [f"{'operation':<32} {'µs/call':>9} {'min-max':>17}", "-" * 60]
    for row in results:
        spread = f"{row['us_min']:.2f}-{row['us_max']:.2f}"
        lines.append(f"{row['operation']:<32} {row['us_per_call']:9.2f} {spread:>17}")
    ours = results[0]
    verdict = "met" if ours["goal_met"] else "NOT met"
    lines += [
        "",
        f"goal: cached HTML render <= {GOAL_US:g} µs: {ours['us_per_call']:.2f} µs, {verdict}",
        f"Python {sys.version.split()[0]}, median of {ours['repeat']} interleaved repetitions "
        f"of ~{ours['seconds_per_repeat']} s of CPU time each",
    ]
    return "\n".join(lines)


def main(*, quiet: bool = False) -> list[dict[str, Any]]:
    """Run the benchmark, print the table unless ``quiet``, return one dict per row."""
    results = run()
    if not quiet:
        print(_table(results))
    return results


if __name__ == "__main__":
    main()
