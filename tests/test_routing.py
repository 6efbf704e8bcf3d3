from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway_guard.policy import compile_policies
from gateway_guard.routing import Route, RouteTable, RouteTemplateError, parse_template
from gateway_guard.settings import load_settings


def table(*specs: tuple[str, frozenset[str] | None], exempt: tuple[str, ...] = ()) -> RouteTable:
    routes = [Route(index=i, pattern=p, name=p, methods=m) for i, (p, m) in enumerate(specs)]
    return RouteTable(routes, exempt)


def test_templates_match_segments_ints_and_paths() -> None:
    t = table(
        ("/orders/{id:int}", None),
        ("/orders/{slug}", None),
        ("/static/{rest:path}", None),
        ("/files/{name}.json", None),
    )
    assert t.match("GET", "/orders/42").pattern == "/orders/{id:int}"  # type: ignore[union-attr]
    assert t.match("GET", "/orders/abc").pattern == "/orders/{slug}"  # type: ignore[union-attr]
    assert t.match("GET", "/orders/a/b") is None
    assert t.match("GET", "/static/a/b/c.css").pattern == "/static/{rest:path}"  # type: ignore[union-attr]
    assert t.match("GET", "/static/").pattern == "/static/{rest:path}"  # type: ignore[union-attr]
    assert t.match("GET", "/files/a.json").pattern == "/files/{name}.json"  # type: ignore[union-attr]
    assert t.match("GET", "/files/axjson") is None  # the dot is literal


def test_first_match_wins_across_methods() -> None:
    t = table(
        ("/checkout/{rest:path}", frozenset({"POST"})),
        ("/{rest:path}", None),
    )
    assert t.match("POST", "/checkout/pay").index == 0  # type: ignore[union-attr]
    assert t.match("GET", "/checkout/pay").index == 1  # type: ignore[union-attr]


def test_get_route_answers_head() -> None:
    t = table(("/a", frozenset({"GET"})))
    assert t.match("HEAD", "/a") is not None
    assert t.match("DELETE", "/a") is None


def test_regex_metacharacters_in_templates_are_literal() -> None:
    t = table(("/a.b/(x)+", None))
    assert t.match("GET", "/a.b/(x)+") is not None
    assert t.match("GET", "/aXb/(x)+") is None


def test_empty_table_and_exempt() -> None:
    t = table(exempt=("/healthz", "/metrics/{rest:path}"))
    assert t.match("GET", "/a") is None
    assert t.is_exempt("/healthz")
    assert t.is_exempt("/metrics/x/y")
    assert not t.is_exempt("/healthz/x")
    assert not table().is_exempt("/healthz")


def test_hostile_paths_do_not_match_by_accident() -> None:
    t = table(("/orders/{id}", None), exempt=("/healthz",))
    assert t.match("GET", "/orders/1\n/x") is None
    assert not t.is_exempt("/healthz\n")


@pytest.mark.parametrize(
    "bad", ["", "x", "/a/{", "/a/}", "/a/{1x}", "/a/{x:nope}", "/{x}/{x}", "/{p:path}/x", "/a\nb"]
)
def test_bad_templates(bad: str) -> None:
    with pytest.raises(RouteTemplateError):
        parse_template(bad)


@given(
    st.text(
        alphabet=st.characters(min_codepoint=33, max_codepoint=0x2FF, exclude_characters="\x7f"),
        max_size=40,
    )
)
def test_any_literal_path_matches_itself_only(segment: str) -> None:
    literal = "/" + segment.replace("{", "").replace("}", "")
    rx = re.compile(parse_template(literal), re.DOTALL)
    assert rx.fullmatch(literal)
    assert not rx.fullmatch(literal + "x")


@pytest.mark.implementation
def test_matching_does_not_grow_with_distinct_paths() -> None:
    s = load_settings({"routes": [{"path": "/orders/{id}"}]}, environ={})
    t = compile_policies(s).routes
    before = (dict(t._by_method), t._other, dict(t._routes_by_method), t._routes_other)
    for i in range(5000):
        t.match("GET", f"/orders/{i}")
        t.resolve("GET", f"/orders/{i}")
        t.is_exempt(f"/x/{i}")
    after = (dict(t._by_method), t._other, dict(t._routes_by_method), t._routes_other)
    assert after == before
    assert len(t) == 1


def test_an_exempt_path_is_exempt_in_resolve_but_still_matches_its_route() -> None:
    t = table(("/healthz", None), ("/{rest:path}", None), exempt=("/healthz",))
    assert t.resolve("GET", "/healthz") == (True, None)
    assert t.match("GET", "/healthz").index == 0  # type: ignore[union-attr]
    assert t.resolve("GET", "/x") == (False, t.routes[1])
