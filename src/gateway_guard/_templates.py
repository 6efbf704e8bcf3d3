"""The HTML page: its Jinja2 templates, the values they are given, and its CSP.

A user's ``brand.template_dir`` is searched before the built-in templates (which stay
reachable as ``gateway_guard/error.html``, so a user's page can extend ours). A template
is loaded and test-rendered once at start-up; what fails is reported and replaced by the
built-in page, so a broken template is found at deploy time, not at the first outage.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import jinja2

from ._colours import PALETTE, ink
from ._copy import ENGLISH_WORDS, Page
from ._hygiene import COLOUR_RE, SAFE_URL_RE
from ._schema import BrandSettings

__all__ = [
    "TEMPLATE_NAME",
    "content_security_policy",
    "environment",
    "load_template",
    "page_context",
    "static_context",
]

logger = logging.getLogger("gateway_guard")

TEMPLATE_NAME: Final = "error.html"
_SAMPLE_DETAILS: Final[Mapping[str, Any]] = {
    "proxy_error": "connection_limit_reached",
    "received_status": 503,
    "upstream": "sample",
    "attempts": 1,
    "elapsed_ms": 1.0,
    "exception": "LoadShedError: sample",
}
_NO_SPACE_LANGUAGES = frozenset({"ja", "zh", "th", "lo", "km", "my"})
_CSP_HOST_RE = re.compile(r"[A-Za-z0-9.-]+(?::[0-9]{1,5})?")
# What a Settings built directly may carry instead of a colour: the schema's default.
_DEFAULT_ACCENT: Final[str] = BrandSettings.model_fields["accent_color"].default


def static_context(brand: BrandSettings, debug: bool, problems: list[str]) -> dict[str, Any]:
    """The template values that are the same on every page: brand, colours, debug flag.

    A colour or URL that settings validation would have refused is replaced or left out,
    and reported in ``problems`` (and the log).
    """
    accent = brand.accent_color
    if not COLOUR_RE.fullmatch(accent):
        problems.append(
            f"brand.accent_color: not a hex colour, using {_DEFAULT_ACCENT}: {accent!r}"
        )
        logger.warning("gateway_guard: %s", problems[-1])
        accent = _DEFAULT_ACCENT
    urls: dict[str, str | None] = {}
    for key in ("logo_url", "support_url", "status_url", "home_url"):
        url = getattr(brand, key)
        if url is not None and not SAFE_URL_RE.fullmatch(url):
            problems.append(f"brand.{key}: not an http(s) URL or /path, left out: {url!r}")
            logger.warning("gateway_guard: %s", problems[-1])
            url = None
        urls[key] = url or None
    return {
        "brand_name": brand.name,
        **urls,
        "accent_color": accent,
        "accent_ink": ink(accent, PALETTE["light"]["card"], "#000000"),
        "accent_ink_dark": ink(accent, PALETTE["dark"]["card"], "#ffffff"),
        "palette": PALETTE,
        "debug": debug,
    }


def page_context(
    static: Mapping[str, Any], page: Page, rid: str, ts: str, iso: str
) -> dict[str, Any]:
    """Everything the template is given for ``page``, request ``rid`` at time ``ts``.

    ``t`` is every string of the page's language (:data:`gateway_guard._copy.ENGLISH`'s
    keys); the sentences with values in them come ready, and ``reference_parts`` splits
    the reference sentence around its ``{reference}`` and ``{time}`` (which the page
    marks up), so a translation may put them in any order.
    """
    words = page.words
    return {
        **static,
        "lang": words.tag,
        "dir": words.dir,
        "t": words.strings,
        "status": page.status,
        "status_phrase": page.status_phrase,
        "error_code": (
            words["error_code"]
            .replace("{status}", str(page.status))
            .replace("{phrase}", page.status_phrase)
        ),
        "situation": page.situation,
        "heading": page.heading,
        "message": page.message,
        "advice": page.advice,
        "caution": words["caution"] if page.caution else None,
        "resubmit": words["resubmit"] if page.resubmit else None,
        "retry_after": page.retry_after,
        "retry_after_text": (
            words.duration(page.retry_after) if page.retry_after is not None else None
        ),
        "reference_parts": _parts(words["reference"]),
        # Japanese and Chinese put no space between sentences.
        "sentence_gap": "" if words.tag.split("-")[0].lower() in _NO_SPACE_LANGUAGES else " ",
        "retry_link": page.retry_link,
        "proxy_error": page.proxy_error,
        "received_status": page.received_status,
        "request_id": rid,
        "timestamp": ts,
        "timestamp_iso": iso,
        "details": page.details,
    }


def _parts(sentence: str) -> list[tuple[str, str]]:
    """``sentence`` as (kind, text) parts: ``text`` parts, and ``reference``/``time`` slots."""
    parts: list[tuple[str, str]] = []
    rest = sentence
    while rest:
        starts = [(rest.find(f"{{{name}}}"), name) for name in ("reference", "time")]
        found = [(at, name) for at, name in starts if at >= 0]
        if not found:
            parts.append(("text", rest))
            break
        at, name = min(found)
        if at:
            parts.append(("text", rest[:at]))
        parts.append((name, ""))
        rest = rest[at + len(name) + 2 :]
    return parts


def load_template(
    template_dir: str | None, static: Mapping[str, Any], problems: list[str]
) -> tuple[jinja2.Template | None, bool]:
    """The error page template and whether it is the built-in one.

    None when not even the built-in page loads (a broken installation): the renderer
    then answers in plain text.
    """

    def report(problem: str) -> None:
        problems.append(problem)
        logger.error("gateway_guard: %s", problem)

    if template_dir is not None:
        user_file = Path(template_dir) / TEMPLATE_NAME
        if not Path(template_dir).is_dir():
            report(f"brand.template_dir: not a directory: {template_dir!r}")
        elif not user_file.is_file():
            report(
                f"brand.template_dir: no {TEMPLATE_NAME} in {template_dir!r}; "
                "using the built-in page"
            )
        else:
            try:
                template = environment(jinja2.FileSystemLoader(template_dir)).get_template(
                    TEMPLATE_NAME
                )
                _smoke_test(template, static)
                return template, False
            except Exception as exc:
                where = str(user_file)
                if isinstance(exc, jinja2.TemplateSyntaxError) and exc.lineno:
                    where += f", line {exc.lineno}"
                report(
                    f"brand.template_dir: {where}: {type(exc).__name__}: {exc}; "
                    "using the built-in page"
                )
    try:
        return environment(None).get_template(TEMPLATE_NAME), True
    except Exception:  # a broken installation: answer in plain text rather than crash
        logger.exception("gateway_guard: the built-in error page cannot be loaded")
        problems.append("the built-in error page cannot be loaded; using plain text")
        return None, False


def _smoke_test(template: jinja2.Template, static: Mapping[str, Any]) -> None:
    # Render once at start-up with every optional part present, so a template that
    # fails on everything is reported (and replaced) now, not at the first outage.
    page = Page(
        status=503,
        situation="overloaded",
        proxy_error="connection_limit_reached",
        received_status=503,
        retry_after=5,
        retry_link=True,
        caution=True,
        app=False,
        details=_SAMPLE_DETAILS,
        words=ENGLISH_WORDS,
        resubmit=True,
    )
    template.render(page_context(static, page, "sample-request-id", "2000-01-01 00:00:00 UTC", ""))


def environment(user_loader: jinja2.BaseLoader | None) -> jinja2.Environment:
    """A Jinja2 environment over the user's templates (if any), then ours."""
    builtin = jinja2.PackageLoader("gateway_guard", "templates")
    # "gateway_guard/error.html" always names ours, so a user's error.html can extend it
    # (plain "error.html" would find the user's own file again).
    loaders: list[jinja2.BaseLoader] = [builtin, jinja2.PrefixLoader({"gateway_guard": builtin})]
    if user_loader is not None:
        loaders.insert(0, user_loader)  # the user's directory first, then ours
    return jinja2.Environment(
        loader=jinja2.ChoiceLoader(loaders),
        # Every template here is HTML: escape everything, whatever the file is called.
        autoescape=True,
        trim_blocks=True,
        lstrip_blocks=True,
        # Templates are compiled once and kept: no stat() per render.
        auto_reload=False,
    )


def content_security_policy(logo_url: str | None) -> str:
    """The built-in page's CSP: no script, no requests but the logo's."""
    if logo_url is None:
        images = "'none'"
    elif logo_url.startswith("/"):
        images = "'self'"
    else:
        parts = urlsplit(logo_url)
        scheme = parts.scheme.lower()
        # A host-source may not carry user info or odd characters; the scheme alone still
        # lets the logo load.
        images = (
            f"{scheme}://{parts.netloc}" if _CSP_HOST_RE.fullmatch(parts.netloc) else f"{scheme}:"
        )
    return (
        f"default-src 'none'; style-src 'unsafe-inline'; img-src {images}; "
        "base-uri 'none'; form-action 'none'"
    )
