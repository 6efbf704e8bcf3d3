"""The compiled route table: (method, path) -> route policy, first match wins.

All templates are compiled at startup into ONE regular expression of ordered alternatives
(``METHOD path``), so a lookup is a single ``fullmatch`` whatever the number of routes,
and nothing is ever stored per raw path: the table's size is fixed by the settings.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .policy import CallPolicy, Priority, ShedPolicy

__all__ = ["Route", "RouteTable", "RouteTemplateError", "parse_template"]


class RouteTemplateError(ValueError):
    """A route template that does not parse."""


_PARAM = re.compile(r"\{([^{}]*)\}")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_CONVERTERS = {"str": "[^/]+", "int": "[0-9]+", "path": ".*", "float": r"[0-9]+(?:\.[0-9]+)?"}


def parse_template(template: str) -> str:
    """Return the regular expression (without anchors) for a route template.

    ``/orders/{id}`` matches one segment, ``{id:int}`` digits, ``{rest:path}`` anything
    including slashes (only as the last parameter). Raises :class:`RouteTemplateError`.
    """
    if not template.startswith("/"):
        raise RouteTemplateError(f"must start with '/', got {template!r}")
    if any(ord(c) < 0x20 or c == "\x7f" for c in template):
        raise RouteTemplateError(f"must not contain control characters, got {template!r}")
    parts: list[str] = []
    names: set[str] = set()
    pos = 0
    for m in _PARAM.finditer(template):
        literal = template[pos : m.start()]
        if "{" in literal or "}" in literal:
            raise RouteTemplateError(f"unbalanced braces in {template!r}")
        parts.append(re.escape(literal))
        name, _, conv = m.group(1).partition(":")
        conv = conv or "str"
        if not _NAME.match(name):
            raise RouteTemplateError(f"bad parameter name {name!r} in {template!r}")
        if name in names:
            raise RouteTemplateError(f"parameter {name!r} appears twice in {template!r}")
        if conv not in _CONVERTERS:
            allowed = ", ".join(sorted(_CONVERTERS))
            raise RouteTemplateError(
                f"unknown converter {conv!r} in {template!r} (allowed: {allowed})"
            )
        if conv == "path" and m.end() != len(template):
            raise RouteTemplateError(f"{{{name}:path}} must come last in {template!r}")
        names.add(name)
        parts.append(_CONVERTERS[conv])
        pos = m.end()
    tail = template[pos:]
    if "{" in tail or "}" in tail:
        raise RouteTemplateError(f"unbalanced braces in {template!r}")
    parts.append(re.escape(tail))
    return "".join(parts)


@dataclass(frozen=True, slots=True, eq=False)
class Route:
    """One ``[[routes]]`` entry, compiled. ``index`` is its position in the settings."""

    index: int
    pattern: str
    name: str
    methods: frozenset[str] | None = None
    priority: Priority = "normal"
    depends_on: tuple[str, ...] = ()
    deadline: float | None = None
    shed: ShedPolicy | None = None
    # The effective policy of each upstream when called while serving this route.
    calls: Mapping[str, CallPolicy] = field(default_factory=dict)


class RouteTable:
    """Ordered routes and exempt paths, each compiled into a single regular expression."""

    __slots__ = ("_exempt", "_groups", "_matcher", "routes")

    def __init__(self, routes: Sequence[Route], exempt: Sequence[str] = ()) -> None:
        self.routes: tuple[Route, ...] = tuple(routes)
        alternatives = []
        self._groups: dict[str, Route] = {}
        for route in self.routes:
            methods = route.methods
            if methods is None:
                method_rx = "[^ ]+"
            else:
                # Like most frameworks, a GET route answers HEAD too.
                if "GET" in methods:
                    methods = methods | {"HEAD"}
                method_rx = "(?:" + "|".join(sorted(re.escape(m) for m in methods)) + ")"
            group = f"r{route.index}"
            self._groups[group] = route
            alternatives.append(f"(?P<{group}>{method_rx} {parse_template(route.pattern)})")
        self._matcher = re.compile("|".join(alternatives), re.DOTALL) if alternatives else None
        self._exempt = (
            re.compile("|".join(f"(?:{parse_template(p)})" for p in exempt), re.DOTALL)
            if exempt
            else None
        )

    def match(self, method: str, path: str) -> Route | None:
        """The first route whose methods and template match, or None."""
        if self._matcher is None:
            return None
        m = self._matcher.fullmatch(f"{method} {path}")
        if m is None:
            return None
        return self._groups[m.lastgroup]  # type: ignore[index]

    def is_exempt(self, path: str) -> bool:
        return self._exempt is not None and self._exempt.fullmatch(path) is not None

    def __len__(self) -> int:
        return len(self.routes)
