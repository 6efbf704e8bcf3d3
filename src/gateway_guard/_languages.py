"""Which language a visitor reads: ``Accept-Language`` against the languages offered.

:class:`Languages` is built once per renderer from ``[brand]`` (``languages``, ``lang``,
``strings``): one complete :class:`~gateway_guard._copy.Words` per offered language.
:meth:`Languages.choose` parses a header in bounded, linear time (RFC 9110 §12.5.4) and
finds the best offered language by RFC 4647 lookup; the answer for the few real header
values is remembered, so an outage costs a dict lookup per request.
:func:`check_languages` is the settings check, reporting each problem at its key path.
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping, Sequence
from typing import Final

from ._copy import ENGLISH, Words
from ._schema import BrandSettings
from ._translations import TRANSLATIONS

__all__ = ["BUILTIN_LANGUAGES", "Languages", "check_languages", "parse_accept_language"]

#: Every language with built-in words, in the order they are offered by default.
BUILTIN_LANGUAGES: Final[tuple[str, ...]] = ("en", *TRANSLATIONS)
_BUILTIN: Final[Mapping[str, Mapping[str, str]]] = {"en": ENGLISH, **TRANSLATIONS}

# A real Accept-Language is under 200 characters and a dozen ranges; only these are read.
_MAX_HEADER_LENGTH = 1024
_MAX_RANGES = 32
_MAX_CACHED_HEADER_LENGTH = 256
_CACHE_SIZE = 256
# RFC 4647 language-range. Subtags are separated by "-", which no subtag holds: a match
# never backtracks.
_RANGE_RE = re.compile(r"[A-Za-z]{1,8}(?:-[A-Za-z0-9]{1,8})*|\*")
_QVALUE_RE = re.compile(r"0(?:\.[0-9]{0,3})?|1(?:\.0{0,3})?")
_TAG_RE = re.compile(r"[A-Za-z]{2,8}(?:-[A-Za-z0-9]{1,8})*")
_MAX_STRING_LENGTH = 1000
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def parse_accept_language(value: str | None) -> list[str]:
    """The language ranges of an ``Accept-Language``, most wanted first, lower case.

    Ranges with ``q=0`` (not acceptable) and malformed ones are left out; equal weights
    keep the header's order. Only the first 1024 characters and 32 ranges are read.
    """
    if not value:
        return []
    weighted: list[tuple[float, int, str]] = []
    items = value[:_MAX_HEADER_LENGTH].split(",", _MAX_RANGES)[:_MAX_RANGES]
    for position, item in enumerate(items):
        language_range, *params = item.split(";")
        language_range = language_range.strip(" \t")
        if not _RANGE_RE.fullmatch(language_range):
            continue
        q = 1.0
        for param in params:
            name, _, raw = param.partition("=")
            if name.strip(" \t").lower() == "q":
                raw = raw.strip(" \t")
                q = float(raw) if _QVALUE_RE.fullmatch(raw) else 0.0
                break
        if q > 0:
            weighted.append((-q, position, language_range.lower()))
    weighted.sort()
    return [language_range for _, _, language_range in weighted]


class Languages:
    """The offered languages' words, and the choice among them for a request."""

    __slots__ = ("_by_lower", "_cache", "default", "offered")

    def __init__(self, brand: BrandSettings) -> None:
        tags = _offered(brand)
        self.offered: dict[str, Words] = {}
        for tag in tags:
            strings = dict(_BUILTIN.get(_canonical(tag) or "", {}))
            strings.update(_overrides_for(brand, tag))
            # A language we have no words for, whose strings were not all given (a Settings
            # built without validation): English fills the gaps rather than a KeyError.
            merged = {**ENGLISH, **strings} if not _is_builtin(tag) else strings
            self.offered[tag] = Words(tag, merged)
        self._by_lower = {tag.lower(): tag for tag in self.offered}
        default = _lookup([brand.lang.lower()], self._by_lower) or tags[0]
        words = self.offered[default]
        if brand.lang.lower() != default.lower() and brand.lang.lower().startswith(
            default.lower() + "-"
        ):
            # lang = "en-GB": the page says so when it answers in the default language.
            words = Words(brand.lang, words.strings)
            self.offered[default] = words
        self.default = words
        self._cache: dict[str, Words] = {}

    def choose(self, accept_language: str | None) -> Words:
        """The words for a request's ``Accept-Language`` (the default when none fits)."""
        if not accept_language:
            return self.default
        words = self._cache.get(accept_language)
        if words is None:
            tag = _lookup(parse_accept_language(accept_language), self._by_lower)
            words = self.offered[tag] if tag is not None else self.default
            if len(accept_language) <= _MAX_CACHED_HEADER_LENGTH:
                if len(self._cache) >= _CACHE_SIZE:
                    self._cache.clear()  # hostile variety must not grow memory
                self._cache[accept_language] = words
        return words


def _lookup(ranges: Sequence[str], offered: Mapping[str, str]) -> str | None:
    """RFC 4647 §3.4 lookup, then prefix matching: the first range that any offered tag fits.

    Each range is tried whole, then shortened a subtag at a time (``de-AT-x`` → ``de-AT``
    → ``de``; a single-letter subtag left at the end goes with it). At each step an
    offered tag that extends it also fits (``zh-CN`` → ``zh`` → ``zh-Hans``), as RFC 4647
    §3.3.1 filtering would: a visitor asking for Chinese reads the Chinese we have.
    ``offered`` maps lower-case tags to their spelling; ``*`` is skipped (§3.4).
    """
    for language_range in ranges:
        candidate = language_range
        while candidate and candidate != "*":
            tag = offered.get(candidate)
            if tag is not None:
                return tag
            prefix = candidate + "-"
            for lower, tag in offered.items():
                if lower.startswith(prefix):
                    return tag
            candidate, _, _ = candidate.rpartition("-")
            if len(candidate) > 1 and candidate[-2] == "-":
                candidate = candidate[:-2]
    return None


def _canonical(tag: str) -> str | None:
    """The built-in language ``tag`` names (case-insensitively), or None."""
    lower = tag.lower()
    for builtin in BUILTIN_LANGUAGES:
        if builtin.lower() == lower:
            return builtin
    return None


def _is_builtin(tag: str) -> bool:
    return _canonical(tag) is not None


def _offered(brand: BrandSettings) -> list[str]:
    tags = list(brand.languages) if brand.languages else list(BUILTIN_LANGUAGES)
    return [_canonical(tag) or tag for tag in tags]


def _overrides_for(brand: BrandSettings, tag: str) -> Mapping[str, str]:
    for language, strings in brand.strings.items():
        if language.lower() == tag.lower():
            return strings
    return {}


def _placeholders(text: str) -> set[str] | None:
    """The ``{names}`` in ``text``, or None when its braces do not parse."""
    try:
        return {name for _, name, _, _ in string.Formatter().parse(text) if name is not None}
    except ValueError:
        return None


def check_languages(brand: BrandSettings) -> list[tuple[str, str]]:
    """What is wrong with ``brand.languages``, ``brand.lang`` and ``brand.strings``.

    Each problem is ``(key path, message)``.
    """
    problems: list[tuple[str, str]] = []
    offered_lower: dict[str, str] = {}
    if brand.languages is not None:
        if not brand.languages:
            problems.append(("brand.languages", "must list at least one language, got []"))
        for i, tag in enumerate(brand.languages):
            if not _TAG_RE.fullmatch(tag):
                why = f"must be a language tag such as de or pt-BR, got {tag!r}"
                problems.append((f"brand.languages.{i}", why))
            elif tag.lower() in offered_lower:
                problems.append((f"brand.languages.{i}", f"{tag!r} is listed twice"))
            else:
                offered_lower[tag.lower()] = tag
    else:
        offered_lower = {tag.lower(): tag for tag in BUILTIN_LANGUAGES}
    builtin_list = ", ".join(BUILTIN_LANGUAGES)
    for language, strings in brand.strings.items():
        where = f"brand.strings.{language}"
        if language.lower() not in offered_lower:
            problems.append((where, f"{language!r} is not offered: add it to brand.languages"))
            continue
        builtin = _BUILTIN.get(_canonical(language) or "")
        for key, text in strings.items():
            if key not in ENGLISH and not _is_plural_key(key):
                close = [k for k in ENGLISH if k.startswith(key.split("_", 1)[0])][:3]
                hint = f"; did you mean {', '.join(close)}?" if close else ""
                problems.append((f"{where}.{key}", f"is not a string of the page{hint}"))
                continue
            if len(text) > _MAX_STRING_LENGTH or _CONTROL_RE.search(text):
                problems.append(
                    (
                        f"{where}.{key}",
                        f"must be one line of at most {_MAX_STRING_LENGTH} characters, "
                        f"got {text[:60]!r}",
                    )
                )
                continue
            allowed = _placeholders(ENGLISH.get(key) or "{n}") or set()
            found = _placeholders(text)
            if found is None or not found <= allowed:
                names = ", ".join(f"{{{name}}}" for name in sorted(allowed)) or "none"
                problems.append(
                    (f"{where}.{key}", f"may use only the placeholders {names}, got {text!r}")
                )
        if builtin is None:
            missing = [key for key in ENGLISH if key not in strings]
            if missing:
                problems.append(
                    (
                        where,
                        f"{language!r} has no built-in words (built in: {builtin_list}), so "
                        f"every string is needed; missing: {', '.join(missing)}",
                    )
                )
    for tag in offered_lower.values():
        if not _is_builtin(tag) and not any(lang.lower() == tag.lower() for lang in brand.strings):
            problems.append(
                (
                    "brand.languages",
                    f"{tag!r} has no built-in words (built in: {builtin_list}): give them "
                    f"all in [brand.strings.{tag}]",
                )
            )
    explicit_lang = "lang" in brand.model_fields_set
    if explicit_lang and offered_lower and _lookup([brand.lang.lower()], offered_lower) is None:
        problems.append(
            (
                "brand.lang",
                f"{brand.lang!r} (the language used when none of the visitor's fits) "
                f"is not among brand.languages: {', '.join(offered_lower.values())}",
            )
        )
    return problems


_PLURAL_KEY_RE = re.compile(r"(?:second|minute|hour)_(?:zero|one|two|few|many|other)")


def _is_plural_key(key: str) -> bool:
    return _PLURAL_KEY_RE.fullmatch(key) is not None
