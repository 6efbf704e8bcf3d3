"""Route matching on hostile paths: the route table against the backtracking regex it replaced.

    .venv/bin/python bench/routing.py
    .venv/bin/python bench/routing.py --sizes 1024 16384

Each row is one ``RouteTable.resolve`` of a path ``/x/<body>/`` or ``/x/<body>!`` that the
route does not match: the worst case for a backtracking engine, which tries every way of
splitting the segment before it answers no. The
``regex`` column times the template's plain regular expression (``parse_template``, what
the table used to run) on short bodies only: it grows as the length to the power of the
number of parameters in the segment, so 1 KB already takes seconds. Times are the best of
``--repeat`` runs of CPU time (``time.process_time`` would be too coarse here, so
``perf_counter``; the best of several is what a quiet machine gives).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import re
import time
from collections.abc import Callable

from gateway_guard.routing import Route, RouteTable, parse_template

TEMPLATES = ("/x/{a}", "/x/{a}_{b}_{c}", "/files/{name}.{ext}", "/x/{a}_{b:int}_{c}")
BODIES = {"underscores": "_", "a_": "a_", "1_": "1_", "dots": "a."}
REGEX_LIMIT = 128  # longer bodies take the old regex too long to be worth waiting for


def best(repeat: int, fn: Callable[[], object]) -> float:
    out = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        out = min(out, time.perf_counter() - start)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 1024, 16384])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    print(f"{'template':24} {'body':14} {'bytes':>6} {'table':>10} {'regex':>10}")
    for template in TEMPLATES:
        table = RouteTable([Route(index=0, pattern=template, name=template)])
        regex = re.compile(parse_template(template), re.DOTALL)
        prefix = template.split("{")[0]
        for (label, unit), end in itertools.product(BODIES.items(), "/!"):
            for size in args.sizes:
                path = prefix + unit * (size // len(unit)) + end
                took = best(args.repeat, functools.partial(table.resolve, "GET", path))
                old = "-"
                if size <= REGEX_LIMIT:
                    old = f"{best(1, functools.partial(regex.fullmatch, path)) * 1e3:.3f} ms"
                print(
                    f"{template:24} {label + ' ' + end:14} {size:>6} {took * 1e3:7.3f} ms {old:>10}"
                )


if __name__ == "__main__":
    main()
