"""Which upstream a URL belongs to: base_url host, port and path, and match patterns."""

from __future__ import annotations

import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

import gateway_guard as gg
from gateway_guard._hosts import HostConflict, HostMap, parse_pattern


def hosts(**upstreams: tuple[str | None, list[str]]) -> HostMap:
    return HostMap(upstreams)


def test_base_url_host_and_port() -> None:
    m = hosts(payments=("http://payments.internal:8080", []), api=("https://api.example", []))
    assert m.lookup_url("http://payments.internal:8080/charges") == "payments"
    assert m.lookup_url("http://PAYMENTS.internal.:8080/") == "payments"
    assert m.lookup_url("http://payments.internal/charges") is None  # port 80, not 8080
    assert m.lookup_url("https://api.example/v1") == "api"
    assert m.lookup_url("https://api.example:443/v1") == "api"
    assert m.lookup_url("http://api.example/v1") is None  # port 80
    assert m.lookup_url("https://evil.example/?u=https://api.example") is None
    assert m.lookup_url("https://api.example.evil.test/") is None
    assert m.lookup_url("not a url") is None
    assert m.lookup_url("http://[::1:80/") is None


def test_base_url_path_prefixes_share_a_host() -> None:
    m = hosts(v1=("http://api.internal/v1", []), v2=("http://api.internal/v2/", []))
    assert m.lookup_url("http://api.internal/v1/orders") == "v1"
    assert m.lookup_url("http://api.internal/v1") == "v1"
    assert m.lookup_url("http://api.internal/v2/x") == "v2"
    assert m.lookup_url("http://api.internal/v10") is None
    assert m.lookup_url("http://api.internal/") is None


def test_match_patterns() -> None:
    m = hosts(
        payments=("http://10.0.0.5:8080", ["payments.internal", "*.payments.internal:8443"]),
        eu=(None, ["*.eu.payments.internal"]),
        v6=(None, ["[::1]:9000"]),
    )
    assert m.lookup_url("http://payments.internal/x") == "payments"  # any port
    assert m.lookup_url("http://payments.internal:1234/x") == "payments"
    assert m.lookup_url("https://a.payments.internal:8443/") == "payments"
    assert m.lookup_url("https://a.b.payments.internal:8443/") == "payments"
    assert m.lookup_url("https://a.payments.internal/") is None  # 443, not 8443
    assert m.lookup_url("https://x.eu.payments.internal:8443/") == "eu"  # longer domain wins
    assert m.lookup_url("https://eu.payments.internal:8443/") == "payments"
    assert m.lookup_url("http://10.0.0.5:8080/") == "payments"
    assert m.lookup_url("http://[::1]:9000/") == "v6"
    assert m.lookup_url("http://xpayments.internal/") is None


def test_an_exact_host_beats_a_wildcard() -> None:
    m = hosts(a=(None, ["*.example.test"]), b=(None, ["api.example.test"]))
    assert m.lookup_url("http://api.example.test/") == "b"
    assert m.lookup_url("http://www.example.test/") == "a"
    assert m.lookup_url("http://example.test/") is None  # a wildcard needs a label before


@pytest.mark.parametrize(
    "bad",
    ["", "*", "*.", "a..b", "a b", "*.*.x", "a*.x", "x:0", "x:99999", "x:80a", "[::1", "[zz]"],
)
def test_bad_patterns(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_pattern(bad)


def test_two_upstreams_naming_one_host_in_match_conflict() -> None:
    with pytest.raises(HostConflict) as info:
        hosts(a=(None, ["x.internal"]), b=(None, ["X.internal."]))
    assert (info.value.first, info.value.second, info.value.key) == ("a", "b", "match.0")
    with pytest.raises(HostConflict) as info:
        hosts(a=(None, ["*.x.internal:80"]), b=(None, ["y", "*.x.internal:80"]))
    assert info.value.key == "match.1"
    # Different ports, or a port and any port, are different claims.
    hosts(a=(None, ["x.internal:81"]), b=(None, ["x.internal"]))


def test_a_shared_base_url_belongs_to_the_first_unless_a_pattern_claims_it() -> None:
    # Two policies for one service (the same base_url) is a valid configuration.
    m = hosts(a=("http://x.internal", []), b=("http://x.internal", []))
    assert m.lookup_url("http://x.internal/") == "a"
    m = hosts(a=("http://x.internal", []), b=("http://x.internal", ["x.internal:80"]))
    assert m.lookup_url("http://x.internal/") == "b"
    m = hosts(a=("http://x.internal/v1", []), b=("http://x.internal/v1/", []))
    assert m.lookup_url("http://x.internal/v1/y") == "a"
    # A wildcard pattern beats a base_url too: patterns are what instrumentation is told.
    m = hosts(a=("http://eu.x.internal", []), b=(None, ["*.x.internal"]))
    assert m.lookup_url("http://eu.x.internal/") == "b"


def test_settings_refuse_bad_and_conflicting_patterns() -> None:
    with pytest.raises(gg.SettingsError) as info:
        gg.Guard(
            {
                "upstreams": {
                    "a": {"base_url": "http://x.internal:8080", "match": ["ok.internal", "b d"]},
                    "b": {"base_url": "http://x.internal:8080", "match": ["ok.internal"]},
                }
            }
        )
    text = str(info.value)
    assert "upstreams.a.match.1: must be a host name" in text
    assert "upstreams.b.match.0: ok.internal already belongs to upstream 'a'" in text


def test_guard_upstream_for_url() -> None:
    guard = gg.Guard(
        {
            "upstreams": {
                "payments": {"base_url": "http://payments.internal:8080", "match": ["*.pay.test"]}
            }
        }
    )
    assert guard.upstream_for_url("http://payments.internal:8080/x") == "payments"
    assert guard.upstream_for_url("https://eu.pay.test/x") == "payments"
    assert guard.upstream_for_url("https://example.com/") is None


@given(st.text(alphabet="ab.-*:", max_size=60))
def test_lookup_never_raises(host: str) -> None:
    m = hosts(a=(None, ["*.a.b", "a.b:1"]))
    m.lookup(host, None)
    m.lookup_url(f"http://{host}/")


def test_lookup_is_linear_in_the_host() -> None:
    m = hosts(a=(None, ["*.a.a"]))
    host = "a." * 120 + "a"  # many labels, every one of them in the tree
    start = time.perf_counter()
    for _ in range(1000):
        m.lookup(host, None)
    assert m.lookup(host, None) == "a"
    assert time.perf_counter() - start < 2.0
    assert m.lookup("a." * 5000 + "a", None) is None  # longer than any DNS name: no work
