"""Route templates in each framework's own syntax match what that framework's router matches.

The evidence is the frameworks themselves: hypothesis writes templates and paths, and the
route table's answer is compared with Starlette's ``Route.matches``, Werkzeug's
``Map.match`` and Django's ``RoutePattern.match`` on the same template and path.
"""

from __future__ import annotations

import uuid

import pytest

# Dev dependencies: the routers we compare against. Missing, this fails, never skips.
from django.urls import resolvers as django_resolvers
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from starlette import routing as starlette_routing
from werkzeug import exceptions as werkzeug_exceptions
from werkzeug import routing as werkzeug_routing

from gateway_guard.routing import Route, RouteTable, RouteTemplateError, template_syntax


def ours(template: str, path: str) -> bool:
    table = RouteTable([Route(index=0, pattern=template, name=template)])
    return table.resolve("GET", path)[1] is not None


def starlette_matches(template: str, path: str) -> bool:
    route = starlette_routing.Route(template, endpoint=lambda request: None)
    scope = {"type": "http", "path": path, "root_path": "", "method": "GET"}
    return bool(route.matches(scope)[0] == starlette_routing.Match.FULL)


def werkzeug_matches(template: str, path: str) -> bool:
    rule = werkzeug_routing.Rule(template, endpoint="view")
    adapter = werkzeug_routing.Map([rule]).bind("localhost")
    try:
        adapter.match(path)
    except werkzeug_exceptions.NotFound:
        return False
    except werkzeug_routing.RequestRedirect:
        # A redirect (strict slashes, merged slashes) never reaches the view.
        return False
    return True


def django_matches(template: str, path: str) -> bool:
    # Django's root resolver takes the path's first "/"; patterns match what follows.
    if not path.startswith("/"):
        return False
    pattern = django_resolvers.RoutePattern(template.removeprefix("/"), is_endpoint=True)
    return pattern.match(path[1:]) is not None


UUID = "0f8fad5b-d9cb-469f-a165-70867728950e"
VALUES = [
    "",
    "a",
    "ab",
    "A",
    "1",
    "12",
    "007",
    "\u0663",  # ARABIC-INDIC DIGIT THREE: Werkzeug's \d takes it, [0-9] does not
    "1.5",
    "1.",
    ".5",
    "1.2.3",
    "a-b_c",
    "a.b",
    "é",
    "x y",
    "a/b",
    "/",
    "/a",
    UUID,
    UUID.upper(),
    UUID.replace("-", ""),
    UUID[:-1],
    UUID + "0",
]
LITERALS = ["a", "-", ".", "_", "1", "x.", "v"]
CONVERTERS = {
    "starlette": ["", "str", "int", "float", "uuid"],
    "werkzeug": ["", "string", "default", "int", "float", "uuid"],
    "django": ["", "str", "int", "slug", "uuid"],
}
PATHS = {"starlette": "path", "werkzeug": "path", "django": "path"}
MATCHERS = {
    "starlette": starlette_matches,
    "werkzeug": werkzeug_matches,
    "django": django_matches,
}


def param(syntax: str, conv: str, name: str) -> str:
    if syntax == "starlette":
        return f"{{{name}:{conv}}}" if conv else f"{{{name}}}"
    return f"<{conv}:{name}>" if conv else f"<{name}>"


@st.composite
def template_and_path(draw: st.DrawFn, syntax: str) -> tuple[str, str]:
    """A template of 1-3 segments, each of literals and parameters (a path one may end
    it), and a path built from it with values that sit on each converter's edges."""
    template: list[str] = []
    path: list[str] = []
    names = iter("abcdefghij")
    for index in range(draw(st.integers(1, 3))):
        template.append("/")
        path.append("/")
        for _ in range(draw(st.integers(1, 3))):
            if draw(st.booleans()):
                text = draw(st.sampled_from(LITERALS))
                template.append(text)
                path.append(text if draw(st.integers(0, 9)) else draw(st.sampled_from(LITERALS)))
            else:
                conv = draw(st.sampled_from(CONVERTERS[syntax]))
                template.append(param(syntax, conv, next(names)))
                path.append(draw(st.sampled_from(VALUES)))
        if draw(st.integers(0, 3)) == 0 and index >= 0:
            template.append(param(syntax, PATHS[syntax], next(names)))
            path.append(draw(st.sampled_from(VALUES)))
            break
        if draw(st.integers(0, 4)) == 0 and syntax != "werkzeug":
            template.append("/")
            path.append("/" if draw(st.integers(0, 5)) else "")
    text = "".join(template)
    if syntax == "django" and "<str:" not in text and "<slug:" not in text:
        # Without a Django-only converter, a leading "/" reads as Werkzeug: use Django's
        # own slash-free form.
        text = text[1:]
    return text, "".join(path)


def agree(syntax: str, template: str, path: str) -> None:
    assert template_syntax(template) in (syntax, "starlette")
    expected = MATCHERS[syntax](
        template if syntax != "django" else "/" + template.lstrip("/"), path
    )
    assert ours(template, path) == expected, (template, path, expected)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(template_and_path("starlette"))
@example(("/o/{a}.{b:float}", "/o/x.1.5"))
@example(("/o/{a:uuid}", "/o/" + UUID.replace("-", "")))
def test_starlette_templates_match_what_starlette_matches(case: tuple[str, str]) -> None:
    agree("starlette", *case)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(template_and_path("werkzeug"))
@example(("/o/<int:a>", "/o/\u0663"))
@example(("/o/<float:a>", "/o/1"))
@example(("/c/<path:rest>", "/c/"))
@example(("/c/<path:rest>", "/c//x"))
@example(("/c/<a>.<path:rest>", "/c/x./y"))
def test_werkzeug_templates_match_what_werkzeug_matches(case: tuple[str, str]) -> None:
    agree("werkzeug", *case)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(template_and_path("django"))
@example(("orders/<int:id>/", "/orders/\u0663/"))
@example(("o/<uuid:a>", "/o/" + UUID.upper()))
@example(("c/<path:rest>", "/c/"))
@example(("c/<path:rest>", "/c//"))
@example(("c/<slug:a>.<path:rest>", "/c/x./"))
def test_django_templates_match_what_django_matches(case: tuple[str, str]) -> None:
    agree("django", *case)


@pytest.mark.parametrize(
    ("template", "syntax"),
    [
        ("/orders/{id:int}", "starlette"),
        ("/orders/<int:id>", "werkzeug"),
        ("/orders/<id>", "werkzeug"),
        ("/orders/<string:id>", "werkzeug"),
        ("/orders/<str:id>", "django"),
        ("/orders/<slug:id>/<int:n>", "django"),
        ("orders/<int:id>/", "django"),
        ("orders/", "starlette"),
        ("/orders", "starlette"),
    ],
)
def test_the_syntax_is_read_from_the_template(template: str, syntax: str) -> None:
    assert template_syntax(template) == syntax


def test_django_slash_free_form_stands_for_the_absolute_path() -> None:
    assert ours("orders/<int:id>/", "/orders/42/")
    assert not ours("orders/<int:id>/", "/orders/42")
    assert not ours("orders/<int:id>/", "orders/42/")


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("/a/{x}/<y>", "mixes"),
        ("/a/<str:x>/<float:y>", "mixes Django converters (str) and Werkzeug ones (float)"),
        ("/a/<int(signed=True):x>", "arguments"),
        ("orders/<float:x>/", "unknown converter 'float' for Django's syntax"),
        ("/a/<path:p>/edit", "must come last"),
        ("/a/<x", "unbalanced"),
        ("/a/<1x>", "bad parameter name"),
        ("/a//<int:x>", "ambiguous in a Werkzeug rule"),
    ],
)
def test_ambiguous_or_unknown_templates_are_refused(template: str, message: str) -> None:
    with pytest.raises(RouteTemplateError, match=message.replace("(", r"\(").replace(")", r"\)")):
        template_syntax(template)


def test_uuid_in_a_segment_with_other_parameters() -> None:
    u = str(uuid.UUID(UUID))
    assert ours("/o/{a}-{b:uuid}", f"/o/x-{u}")
    assert ours("/o/{a}-{b:uuid}", f"/o/x-{u.replace('-', '')}")
    assert not ours("/o/<a>-<uuid:b>", f"/o/x-{u.replace('-', '')}")
    assert ours("/o/<a>-<uuid:b>", f"/o/x-{u.upper()}")
    assert not ours("o/<slug:a>-<uuid:b>", f"/o/x-{u.upper()}")
