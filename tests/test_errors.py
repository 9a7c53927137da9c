from __future__ import annotations

import orjson

from router.errors import (
    BodyTooLarge,
    MalformedJSON,
    ModelNotFound,
    NoHealthyEndpoint,
    UpstreamConnectError,
    UpstreamTimeout,
    normalise_upstream_error,
)
from tests.helpers import FIXTURES

VLLM = FIXTURES / "vllm"


def test_router_errors_have_openai_shape_and_status() -> None:
    cases = [
        (MalformedJSON("bad"), 400, "invalid_request_error", "invalid_json"),
        (BodyTooLarge("big"), 413, "invalid_request_error", "request_too_large"),
        (ModelNotFound("x"), 404, "invalid_request_error", "model_not_found"),
        (NoHealthyEndpoint("none"), 503, "service_unavailable", "no_healthy_endpoint"),
        (UpstreamConnectError("down"), 502, "upstream_error", "upstream_connect_error"),
        (UpstreamTimeout("slow"), 504, "timeout", "upstream_timeout"),
    ]
    for err, status, type_, code in cases:
        body = orjson.loads(err.to_bytes())
        assert set(body) == {"error"}
        assert set(body["error"]) == {"message", "type", "param", "code"}
        assert (err.status, body["error"]["type"], body["error"]["code"]) == (status, type_, code)
    assert orjson.loads(ModelNotFound("x").to_bytes())["error"]["param"] == "model"


def test_vllm_error_bodies_are_normalised() -> None:
    err = normalise_upstream_error(404, (VLLM / "err_unknown_model.body").read_bytes())
    assert err.status == 404
    assert err.body() == {
        "error": {
            "message": "The model `nope` does not exist. Valid aliases: tiny.",
            "type": "not_found_error",  # vLLM says "NotFoundError"
            "param": "model",
            "code": None,  # vLLM's integer 404 is not an OpenAI code
        }
    }
    err = normalise_upstream_error(400, (VLLM / "err_bad_max_tokens.body").read_bytes())
    assert (err.type, err.param) == ("invalid_request_error", "max_tokens")
    assert err.message.startswith("max_tokens must be at least 1")


def test_tgi_and_triton_and_plain_bodies() -> None:
    tgi = normalise_upstream_error(
        422, b'{"error":"Input validation error: bad","error_type":"validation"}'
    )
    assert (tgi.status, tgi.message, tgi.type) == (422, "Input validation error: bad", "validation")
    triton = normalise_upstream_error(400, b'{"error":"failed to parse the request JSON"}')
    assert triton.message == "failed to parse the request JSON"
    plain = normalise_upstream_error(502, b"<html>Bad Gateway</html>")
    assert (plain.message, plain.type) == ("<html>Bad Gateway</html>", "upstream_error")
    empty = normalise_upstream_error(503, b"")
    assert empty.message == "upstream answered HTTP 503"


def test_retry_after_is_kept() -> None:
    err = normalise_upstream_error(429, b"{}", retry_after="3")
    assert err.headers() == [(b"retry-after", b"3")]
    assert err.type == "rate_limit_error"
