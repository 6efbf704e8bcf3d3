"""The compiled route table: (method, path) -> route policy, first match wins.

All templates are compiled at startup into ONE regular expression of ordered alternatives
(``METHOD path``), so a lookup is a single ``fullmatch`` whatever the number of routes,
and nothing is ever stored per raw path: the table's size is fixed by the settings.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, TypeAlias

from ._schema import Priority, RouteSettings

if TYPE_CHECKING:
    from .policy import CallPolicy, ShedPolicy

__all__: list[str] = []


class RouteTemplateError(ValueError):
    """A route template that does not parse."""


# A route that sets no priority, and a view policy (which has none), are "normal" the
# way the settings schema says.
_DEFAULT_PRIORITY: Final[Priority] = RouteSettings.model_fields["priority"].default

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
    priority: Priority = _DEFAULT_PRIORITY
    depends_on: tuple[str, ...] = ()
    deadline: float | None = None
    shed: ShedPolicy | None = None
    # The effective policy of each upstream when called while serving this route.
    calls: Mapping[str, CallPolicy] = field(default_factory=dict)
    # The key of the route's own shedding limiter (its index), or None when it shares the
    # app's: worked out once here rather than on every request.
    shed_key: int | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        object.__setattr__(self, "shed_key", self.index if self.shed is not None else None)


_Answer: TypeAlias = tuple[bool, Route | None]
_Matcher: TypeAlias = tuple[re.Pattern[str], tuple[_Answer, ...]]
_NOTHING: _Answer = (False, None)
_EXEMPT: _Answer = (True, None)


class RouteTable:
    """Ordered routes and exempt paths, compiled into one regular expression per method.

    Exempt paths come first in every expression, so one ``fullmatch`` answers both "is it
    exempt?" and "which route?". Methods not named by any route share one expression;
    the table never grows with what clients send.
    """

    __slots__ = ("_by_method", "_other", "routes")

    def __init__(self, routes: Sequence[Route], exempt: Sequence[str] = ()) -> None:
        self.routes: tuple[Route, ...] = tuple(routes)
        exempt_rx = "|".join(f"(?:{parse_template(p)})" for p in exempt)
        methods: set[str] = set()
        for route in self.routes:
            if route.methods is not None:
                methods |= route.methods
                # Like most frameworks, a GET route answers HEAD too.
                if "GET" in route.methods:
                    methods.add("HEAD")

        def compile_for(method: str | None) -> _Matcher | None:
            # Each alternative is one capturing group (template parameters capture
            # nothing), so a match's ``lastindex`` numbers the alternative that matched,
            # and the answer is read from a tuple built here: nothing is built per request.
            parts: list[str] = []
            answers: list[_Answer] = [_NOTHING]  # group 0 is the whole match: never used
            if exempt:
                parts.append(f"({exempt_rx})")
                answers.append(_EXEMPT)
            for route in self.routes:
                allowed = route.methods
                if allowed is not None and "GET" in allowed:
                    allowed = allowed | {"HEAD"}
                if allowed is None or (method is not None and method in allowed):
                    parts.append(f"({parse_template(route.pattern)})")
                    answers.append((False, route))
            if not parts:
                return None
            return re.compile("|".join(parts), re.DOTALL), tuple(answers)

        self._by_method = {m: compile_for(m) for m in sorted(methods)}
        self._other = compile_for(None)

    def resolve(self, method: str, path: str) -> _Answer:
        """``(exempt, route)``: whether ``path`` is exempt, else the first matching route."""
        matcher = self._by_method.get(method, self._other)
        if matcher is None:
            return _NOTHING
        pattern, answers = matcher
        m = pattern.fullmatch(path)
        if m is None:
            return _NOTHING
        return answers[m.lastindex]  # type: ignore[index]

    def __len__(self) -> int:
        return len(self.routes)
