"""The bodies built without a template: problem+json (RFC 9457) and plain text.

Both say what the page says (:mod:`gateway_guard._copy`), in a form a program or a
terminal reads; neither needs escaping rules of its own beyond what is done here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Final

from ._copy import Page
from ._hygiene import one_line

__all__ = ["PROBLEM_TYPE_BASE", "plain_text", "problem_json", "problem_type"]

# Where this project documents each error type (docs/error-pages.md has an anchor per
# type). Not used as a "type" URI: a user's public API would then publish a third party's
# address. Kept for code that read it.
PROBLEM_TYPE_BASE: Final = (
    "https://github.com/gateway-guard/gateway-guard/blob/main/docs/error-pages.md"
)


def problem_type(page: Page, base: str | None = None) -> str:
    """The problem+json ``type`` URI of ``page``: ``base`` + its error type, or about:blank.

    ``base`` is ``brand.problem_base_url``, the operator's own documentation of problem
    types; the error type (or ``upstream_status`` for a failure status the upstream
    answered) is appended as it is. Unset, every problem is ``about:blank`` (RFC 9457
    §4.2.1): its meaning is its status, and ``title`` is then the status phrase. Errors
    the app returned itself carry no more meaning than their status, whatever ``base`` is.
    """
    if page.app or base is None:
        return "about:blank"
    return f"{base}{page.proxy_error or 'upstream_status'}"


def problem_json(page: Page, rid: str, base: str | None = None) -> bytes:
    """``page`` as an ``application/problem+json`` body (ASCII) for request ``rid``.

    ``title`` is the status phrase and ``detail`` the page's message, both in the page's
    language (RFC 9457 §3.1.3 and §4.2.1 allow localising them by Accept-Language).
    """
    problem: dict[str, Any] = {
        "type": problem_type(page, base),
        "title": page.status_phrase,
        "status": page.status,
        "detail": page.message,
        # A URI, as RFC 9457 §3.1.5 requires; request_id carries the bare id for clients.
        "instance": f"urn:request:{rid}",
        "request_id": rid,
    }
    if page.proxy_error is not None:
        problem["proxy_error"] = page.proxy_error
    if page.received_status is not None:
        problem["received_status"] = page.received_status
    if page.retry_after is not None:
        problem["retry_after"] = page.retry_after
    if page.details is not None:
        for field in ("upstream", "attempts", "elapsed_ms", "exception"):
            problem[field] = page.details[field]
    # ensure_ascii: valid in any charset. <, > and & as \u escapes: the body stays inert
    # even if something renders it as HTML (the same JSON value to every parser).
    text = json.dumps(problem, ensure_ascii=True)
    text = text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return text.encode("ascii")


def plain_text(page: Page, brand: Mapping[str, Any], rid: str, ts: str) -> bytes:
    """``page`` as a ``text/plain`` body; ``brand`` is the template's static context."""
    # The words may come from settings ([brand.strings]): one line each, whatever they hold
    # (the settings check refuses line breaks, but a Settings built in code skips it).
    words = page.words
    name = brand["brand_name"]
    status_line = f"{page.status} {one_line(page.status_phrase)}"
    lines = [f"{one_line(name)}: {status_line}" if name else status_line, ""]
    lines += [one_line(page.message), one_line(page.advice), ""]
    if brand["status_url"]:
        label = one_line(words["status_page_label"])
        lines.append(f"{label}: {one_line(brand['status_url'])}")
    if brand["support_url"]:
        lines.append(f"{one_line(words['support_label'])}: {one_line(brand['support_url'])}")
    lines.append(f"{one_line(words['reference_label'])}: {rid} ({ts})")
    if page.details is not None:
        lines += ["", "Debug details (debug mode is on; turn it off in production):"]
        for label, field in (
            ("Proxy error", "proxy_error"),
            ("Received status", "received_status"),
            ("Upstream", "upstream"),
            ("Attempts", "attempts"),
            ("Elapsed ms", "elapsed_ms"),
        ):
            if page.details[field] is not None:
                lines.append(f"{label}: {one_line(str(page.details[field]))}")
        # Plain text has no escaping: controls become spaces, so no line can be forged;
        # the exception's own lines (its causes) are indented under it.
        first, *causes = page.details["exception"].split("\n")
        lines.append(f"Exception: {one_line(first)}")
        lines.extend(f"  {one_line(cause)}" for cause in causes)
    return ("\n".join(lines) + "\n").encode("utf-8", "replace")
