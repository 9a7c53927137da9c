"""W3C Trace Context parsing (sans-I/O): what is accepted, what starts a new trace."""

from __future__ import annotations

import random

import pytest

from router.relay import upstream_headers
from router.trace_context import (
    MAX_MEMBERS,
    TraceContext,
    new_trace,
    parse,
    parse_traceparent,
    parse_tracestate,
)

TRACE = "0af7651916cd43dd8448eb211c80319c"
SPAN = "b7ad6b7169203331"
VALID = f"00-{TRACE}-{SPAN}-01"


def test_a_version_00_traceparent_is_read() -> None:
    assert parse_traceparent(VALID) == (TRACE, SPAN, 1)
    assert parse_traceparent(f"00-{TRACE}-{SPAN}-00") == (TRACE, SPAN, 0)


@pytest.mark.parametrize(
    "value",
    [
        "",
        "00",
        VALID.upper(),  # the specification's hex is lower case
        f"00-{TRACE.upper()}-{SPAN}-01",
        f"00-{'0' * 32}-{SPAN}-01",  # all-zero trace id
        f"00-{TRACE}-{'0' * 16}-01",  # all-zero parent id
        f"ff-{TRACE}-{SPAN}-01",  # version ff is forbidden
        f"0g-{TRACE}-{SPAN}-01",
        f"00-{TRACE}-{SPAN}-01-extra",  # version 00 is exactly 55 characters
        f"00-{TRACE}-{SPAN}-1",
        f"00_{TRACE}_{SPAN}_01",
        f"00-{TRACE[:-1]}x-{SPAN}-01",
        f"00-{TRACE}-{SPAN}-0x",
        f"01-{TRACE}-{SPAN}-01x",  # a later version's extra fields start with "-"
        f"01-{TRACE}-{SPAN}-01-" + "a" * 600,  # past the length bound
    ],
)
def test_an_invalid_traceparent_is_refused(value: str) -> None:
    assert parse_traceparent(value) is None


def test_a_later_version_is_read_as_00_and_sent_as_00() -> None:
    parsed = parse([(b"traceparent", f"cc-{TRACE}-{SPAN}-01-what-the-future-has".encode())])
    assert parsed == TraceContext(TRACE, SPAN, 1)
    assert parsed.traceparent() == VALID


def test_flags_other_than_sampled_are_sent_as_zero() -> None:
    parsed = parse([(b"traceparent", f"00-{TRACE}-{SPAN}-03".encode())])
    assert parsed is not None and parsed.traceparent() == VALID
    parsed = parse([(b"traceparent", f"00-{TRACE}-{SPAN}-fe".encode())])
    assert parsed is not None and parsed.traceparent().endswith("-00")


def test_tracestate_is_validated_and_normalised() -> None:
    assert parse_tracestate(["congo=t61rcWkgMzE, rojo=00f067aa0ba902b7"]) == (
        "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"
    )
    # Several headers are one list; empty members are skipped.
    assert parse_tracestate(["a=1,,", " b=2 ", "tenant@sys=x"]) == "a=1,b=2,tenant@sys=x"


@pytest.mark.parametrize(
    "values",
    [
        ["Upper=1"],  # keys are lower case
        ["a=1,a=2"],  # a key twice
        ["a"],  # no value
        ["a=b=c"],  # "=" is not a value character
        ["a=" + "x" * 257],  # a value is at most 256 characters
        ["1a=1"],  # a simple key starts with a letter
        ["k=v\x7f"],
        [",".join(f"k{i}=v" for i in range(MAX_MEMBERS + 1))],
        ["a=" + "x" * 200, "b=" + "x" * 200, "c=" + "x" * 200],  # over 512 characters
        ["", " , "],  # nothing
    ],
)
def test_an_invalid_tracestate_is_dropped(values: list[str]) -> None:
    assert parse_tracestate(values) is None


def test_the_tracestate_goes_with_a_valid_traceparent_only() -> None:
    state = (b"tracestate", b"vendor=1")
    assert parse([(b"traceparent", VALID.encode()), state]) == TraceContext(
        TRACE, SPAN, 1, "vendor=1"
    )
    assert parse([(b"traceparent", b"00-junk"), state]) is None
    assert parse([state]) is None


def test_two_traceparents_are_no_trace_context() -> None:
    other = f"00-{TRACE}-{'1' * 16}-01".encode()
    assert parse([(b"traceparent", VALID.encode()), (b"traceparent", other)]) is None


def test_a_new_trace_has_valid_random_ids_and_is_not_sampled() -> None:
    a, b = new_trace(random.Random(1)), new_trace(random.Random(1))
    assert a == b  # from the generator given
    assert parse_traceparent(a.traceparent()) == (a.trace_id, a.span_id, 0)
    assert a != new_trace(random.Random(2))
    assert not a.sampled and a.state is None


def test_upstream_headers_carry_the_trace_context_kvroute_wrote() -> None:
    client = {"traceparent": "00-junk", "tracestate": "x=1", "x-hint": "h"}
    trace = TraceContext(TRACE, SPAN, 1, "vendor=1")
    headers = upstream_headers(client, {}, "rid", trace, ("x-hint",))
    assert headers["traceparent"] == VALID and headers["tracestate"] == "vendor=1"
    assert headers["x-hint"] == "h" and headers["x-request-id"] == "rid"
    bare = upstream_headers(client, {}, "rid", TraceContext(TRACE, SPAN))
    assert bare["traceparent"] == f"00-{TRACE}-{SPAN}-00" and "tracestate" not in bare
