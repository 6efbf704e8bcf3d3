"""Route templates as tokens, and a linear-time matcher for the segments a regex would not be.

A template parses into :class:`Literal` and :class:`Param` tokens, from any of three
syntaxes, each read the way its framework reads it:

- Starlette: ``/orders/{id}``, ``{id:int}``, ``{x:float}``, ``{x:uuid}``, ``{rest:path}``;
- Werkzeug (Flask): ``/orders/<id>``, ``<int:id>``, ``<float:x>``, ``<uuid:x>``,
  ``<path:rest>``, ``<string:x>``;
- Django: ``<str:x>``, ``<int:x>``, ``<slug:x>``, ``<uuid:x>``, ``<path:x>``, and its
  leading-slash-free form ``orders/<int:id>/`` (Django matches it against the path after
  the first ``/``, so it stands for ``/orders/<int:id>/``).

The same converter name means different things in different frameworks (Werkzeug's
``int`` is ``\\d+``, Unicode digits; Django's is ``[0-9]+``), so a parameter's *kind*
names the framework's exact expression. Angle brackets are Werkzeug's and Django's
both: a template without the leading ``/``, or with ``str`` or ``slug``, is Django's;
otherwise it is Werkzeug's (Flask rules start with ``/``). Anything else ambiguous is
refused: both bracket styles in one template, a Django-only and a Werkzeug-only converter
together, converter arguments, stray brackets, a ``path`` parameter before the end.

A template whose every ``/``-separated segment holds at most one parameter becomes a
regular expression (the route table joins them into one): with one quantified parameter
per segment and no quantifier that can cross a ``/`` but a trailing ``path``, the
backtracking engine tries each end of that one parameter once, so it runs in time linear
in the path. A segment with two or more parameters (``{name}.{ext}``, ``{a}_{b}_{c}``) is
where a backtracking engine goes polynomial or worse: the route table matches it as
``[^/]+`` in the joined expression and then checks it here, with :func:`match_segment`,
which walks the segment's tokens once while keeping the set of positions the regular
expression could have reached, as sorted intervals. Work is linear in the segment's
length for any template.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, TypeAlias
from typing import Literal as Kind

__all__ = [
    "Literal",
    "Param",
    "Syntax",
    "Token",
    "match_segment",
    "parse",
    "segment_regex",
    "tokenize",
]


class TemplateSyntaxError(ValueError):
    """Raised by :func:`tokenize`; routing re-raises it as RouteTemplateError."""


ParamKind: TypeAlias = Kind[
    "str",
    "int",
    "udigits",
    "slug",
    "float",
    "ufloat",
    "uuid",
    "uuid_dashed",
    "uuid_lower",
    "path",
    "path_rest",
    "path_nonempty",
]
Syntax: TypeAlias = Kind["starlette", "werkzeug", "django"]


@dataclass(frozen=True, slots=True)
class Literal:
    text: str


@dataclass(frozen=True, slots=True)
class Param:
    name: str
    # Which framework expression the parameter matches: see _REGEX. The path kinds may
    # hold slashes and come last only.
    kind: ParamKind


Token: TypeAlias = Literal | Param

_HEX = "[0-9a-fA-F]"
# Each framework's own expression for each kind, copied from its converters
# (starlette.convertors, werkzeug.routing.converters, django.urls.converters).
_REGEX: Final[dict[str, str]] = {
    "str": "[^/]+",  # all three
    "int": "[0-9]+",  # Starlette, Django
    "udigits": r"\d+",  # Werkzeug int: any Unicode decimal digit, as int() reads them
    "slug": "[-a-zA-Z0-9_]+",  # Django
    "float": r"[0-9]+(?:\.[0-9]+)?",  # Starlette
    "ufloat": r"\d+\.\d+",  # Werkzeug: the dot is required
    "uuid": f"{_HEX}{{8}}-?{_HEX}{{4}}-?{_HEX}{{4}}-?{_HEX}{{4}}-?{_HEX}{{12}}",  # Starlette
    "uuid_dashed": f"{_HEX}{{8}}-{_HEX}{{4}}-{_HEX}{{4}}-{_HEX}{{4}}-{_HEX}{{12}}",  # Werkzeug
    "uuid_lower": "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",  # Django
    "path": ".*",  # Starlette
    "path_rest": "[^/].*",  # Werkzeug's "[^/].*?": lazy, the same under a full match
    "path_nonempty": ".+",  # Django
}
_PATHS: Final = frozenset({"path", "path_rest", "path_nonempty"})
# Kinds that are one or more characters of one class: the class.
_RUN: Final[dict[str, str]] = {"int": "[0-9]", "udigits": r"\d", "slug": "[-a-zA-Z0-9_]"}
# Kinds that cannot start just anywhere: the class of their first character. A literal
# before one of them must keep every position it can reach, not just the earliest.
_FIRST: Final[dict[str, str]] = {
    **_RUN,
    "float": "[0-9]",
    "ufloat": r"\d",
    "uuid": _HEX,
    "uuid_dashed": _HEX,
    "uuid_lower": "[0-9a-f]",
}
_UUIDS: Final = frozenset({"uuid", "uuid_dashed", "uuid_lower"})

_CONVERTERS: Final[dict[Syntax, dict[str, ParamKind]]] = {
    "starlette": {"str": "str", "int": "int", "float": "float", "uuid": "uuid", "path": "path"},
    "werkzeug": {
        "default": "str",
        "string": "str",
        "int": "udigits",
        "float": "ufloat",
        "uuid": "uuid_dashed",
        "path": "path_rest",
    },
    "django": {
        "str": "str",
        "int": "int",
        "slug": "slug",
        "uuid": "uuid_lower",
        "path": "path_nonempty",
    },
}
_DJANGO_ONLY: Final = frozenset(_CONVERTERS["django"]) - frozenset(_CONVERTERS["werkzeug"])
_WERKZEUG_ONLY: Final = frozenset(_CONVERTERS["werkzeug"]) - frozenset(_CONVERTERS["django"])

_BRACES = re.compile(r"\{([^{}]*)\}")
_ANGLES = re.compile(r"<([^<>]*)>")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def tokenize(template: str) -> list[Token]:
    """The tokens of a route template in any supported syntax. Raises TemplateSyntaxError."""
    return parse(template)[1]


def parse(template: str) -> tuple[Syntax, list[Token]]:
    """The template's syntax and tokens. A parameter-free template is "starlette" (all
    three read it alike). Raises TemplateSyntaxError."""
    if not template:
        raise TemplateSyntaxError("must not be empty (the site's root is '/')")
    if any(ord(c) < 0x20 or c == "\x7f" for c in template):
        raise TemplateSyntaxError(f"must not contain control characters, got {template!r}")
    braces = "{" in template or "}" in template
    angles = "<" in template or ">" in template
    if braces and angles:
        raise TemplateSyntaxError(
            f"mixes Starlette {{name}} and Werkzeug/Django <name> parameters in {template!r}"
        )
    if not template.startswith("/"):
        if braces:
            raise TemplateSyntaxError(f"must start with '/', got {template!r}")
        # Django's own form: its patterns match what follows the path's first "/".
        return ("django" if angles else "starlette"), _tokens("/" + template, "django", template)
    if braces:
        return "starlette", _tokens(template, "starlette", template)
    if not angles:
        return "starlette", _tokens(template, "starlette", template)
    named = {m.group(1).rpartition(":")[0] for m in _ANGLES.finditer(template)}
    django = named & _DJANGO_ONLY
    werkzeug = named & _WERKZEUG_ONLY
    if django and werkzeug:
        raise TemplateSyntaxError(
            f"mixes Django converters ({', '.join(sorted(django))}) and Werkzeug ones "
            f"({', '.join(sorted(werkzeug))}) in {template!r}"
        )
    syntax: Syntax = "django" if django else "werkzeug"
    if syntax == "werkzeug" and "//" in template:
        # Werkzeug merges a rule's repeated slashes unless the app says merge_slashes=False.
        raise TemplateSyntaxError(f"'//' is ambiguous in a Werkzeug rule: {template!r}")
    return syntax, _tokens(template, syntax, template)


def _tokens(template: str, syntax: Syntax, shown: str) -> list[Token]:
    param = _BRACES if syntax == "starlette" else _ANGLES
    opening, closing = ("{", "}") if syntax == "starlette" else ("<", ">")
    table = _CONVERTERS[syntax]
    tokens: list[Token] = []
    names: set[str] = set()
    pos = 0
    for m in param.finditer(template):
        literal = template[pos : m.start()]
        if opening in literal or closing in literal:
            raise TemplateSyntaxError(f"unbalanced brackets in {shown!r}")
        if literal:
            tokens.append(Literal(literal))
        if syntax == "starlette":
            name, _, conv = m.group(1).partition(":")
            conv = conv or "str"
        else:
            conv, colon, name = m.group(1).rpartition(":")
            conv = conv if colon else "default" if syntax == "werkzeug" else "str"
        if "(" in conv or ")" in conv:
            raise TemplateSyntaxError(
                f"converter arguments ({conv}) are not supported in {shown!r}: "
                "use the plain converter"
            )
        if not _NAME.fullmatch(name):
            raise TemplateSyntaxError(f"bad parameter name {name!r} in {shown!r}")
        if name in names:
            raise TemplateSyntaxError(f"parameter {name!r} appears twice in {shown!r}")
        kind = table.get(conv)
        if kind is None:
            allowed = ", ".join(sorted(c for c in table if c != "default"))
            raise TemplateSyntaxError(
                f"unknown converter {conv!r} for {syntax.capitalize()}'s syntax in "
                f"{shown!r} (allowed: {allowed})"
            )
        if kind in _PATHS and m.end() != len(template):
            raise TemplateSyntaxError(f"a path parameter ({name}) must come last in {shown!r}")
        names.add(name)
        tokens.append(Param(name, kind))
        pos = m.end()
    tail = template[pos:]
    if opening in tail or closing in tail:
        raise TemplateSyntaxError(f"unbalanced brackets in {shown!r}")
    if tail:
        tokens.append(Literal(tail))
    return tokens


def segments(tokens: Sequence[Token]) -> list[list[Token]]:
    """The tokens split at every ``/`` of a literal: segment ``i`` matches path segment ``i``
    (no parameter but a trailing path one can hold a ``/``)."""
    out: list[list[Token]] = [[]]
    for token in tokens:
        if isinstance(token, Param):
            out[-1].append(token)
            continue
        first, *rest = token.text.split("/")
        if first:
            out[-1].append(Literal(first))
        for piece in rest:
            out.append([Literal(piece)] if piece else [])
    return out


def token_regex(tokens: Sequence[Token]) -> str:
    """The regular expression (no anchors, for DOTALL) the tokens stand for."""
    return "".join(re.escape(t.text) if isinstance(t, Literal) else _REGEX[t.kind] for t in tokens)


def needs_check(segment: Sequence[Token]) -> bool:
    return sum(isinstance(t, Param) for t in segment) > 1


def ends_in_path(segment: Sequence[Token]) -> bool:
    return bool(segment) and isinstance(segment[-1], Param) and segment[-1].kind in _PATHS


def segment_regex(segment: Sequence[Token]) -> str:
    """The segment's part of the joined expression: exact when it is safe for a
    backtracking engine, else a superset that :func:`match_segment` narrows."""
    if not needs_check(segment):
        return token_regex(segment)
    return ".*" if ends_in_path(segment) else "[^/]+"


# Sets of positions in a segment: sorted, disjoint, inclusive (start, end) intervals.
_Spans: TypeAlias = list[tuple[int, int]]


def _after_any(spans: _Spans, n: int) -> _Spans:
    # One or more of anything: every position after the earliest one reached.
    start = spans[0][0] + 1 if spans else n + 1
    return [(start, n)] if start <= n else []


def _after_run(seg: str, spans: _Spans, cls: str) -> _Spans:
    # One or more characters of ``cls`` (which never holds "/": the segment ends there).
    one = re.compile(cls)  # re caches these
    run = re.compile(f"{cls}*")
    out: _Spans = []
    covered = -1  # a run before here was already walked from an earlier start
    for lo, hi in spans:
        pos = max(lo, covered)
        while pos <= hi:
            m = one.search(seg, pos, hi + 1)
            if m is None:
                break
            start = m.start()
            end = run.match(seg, start).end()  # type: ignore[union-attr]
            out.append((start + 1, end))
            # A later start in this run reaches a subset of what this one reaches.
            covered = end
            pos = end + 1
    return out


def _after_uuid(seg: str, spans: _Spans, kind: str, n: int) -> _Spans:
    # A UUID's match from a given start is unique (a "-" is never a hex digit, so an
    # optional dash is taken exactly when present): one end per start. The zero-width
    # needle lets the C scanner try every start; 36 is a UUID's longest form.
    needle = re.compile(f"(?=({_REGEX[kind]}))")
    ends: _Spans = []
    for lo, hi in spans:
        for m in needle.finditer(seg, lo, min(hi + 37, n)):
            if m.start() > hi:
                break
            ends.append((m.end(1), m.end(1)))
    return _union(ends, [])


def _after_literal(seg: str, spans: _Spans, text: str, first: str | None) -> _Spans:
    size = len(text)
    if first is None:
        # What follows can start anywhere, so it reads only the earliest position reached.
        for lo, hi in spans:
            at = seg.find(text, lo, hi + size)
            if at >= 0:
                return [(at + size, at + size)]
        return []
    # What follows must start with a ``first`` character, so every occurrence followed by
    # one counts; the zero-width needle finds overlapping ones, and the C scanner skips
    # the others.
    needle = re.compile(f"(?={re.escape(text)}{first})")  # re caches it
    out: _Spans = []
    for lo, hi in spans:
        for m in needle.finditer(seg, lo, min(hi + size + 1, len(seg))):
            end = m.start() + size
            if out and out[-1][1] + 1 == end:
                out[-1] = (out[-1][0], end)
            else:
                out.append((end, end))
    return out


def _union(a: _Spans, b: _Spans) -> _Spans:
    out: _Spans = []
    for lo, hi in sorted(a + b):
        if out and lo <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(hi, out[-1][1]))
        else:
            out.append((lo, hi))
    return out


def _match_spans(segment: Sequence[Token], seg: str) -> bool:
    """Whether ``seg`` (one path segment) fully matches ``segment``'s tokens. With a
    trailing path parameter ``seg`` is the rest of the path, slashes included, and the
    parameters before it match within its first segment.

    Each step's cost is linear in ``len(seg)``, and a literal step's Python-level loop runs
    once per occurrence only when a parameter with a restricted first character follows.
    """
    n = len(seg)
    if ends_in_path(segment):
        slash = seg.find("/")
        n = slash if slash >= 0 else n
    spans: _Spans = [(0, 0)]
    last = len(segment) - 1
    for i, token in enumerate(segment):
        if not spans:
            return False
        if isinstance(token, Literal):
            if i == last:
                # Anchored at the end: one position can finish the match.
                start = n - len(token.text)
                return seg.endswith(token.text) and any(lo <= start <= hi for lo, hi in spans)
            following = segment[i + 1]
            first = _FIRST.get(following.kind) if isinstance(following, Param) else None
            spans = _after_literal(seg, spans, token.text, first)
            continue
        kind = token.kind
        if kind == "str":
            spans = _after_any(spans, n)
        elif kind in _RUN:
            spans = _after_run(seg, spans, _RUN[kind])
        elif kind == "float":  # digits, then optionally "." and digits
            whole = _after_run(seg, spans, "[0-9]")
            spans = _union(
                whole, _after_run(seg, _after_literal(seg, whole, ".", "[0-9]"), "[0-9]")
            )
        elif kind == "ufloat":  # digits, ".", digits
            whole = _after_run(seg, spans, r"\d")
            spans = _after_run(seg, _after_literal(seg, whole, ".", r"\d"), r"\d")
        elif kind in _UUIDS:
            spans = _after_uuid(seg, spans, kind, n)
        # A trailing path parameter takes whatever is left: the earliest position reached
        # leaves it the most. Starlette's may be empty; Werkzeug's must start with a
        # character other than "/" (positions before ``n`` are those); Django's must not
        # be empty.
        elif kind == "path":
            return True
        elif kind == "path_rest":
            return spans[0][0] < n
        else:
            return spans[0][0] < len(seg)
    return bool(spans) and spans[-1][1] == n


# An ASCII segment (every hostile path a server lets through percent-decodes to bytes; a
# non-ASCII one takes the span sets above) is matched with sets of positions as Python
# ints used as bit sets, bit p for position p: each step is a fixed number of C-level
# passes (bytes.translate, big-integer shifts and ors), never a Python loop per
# occurrence. The spans loop once per occurrence of a literal before a digit parameter:
# 7 ms for a 16 KiB "1_1_...!" segment against "{a}_{b:int}_{c}" (bench/routing.py).


@functools.cache
def _table(cls: str) -> bytes:
    """A bytes.translate table: b"1" for the ASCII characters of the class, else b"0"."""
    one = re.compile(cls)
    return bytes(0x31 if one.fullmatch(chr(c)) else 0x30 for c in range(256))


def _mask(raw: bytes, cls: str) -> int:
    """Bit p set when the character at p is one of the one-character class ``cls``."""
    return int(raw.translate(_table(cls))[::-1], 2) if raw else 0


def _literal(raw: bytes, text: str) -> int:
    """Bit p set when ``text`` occurs at position p."""
    mask = -1
    for k, char in enumerate(text):
        mask &= _mask(raw, re.escape(char)) >> k
    return max(mask, 0)


def _run(raw: bytes, starts: int, n: int, cls: str) -> int:
    # One or more characters of ``cls`` from any start: within each run of the class,
    # every position after a start, the reach doubling each pass (log2(n) passes).
    inside = _mask(raw, cls) & ((1 << n) - 1)
    reached = starts & inside
    window = inside
    k = 1
    while k < n and reached:
        reached |= (reached << k) & window
        window &= window << k
        k <<= 1
    return reached << 1


def match_segment(segment: Sequence[Token], seg: str) -> bool:
    """Whether ``seg`` (one path segment) fully matches ``segment``'s tokens. With a
    trailing path parameter ``seg`` is the rest of the path, slashes included, and the
    parameters before it match within its first segment. Linear time, no backtracking.
    """
    if not seg.isascii():
        return _match_spans(segment, seg)
    raw = seg.encode("ascii")
    n = len(seg)
    if ends_in_path(segment):
        slash = seg.find("/")
        n = slash if slash >= 0 else n
    full = (1 << (n + 1)) - 1
    reached = 1  # position 0
    last = len(segment) - 1
    for i, token in enumerate(segment):
        if not reached:
            return False
        if isinstance(token, Literal):
            size = len(token.text)
            if i == last:
                # Anchored at the end: one position can finish the match.
                start = n - size
                return seg.endswith(token.text) and start >= 0 and bool(reached >> start & 1)
            if not token.text.isascii():
                return False
            reached = ((reached & _literal(raw, token.text)) << size) & full
            continue
        kind = token.kind
        lowest = (reached & -reached).bit_length() - 1
        if kind == "str":
            # One or more of anything: every position after the earliest one reached.
            reached = full & ~((1 << (lowest + 1)) - 1)
        elif kind in _RUN:
            reached = _run(raw, reached, n, _RUN[kind]) & full
        elif kind in {"float", "ufloat"}:  # digits, then "." and digits
            whole = _run(raw, reached, n, "[0-9]") & full
            dot = ((whole & _literal(raw, ".")) << 1) & full
            reached = _run(raw, dot, n, "[0-9]") & full
            if kind == "float":  # Starlette's: the fraction is optional
                reached |= whole
        elif kind in _UUIDS:
            # A UUID's match from a given start is unique: one end per start reached.
            needle = re.compile(f"(?=({_REGEX[kind]}))")
            ends = 0
            for m in needle.finditer(seg, 0, n):
                if reached >> m.start() & 1:
                    ends |= 1 << m.end(1)
            reached = ends
        # A trailing path parameter takes whatever is left: the earliest position reached
        # leaves it the most. Starlette's may be empty; Werkzeug's must start with a
        # character other than "/" (positions before ``n`` are those); Django's must not
        # be empty.
        elif kind == "path":
            return True
        elif kind == "path_rest":
            return lowest < n
        else:
            return lowest < len(seg)
    return bool(reached >> n & 1)


# One value each kind matches in every framework that has it, for sample paths.
_SAMPLE: Final[dict[str, str]] = {
    "str": "x",
    "int": "1",
    "udigits": "1",
    "slug": "x",
    "float": "1.5",
    "ufloat": "1.5",
    "uuid": "0f8fad5b-d9cb-469f-a165-70867728950e",
    "uuid_dashed": "0f8fad5b-d9cb-469f-a165-70867728950e",
    "uuid_lower": "0f8fad5b-d9cb-469f-a165-70867728950e",
    "path": "x",
    "path_rest": "x",
    "path_nonempty": "x",
}


def samples(tokens: Sequence[Token]) -> list[str]:
    """Paths the tokens match: one with a plain value for each parameter, and, when the
    template ends in a path parameter, one whose last parameter spans two segments."""
    out = ["".join(t.text if isinstance(t, Literal) else _SAMPLE[t.kind] for t in tokens)]
    if tokens and isinstance(tokens[-1], Param) and tokens[-1].kind in _PATHS:
        out.append(out[0] + "/x")
    return out
