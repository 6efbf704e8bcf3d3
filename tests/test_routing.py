from __future__ import annotations

import math
import re
import time
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway_guard.policy import compile_policies
from gateway_guard.routing import Route, RouteTable, RouteTemplateError, parse_template
from gateway_guard.settings import load_settings


def match(t: RouteTable, method: str, path: str) -> Route | None:
    exempt, route = t.resolve(method, path)
    assert not exempt
    return route


def is_exempt(t: RouteTable, path: str) -> bool:
    return t.resolve("GET", path)[0]


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
    assert match(t, "GET", "/orders/42").pattern == "/orders/{id:int}"  # type: ignore[union-attr]
    assert match(t, "GET", "/orders/abc").pattern == "/orders/{slug}"  # type: ignore[union-attr]
    assert match(t, "GET", "/orders/a/b") is None
    assert match(t, "GET", "/static/a/b/c.css").pattern == "/static/{rest:path}"  # type: ignore[union-attr]
    assert match(t, "GET", "/static/").pattern == "/static/{rest:path}"  # type: ignore[union-attr]
    assert match(t, "GET", "/files/a.json").pattern == "/files/{name}.json"  # type: ignore[union-attr]
    assert match(t, "GET", "/files/axjson") is None  # the dot is literal


def test_first_match_wins_across_methods() -> None:
    t = table(
        ("/checkout/{rest:path}", frozenset({"POST"})),
        ("/{rest:path}", None),
    )
    assert match(t, "POST", "/checkout/pay").index == 0  # type: ignore[union-attr]
    assert match(t, "GET", "/checkout/pay").index == 1  # type: ignore[union-attr]


def test_get_route_answers_head() -> None:
    t = table(("/a", frozenset({"GET"})))
    assert match(t, "HEAD", "/a") is not None
    assert match(t, "DELETE", "/a") is None


def test_regex_metacharacters_in_templates_are_literal() -> None:
    t = table(("/a.b/(x)+", None))
    assert match(t, "GET", "/a.b/(x)+") is not None
    assert match(t, "GET", "/aXb/(x)+") is None


def test_empty_table_and_exempt() -> None:
    t = table(exempt=("/healthz", "/metrics/{rest:path}"))
    assert match(t, "GET", "/a") is None
    assert is_exempt(t, "/healthz")
    assert is_exempt(t, "/metrics/x/y")
    assert not is_exempt(t, "/healthz/x")
    assert not is_exempt(table(), "/healthz")


def test_hostile_paths_do_not_match_by_accident() -> None:
    t = table(("/orders/{id}", None), exempt=("/healthz",))
    assert match(t, "GET", "/orders/1\n/x") is None
    assert not is_exempt(t, "/healthz\n")


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "x/{id}",
        "/a/{",
        "/a/}",
        "/a/{1x}",
        "/a/{x:nope}",
        "/{x}/{x}",
        "/{p:path}/x",
        "/a\nb",
        "/a/<",
        "/a/<int:x",
        "/a/<x>>",
        "/a/{x}/<y>",
        "/a/<str:x>/<float:y>",
        "/a/<string(length=2):x>",
        "/a/<any(a,b):x>",
        "/a/<slug:x>/<x>",
        "/<path:p>/edit",
        "orders/<float:x>/",
        "/a/<hex:x>",
    ],
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
    # Brackets make parameters (or are refused); nothing else is special.
    literal = "/" + "".join(c for c in segment if c not in "{}<>")
    rx = re.compile(parse_template(literal), re.DOTALL)
    assert rx.fullmatch(literal)
    assert not rx.fullmatch(literal + "x")


@pytest.mark.implementation
def test_matching_does_not_grow_with_distinct_paths() -> None:
    s = load_settings({"routes": [{"path": "/orders/{id}"}]}, environ={})
    t = compile_policies(s).routes
    before = (dict(t._by_method), t._other)
    for i in range(5000):
        t.resolve("GET", f"/orders/{i}")
        t.resolve("GET", f"/x/{i}")
    after = (dict(t._by_method), t._other)
    assert after == before
    assert len(t) == 1


def test_an_exempt_path_is_exempt_even_when_a_route_matches_it() -> None:
    t = table(("/healthz", None), ("/{rest:path}", None), exempt=("/healthz",))
    assert t.resolve("GET", "/healthz") == (True, None)
    assert t.resolve("GET", "/x") == (False, t.routes[1])


# Templates built from pieces that make regex backtracking matter: several parameters
# in one segment, literals that the parameters can also match, digits and dots.
_PIECES = st.sampled_from(["/", "_", ".", "a", "1", "{}", "{}", "{:int}", "{:float}"])


@st.composite
def _templates(draw: st.DrawFn) -> str:
    pieces = draw(st.lists(_PIECES, max_size=7))
    if draw(st.booleans()):
        pieces.append("{:path}")
    out = "/"
    for i, piece in enumerate(pieces):
        out += piece.replace("{", f"{{p{i}") if piece.startswith("{") else piece
    return out


_PATHS = st.text(alphabet="/_.a1b", max_size=12).map(lambda s: "/" + s)


@given(st.lists(_templates(), min_size=1, max_size=3), _PATHS)
def test_matching_agrees_with_the_templates_regular_expressions(
    templates: list[str], path: str
) -> None:
    t = table(*((p, None) for p in templates))
    expected = next(
        (i for i, p in enumerate(templates) if re.fullmatch(parse_template(p), path, re.DOTALL)),
        None,
    )
    route = match(t, "GET", path)
    assert (route.index if route is not None else None) == expected


def test_segments_with_several_parameters() -> None:
    t = table(
        ("/files/{name}.{ext}", None),
        ("/v/{major:int}.{minor:int}", None),
        ("/x/{a}_{b}_{c}/{rest:path}", None),
        ("/{a}-{b}", None),
    )
    assert match(t, "GET", "/files/a.b.c").index == 0  # type: ignore[union-attr]
    assert match(t, "GET", "/files/.b") is None
    assert match(t, "GET", "/v/1.2").index == 1  # type: ignore[union-attr]
    # The check for route 1 fails, so the table goes on to a later route.
    assert match(t, "GET", "/v-1.x").index == 3  # type: ignore[union-attr]
    assert match(t, "GET", "/x/a_b_c/").index == 2  # type: ignore[union-attr]
    assert match(t, "GET", "/x/a_b_c/d/e").index == 2  # type: ignore[union-attr]
    assert match(t, "GET", "/x/a_b_/d") is None


def _best_of(repeats: int, fn: Callable[[], object]) -> float:
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


_RUNS = re.compile("[0-9]+|[^0-9]+")


def _runs(path: str) -> list[int]:
    # Python-level work per run of digits: what the digit steps of the matcher do.
    return [m.end() for m in _RUNS.finditer(path)]


@pytest.mark.parametrize(
    ("template", "str_only"),
    [
        ("/x/{a}_{b}_{c}", True),
        ("/x/{a}_{b}_{c}_{d}.{e}", True),
        ("/x/{a}{b}{c}/{r:path}", True),
        ("/x/{a}_{b:int}_{c}", False),
        ("/x/{a}.{b:float}_{c}", False),
    ],
)
@pytest.mark.parametrize("body", ["_" * 16384, "1_" * 8192, "a_" * 8192 + "/", "1.1_" * 4096])
def test_hostile_paths_match_in_linear_time(template: str, str_only: bool, body: str) -> None:
    # A backtracking engine takes minutes on these (polynomial in the length, with the
    # number of parameters in the segment as the exponent). Bounds are relative to work
    # timed on the same 16 KB path in this run, so a loaded machine moves both sides:
    # str parameters cost little more than a one-parameter template (well under 1 ms,
    # bench/routing.py); digit parameters walk runs of digits in Python, so they are held
    # to a Python loop over the path's runs of digits (measured: 2 to 7 times that).
    hostile = table((template, None), exempt=("/healthz",))
    plain = table(("/x/{a}", None), exempt=("/healthz",))
    path = "/x/" + body + "!"
    took = _best_of(5, lambda: hostile.resolve("GET", path))
    if str_only:
        baseline = _best_of(5, lambda: plain.resolve("GET", path))
        assert took < 50 * baseline, (took, baseline)
    else:
        baseline = _best_of(5, lambda: _runs(path))
        assert took < 50 * baseline, (took, baseline)


_SEGMENT_TEMPLATES = [
    "/{a}_{b}_{c}",
    "/{a}_{b:int}_{c}",
    "/{a}.{b:float}_{c}",
    "/{a}-{b:uuid}",
    "/<a>_<int:b>.<float:c>",
    "/<str:a>-<slug:b>_<int:c>",
    "/{a}{b}.{c:int}/{r:path}",
    "/x{a:int}y{b}z",
]


@pytest.mark.implementation
@given(
    template=st.sampled_from(_SEGMENT_TEMPLATES),
    seg=st.text(alphabet="01a_.-/yxz9fé", max_size=40),
)
def test_bit_set_matcher_agrees_with_the_span_matcher(template: str, seg: str) -> None:
    # ASCII segments take the bit-set matcher, the others the span sets; both must agree.
    from gateway_guard import _matcher

    for segment in _matcher.segments(_matcher.parse(template)[1]):
        if _matcher.needs_check(segment):
            assert _matcher.match_segment(segment, seg) == _matcher._match_spans(segment, seg)
