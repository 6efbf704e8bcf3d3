from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import gateway_guard as gg
from gateway_guard.policy import compile_policies
from gateway_guard.settings import Settings, load_settings

EXAMPLE = Path(__file__).parent.parent / "examples" / "settings.toml"

UP = {"payments": {"base_url": "http://payments.internal:8080"}}

# (settings, key path that must be named, a fragment of the explanation)
INVALID: list[tuple[dict[str, Any], str, str]] = [
    ({"servce": "x"}, "servce", "did you mean 'service'"),
    ({"service": "my shop"}, "service", "token"),
    ({"service": "shop\r\nX-Evil: 1"}, "service", "token"),
    ({"service": 3}, "service", "must be a string"),
    ({"debug": "yes"}, "debug", "true or false"),
    ({"brand": {"accent_color": "red"}}, "brand.accent_color", "hex colour"),
    ({"brand": {"accent_color": "#12345g"}}, "brand.accent_color", "hex colour"),
    ({"brand": {"accent_color": "#fff;background:url(x)"}}, "brand.accent_color", "hex"),
    ({"brand": {"logo_url": "javascript:alert(1)"}}, "brand.logo_url", "http(s) URL"),
    ({"brand": {"support_url": "ftp://acme.example/"}}, "brand.support_url", "http(s)"),
    ({"brand": {"status_url": "//evil.example/"}}, "brand.status_url", "http(s)"),
    ({"brand": {"status_url": 'https://x.example/"><script>'}}, "brand.status_url", "quotes"),
    ({"brand": {"template_dir": "/definitely/not/here"}}, "brand.template_dir", "directory"),
    ({"brand": {"lang": "en us"}}, "brand.lang", "must match"),
    ({"brand": {"colour": "#fff"}}, "brand.colour", "unknown key"),
    ({"defaults": {"connect_timeout": 0}}, "defaults.connect_timeout", "greater than 0"),
    ({"defaults": {"read_timeout": -1}}, "defaults.read_timeout", "greater than 0"),
    ({"defaults": {"read_timeout": 20.0}}, "defaults.read_timeout", "must not exceed the deadline"),
    ({"defaults": {"deadline": float("inf")}}, "defaults.deadline", "finite"),
    ({"defaults": {"retry": {"attempts": 0}}}, "defaults.retry.attempts", "at least 1"),
    ({"defaults": {"retry": {"attempts": 2.5}}}, "defaults.retry.attempts", "whole number"),
    ({"defaults": {"retry": {"attempts": True}}}, "defaults.retry.attempts", "whole number"),
    ({"defaults": {"retry": {"on_status": [503, 99]}}}, "defaults.retry.on_status.1", "at least"),
    ({"defaults": {"retry": {"methods": ["GET", "P OST"]}}}, "defaults.retry.methods.1", "match"),
    ({"defaults": {"retry": {"budget_ratio": 2}}}, "defaults.retry.budget_ratio", "at most 1"),
    (
        {"defaults": {"retry": {"backoff_initial": 5, "backoff_max": 1}}},
        "defaults.retry.backoff_initial",
        "backoff_max",
    ),
    ({"defaults": {"retry": {"retries": 3}}}, "defaults.retry.retries", "unknown key"),
    ({"defaults": {"breaker": {"failure_rate": 1.5}}}, "defaults.breaker.failure_rate", "at most"),
    ({"defaults": {"breaker": {"failure_rate": 0}}}, "defaults.breaker.failure_rate", "than 0"),
    ({"defaults": {"breaker": {"window": "counts"}}}, "defaults.breaker.window", "'count'"),
    (
        {"defaults": {"breaker": {"window_size": 5, "min_calls": 10}}},
        "defaults.breaker.min_calls",
        "window_size",
    ),
    (
        {"defaults": {"breaker": {"open_seconds": 60, "max_open_seconds": 10}}},
        "defaults.breaker.max_open_seconds",
        "open_seconds",
    ),
    ({"defaults": {"breaker": {"failur_rate": 0.5}}}, "defaults.breaker.failur_rate", "did you"),
    ({"defaults": {"bulkhead": {"max_concurrent": -1}}}, "defaults.bulkhead.max_concurrent", "0"),
    ({"upstreams": {"payments": {"base_url": "ftp://x"}}}, "upstreams.payments.base_url", "http"),
    (
        {"upstreams": {"payments": {"base_url": "javascript:alert(1)"}}},
        "upstreams.payments.base_url",
        "http",
    ),
    (
        {"upstreams": {"payments": {"breaker": {"failure_rate": 1.5}}}},
        "upstreams.payments.breaker.failure_rate",
        "at most 1",
    ),
    (
        {"upstreams": {"payments": {"read_timeout": 30}}},
        "upstreams.payments.read_timeout",
        "deadline",
    ),
    ({"upstreams": {"pay ments": {}}}, "upstreams.pay ments", "upstream names"),
    (
        {"upstreams": {"p": {"base_url": "http://127.0.0.1:99999"}}},
        "upstreams.p.base_url",
        "invalid port",
    ),
    (
        {"upstreams": {"payments": {"base_ur": "http://x"}}},
        "upstreams.payments.base_ur",
        "did you mean 'base_url'",
    ),
    ({"upstreams": ["payments"]}, "upstreams", "table"),
    ({"shed": {"max_queue": -5}}, "shed.max_queue", "at least 0"),
    ({"shed": {"exempt": ["healthz"]}}, "shed.exempt.0", "start with '/'"),
    ({"routes": [{"methods": ["GET"]}]}, "routes.0.path", "required"),
    ({"routes": [{"path": "orders/{id}"}]}, "routes.0.path", "start with '/'"),
    ({"routes": [{"path": "/orders/{id"}]}, "routes.0.path", "unbalanced"),
    ({"routes": [{"path": "/a/{x:uuid}"}]}, "routes.0.path", "unknown converter"),
    ({"routes": [{"path": "/a/{x}/{x}"}]}, "routes.0.path", "twice"),
    ({"routes": [{"path": "/a/{rest:path}/b"}]}, "routes.0.path", "must come last"),
    ({"routes": [{"path": "/a", "priority": "urgent"}]}, "routes.0.priority", "'critical'"),
    (
        {"upstreams": UP, "routes": [{"path": "/a", "depends_on": ["paymnts"]}]},
        "routes.0.depends_on.0",
        "did you mean 'payments'",
    ),
    (
        {"routes": [{"path": "/a", "breaker": {"failure_rate": 0.1}}]},
        "routes.0.breaker",
        "unknown key",
    ),
    (
        {"routes": [{"path": "/ok"}, {"path": "/a", "read_timeout": 9, "deadline": 3}]},
        "routes.1.read_timeout",
        "deadline",
    ),
    ({"routes": [{"path": "/a", "shed": {"exempt": ["/x"]}}]}, "routes.0.shed.exempt", "app-wide"),
    ({"routes": {"path": "/a"}}, "routes", "list"),
    ({"routes": [{"path": "/a", "methods": []}]}, "routes.0.methods", "at least 1"),
    (
        {"routes": [{"path": "/a", "retry": {"budget_ratio": 0.5}}]},
        "routes.0.retry.budget_ratio",
        "per upstream",
    ),
    # Only the deadline was set here: blame it, not the inherited read_timeout.
    (
        {"upstreams": {"search": {"deadline": 2.5}}},
        "upstreams.search.deadline",
        "read_timeout 3 s",
    ),
    (
        {"upstreams": {"s": {"breaker": {"window_size": 5}}}},
        "upstreams.s.breaker.window_size",
        "min_calls 10",
    ),
]


def test_corpus_is_large_enough() -> None:
    assert len(INVALID) >= 30


@pytest.mark.parametrize(("raw", "path", "fragment"), INVALID, ids=[c[1] for c in INVALID])
def test_invalid_settings_name_the_key_path(raw: dict[str, Any], path: str, fragment: str) -> None:
    with pytest.raises(gg.SettingsError) as info:
        load_settings(raw, environ={})
    message = str(info.value)
    assert f"{path}:" in message, message
    assert fragment in message, message
    assert any(p.path == path for p in info.value.problems)
    # SettingsError is also a ValueError, so generic startup code catches it.
    assert isinstance(info.value, ValueError)


def test_several_problems_are_reported_together() -> None:
    with pytest.raises(gg.SettingsError) as info:
        load_settings(
            {
                "defaults": {"retry": {"attempts": 0}, "breaker": {"failure_rate": 7}},
                "shed": {"max_queue": -1},
            },
            environ={},
        )
    paths = {p.path for p in info.value.problems}
    assert paths == {"defaults.retry.attempts", "defaults.breaker.failure_rate", "shed.max_queue"}
    assert str(info.value).startswith("3 problems")


def test_bad_value_is_shown_but_truncated() -> None:
    with pytest.raises(gg.SettingsError) as info:
        load_settings({"service": "x" * 500 + " y"}, environ={})
    assert "..." in str(info.value)
    assert len(str(info.value)) < 400


def test_defaults_match_design() -> None:
    s = load_settings({}, environ={})
    assert s.service == "gateway-guard"
    assert s.debug is False
    assert s.defaults.connect_timeout == 1.0
    assert s.defaults.read_timeout == 3.0
    assert s.defaults.deadline == 4.0
    assert s.defaults.retry.attempts == 3
    assert s.defaults.retry.methods == ["GET", "HEAD", "OPTIONS", "PUT", "DELETE"]
    assert s.defaults.retry.budget_ratio == 0.1
    assert s.defaults.breaker.failure_rate == 0.8
    assert s.defaults.breaker.half_open_calls == 3
    assert s.defaults.bulkhead.max_concurrent == 100
    assert s.shed.exempt == ["/healthz", "/metrics"]


def test_example_file_loads() -> None:
    s = load_settings(EXAMPLE, environ={})
    assert s.service == "shop"
    assert s.upstreams["payments"].base_url is not None


def test_json_file_and_string_path(tmp_path: Path) -> None:
    file = tmp_path / "gg.json"
    file.write_text(json.dumps({"service": "api", "upstreams": UP}))
    assert load_settings(str(file), environ={}).service == "api"
    assert load_settings(file, environ={}).upstreams["payments"].base_url


@pytest.mark.parametrize(
    ("name", "content", "fragment"),
    [
        ("gg.yaml", "service: x", "must end in .toml or .json"),
        ("gg.toml", "service = ", "not valid TOML"),
        ("gg.json", "{", "not valid JSON"),
        ("gg.json", "[1, 2]", "top level"),
    ],
)
def test_bad_files(tmp_path: Path, name: str, content: str, fragment: str) -> None:
    file = tmp_path / name
    file.write_text(content)
    with pytest.raises(gg.SettingsError, match="must end|not valid|top level") as info:
        load_settings(file, environ={})
    assert fragment in str(info.value)
    assert str(file) in str(info.value)


def test_missing_file() -> None:
    with pytest.raises(gg.SettingsError, match="cannot be read"):
        load_settings("/nope/gateway_guard.toml", environ={})


def test_wrong_source_type() -> None:
    with pytest.raises(gg.SettingsError, match="must be a mapping"):
        load_settings(42, environ={})  # type: ignore[arg-type]


def test_settings_object_passes_through() -> None:
    s = load_settings({"service": "x"}, environ={})
    assert load_settings(s) is s


# --- environment ---------------------------------------------------------------------


def test_env_settings_file(tmp_path: Path) -> None:
    file = tmp_path / "gg.toml"
    file.write_text('service = "from-file"\n')
    s = load_settings(None, environ={"GATEWAY_GUARD_SETTINGS": str(file)})
    assert s.service == "from-file"


def test_no_source_no_env_gives_defaults() -> None:
    assert load_settings(None, environ={}).service == "gateway-guard"


def test_env_overrides_are_coerced_to_the_field_type() -> None:
    env = {
        "GATEWAY_GUARD__SERVICE": "envshop",
        "GATEWAY_GUARD__DEBUG": "true",
        "GATEWAY_GUARD__DEFAULTS__RETRY__ATTEMPTS": "5",
        "GATEWAY_GUARD__DEFAULTS__RETRY__ON_STATUS": "502,503",
        "GATEWAY_GUARD__DEFAULTS__RETRY__METHODS": '["GET"]',
        "GATEWAY_GUARD__DEFAULTS__BREAKER__FAILURE_RATE": "0.25",
        "GATEWAY_GUARD__UPSTREAMS__PAYMENTS__READ_TIMEOUT": "1.5",
        "GATEWAY_GUARD__ROUTES__0__DEADLINE": "4",
        "GATEWAY_GUARD__BRAND__NAME": "123",  # a string field stays a string
    }
    s = load_settings({"upstreams": UP, "routes": [{"path": "/a"}]}, environ=env)
    assert s.service == "envshop"
    assert s.debug is True
    assert s.defaults.retry.attempts == 5
    assert s.defaults.retry.on_status == [502, 503]
    assert s.defaults.retry.methods == ["GET"]
    assert s.defaults.breaker.failure_rate == 0.25
    assert s.upstreams["payments"].read_timeout == 1.5
    assert s.routes[0].deadline == 4
    assert s.brand.name == "123"


def test_env_list_items_are_trimmed() -> None:
    env = {"GATEWAY_GUARD__DEFAULTS__RETRY__METHODS": "GET, PUT"}
    assert load_settings({}, environ=env).defaults.retry.methods == ["GET", "PUT"]


def test_json_schema_key_is_ignored(tmp_path: Path) -> None:
    file = tmp_path / "gg.json"
    file.write_text(json.dumps({"$schema": "./schema.json", "service": "api"}))
    assert load_settings(file, environ={}).service == "api"


def test_env_override_creates_an_upstream() -> None:
    env = {"GATEWAY_GUARD__UPSTREAMS__SEARCH__BASE_URL": "http://127.0.0.1:9"}
    s = load_settings({}, environ=env)
    assert s.upstreams["search"].base_url == "http://127.0.0.1:9"


def test_env_override_matches_upstream_names_case_insensitively() -> None:
    env = {"GATEWAY_GUARD__UPSTREAMS__PAYMENTS__READ_TIMEOUT": "1"}
    s = load_settings({"upstreams": {"Payments": {}}}, environ=env)
    assert s.upstreams["Payments"].read_timeout == 1


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({"GATEWAY_GUARD__DEFAULTS__RETRY__ATTEMPTS": "many"}, "defaults.retry.attempts"),
        ({"GATEWAY_GUARD__DEFAULTS__RETRY__ATEMPTS": "2"}, "did you mean 'attempts'"),
        ({"GATEWAY_GUARD__ROUTES__3__DEADLINE": "2"}, "GATEWAY_GUARD__ROUTES__3__DEADLINE"),
        ({"GATEWAY_GUARD____X": "1"}, "empty key segment"),
        ({"GATEWAY_GUARD__SERVICE__X": "1"}, "not a section"),
    ],
)
def test_bad_env_overrides(env: dict[str, str], fragment: str) -> None:
    with pytest.raises(gg.SettingsError) as info:
        load_settings({}, environ=env)
    assert fragment in str(info.value)


def test_real_environment_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_GUARD__SERVICE", "from-env")
    assert load_settings({}).service == "from-env"
    assert gg.Guard({}).settings.service == "from-env"


# --- layering -------------------------------------------------------------------------


def test_layering_defaults_upstream_route_per_key() -> None:
    s = load_settings(
        {
            "defaults": {
                "read_timeout": 8,
                "deadline": 10,
                "retry": {"attempts": 4, "backoff_max": 3},
            },
            "upstreams": {
                "payments": {"read_timeout": 3, "retry": {"backoff_max": 1}},
                "search": {},
            },
            "routes": [
                {"path": "/checkout", "retry": {"attempts": 1}, "connect_timeout": 0.5},
            ],
        },
        environ={},
    )
    p = compile_policies(s)
    pay = p.calls["payments"]
    assert pay.read_timeout == 3  # upstream beats defaults
    assert pay.retry.attempts == 4  # inherited per key
    assert pay.retry.backoff_max == 1  # merged, not replaced
    route = p.routes.resolve("GET", "/checkout")[1]
    assert route is not None
    in_route = route.calls["payments"]
    assert in_route.retry.attempts == 1  # the route beats the upstream
    assert in_route.retry.backoff_max == 1  # ... per key
    assert in_route.connect_timeout == 0.5
    assert in_route.read_timeout == 3
    assert route.calls["search"].read_timeout == 8


def test_route_deadline_caps_but_never_loosens() -> None:
    s = load_settings(
        {
            "upstreams": {"fast": {"deadline": 2.0, "read_timeout": 1}, "slow": {}},
            "routes": [{"path": "/a", "deadline": 3.0}],
        },
        environ={},
    )
    route = compile_policies(s).routes.resolve("GET", "/a")[1]
    assert route is not None
    assert route.deadline == 3.0
    assert route.calls["fast"].deadline == 2.0
    assert route.calls["slow"].deadline == 3.0


def test_unchanged_route_policies_are_shared() -> None:
    s = load_settings(
        {"upstreams": UP, "routes": [{"path": "/a", "priority": "critical"}]}, environ={}
    )
    p = compile_policies(s)
    route = p.routes.resolve("GET", "/a")[1]
    assert route is not None
    assert route.calls["payments"] is p.calls["payments"]


def test_policies_are_frozen() -> None:
    p = compile_policies(load_settings({"upstreams": UP}, environ={}))
    with pytest.raises(AttributeError):
        p.calls["payments"].deadline = 1  # type: ignore[misc]


def test_route_shed_merges_with_app_shed() -> None:
    s = load_settings(
        {"shed": {"queue_timeout": 2}, "routes": [{"path": "/a", "shed": {"max_concurrent": 5}}]},
        environ={},
    )
    route = compile_policies(s).routes.resolve("GET", "/a")[1]
    assert route is not None and route.shed is not None
    assert route.shed.max_concurrent == 5
    assert route.shed.queue_timeout == 2


def test_schema_is_json_serialisable() -> None:
    schema = Settings.model_json_schema()
    text = json.dumps(schema)
    assert "failure_rate" in text
    assert schema["additionalProperties"] is False


def test_guard_rejects_bad_settings() -> None:
    with pytest.raises(gg.SettingsError, match="defaults.retry.attempts"):
        gg.Guard({"defaults": {"retry": {"attempts": 0}}})


def test_guard_unknown_upstream_lists_known() -> None:
    guard = gg.Guard({"upstreams": UP})
    with pytest.raises(KeyError, match="payments"):
        guard.policy("nope")


def test_max_open_seconds_unset_is_60s_or_open_seconds_when_longer() -> None:
    settings = load_settings(
        {
            "upstreams": {
                "quick": {"base_url": "http://quick.test"},
                "slow": {"base_url": "http://slow.test", "breaker": {"open_seconds": 120}},
                "capped": {
                    "base_url": "http://capped.test",
                    "breaker": {"open_seconds": 5, "max_open_seconds": 20},
                },
            }
        },
        environ={},
    )
    calls = compile_policies(settings).calls
    assert calls["quick"].breaker.max_open_seconds == 60.0
    # A long open_seconds is not refused for a cap the user never set.
    assert calls["slow"].breaker.max_open_seconds == 120.0
    assert calls["capped"].breaker.max_open_seconds == 20.0


def test_max_open_seconds_from_the_environment() -> None:
    settings = load_settings(
        {}, environ={"GATEWAY_GUARD__DEFAULTS__BREAKER__MAX_OPEN_SECONDS": "90"}
    )
    assert settings.defaults.breaker.max_open_seconds == 90.0


# Defect 9 of issue #15: each of these passed validation before.
HOSTILE: list[tuple[dict[str, Any], str, str]] = [
    ({"defaults": {"read_timeout": 1e300}}, "defaults.read_timeout", "3600"),
    ({"defaults": {"retry": {"backoff_max": 1e300}}}, "defaults.retry.backoff_max", "3600"),
    ({"shed": {"queue_timeout": 1e300}}, "shed.queue_timeout", "3600"),
    ({"service": "shop\n"}, "service", "token"),
    ({"brand": {"accent_color": "#fff\n"}}, "brand.accent_color", "hex colour"),
    ({"upstreams": {"pay\n": {"base_url": "http://p.example"}}}, "upstreams.pay\n", "names"),
    ({"upstreams": {"p": {"base_url": "http://:8080"}}}, "upstreams.p.base_url", "host"),
    (
        {"brand": {"status_url": "https://s.example/\u2028Forged: line"}},
        "brand.status_url",
        "control",
    ),
    ({"brand": {"support_url": "https://s.example/\x85x"}}, "brand.support_url", "control"),
    ({"brand": {"name": "Acme\u2028Forged: line"}}, "brand.name", "one line"),
    ({"routes": [{"path": "/a", "name": "a\nb"}]}, "routes.0.name", "one line"),
    ({"defaults": {"retry": {"on_status": [200, 503]}}}, "defaults.retry.on_status.0", "400"),
    ({"shed": {"max_concurrent": 10**12}}, "shed.max_concurrent", "1000000"),
    ({"shed": {"max_concurrent": 2**64}}, "shed.max_concurrent", "1000000"),
    (
        {"defaults": {"bulkhead": {"max_concurrent": 10**12}}},
        "defaults.bulkhead.max_concurrent",
        "",
    ),
    (
        {"routes": [{"path": "/a/{x}"}, {"path": "/a/{x}", "methods": ["GET"]}]},
        "routes.1.path",
        "duplicates routes.0.path",
    ),
    # Held in memory by every call in flight: a size beyond any body worth retrying is a typo.
    (
        {"defaults": {"retry": {"buffer_body_bytes": 2**40}}},
        "defaults.retry.buffer_body_bytes",
        "67108864",
    ),
    ({"defaults": {"retry": {"buffer_body_bytes": -1}}}, "defaults.retry.buffer_body_bytes", "0"),
]


@pytest.mark.parametrize(("raw", "path", "fragment"), HOSTILE, ids=[c[1] for c in HOSTILE])
def test_hostile_settings_are_refused_at_startup(
    raw: dict[str, Any], path: str, fragment: str
) -> None:
    with pytest.raises(gg.SettingsError) as info:
        load_settings(raw, environ={})
    assert any(p.path == path for p in info.value.problems), info.value
    assert fragment in str(info.value)


def test_a_route_with_other_methods_is_not_a_duplicate() -> None:
    routes = [{"path": "/a", "methods": ["GET"]}, {"path": "/a", "methods": ["POST"]}]
    assert len(load_settings({"routes": routes}, environ={}).routes) == 2


def test_settings_nested_deep_are_a_settings_error(tmp_path: Path) -> None:
    deep: dict[str, Any] = {}
    node = deep
    for _ in range(100_000):
        node["x"] = {}
        node = node["x"]
    with pytest.raises(gg.SettingsError, match="nested deeper"):
        load_settings({"brand": deep}, environ={})
    file = tmp_path / "deep.json"
    file.write_text('{"brand": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(gg.SettingsError):
        load_settings(str(file), environ={})
