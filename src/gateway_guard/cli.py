"""The ``gateway-guard`` command: ``check`` a settings file, print the settings ``schema``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import TextIO

from .errors import SettingsError
from .log import dict_config
from .policy import CallPolicy, Policies, ShedPolicy, compile_policies
from .settings import Settings, load_settings

__all__: list[str] = []


def _seconds(value: float) -> str:
    return f"{value:g}s"


def _breaker(policy: CallPolicy) -> str:
    b = policy.breaker
    if not b.enabled:
        return "off"
    size = f"{b.window_size}" if b.window == "count" else f"{b.window_size}s"
    return f"{b.failure_rate:g} of {size} (min {b.min_calls}), open {_seconds(b.open_seconds)}"


def _retry(policy: CallPolicy) -> str:
    r = policy.retry
    if r.attempts <= 1:
        return "1 (no retry)"
    statuses = ",".join(str(s) for s in sorted(r.on_status))
    return f"{r.attempts} on {statuses}, budget {r.budget_ratio:g}"


def _bulkhead(policy: CallPolicy) -> str:
    h = policy.bulkhead
    if h.max_concurrent == 0:
        return "unlimited"
    wait = f", wait {_seconds(h.max_wait)}" if h.max_wait else ""
    return f"{h.max_concurrent}{wait}"


def _shed(shed: ShedPolicy | None) -> str:
    if shed is None:
        return "app-wide"
    if not shed.enabled:
        return "off"
    return f"{shed.max_concurrent} + queue {shed.max_queue} ({_seconds(shed.queue_timeout)})"


def _table(rows: list[list[str]], out: TextIO) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for n, row in enumerate(rows):
        out.write("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
        out.write("\n")
        if n == 0:
            out.write("  ".join("-" * w for w in widths) + "\n")


def describe(policies: Policies, out: TextIO) -> None:
    """Print the effective policy of every route x upstream as readable tables."""
    s = policies.settings
    out.write(f"service {s.service!r}, debug {'on' if s.debug else 'off'}\n")
    out.write(f"inbound shedding: {_shed(policies.shed)}; exempt: {', '.join(s.shed.exempt)}\n\n")
    header = ["route", "methods", "upstream", "connect", "read", "deadline", "attempts"]
    rows = [[*header, "breaker", "bulkhead"]]
    for name, policy in sorted(policies.calls.items()):
        rows.append(
            [
                "(outside routes)",
                "*",
                name,
                _seconds(policy.connect_timeout),
                _seconds(policy.read_timeout),
                _seconds(policy.deadline),
                _retry(policy),
                _breaker(policy),
                _bulkhead(policy),
            ]
        )
    for route in policies.routes.routes:
        methods = ",".join(sorted(route.methods)) if route.methods else "*"
        for name, policy in sorted(route.calls.items()):
            rows.append(
                [
                    route.pattern,
                    methods,
                    name,
                    _seconds(policy.connect_timeout),
                    _seconds(policy.read_timeout),
                    _seconds(policy.deadline),
                    _retry(policy),
                    _breaker(policy),
                    _bulkhead(policy),
                ]
            )
    if len(rows) == 1:
        out.write("no upstreams configured\n")
    else:
        _table(rows, out)
    if policies.routes.routes:
        out.write("\n")
        route_rows = [["route", "methods", "priority", "deadline", "depends on", "shedding"]]
        for route in policies.routes.routes:
            route_rows.append(
                [
                    route.pattern,
                    ",".join(sorted(route.methods)) if route.methods else "*",
                    route.priority,
                    _seconds(route.deadline) if route.deadline else "-",
                    ", ".join(route.depends_on) or "-",
                    _shed(route.shed),
                ]
            )
        _table(route_rows, out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="gateway-guard",
        description="Check gateway_guard settings and print their schema.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser(
        "check", help="validate a settings file and print the effective policies"
    )
    check.add_argument("settings", help="a .toml or .json settings file")
    sub.add_parser("schema", help="print the settings' JSON Schema (for editors)")
    log_config = sub.add_parser(
        "log-config",
        help="print a logging config naming each line's request (uvicorn --log-config)",
    )
    log_config.add_argument("--level", default="INFO", help="the root level (default INFO)")
    args = parser.parse_args(argv)

    if args.command == "log-config":
        json.dump(dict_config(args.level.upper()), sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0

    if args.command == "schema":
        try:
            json.dump(Settings.model_json_schema(), sys.stdout, indent=2)
            sys.stdout.write("\n")
        except BrokenPipeError:  # `gateway-guard schema | head` is fine
            pass
        return 0
    try:
        settings = load_settings(args.settings)
    except SettingsError as exc:
        sys.stderr.write(f"{args.settings}: invalid settings\n{exc}\n")
        return 1
    describe(compile_policies(settings), sys.stdout)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
