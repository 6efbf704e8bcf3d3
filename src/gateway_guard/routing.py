"""The compiled route table: (method, path) -> route policy, first match wins.

All templates are compiled at startup into ONE regular expression of ordered alternatives
(``METHOD path``), so a lookup is a single ``fullmatch`` whatever the number of routes,
and nothing is ever stored per raw path: the table's size is fixed by the settings.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, TypeAlias

from ._matcher import (
    Syntax,
    TemplateSyntaxError,
    Token,
    match_segment,
    needs_check,
    parse,
    samples,
    segment_regex,
    token_regex,
    tokenize,
)
from ._matcher import segments as _split
from ._schema import Priority, RouteSettings

if TYPE_CHECKING:
    from .policy import CallPolicy, ShedPolicy

__all__: list[str] = []


class RouteTemplateError(ValueError):
    """A route template that does not parse."""


# A route that sets no priority, and a view policy (which has none), are "normal" the
# way the settings schema says.
_DEFAULT_PRIORITY: Final[Priority] = RouteSettings.model_fields["priority"].default


def parse_template(template: str) -> str:
    """Return the regular expression (without anchors) for a route template.

    ``/orders/{id}`` matches one segment, ``{id:int}`` digits, ``{rest:path}`` anything
    including slashes (only as the last parameter); Werkzeug's ``<int:id>`` and Django's
    ``orders/<slug:x>/`` mean what their frameworks mean (see _matcher). Raises
    :class:`RouteTemplateError`.
    This is the meaning of a template; the route table matches it without backtracking.
    """
    return token_regex(_tokens(template))


def _tokens(template: str) -> list[Token]:
    try:
        return tokenize(template)
    except TemplateSyntaxError as exc:
        raise RouteTemplateError(str(exc)) from None


class _Check:
    """The exact test of a template some of whose segments the joined expression only
    approximates (see _matcher): run after that expression matched, on the path's segments."""

    __slots__ = ("_parts", "_segments", "_strip")

    def __init__(self, segments: list[list[Token]], strip: bool) -> None:
        self._segments = [(i, seg) for i, seg in enumerate(segments) if needs_check(seg)]
        self._parts = len(segments) - 1
        self._strip = strip

    def __call__(self, path: str) -> bool:
        # The joined expression matched, so the path has the template's slashes where the
        # template has them (after the leading ones Werkzeug ignores); a trailing path
        # parameter's segment runs to the end.
        if self._strip:
            path = "/" + path.lstrip("/")
        parts = path.split("/", self._parts)
        return all(match_segment(segment, parts[i]) for i, segment in self._segments)


def _compile(template: str) -> tuple[str, _Check | None]:
    """The template's part of a joined expression, and the check that makes it exact."""
    try:
        syntax, tokens = parse(template)
    except TemplateSyntaxError as exc:
        raise RouteTemplateError(str(exc)) from None
    segments = _split(tokens)
    rx = "/".join(segment_regex(seg) for seg in segments)
    strip = syntax == "werkzeug"
    if strip:
        # Werkzeug matches the path with its leading slashes made one ("//orders/1" is
        # "/orders/1"). No segment's expression can start with "/", so "/+" cannot backtrack.
        rx = "/+" + rx.removeprefix("/")
    return rx, (_Check(segments, strip) if any(needs_check(seg) for seg in segments) else None)


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
_NOTHING: _Answer = (False, None)
_EXEMPT: _Answer = (True, None)


@dataclass(frozen=True, slots=True)
class _Matcher:
    pattern: re.Pattern[str]
    answers: tuple[_Answer, ...]
    # None when every alternative is exact, the common case: one fullmatch answers.
    checks: tuple[_Check | None, ...] | None
    alternatives: tuple[re.Pattern[str], ...]

    def after(self, index: int, path: str) -> _Answer:
        """The first alternative after ``index`` that matches exactly: the rare path taken
        when an approximated alternative matched and its check said no."""
        assert self.checks is not None
        for i in range(index + 1, len(self.answers)):
            check = self.checks[i]
            if self.alternatives[i].fullmatch(path) and (check is None or check(path)):
                return self.answers[i]
        return _NOTHING


class RouteTable:
    """Ordered routes and exempt paths, compiled into one regular expression per method.

    Exempt paths come first in every expression, so one ``fullmatch`` answers both "is it
    exempt?" and "which route?". Methods not named by any route share one expression;
    the table never grows with what clients send. A template with two parameters in one
    segment is matched there loosely and then checked in linear time (see _matcher).
    """

    __slots__ = ("_by_method", "_other", "routes")

    def __init__(self, routes: Sequence[Route], exempt: Sequence[str] = ()) -> None:
        self.routes: tuple[Route, ...] = tuple(routes)
        compiled_exempt = [_compile(p) for p in exempt]
        compiled = [_compile(route.pattern) for route in self.routes]
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
            parts: list[tuple[str, _Check | None]] = [("", None)]  # group 0: never used
            answers: list[_Answer] = [_NOTHING]
            for part in compiled_exempt:
                parts.append(part)
                answers.append(_EXEMPT)
            for route, part in zip(self.routes, compiled, strict=True):
                allowed = route.methods
                if allowed is not None and "GET" in allowed:
                    allowed = allowed | {"HEAD"}
                if allowed is None or (method is not None and method in allowed):
                    parts.append(part)
                    answers.append((False, route))
            if len(parts) == 1:
                return None
            pattern = re.compile("|".join(f"({rx})" for rx, _ in parts[1:]), re.DOTALL)
            checks = tuple(check for _, check in parts)
            if not any(checks):
                return _Matcher(pattern, tuple(answers), None, ())
            alternatives = tuple(re.compile(rx, re.DOTALL) for rx, _ in parts)
            return _Matcher(pattern, tuple(answers), checks, alternatives)

        self._by_method = {m: compile_for(m) for m in sorted(methods)}
        self._other = compile_for(None)

    def resolve(self, method: str, path: str) -> _Answer:
        """``(exempt, route)``: whether ``path`` is exempt, else the first matching route."""
        matcher = self._by_method.get(method, self._other)
        if matcher is None:
            return _NOTHING
        m = matcher.pattern.fullmatch(path)
        if m is None:
            return _NOTHING
        index: int = m.lastindex  # type: ignore[assignment]
        checks = matcher.checks
        if checks is None:
            return matcher.answers[index]
        check = checks[index]
        if check is None or check(path):
            return matcher.answers[index]
        return matcher.after(index, path)

    def __len__(self) -> int:
        return len(self.routes)


def template_syntax(template: str) -> Syntax:
    """Which framework's syntax a valid template is read in ("starlette" when it has no
    parameters: all three read those alike). Raises :class:`RouteTemplateError`."""
    try:
        return parse(template)[0]
    except TemplateSyntaxError as exc:
        raise RouteTemplateError(str(exc)) from None


def sample_paths(template: str) -> list[str]:
    """A few concrete paths the template matches (``/orders/<int:id>`` gives
    ``/orders/1``). Raises :class:`RouteTemplateError`."""
    return samples(_tokens(template))


def unmatched_routes(
    routes: Sequence[Route], app_matches: Callable[[str], bool], app_templates: Iterable[str]
) -> list[Route]:
    """The routes that match none of an app's URL patterns, for the adapters' startup
    warnings. ``app_matches(path)`` asks the app's own router (Flask's url_map, Django's
    resolver); ``app_templates`` are its patterns, read here as templates where they parse,
    so that a broad route (``/api/{rest:path}``) is found covering ``/api/orders/<int:id>``.
    Methods are not compared: a path the app serves under some method counts."""
    app_paths: list[str] = []
    for template in app_templates:
        try:
            app_paths.extend(sample_paths(template))
        except RouteTemplateError:
            continue  # a custom converter or a regex pattern: app_matches still covers it
    out: list[Route] = []
    for route in routes:
        if any(app_matches(path) for path in sample_paths(route.pattern)):
            continue
        table = RouteTable([Route(index=0, pattern=route.pattern, name=route.name)])
        if any(table.resolve("GET", path)[1] is not None for path in app_paths):
            continue
        out.append(route)
    return out
