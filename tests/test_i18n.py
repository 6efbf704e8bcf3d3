"""Pages in the visitor's language, and bodies that fit every client.

Accept-Language (RFC 9110 §12.5.4, RFC 4647 lookup), the built-in translations, the
settings that restrict, add and override languages, and the fetch-aware content
negotiation (Sec-Fetch-Dest/-Mode, X-Requested-With, every +json type).
"""

from __future__ import annotations

import json
import string
import time
from typing import Any

import pytest

import gateway_guard as gg
from gateway_guard._copy import ENGLISH, Words, direction, plural_category
from gateway_guard._languages import BUILTIN_LANGUAGES, Languages, parse_accept_language
from gateway_guard._negotiate import Wants, kind_of, negotiate
from gateway_guard._translations import TRANSLATIONS
from gateway_guard.errors import CircuitOpenError, UpstreamTimeout
from gateway_guard.render import ErrorRenderer
from gateway_guard.settings import BrandSettings, Settings, load_settings

RID = "rid-1"
CHROME = "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,*/*;q=0.8"


def renderer(**brand: Any) -> ErrorRenderer:
    return ErrorRenderer(Settings(service="shop", brand=BrandSettings(**brand)))


def _names(text: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(text) if name}


# --- the translations themselves -------------------------------------------------------------


@pytest.mark.parametrize("language", sorted(TRANSLATIONS))
def test_each_translation_has_every_string_with_the_same_placeholders(language: str) -> None:
    words = TRANSLATIONS[language]
    plural = {"second", "minute", "hour"}
    singular_keys = {k for k in ENGLISH if k.rsplit("_", 1)[0] not in plural}
    assert singular_keys <= set(words), singular_keys - set(words)
    for key in singular_keys:
        assert _names(words[key]) == _names(ENGLISH[key]), (language, key)
        if key.endswith(("_heading", "_message")):
            assert words[key] != ENGLISH[key], (language, key)  # translated, not copied
    for unit in plural:
        # Every category the language's plural rule gives for 1..200 has its form.
        needed = {f"{unit}_{plural_category(language, n)}" for n in range(1, 201)}
        assert needed <= set(words), (language, needed - set(words))
    extra = set(words) - set(ENGLISH)
    assert all(k.rsplit("_", 1)[0] in plural for k in extra), extra


def test_builtin_languages_cover_the_issue_and_one_right_to_left() -> None:
    assert {"en", "de", "fr", "es", "pt", "ja", "zh-Hans"} <= set(BUILTIN_LANGUAGES)
    assert [lang for lang in BUILTIN_LANGUAGES if direction(lang) == "rtl"] == ["ar"]


@pytest.mark.parametrize(
    ("language", "seconds", "expected"),
    [
        ("en", 1, "1 second"),
        ("en", 30, "30 seconds"),
        ("en", 120, "2 minutes"),
        ("en", 3600, "60 minutes"),
        ("en", 7200, "2 hours"),
        ("de", 1, "1 Sekunde"),
        ("de", 5, "5 Sekunden"),
        ("fr", 1, "1\u00a0seconde"),
        ("ja", 30, "30秒"),
        ("zh-Hans", 30, "30 秒"),
        ("ar", 1, "ثانية واحدة"),
        ("ar", 2, "ثانيتين"),
        ("ar", 5, "5 ثوانٍ"),
        ("ar", 30, "30 ثانية"),
    ],
)
def test_durations_follow_each_languages_plural_rules(
    language: str, seconds: int, expected: str
) -> None:
    strings = {**ENGLISH, **TRANSLATIONS.get(language, {})}
    assert Words(language, strings).duration(seconds) == expected


# --- Accept-Language -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("de-DE,de;q=0.9,en;q=0.8", ["de-de", "de", "en"]),
        ("en;q=0.5, fr", ["fr", "en"]),
        ("fr;q=0, de", ["de"]),  # q=0: not acceptable
        ("da, en-gb;q=0.8, en;q=0.7", ["da", "en-gb", "en"]),
        ("*", ["*"]),
        ("de;q=2, x y, 12, fr;q=abc, ja", ["ja"]),  # malformed ranges and q-values dropped
        ("", []),
    ],
)
def test_accept_language_parse(header: str, expected: list[str]) -> None:
    assert parse_accept_language(header) == expected


def test_accept_language_parse_is_bounded_and_linear() -> None:
    started = time.perf_counter()
    for hostile in ("a-" * 500_000, ",".join(["de"] * 100_000), "a" * 1_000_000, ";" * 10**6):
        assert len(parse_accept_language(hostile)) <= 32
    assert time.perf_counter() - started < 2.0


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, "en"),
        ("de-AT,de;q=0.9", "de"),
        ("pt-BR", "pt"),
        ("zh-CN,zh;q=0.9", "zh-Hans"),  # lookup shortens zh-CN to zh, which zh-Hans extends
        ("zh-Hans-CN", "zh-Hans"),
        ("ja-JP", "ja"),
        ("ar-EG", "ar"),
        ("fr;q=0.4, es;q=0.6", "es"),
        ("nl, sv", "en"),  # nothing fits: the default
        ("*", "en"),
        ("en-x-private", "en"),
    ],
)
def test_language_lookup(header: str | None, expected: str) -> None:
    assert Languages(BrandSettings()).choose(header).tag == expected


def test_restricted_languages_and_their_default() -> None:
    languages = Languages(BrandSettings(languages=["de", "fr"]))
    assert languages.choose("ja").tag == "de"  # English not offered: the first is the default
    assert languages.choose("fr-CA").tag == "fr"
    # lang = en-GB: English answers, and the page says which English.
    assert Languages(BrandSettings(lang="en-GB")).choose("nl").tag == "en-GB"


def test_the_language_choice_is_remembered_and_bounded() -> None:
    languages = Languages(BrandSettings())
    for i in range(2000):
        languages.choose(f"x{i % 999}-a, de")
    assert len(languages._cache) <= 256
    assert languages.choose("de, " + "a" * 5000).tag == "de"  # read, not remembered
    assert languages.choose("a" * 5000 + ", de").tag == "en"  # beyond what is read
    assert len(languages._cache) <= 256


# --- the bodies in each language -------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "lang", "dir_", "heading"),
    [
        ("de", "de", "ltr", "Vorübergehend nicht verfügbar"),
        ("ja", "ja", "ltr", "一時的に利用できません"),
        ("ar", "ar", "rtl", "غير متاح مؤقتًا"),
        ("zh-CN", "zh-Hans", "ltr", "暂时无法使用"),
        ("es", "es", "ltr", "No disponible temporalmente"),
    ],
)
def test_html_page_in_the_visitors_language(
    header: str, lang: str, dir_: str, heading: str
) -> None:
    rendered = renderer(name="Acme").render(
        CircuitOpenError(retry_after=30), request_id=RID, wants=Wants(CHROME, header, "navigate")
    )
    text = rendered.body.decode()
    assert f'<html lang="{lang}" dir="{dir_}">' in text
    assert f"<h1>{heading}</h1>" in text
    headers = dict(rendered.headers)
    assert headers["content-language"] == lang
    assert headers["vary"] == "Accept, Accept-Language"
    assert "Try again" not in text or lang == "en"


def test_problem_json_and_text_in_the_visitors_language() -> None:
    r = renderer()
    problem = json.loads(
        r.render(UpstreamTimeout(), request_id=RID, wants=Wants("application/json", "fr")).body
    )
    assert problem["title"] == "Délai de la passerelle dépassé"
    assert problem["detail"] == TRANSLATIONS["fr"]["timeout_message"]
    assert problem["type"] == "about:blank"
    text = r.render(UpstreamTimeout(), request_id=RID, wants=Wants("*/*", "de")).body.decode()
    assert "Das dauert zu lange" not in text  # the heading is the page's, not the text's
    assert TRANSLATIONS["de"]["timeout_message"] in text
    assert f"Referenz: {RID}" in text


def test_one_cached_body_per_language() -> None:
    r = renderer()
    for _ in range(3):
        for header in ("de", "de-DE", "fr", "ja", "nl"):
            r.render(UpstreamTimeout(), request_id=RID, wants=Wants(CHROME, header, "navigate"))
    assert r.cache_size == 4  # de (de-DE too), fr, ja, en (for nl)


def test_overridden_strings_and_an_added_language() -> None:
    brand = {
        "languages": ["en", "de", "nl"],
        "strings": {
            "de": {"home": "Zurück zum Shop"},
            "nl": {**ENGLISH, "timeout_heading": "Dit duurt te lang", "home": "Naar de winkel"},
        },
        "home_url": "https://shop.example/",
    }
    settings = load_settings({"brand": brand}, environ={})
    r = ErrorRenderer(settings)
    de = r.render(UpstreamTimeout(), request_id=RID, wants=Wants(CHROME, "de")).body.decode()
    assert '<a href="https://shop.example/">Zurück zum Shop</a>' in de
    nl = r.render(UpstreamTimeout(), request_id=RID, wants=Wants(CHROME, "nl-BE")).body.decode()
    assert '<html lang="nl" dir="ltr">' in nl and "<h1>Dit duurt te lang</h1>" in nl
    ja = r.render(UpstreamTimeout(), request_id=RID, wants=Wants(CHROME, "ja")).body.decode()
    assert '<html lang="en"' in ja  # not offered: the default


def test_problem_base_url_makes_the_type_yours() -> None:
    settings = load_settings(
        {"brand": {"problem_base_url": "https://acme.example/problems/"}}, environ={}
    )
    problem = json.loads(
        ErrorRenderer(settings)
        .render(UpstreamTimeout(), request_id=RID, accept="application/json")
        .body
    )
    assert problem["type"] == "https://acme.example/problems/http_response_timeout"
    app = ErrorRenderer(settings).render_status(502, request_id=RID, accept="application/json")
    assert json.loads(app.body)["type"] == "about:blank"  # the app's own: only its status


@pytest.mark.parametrize(
    ("brand", "path", "fragment"),
    [
        ({"problem_base_url": "/problems/"}, "brand.problem_base_url", "http(s) URL"),
        ({"problem_base_url": "javascript:alert(1)"}, "brand.problem_base_url", "http(s) URL"),
        ({"home_url": "javascript:alert(1)"}, "brand.home_url", "http(s) URL or a /path"),
        ({"languages": ["de", "DE"]}, "brand.languages.1", "listed twice"),
        ({"languages": ["en", "not a tag"]}, "brand.languages.1", "language tag"),
        ({"languages": []}, "brand.languages", "at least one"),
        ({"languages": ["en", "nl"]}, "brand.languages", "[brand.strings.nl]"),
        ({"languages": ["de"], "lang": "fr"}, "brand.lang", "not among brand.languages"),
        ({"strings": {"nl": {"home": "Thuis"}}}, "brand.strings.nl", "not offered"),
        ({"strings": {"de": {"hoem": "x"}}}, "brand.strings.de.hoem", "not a string of the page"),
        (
            {"strings": {"de": {"advice_wait": "In {dauer} erneut."}}},
            "brand.strings.de.advice_wait",
            "{duration}",
        ),
        ({"strings": {"de": {"home": "a\nb"}}}, "brand.strings.de.home", "one line"),
        (
            {"languages": ["en", "nl"], "strings": {"nl": {"home": "Thuis"}}},
            "brand.strings.nl",
            "missing: error_code",
        ),
    ],
)
def test_language_settings_are_checked_with_the_key_path(
    brand: dict[str, Any], path: str, fragment: str
) -> None:
    with pytest.raises(gg.SettingsError) as info:
        load_settings({"brand": brand}, environ={})
    assert any(p.path == path for p in info.value.problems), str(info.value)
    assert fragment in str(info.value)


# --- which body: clients that say what they are ----------------------------------------------


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"sec-fetch-dest": "empty", "sec-fetch-mode": "cors"}, "program"),
        ({"sec-fetch-dest": "empty", "sec-fetch-mode": "same-origin"}, "program"),
        ({"sec-fetch-mode": "cors"}, "program"),
        ({"x-requested-with": "XMLHttpRequest"}, "program"),
        ({"sec-fetch-dest": "document", "sec-fetch-mode": "navigate"}, "navigate"),
        ({"sec-fetch-dest": "iframe"}, "navigate"),
        ({"sec-fetch-dest": "image", "sec-fetch-mode": "no-cors"}, ""),
        ({}, ""),
        ({"sec-fetch-dest": "x" * 1000}, ""),
    ],
)
def test_kind_of_request(headers: dict[str, str], expected: str) -> None:
    kind = kind_of(
        headers.get("sec-fetch-dest"),
        headers.get("sec-fetch-mode"),
        headers.get("x-requested-with"),
    )
    assert kind == expected
    raw = [(k.encode(), v.encode()) for k, v in headers.items()]
    assert Wants.from_asgi(raw).kind == expected
    environ = {"HTTP_" + k.upper().replace("-", "_"): v for k, v in headers.items()}
    assert Wants.from_environ(environ).kind == expected


@pytest.mark.parametrize(
    ("accept", "kind", "expected"),
    [
        ("*/*", "program", "json"),  # fetch() and XHR: a script reads JSON
        ("*/*", "", "text"),  # curl
        (None, "", "text"),
        (None, "program", "json"),
        ("text/plain, */*", "program", "text"),  # it named text
        ("text/html, */*;q=0.01", "program", "html"),  # htmx, Turbo: it named HTML
        ("application/vnd.api+json", "", "json"),
        ("application/xml", "", "text"),
        (CHROME, "navigate", "html"),
        ("*/*", "navigate", "html"),  # a navigation that sent only */*
        ("image/webp,*/*;q=0.8", "", "text"),
    ],
)
def test_negotiation_by_kind(accept: str | None, kind: Any, expected: str) -> None:
    assert negotiate(accept, kind) == expected


def test_repeated_header_lines_form_one_list() -> None:
    wants = Wants.from_asgi(
        [
            (b"accept", b"text/plain;q=0.1"),
            (b"accept", b"application/json"),
            (b"accept-language", b"de"),
        ]
    )
    assert wants.accept == "text/plain;q=0.1, application/json"
    assert wants.language == "de"


# --- the page, for the visitor ---------------------------------------------------------------


def test_countdown_follows_retry_after_without_script_or_refresh() -> None:
    r = renderer()
    wants = Wants(CHROME, "de", "navigate")
    page = r.render(CircuitOpenError(retry_after=30), request_id=RID, wants=wants).body.decode()
    assert 'style="--wait: 30s; --from: 30"' in page
    # Where CSS cannot count, the wait stays in words; the sentence is for screen readers.
    assert '<span class="countdown-words">30 Sekunden</span>' in page
    assert '<p class="visually-hidden">Bitte versuchen Sie es in 30 Sekunden erneut.</p>' in page
    assert "<script" not in page and "http-equiv" not in page
    no_wait = r.render(UpstreamTimeout(), request_id=RID, wants=wants).body.decode()
    assert 'class="countdown"' not in no_wait
    assert "<p>Bitte versuchen Sie es in wenigen Augenblicken erneut.</p>" in no_wait


@pytest.mark.parametrize(
    ("method", "try_again", "resubmit", "caution"),
    [
        ("GET", True, False, False),
        ("PUT", False, True, False),
        ("DELETE", False, True, False),
        ("POST", False, True, True),
        ("PATCH", False, True, True),
    ],
)
def test_try_again_only_repeats_a_get(
    method: str, try_again: bool, resubmit: bool, caution: bool
) -> None:
    r = renderer(home_url="https://acme.example/")
    text = r.render(UpstreamTimeout(), request_id=RID, accept=CHROME, method=method).body.decode()
    # href="" reloads the address with GET: right after a GET, wrong after a form's POST.
    assert ('<a class="button" href="">Try again</a>' in text) is try_again
    assert ("go back to the previous page and send the form again" in text) is resubmit
    assert ("check whether it went through" in text) is caution
    assert '<a href="https://acme.example/">Go to the home page</a>' in text


def test_head_gets_the_get_headers_without_a_body() -> None:
    r = renderer()
    for wants in (Wants(CHROME, "ja", "navigate"), Wants("*/*", "de", "program"), Wants()):
        get = r.render(UpstreamTimeout(), request_id=RID, wants=wants, method="GET")
        head = r.render(UpstreamTimeout(), request_id=RID, wants=wants, method="HEAD")
        assert head.body == b"" and head.headers == get.headers


def test_strings_from_code_cannot_forge_lines_or_markup() -> None:
    """A Settings built in code skips the settings check: the bodies still hold."""
    strings = {"de": {"timeout_message": "Zeile\r\nX-Forged: 1 <script>alert(1)</script>"}}
    r = renderer(strings=strings)
    text = r.render(UpstreamTimeout(), request_id=RID, wants=Wants("*/*", "de")).body.decode()
    assert "\r" not in text and "\nX-Forged" not in text
    page = r.render(UpstreamTimeout(), request_id=RID, wants=Wants(CHROME, "de")).body.decode()
    assert "<script>alert" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
