"""Route templates as tokens, and a linear-time matcher for the segments a regex would not be.

A template parses into :class:`Literal` and :class:`Param` tokens. A template whose every
``/``-separated segment holds at most one parameter becomes a regular expression (the
route table joins them into one): with one quantifier per segment and no quantifier that
can cross a ``/``, the backtracking engine tries each end of that one parameter once, so
it runs in time linear in the path. A segment with two or more parameters
(``{name}.{ext}``, ``{a}_{b}_{c}``) is where a backtracking engine goes polynomial or
worse: the route table matches it as ``[^/]+`` in the joined expression and then checks
it here, with :func:`match_segment`, which walks the segment's tokens once while keeping
the set of positions the regular expression could have reached, as sorted intervals.
Work is linear in the segment's length for any template.

The tokens do not know the ``{name:conv}`` syntax: a parser for another syntax
(Werkzeug's ``<int:id>``, Django's ``<slug:x>``) only has to produce the same tokens; a new
converter is a new :class:`Param` kind or character class.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, TypeAlias
from typing import Literal as Kind

__all__ = ["Literal", "Param", "Token", "match_segment", "segment_regex", "tokenize"]


class TemplateSyntaxError(ValueError):
    """Raised by :func:`tokenize`; routing re-raises it as RouteTemplateError."""


@dataclass(frozen=True, slots=True)
class Literal:
    text: str


@dataclass(frozen=True, slots=True)
class Param:
    name: str
    # "str": one or more of anything but "/"; "int": ASCII digits; "float": digits with an
    # optional "." and digits; "path": anything at all, slashes included (last only).
    kind: Kind["str", "int", "float", "path"]


Token: TypeAlias = Literal | Param

_PARAM = re.compile(r"\{([^{}]*)\}")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_REGEX: Final = {"str": "[^/]+", "int": "[0-9]+", "path": ".*", "float": r"[0-9]+(?:\.[0-9]+)?"}


def tokenize(template: str) -> list[Token]:
    """The tokens of a ``{name:conv}`` template. Raises TemplateSyntaxError."""
    if not template.startswith("/"):
        raise TemplateSyntaxError(f"must start with '/', got {template!r}")
    if any(ord(c) < 0x20 or c == "\x7f" for c in template):
        raise TemplateSyntaxError(f"must not contain control characters, got {template!r}")
    tokens: list[Token] = []
    names: set[str] = set()
    pos = 0
    for m in _PARAM.finditer(template):
        literal = template[pos : m.start()]
        if "{" in literal or "}" in literal:
            raise TemplateSyntaxError(f"unbalanced braces in {template!r}")
        if literal:
            tokens.append(Literal(literal))
        name, _, conv = m.group(1).partition(":")
        conv = conv or "str"
        if not _NAME.fullmatch(name):
            raise TemplateSyntaxError(f"bad parameter name {name!r} in {template!r}")
        if name in names:
            raise TemplateSyntaxError(f"parameter {name!r} appears twice in {template!r}")
        if conv not in _REGEX:
            allowed = ", ".join(sorted(_REGEX))
            raise TemplateSyntaxError(
                f"unknown converter {conv!r} in {template!r} (allowed: {allowed})"
            )
        if conv == "path" and m.end() != len(template):
            raise TemplateSyntaxError(f"{{{name}:path}} must come last in {template!r}")
        names.add(name)
        tokens.append(Param(name, conv))  # type: ignore[arg-type]
        pos = m.end()
    tail = template[pos:]
    if "{" in tail or "}" in tail:
        raise TemplateSyntaxError(f"unbalanced braces in {template!r}")
    if tail:
        tokens.append(Literal(tail))
    return tokens


def segments(tokens: Sequence[Token]) -> list[list[Token]]:
    """The tokens split at every ``/`` of a literal: segment ``i`` matches path segment ``i``
    (no parameter but a trailing ``path`` one can hold a ``/``)."""
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


def segment_regex(segment: Sequence[Token]) -> str:
    """The segment's part of the joined expression: exact when it is safe for a
    backtracking engine, else a superset that :func:`match_segment` narrows."""
    if not needs_check(segment):
        return token_regex(segment)
    return ".*" if isinstance(segment[-1], Param) and segment[-1].kind == "path" else "[^/]+"


# Sets of positions in a segment: sorted, disjoint, inclusive (start, end) intervals.
_Spans: TypeAlias = list[tuple[int, int]]
_DIGIT = re.compile("[0-9]")
_DIGITS = re.compile("[0-9]*")


def _after_any(spans: _Spans, n: int) -> _Spans:
    # One or more of anything: every position after the earliest one reached.
    start = spans[0][0] + 1 if spans else n + 1
    return [(start, n)] if start <= n else []


def _after_digits(seg: str, spans: _Spans) -> _Spans:
    out: _Spans = []
    covered = -1  # digits before here were already walked from an earlier start
    for lo, hi in spans:
        pos = max(lo, covered)
        while pos <= hi:
            m = _DIGIT.search(seg, pos, hi + 1)
            if m is None:
                break
            start = m.start()
            end = _DIGITS.match(seg, start).end()  # type: ignore[union-attr]
            out.append((start + 1, end))
            # A later start in this run reaches a subset of what this one reaches.
            covered = end
            pos = end + 1
    return out


def _after_literal(seg: str, spans: _Spans, text: str, before_digits: bool) -> _Spans:
    size = len(text)
    if not before_digits:
        # What follows reads only the earliest position reached.
        for lo, hi in spans:
            at = seg.find(text, lo, hi + size)
            if at >= 0:
                return [(at + size, at + size)]
        return []
    # A digit parameter follows, so every occurrence followed by a digit counts; the
    # zero-width needle finds overlapping ones, and the C scanner skips the others.
    needle = re.compile(f"(?={re.escape(text)}[0-9])")  # re caches it
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


def match_segment(segment: Sequence[Token], seg: str) -> bool:
    """Whether ``seg`` (one path segment, no ``/``) fully matches ``segment``'s tokens;
    with a trailing ``path`` parameter, whether some prefix of it matches the rest.

    Each step's cost is linear in ``len(seg)``, and a literal step's Python-level loop runs
    once per occurrence only when a digit parameter follows it.
    """
    n = len(seg)
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
            digits = isinstance(following, Param) and following.kind in ("int", "float")
            spans = _after_literal(seg, spans, token.text, digits)
        elif token.kind == "str":
            spans = _after_any(spans, n)
        elif token.kind == "int":
            spans = _after_digits(seg, spans)
        elif token.kind == "float":
            whole = _after_digits(seg, spans)
            spans = _union(whole, _after_digits(seg, _after_literal(seg, whole, ".", True)))
        else:  # a trailing path parameter takes whatever is left
            return bool(spans)
    return bool(spans) and spans[-1][1] == n
