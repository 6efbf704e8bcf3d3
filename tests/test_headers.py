from __future__ import annotations

import calendar
import doctest
import math
import os
import random
import re
import threading
import time
import warnings

import http_sf
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway_guard import headers
from gateway_guard.headers import (
    PROXY_ERROR_TYPES,
    format_retry_after,
    header_safe,
    new_request_id,
    new_traceparent,
    parse_retry_after,
    parse_traceparent,
    proxy_status,
    server_timing,
    sf_string,
    sf_token,
    valid_request_id,
)

# Every code point, lone surrogates included: they reach us through badly decoded bytes.
any_text = st.text(st.characters(exclude_categories=()))
PRINTABLE_ASCII = re.compile(r"[\x20-\x7e]*")


def expected_text(value: str, max_len: int = 256) -> str:
    """What a value reads as once it went through sf_string, written out char by char."""
    out = []
    for char in value[:max_len]:
        if char in "\t\n\v\f\r":
            out.append(" ")
        elif " " <= char <= "~":
            out.append(char)
        else:
            out.append("?")
    return "".join(out)


def parse_list(value: str) -> list[tuple[object, dict[str, object]]]:
    parsed = http_sf.parse(value.encode(), tltype="list")
    assert isinstance(parsed, list)
    members: list[tuple[object, dict[str, object]]] = []
    for member in parsed:
        assert isinstance(member, tuple)
        item, raw_params = member
        params: dict[str, object] = dict(raw_params)
        members.append((item, params))
    return members


def parse_member(value: str) -> tuple[object, dict[str, object]]:
    [member] = parse_list(value)
    return member


def test_all_is_sorted() -> None:
    assert headers.__all__ == sorted(headers.__all__)


def test_docstring_examples_hold() -> None:
    results = doctest.testmod(headers)
    assert results.attempted > 0
    assert results.failed == 0


# --- sf_token / sf_string / header_safe ------------------------------------------------------


@pytest.mark.parametrize("value", ["shop", "*", "*x", "a:b/c", "Foo.bar-baz_1", "a!#$%&'*+^`|~"])
def test_sf_token_accepts_tokens(value: str) -> None:
    assert sf_token(value) == value


@pytest.mark.parametrize(
    "value", ["", "1abc", "-x", "a b", 'a"', "a,b", "a;b", "é", "shop\r\n", "shop\n", "a=b"]
)
def test_sf_token_rejects_non_tokens(value: str) -> None:
    assert sf_token(value) is None


@pytest.mark.parametrize(
    ("value", "serialized"),
    [
        ("", '""'),
        ("plain text", '"plain text"'),
        ('say "hi"', r'"say \"hi\""'),
        ("C:\\path\\", r'"C:\\path\\"'),
        ("x\r\nSet-Cookie: a=b", '"x  Set-Cookie: a=b"'),
        ("tab\there", '"tab here"'),
        ("nul\x00del\x7f", '"nul?del?"'),
        ("Grüße 日本", '"Gr??e ??"'),
        ("lone \ud800 surrogate", '"lone ? surrogate"'),
        ("next\x85line\u2028sep", '"next?line?sep"'),
    ],
)
def test_sf_string_examples(value: str, serialized: str) -> None:
    assert sf_string(value) == serialized
    assert http_sf.parse(serialized.encode(), tltype="item") == (expected_text(value), {})


def test_sf_string_truncates_before_escaping() -> None:
    # A cut after escaping could leave a lone backslash that swallows the closing quote.
    for value in ("\\" * 1000, '"' * 1000, "a" + "\\" * 999):
        serialized = sf_string(value, max_len=256)
        assert http_sf.parse(serialized.encode(), tltype="item") == (value[:256], {})


@pytest.mark.parametrize("max_len", [0, -5])
def test_sf_string_with_no_room_is_empty(max_len: int) -> None:
    assert sf_string("anything", max_len=max_len) == '""'


@given(any_text, st.integers(min_value=0, max_value=300))
def test_sf_string_round_trips_any_text(value: str, max_len: int) -> None:
    serialized = sf_string(value, max_len=max_len)
    assert PRINTABLE_ASCII.fullmatch(serialized)
    assert http_sf.parse(serialized.encode(), tltype="item") == (
        expected_text(value, max_len),
        {},
    )


@pytest.mark.parametrize(
    ("value", "safe"),
    [
        ("upstream down", "upstream down"),
        ("x\r\nSet-Cookie: a=b", "x  Set-Cookie: a=b"),
        ("  padded\t", "padded"),
        ('quotes " and \\ stay', 'quotes " and \\ stay'),
        ("naïve\x00", "na?ve?"),
        ("\r\n", ""),
    ],
)
def test_header_safe_examples(value: str, safe: str) -> None:
    assert header_safe(value) == safe


def test_header_safe_caps_length() -> None:
    assert header_safe("x" * 10_000) == "x" * 256
    assert header_safe("x" * 100, max_len=10) == "x" * 10


@given(any_text, st.integers(min_value=0, max_value=300))
def test_header_safe_is_visible_ascii(value: str, max_len: int) -> None:
    safe = header_safe(value, max_len)
    assert PRINTABLE_ASCII.fullmatch(safe)
    assert safe == safe.strip(" ")
    assert len(safe) <= max_len


# --- proxy_status ----------------------------------------------------------------------------


def test_proxy_status_example() -> None:
    value = proxy_status("shop", "connection_refused", received_status=503, details="x")
    assert value == 'shop; error=connection_refused; received-status=503; details="x"'


def test_proxy_status_parameter_order() -> None:
    value = proxy_status(
        "shop", "http_response_timeout", received_status=504, details="d", next_hop="payments"
    )
    assert value == (
        'shop; error=http_response_timeout; received-status=504; next-hop="payments"; details="d"'
    )


def test_proxy_status_service_alone() -> None:
    assert proxy_status("shop") == "shop"
    assert parse_member("shop") == (http_sf.Token("shop"), {})


def test_proxy_status_non_token_service_is_a_string() -> None:
    value = proxy_status("Acme Shop\r\nX-Evil: 1", "dns_error")
    assert value == '"Acme Shop  X-Evil: 1"; error=dns_error'
    assert parse_member(value) == ("Acme Shop  X-Evil: 1", {"error": http_sf.Token("dns_error")})


@pytest.mark.parametrize("error", ["not_a_registered_type", "Connection_Refused", "a b", "", "é"])
def test_proxy_status_unknown_error_falls_back(error: str) -> None:
    assert proxy_status("shop", error) == "shop; error=proxy_internal_error"


def test_proxy_status_every_registered_type_is_kept() -> None:
    for error in PROXY_ERROR_TYPES:
        assert sf_token(error) == error
        assert parse_member(proxy_status("shop", error))[1] == {"error": http_sf.Token(error)}


def test_proxy_status_without_error_says_what_the_upstream_answered() -> None:
    # An upstream that answered a failure status: no error type, only received-status.
    assert proxy_status("shop", received_status=500) == "shop; received-status=500"


@pytest.mark.parametrize(("status", "kept"), [(0, True), (999, True), (-1, False), (1000, False)])
def test_proxy_status_received_status_range(status: int, kept: bool) -> None:
    value = proxy_status("shop", received_status=status)
    assert value == (f"shop; received-status={status}" if kept else "shop")


def test_proxy_status_received_status_is_never_a_bool() -> None:
    assert proxy_status("shop", received_status=True) == "shop"


def test_proxy_status_hostile_details() -> None:
    details = 'refused by "10.0.0.1"\r\nSet-Cookie: evil=1\\ \x00 ünïcode ' + "x" * 1000
    value = proxy_status("shop", "connection_refused", details=details, next_hop="a\nb")
    assert PRINTABLE_ASCII.fullmatch(value)
    _, params = parse_member(value)
    assert params["details"] == expected_text(details)
    assert params["next-hop"] == "a b"


def test_proxy_status_extra_parameters() -> None:
    value = proxy_status(
        "shop",
        "dns_error",
        extra={
            "rcode": "NXDOMAIN",
            "info-code": 3,
            "cached": True,
            "stale": False,
            "error": "override",  # would shadow ours: dropped
            "Bad Key": "x",  # not an sf-key: dropped
            "huge": 10**16,  # outside sf-integer: dropped
        },
    )
    assert value == 'shop; error=dns_error; rcode="NXDOMAIN"; info-code=3; cached; stale=?0'
    assert parse_member(value)[1] == {
        "error": http_sf.Token("dns_error"),
        "rcode": "NXDOMAIN",
        "info-code": 3,
        "cached": True,
        "stale": False,
    }


def test_proxy_status_members_combine_into_a_list() -> None:
    value = ", ".join(
        [proxy_status("cdn", received_status=502), proxy_status("shop", "connection_timeout")]
    )
    assert [str(item) for item, _ in parse_list(value)] == ["cdn", "shop"]


sf_keys = st.from_regex(r"[a-z*][a-z0-9_\-.*]{0,8}", fullmatch=True)
extra_values = st.one_of(any_text, st.integers(), st.booleans())


@given(
    service=any_text,
    error=st.one_of(st.none(), st.sampled_from(sorted(PROXY_ERROR_TYPES)), any_text),
    received_status=st.one_of(st.none(), st.integers(min_value=-10, max_value=2000)),
    details=st.one_of(st.none(), any_text),
    next_hop=st.one_of(st.none(), any_text),
    extra=st.one_of(
        st.none(), st.dictionaries(st.one_of(sf_keys, any_text), extra_values, max_size=4)
    ),
)
def test_proxy_status_any_input_parses_and_round_trips(
    *,
    service: str,
    error: str | None,
    received_status: int | None,
    details: str | None,
    next_hop: str | None,
    extra: dict[str, str | int | bool] | None,
) -> None:
    value = proxy_status(
        service,
        error,
        received_status=received_status,
        details=details,
        next_hop=next_hop,
        extra=extra,
    )
    assert PRINTABLE_ASCII.fullmatch(value)

    item, params = parse_member(value)
    if sf_token(service[:256]) is not None:
        assert item == http_sf.Token(service[:256])
    else:
        assert item == expected_text(service)

    expected: dict[str, object] = {}
    if error is not None:
        expected["error"] = http_sf.Token(
            error if error in PROXY_ERROR_TYPES else "proxy_internal_error"
        )
    if received_status is not None and 0 <= received_status <= 999:
        expected["received-status"] = received_status
    if next_hop is not None:
        expected["next-hop"] = expected_text(next_hop)
    if details is not None:
        expected["details"] = expected_text(details)
    for key, extra_value in (extra or {}).items():
        if key in {"error", "received-status", "next-hop", "details"}:
            continue
        if not re.fullmatch(r"[a-z*][a-z0-9_\-.*]*", key):
            continue
        if isinstance(extra_value, str):
            expected[key] = expected_text(extra_value)
        elif isinstance(extra_value, bool) or abs(extra_value) < 10**15:
            expected[key] = extra_value
    assert params == expected
    assert list(params) == list(expected)


# --- Retry-After -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "header"),
    [
        (0, "0"),
        (0.0, "0"),
        (-3.5, "0"),
        (1e-9, "1"),
        (0.2, "1"),
        (1, "1"),
        (1.0, "1"),
        (1.0001, "2"),
        (29.5, "30"),
        (86399.2, "86400"),
        (86400, "86400"),
        (1e12, "86400"),
        (math.inf, "86400"),
        (-math.inf, "0"),
        (math.nan, "1"),
    ],
)
def test_format_retry_after(seconds: float, header: str) -> None:
    assert format_retry_after(seconds) == header


def test_format_retry_after_custom_cap() -> None:
    assert format_retry_after(45.2, max_seconds=30) == "30"
    assert format_retry_after(12.1, max_seconds=30) == "13"


@given(st.floats(min_value=1e-300, max_value=86400))
def test_format_retry_after_never_early_never_much_later(seconds: float) -> None:
    whole = int(format_retry_after(seconds))
    assert whole >= seconds
    assert whole - 1 < seconds
    assert parse_retry_after(format_retry_after(seconds)) == whole


# 1994-11-06 08:49:37 UTC, the date in RFC 9110's examples.
RFC_DATE = calendar.timegm((1994, 11, 6, 8, 49, 37, 0, 0, 0))


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("120", 120.0),
        ("0", 0.0),
        ("007", 7.0),
        (" 5\t", 5.0),
        ("86400", 86400.0),
        ("999999999999999", 1e9),  # clamped, still "too long" for every caller
        ("9" * 5000, 1e9),  # beyond int()'s digit limit: must not raise
        ("0" * 5000 + "3", 3.0),
    ],
)
def test_parse_retry_after_delay_seconds(value: str, seconds: float) -> None:
    assert parse_retry_after(value) == seconds


@pytest.mark.parametrize(
    "value",
    [
        "Sun, 06 Nov 1994 08:49:37 GMT",  # IMF-fixdate
        "Sunday, 06-Nov-94 08:49:37 GMT",  # obsolete RFC 850
        "Sun Nov  6 08:49:37 1994",  # obsolete asctime, GMT by definition
        "  Sun, 06 Nov 1994 08:49:37 GMT  ",
    ],
)
def test_parse_retry_after_http_dates(value: str) -> None:
    assert parse_retry_after(value, now=RFC_DATE - 90) == 90.0
    assert parse_retry_after(value, now=RFC_DATE + 90) == 0.0  # past: retry now


def test_parse_retry_after_leap_second() -> None:
    assert parse_retry_after("Sun, 06 Nov 1994 08:49:60 GMT", now=RFC_DATE) == 22.0


def test_parse_retry_after_two_digit_years_follow_rfc_9110() -> None:
    now = calendar.timegm((2026, 1, 1, 0, 0, 0, 0, 0, 0))
    # 2070 is less than 50 years ahead, so "70" means 2070 (email.utils alone says 1970).
    in_2070 = calendar.timegm((2070, 1, 1, 0, 0, 0, 0, 0, 0))
    assert parse_retry_after("Wednesday, 01-Jan-70 00:00:00 GMT", now=now) == min(
        in_2070 - now, 1e9
    )
    # 2077 would be more than 50 years ahead: it is 1977, in the past.
    assert parse_retry_after("Saturday, 01-Jan-77 00:00:00 GMT", now=now) == 0.0


def test_parse_retry_after_defaults_now_to_the_clock() -> None:
    assert parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT") == 0.0
    far = parse_retry_after("Fri, 31 Dec 9999 23:59:59 GMT")
    assert far == 1e9


@pytest.mark.parametrize(
    "value",
    [
        "",
        "   ",
        "-1",
        "+5",
        "1.5",
        "1e3",
        "0x10",
        "1_000",
        "١٢٣",  # Arabic-Indic digits: int() would take them
        "\uff15",  # fullwidth digit 5
        "soon",
        "120 seconds",
        "Sun, 32 Nov 1994 08:49:37 GMT",
        "Sun, 06 Nov 1994 25:49:37 GMT",
        "Sun, 06 Foo 1994 08:49:37 GMT",
        "Sun, 06 Nov 1994 08:49:37 +9999",
        "Sun, 06 Nov 1994 08:49:37 GMT" + " " * 100 + "x",
        "Sün, 06 Nov 1994 08:49:37 GMT",
        "\x00",
        "5\r\n",
    ],
)
def test_parse_retry_after_garbage(value: str) -> None:
    assert parse_retry_after(value, now=RFC_DATE) is None


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("2, 2", 2.0),  # two fields, joined by the client (defect 7 of #15)
        ("2,5", 5.0),  # the largest wins: never come back sooner than any field asked
        ("5, 2", 5.0),
        ("soon, 3", 3.0),  # garbage elements are ignored
        ("3, , -1, 1.5,", 3.0),
        ("Sun, 06 Nov 1994 08:49:37 GMT, 60", 90.0),  # a date holds a comma of its own
        ("60, Sun, 06 Nov 1994 08:49:37 GMT", 90.0),
        ("Sun, 06 Nov 1994 08:49:37 GMT, Sun, 06 Nov 1994 08:49:37 GMT", 90.0),
        ("Sunday, 06-Nov-94 08:49:37 GMT, 1", 90.0),
    ],
)
def test_parse_retry_after_joined_fields(value: str, seconds: float) -> None:
    assert parse_retry_after(value, now=RFC_DATE - 90) == seconds


@pytest.mark.parametrize("value", [",", ", ,", "soon, later", "Sun, 32 Nov 1994 08:49:37 GMT, x"])
def test_parse_retry_after_joined_garbage(value: str) -> None:
    assert parse_retry_after(value, now=RFC_DATE) is None


@pytest.mark.parametrize(
    "value",
    [
        "1," * 200_000,
        ", " * 200_000 + "5",
        "Sun," * 100_000,
        "9" * 100_000 + "," + "x" * 100_000,
    ],
)
def test_parse_retry_after_hostile_lists_cost_little(value: str) -> None:
    # Only the first few elements are parsed; the rest is one overlong element, refused.
    started = time.perf_counter()
    seconds = parse_retry_after(value, now=RFC_DATE)
    assert time.perf_counter() - started < 0.05
    assert seconds is None or 0.0 <= seconds <= 1e9


@given(any_text, st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True)))
def test_parse_retry_after_never_raises(value: str, now: float | None) -> None:
    seconds = parse_retry_after(value, now=now)
    assert seconds is None or 0.0 <= seconds <= 1e9


# Random text rarely looks like a date; these pieces steer the fuzzing into the date parser.
date_pieces = st.sampled_from(
    ["Sun,", "Sunday,", "Sun", "06", "6", "29", "32", "Nov", "Feb", "06-Nov-94", "1994", "94",
     "0", "00", "9999", "10000", "08:49:37", "24:00:00", "08:49:60", "23:59", "GMT", "UTC",
     "EST", "+0000", "-0000", "+9999", "-2359", "-", ",", ":", "  "]
)  # fmt: skip


@given(st.lists(date_pieces, max_size=8).map(" ".join), st.floats(0, 2e10))
def test_parse_retry_after_date_like_input_never_raises(value: str, now: float) -> None:
    seconds = parse_retry_after(value, now=now)
    assert seconds is None or 0.0 <= seconds <= 1e9


@given(st.integers(min_value=0, max_value=10**20))
def test_parse_retry_after_any_delay_seconds(delay: int) -> None:
    assert parse_retry_after(str(delay)) == min(float(delay), 1e9)


# --- request ids -----------------------------------------------------------------------------

HEX32 = re.compile(r"[0-9a-f]{32}")


def test_new_request_id_shape() -> None:
    request_id = new_request_id()
    assert HEX32.fullmatch(request_id)
    assert valid_request_id(request_id) == request_id


@pytest.mark.implementation
def test_request_ids_keep_their_shape_across_batch_refills() -> None:
    from gateway_guard import headers

    headers._ids.clear()  # the next id starts a fresh batch of 64
    drawn = [new_request_id() for _ in range(3 * 64 + 5)]
    assert all(HEX32.fullmatch(rid) for rid in drawn)
    assert len(set(drawn)) == len(drawn)


def test_new_request_ids_are_unique() -> None:
    assert len({new_request_id() for _ in range(100_000)}) == 100_000


def test_threads_drawing_ids_at_once_never_share_one() -> None:
    threads, per_thread = 8, 5_000
    drawn: list[list[str]] = [[] for _ in range(threads)]
    start = threading.Barrier(threads)

    def work(index: int) -> None:
        start.wait()
        drawn[index].extend(new_request_id() for _ in range(per_thread))

    workers = [threading.Thread(target=work, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert len({rid for ids in drawn for rid in ids}) == threads * per_thread


def test_new_request_id_ignores_the_apps_random_seed() -> None:
    # Apps seed the global generator for reproducibility; that must not repeat our ids.
    state = random.getstate()
    try:
        random.seed(1234)
        first = new_request_id()
        random.seed(1234)
        second = new_request_id()
    finally:
        random.setstate(state)
    assert first != second


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_ids_differ_between_parent_and_forked_child() -> None:
    new_request_id()  # so the parent holds drawn-but-unused ids the child must not reuse
    read_end, write_end = os.pipe()
    with warnings.catch_warnings():
        # Python 3.12+ warns when forking a threaded process; the child below takes no lock
        # and leaves through os._exit, so the deadlock it warns about cannot happen.
        warnings.filterwarnings("ignore", r".*fork\(\) may lead to deadlocks", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe and its exit code
        code = 1
        try:
            os.close(read_end)
            ids = [new_request_id() for _ in range(200)]
            ids += [new_traceparent().split("-")[2] for _ in range(200)]
            with os.fdopen(write_end, "wb") as pipe:
                pipe.write("\n".join(ids).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    parent = {new_request_id() for _ in range(200)}
    parent |= {new_traceparent().split("-")[2] for _ in range(200)}
    with os.fdopen(read_end, "rb") as pipe:
        child = set(pipe.read().decode().split("\n"))
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert len(child) == 400
    assert not parent & child


@pytest.mark.parametrize(
    "value",
    [
        "a",
        "a" * 128,
        "req-1.2_3:4@5/6+7=8",
        "0b7c3f1e-9d2a-4c51-8e4f-5a1b2c3d4e5f",
        "dGhpcyBpcyBiYXNlNjQ=",
    ],
)
def test_valid_request_id_accepts(value: str) -> None:
    assert valid_request_id(value) == value
    assert valid_request_id(value.encode()) == value


@pytest.mark.parametrize(
    "value",
    [
        None,
        "",
        "a" * 129,
        "a b",
        'a"b',
        "a'b",
        "a,b",
        "a;b",
        "<script>",
        "abc\r\nSet-Cookie: x=1",
        "abc\n",
        "\tabc",
        "nul\x00",
        "é",
        "abc\u2028",
        b"",
        b"\xe9t\xe9",
        b"abc\r\n",
        b"a" * 129,
    ],
)
def test_valid_request_id_rejects(value: str | bytes | None) -> None:
    assert valid_request_id(value) is None


@given(st.one_of(any_text, st.binary()))
def test_valid_request_id_output_stays_in_the_set(value: str | bytes) -> None:
    accepted = valid_request_id(value)
    if accepted is not None:
        assert re.fullmatch(r"[A-Za-z0-9._:@/+=-]{1,128}", accepted)
        assert accepted == (value.decode("latin-1") if isinstance(value, bytes) else value)


# --- traceparent -----------------------------------------------------------------------------

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"


@pytest.mark.parametrize(
    ("value", "parsed"),
    [
        (TRACEPARENT, (TRACE_ID, PARENT_ID, "01")),
        (f"00-{TRACE_ID}-{PARENT_ID}-00", (TRACE_ID, PARENT_ID, "00")),
        (f"00-{TRACE_ID}-{PARENT_ID}-09", (TRACE_ID, PARENT_ID, "09")),  # unknown flag bits
        (TRACEPARENT.encode(), (TRACE_ID, PARENT_ID, "01")),
        (f" \t{TRACEPARENT} ", (TRACE_ID, PARENT_ID, "01")),  # OWS around the value
        # A future version: read the first 55 characters; more fields may follow a "-".
        (f"cc-{TRACE_ID}-{PARENT_ID}-01", (TRACE_ID, PARENT_ID, "01")),
        (f"cc-{TRACE_ID}-{PARENT_ID}-01-what-the-future-will-be-like", (TRACE_ID, PARENT_ID, "01")),
    ],
)
def test_parse_traceparent_valid(value: str | bytes, parsed: tuple[str, str, str]) -> None:
    assert parse_traceparent(value) == parsed


@pytest.mark.parametrize(
    "value",
    [
        None,
        "",
        f"ff-{TRACE_ID}-{PARENT_ID}-01",  # version ff is forbidden
        f"00-{'0' * 32}-{PARENT_ID}-01",  # all-zero trace-id
        f"00-{TRACE_ID}-{'0' * 16}-01",  # all-zero parent-id
        TRACEPARENT.upper(),
        f"00-{TRACE_ID.upper()}-{PARENT_ID}-01",
        f"00-{TRACE_ID}-{PARENT_ID.upper()}-01",
        f"0A-{TRACE_ID}-{PARENT_ID}-01",
        f"00-{TRACE_ID}-{PARENT_ID}-0A",
        f"00-{TRACE_ID}-{PARENT_ID}-01-extra",  # version 00 allows nothing after the flags
        f"00-{TRACE_ID}-{PARENT_ID}-01.",
        f"cc-{TRACE_ID}-{PARENT_ID}-01.what-the-future-will-be-like",
        f"000-{TRACE_ID}-{PARENT_ID}-01",
        f"0-{TRACE_ID}-{PARENT_ID}-01",
        f"00-{TRACE_ID}a-{PARENT_ID}-01",
        f"00-{TRACE_ID[:-1]}-{PARENT_ID}-01",
        f"00-{TRACE_ID}-{PARENT_ID}a-01",
        f"00-{TRACE_ID}-{PARENT_ID[:-1]}-01",
        f"00-{TRACE_ID}-{PARENT_ID}-1",
        f"00-{TRACE_ID}-{PARENT_ID}-001",
        f"00_{TRACE_ID}_{PARENT_ID}_01",
        f"00-{TRACE_ID}-{PARENT_ID}-0.",
        f"00-{TRACE_ID[:-1]}g-{PARENT_ID}-01",
        f"00-{TRACE_ID}-{PARENT_ID}-01\r\n",
        f"00-{TRACE_ID[:-1]}\u0661-{PARENT_ID}-01",
        f"00-{TRACE_ID}-{PARENT_ID}-01".encode("utf-16"),
    ],
)
def test_parse_traceparent_invalid(value: str | bytes | None) -> None:
    assert parse_traceparent(value) is None


@given(st.one_of(any_text, st.binary()))
def test_parse_traceparent_any_input(value: str | bytes) -> None:
    parsed = parse_traceparent(value)
    if parsed is not None:
        trace_id, parent_id, flags = parsed
        assert HEX32.fullmatch(trace_id)
        assert trace_id != "0" * 32
        assert re.fullmatch(r"[0-9a-f]{16}", parent_id)
        assert parent_id != "0" * 16
        assert re.fullmatch(r"[0-9a-f]{2}", flags)


def test_new_traceparent_starts_a_trace() -> None:
    value = new_traceparent()
    assert re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-01", value)
    assert parse_traceparent(value) is not None


def test_new_traceparent_continues_a_trace() -> None:
    value = new_traceparent(TRACE_ID, flags="00")
    parsed = parse_traceparent(value)
    assert parsed is not None
    assert parsed[0] == TRACE_ID
    assert parsed[1] != PARENT_ID
    assert parsed[2] == "00"


def test_new_traceparent_span_ids_are_unique() -> None:
    spans = {new_traceparent(TRACE_ID).split("-")[2] for _ in range(100_000)}
    assert len(spans) == 100_000


@pytest.mark.parametrize(
    "trace_id", ["", "0" * 32, TRACE_ID.upper(), TRACE_ID[:-1], TRACE_ID + "0", "x" * 32]
)
def test_new_traceparent_rejects_a_bad_trace_id(trace_id: str) -> None:
    with pytest.raises(ValueError, match="trace_id"):
        new_traceparent(trace_id)


@pytest.mark.parametrize("flags", ["", "1", "001", "0A", "\r\n"])
def test_new_traceparent_rejects_bad_flags(flags: str) -> None:
    with pytest.raises(ValueError, match="flags"):
        new_traceparent(flags=flags)


# --- Server-Timing ---------------------------------------------------------------------------


def test_server_timing_example() -> None:
    value = server_timing([("payments", 0.0123, "2 attempts"), ("app", 0.05, None)])
    assert value == 'payments;dur=12.3;desc="2 attempts", app;dur=50'


@pytest.mark.parametrize(
    ("seconds", "dur"),
    [
        (0.0, ";dur=0"),
        (1.0, ";dur=1000"),
        (0.0012344, ";dur=1.234"),
        (0.0012346, ";dur=1.235"),
        (1e-9, ";dur=0"),
        (-1.0, ";dur=0"),
        (1e300, ";dur=999999999999.999"),
        (math.nan, ""),
        (math.inf, ""),
    ],
)
def test_server_timing_durations(seconds: float, dur: str) -> None:
    assert server_timing([("db", seconds, None)]) == f"db{dur}"


@pytest.mark.parametrize(
    ("name", "metric"),
    [
        ("db", "db"),
        ("cache-hit", "cache-hit"),
        ("my metric", "my_metric"),
        ("a;b=c,d", "a_b_c_d"),
        ("ünïcode", "_n_code"),
        ("x\r\ny", "x__y"),
        ("", "unnamed"),
        ("n" * 100, "n" * 64),
    ],
)
def test_server_timing_names(name: str, metric: str) -> None:
    assert server_timing([(name, math.nan, None)]) == metric


def test_server_timing_hostile_description() -> None:
    value = server_timing([("db", 0.001, 'say "hi"\\\r\nX-Evil: 1 ü')])
    assert value == r'db;dur=1;desc="say \"hi\"\\  X-Evil: 1 ?"'


def test_server_timing_no_entries() -> None:
    assert server_timing([]) == ""


# W3C Server Timing: metric-name = token, params separated by ";", desc a quoted-string.
_TOKEN = r"[A-Za-z0-9!#$%&'*+\-.^_`|~]+"
_METRIC = rf'({_TOKEN})(?:;dur=([0-9]+(?:\.[0-9]{{1,3}})?))?(?:;desc="((?:[^"\\]|\\["\\])*)")?'


@given(
    st.lists(
        st.tuples(
            any_text,
            st.floats(allow_nan=True, allow_infinity=True),
            st.one_of(st.none(), any_text),
        ),
        max_size=4,
    )
)
def test_server_timing_any_input_is_well_formed(
    entries: list[tuple[str, float, str | None]],
) -> None:
    value = server_timing(entries)
    assert PRINTABLE_ASCII.fullmatch(value)
    if not entries:
        assert value == ""
        return
    # Descriptions may contain ", " themselves: split on the grammar instead.
    metrics = [m.group(0) for m in re.finditer(_METRIC + "(?=, |$)", value)]
    assert ", ".join(metrics) == value
    assert len(metrics) == len(entries)
    for metric, (_, seconds, desc) in zip(metrics, entries, strict=True):
        match = re.fullmatch(_METRIC, metric)
        assert match is not None
        assert (match[2] is not None) == math.isfinite(seconds)
        if desc is None:
            assert match[3] is None
        else:
            assert re.sub(r"\\(.)", r"\1", match[3]) == expected_text(desc)
