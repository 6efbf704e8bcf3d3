from __future__ import annotations

import pytest

import gateway_guard as gg
from gateway_guard.context import reset_context, set_context
from gateway_guard.inbound import start, view_policy

SETTINGS = {
    "upstreams": {"pay": {"base_url": "http://pay.test"}, "search": {}},
    "routes": [{"path": "/a", "deadline": 10, "retry": {"attempts": 4}}],
}


def test_view_policy_layers_over_the_upstream() -> None:
    guard = gg.Guard(SETTINGS)
    route = guard.view_policy("checkout", retry={"attempts": 1}, deadline=2)
    assert route.name == "checkout"
    assert route.calls["pay"].retry.attempts == 1
    assert route.calls["pay"].deadline == 2
    assert route.shed is None
    assert route.index == -1


@pytest.mark.parametrize(
    ("overrides", "path"),
    [
        ({"retry": {"attempts": 0}}, "view v.retry.attempts"),
        ({"shed": {"max_concurrent": 1}}, "view v.shed"),
        ({"priority": "critical"}, "view v.priority"),
        ({"depends_on": ["nope"]}, "view v.depends_on.0"),
        ({"read_timeout": 9, "deadline": 1}, "view v.read_timeout"),
        ({"retry": {"budget_ratio": 0.5}}, "view v.retry.budget_ratio"),
    ],
)
def test_bad_view_policies_name_the_view_and_key(overrides: dict[str, object], path: str) -> None:
    guard = gg.Guard(SETTINGS)
    with pytest.raises(gg.SettingsError) as info:
        guard.view_policy("v", **overrides)
    assert any(p.path == path for p in info.value.problems), str(info.value)


def test_view_policy_applies_only_while_the_view_runs() -> None:
    clock_now = [100.0]
    guard = gg.Guard(SETTINGS, clock=lambda: clock_now[0])
    ctx = start(guard, "GET", "/a", None, None)
    outer_route, outer_deadline = ctx.route, ctx.deadline_at
    assert outer_deadline == 110.0
    route = guard.view_policy("v", retry={"attempts": 1}, deadline=2)
    token = set_context(ctx)
    try:
        with view_policy(route):
            assert ctx.route is route
            assert ctx.deadline_at == 102.0  # shortened
        assert (ctx.route, ctx.deadline_at) == (outer_route, outer_deadline)
        longer = guard.view_policy("v2", deadline=60)
        with view_policy(longer):
            assert ctx.deadline_at == 110.0  # never lengthened
    finally:
        reset_context(token)


def test_view_dependency_down_raises_before_the_view() -> None:
    guard = gg.Guard(SETTINGS)
    route = guard.view_policy("v", depends_on=["pay"])
    guard.breaker("pay").force_open()
    ctx = start(guard, "GET", "/b", None, None)
    token = set_context(ctx)
    try:
        with pytest.raises(gg.CircuitOpenError) as info, view_policy(route):
            pytest.fail("the view must not run")
        assert info.value.upstream == "pay"
    finally:
        reset_context(token)


def test_outside_a_request_view_policy_does_nothing() -> None:
    # A view called outside a guarded request (a unit test of the view) just runs: even
    # with its dependency's breaker open, there is no request to answer 503 for.
    guard = gg.Guard(SETTINGS)
    guard.breaker("pay").force_open()
    route = guard.view_policy("v", depends_on=["pay"], deadline=2)
    ran: list[gg.RequestContext | None] = []
    with view_policy(route):
        ran.append(gg.current_context())
    assert ran == [None]  # the body ran, and no context was made up for it
    assert gg.current_context() is None
