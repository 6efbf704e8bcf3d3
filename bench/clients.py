"""Per-call cost of the requests and aiohttp drivers against the bare clients.

    .venv/bin/python bench/clients.py [--quick] [--markdown] [--clock cpu|wall] [--instructions]

Goals (issue #12): a guarded ``requests.Session`` costs at most 1.03x a bare one per call;
a guarded aiohttp session at most 1.05x a bare one.

Every candidate makes the same call, ``GET /items/42``, to the project's misbehaving
upstream in ``ok`` mode (a small JSON echo), running in ANOTHER process on 127.0.0.1, so
the client's own CPU time is what the default clock (this process's CPU time) measures.
Each candidate has its own session, built once, its connection kept alive.

requests (``session.get(url)``, body read whole):

- bare requests: ``requests.Session()`` (the baseline).
- urllib3 Retry(total=3): a session with ``HTTPAdapter(max_retries=Retry(total=3))`` mounted,
  the usual hand-built resilience for requests (retries only, no breaker, no deadline).
- gateway_guard: ``guard.session("up")`` with the defaults: breaker on, 3 attempts, a
  bulkhead of 100, a deadline bounding every socket read.

aiohttp (``async with session.get(url) as r: await r.read()``):

- bare aiohttp: ``aiohttp.ClientSession(base_url=...)`` (the baseline).
- gateway_guard: ``guard.aiohttp_session("up")`` (its middleware, the body watched until it
  ends, the deadline).

``--instructions`` (valgrind) adds a noise-free view: instructions per call of each
candidate in this process (the upstream runs outside valgrind), as the difference of two
runs of 100 and 400 calls, so start-up and imports cancel out.

Method: ``bench/_common.py``'s interleaved rounds, each candidate against the baseline
timed in the same round; the tables give the median per-round ratio with its 95%
interval and the median added µs. The default run takes about 40 s, ``--quick`` about 8 s.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
import requests
from requests.adapters import HTTPAdapter
from urllib3.util import Retry

import gateway_guard as gg

try:
    from bench._common import (
        async_timer,
        compare,
        count_instructions,
        interleave,
        machine_note,
        markdown_table,
        sync_timer,
        text_table,
        valgrind,
        version,
    )
except ImportError:
    from _common import (  # type: ignore[import-not-found,no-redef]
        async_timer,
        compare,
        count_instructions,
        interleave,
        machine_note,
        markdown_table,
        sync_timer,
        text_table,
        valgrind,
        version,
    )

GOALS = {"requests": 1.03, "aiohttp": 1.05}
PATH = "/items/42"
BASELINES = {"requests": "bare requests", "aiohttp": "bare aiohttp"}
GUARD = "gateway_guard"


@dataclass(frozen=True)
class Plan:
    number: int
    rounds: int
    warmup: int
    budget: float  # wall seconds per mode after which no new round starts


FULL = Plan(number=50, rounds=101, warmup=200, budget=18.0)
QUICK = Plan(number=20, rounds=21, warmup=40, budget=3.0)


@contextmanager
def upstream() -> Iterator[str]:
    """The misbehaving upstream in ok mode, in its own process; yields its data URL."""
    process = subprocess.Popen(
        [sys.executable, "-m", "gateway_guard.testing.upstream", "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        for _ in range(20):
            line = process.stdout.readline()
            match = re.match(r"data:\s+(http://127\.0\.0\.1:\d+)", line)
            if match:
                yield match.group(1)
                return
        raise RuntimeError("the upstream did not start")
    finally:
        process.terminate()
        process.wait(10)
        if process.stdout is not None:
            process.stdout.close()


def requests_candidates(stack: ExitStack, url: str) -> dict[str, Callable[[], object]]:
    bare = stack.enter_context(requests.Session())
    retrying = stack.enter_context(requests.Session())
    adapter = HTTPAdapter(max_retries=Retry(total=3))
    retrying.mount("http://", adapter)
    guard = gg.Guard({"upstreams": {"up": {"base_url": url}}})
    guarded = stack.enter_context(guard.session("up"))
    target = url + PATH
    return {
        BASELINES["requests"]: lambda: bare.get(target).content,
        "urllib3 Retry(total=3)": lambda: retrying.get(target).content,
        GUARD: lambda: guarded.get(PATH).content,
    }


def aiohttp_candidates(
    sessions: list[aiohttp.ClientSession], url: str
) -> dict[str, Callable[[], Awaitable[object]]]:
    # Both with base_url (the guarded one's comes from the settings), so both pay the join.
    bare = aiohttp.ClientSession(base_url=url)
    guard = gg.Guard({"upstreams": {"up": {"base_url": url}}})
    guarded = guard.aiohttp_session("up")
    sessions += [bare, guarded]

    async def call_bare() -> bytes:
        async with bare.get(PATH) as response:
            return await response.read()

    async def call_guarded() -> bytes:
        async with guarded.get(PATH) as response:
            return await response.read()

    return {BASELINES["aiohttp"]: call_bare, GUARD: call_guarded}


def _rows(mode: str, samples: dict[str, list[float]], meta: dict[str, Any]) -> list[dict[str, Any]]:
    stats = compare(samples, BASELINES[mode])
    rows = []
    for name, c in stats.items():
        is_goal = name == GUARD
        library = "urllib3" if "urllib3" in name else mode
        rows.append(
            {
                "mode": mode,
                "candidate": name,
                "baseline": BASELINES[mode],
                "version": version("gateway-guard" if is_goal else library),
                "us_per_call": c.median_us,
                "ratio": c.ratio_median,
                "ratio_ci": c.ratio_ci,
                "added_us": c.added_us,
                "goal_ratio": GOALS[mode] if is_goal else None,
                "goal_met": c.ratio_median <= GOALS[mode] if is_goal else None,
                **meta,
            }
        )
    return rows


def format_table(rows: list[dict[str, Any]], *, markdown: bool = False) -> str:
    headers = ["client", "candidate", "µs/call", "ratio", "95% interval", "added µs", "goal"]
    cells = [
        [
            r["mode"],
            r["candidate"],
            f"{r['us_per_call']:.1f}",
            f"{r['ratio']:.3f}x",
            f"{r['ratio_ci'][0]:.3f} to {r['ratio_ci'][1]:.3f}",
            f"{r['added_us']:+.1f}",
            (f"≤ {r['goal_ratio']}x: " + ("met" if r["goal_met"] else "NOT met"))
            if r["goal_ratio"]
            else "",
        ]
        for r in rows
    ]
    table = (markdown_table if markdown else text_table)(headers, cells, align="<<>>>><")
    return f"{table}\n{machine_note()}"


def main(
    quick: bool = False, *, markdown: bool = False, clock: str = "cpu", quiet: bool = False
) -> list[dict[str, Any]]:
    """Time both clients, print the table (unless ``quiet``), return one dict per row."""
    plan = QUICK if quick else FULL
    rows: list[dict[str, Any]] = []
    with upstream() as url:
        with ExitStack() as stack:
            calls = requests_candidates(stack, url)
            for call in calls.values():
                call()  # every candidate works before any is timed
            timers = {name: sync_timer(call, clock=clock) for name, call in calls.items()}
            rounds = interleave(
                timers,
                number=plan.number,
                rounds=plan.rounds,
                warmup=plan.warmup,
                budget=plan.budget,
            )
            meta = {"rounds": len(rounds.samples[BASELINES["requests"]]), "number": plan.number}
            rows += _rows("requests", rounds.samples, {**meta, "clock": clock})
        sessions: list[aiohttp.ClientSession] = []
        with asyncio.Runner() as runner:
            try:
                acalls = runner.run(_build_async(sessions, url))
                for acall in acalls.values():
                    runner.run(acall())
                atimers = {
                    name: async_timer(acall, runner, clock=clock) for name, acall in acalls.items()
                }
                arounds = interleave(
                    atimers,
                    number=plan.number,
                    rounds=plan.rounds,
                    warmup=plan.warmup,
                    budget=plan.budget,
                )
            finally:
                for session in sessions:
                    runner.run(session.close())
        meta = {"rounds": len(arounds.samples[BASELINES["aiohttp"]]), "number": plan.number}
        rows += _rows("aiohttp", arounds.samples, {**meta, "clock": clock})
    if not quiet:
        print(format_table(rows, markdown=markdown))
    return rows


INSTRUCTION_CALLS = (100, 400)


def _child(mode: str, candidate: str, calls: int, url: str) -> None:
    """What --instructions runs under valgrind: ``calls`` calls of one candidate."""
    if mode == "requests":
        with ExitStack() as stack:
            call = requests_candidates(stack, url)[candidate]
            call()
            for _ in range(calls):
                call()
        return

    async def run() -> None:
        sessions: list[aiohttp.ClientSession] = []
        try:
            acall = aiohttp_candidates(sessions, url)[candidate]
            await acall()
            for _ in range(calls):
                await acall()
        finally:
            for session in sessions:
                await session.close()

    asyncio.run(run())


def run_instructions() -> list[dict[str, Any]]:
    n1, n2 = INSTRUCTION_CALLS
    names = {
        "requests": [BASELINES["requests"], "urllib3 Retry(total=3)", GUARD],
        "aiohttp": [BASELINES["aiohttp"], GUARD],
    }
    rows = []
    with upstream() as url:
        for mode, candidates in names.items():
            per_call = {}
            for name in candidates:
                counts = [
                    count_instructions(
                        [sys.executable, __file__, "--child", mode, name, str(n), url]
                    )
                    for n in (n1, n2)
                ]
                per_call[name] = (counts[1] - counts[0]) / (n2 - n1)
            bare = per_call[BASELINES[mode]]
            for name, value in per_call.items():
                rows.append(
                    {
                        "mode": mode,
                        "candidate": name,
                        "instructions_per_call": value,
                        "ratio": value / bare,
                        "added_instructions": value - bare,
                    }
                )
    return rows


async def _build_async(
    sessions: list[aiohttp.ClientSession], url: str
) -> dict[str, Callable[[], Awaitable[object]]]:
    # aiohttp sessions belong to the loop they are made on: made here, on the runner's.
    return aiohttp_candidates(sessions, url)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="~8 s smoke run")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    parser.add_argument(
        "--instructions", action="store_true", help="instructions per call under valgrind"
    )
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


if __name__ == "__main__":
    args = _parse(sys.argv[1:])
    if args.child:
        mode, candidate, calls, url = args.child
        _child(mode, candidate, int(calls), url)
    elif args.instructions:
        if valgrind() is None:
            sys.exit("--instructions: valgrind is not installed")
        for row in run_instructions():
            print(
                f"{row['mode']:9} {row['candidate']:24} {row['instructions_per_call']:>12,.0f} "
                f"instructions/call  {row['ratio']:.3f}x  {row['added_instructions']:+,.0f}"
            )
    else:
        main(args.quick, markdown=args.markdown, clock=args.clock)
