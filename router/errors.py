"""The router's exception tree; every error knows how it looks to an OpenAI client.

    RouterError                      500 internal_error
    ├── InvalidRequest               400 invalid_request_error   (param set when known)
    │   ├── MalformedJSON            400 invalid_json
    │   └── BodyTooLarge             413 request_too_large
    ├── AuthError                    401 invalid_api_key
    │   └── MissingKey               401 missing_api_key         (router/tenants.py)
    ├── ModelNotAllowed              403 model_not_allowed       (router/tenants.py)
    ├── RateLimited                  429 rate_limit_exceeded / insufficient_quota
    │                                    (router/quota/stage.py, with x-ratelimit-*)
    ├── QuotaStoreDown               503 quota_unavailable       (fail_closed, Redis down)
    ├── ModelNotFound                404 model_not_found
    ├── NoHealthyEndpoint            503 no_healthy_endpoint
    ├── QueueFull, QueueTimeout      503 queue_full, queue_timeout (router/admission.py)
    └── UpstreamError                (status of the failure)
        ├── UpstreamConnectError     502 upstream_connect_error
        ├── UpstreamTimeout          504 upstream_timeout
        ├── EndpointMisconfigured    502 endpoint_misconfigured (e.g. its chat template breaks)
        └── UpstreamHTTPError        upstream status, upstream body normalised

Lower-level exceptions (aiohttp, JSON decoders) are mapped at the boundary and
re-raised ``from exc``; nothing else ever reaches a client as a traceback.
"""

from __future__ import annotations

from typing import Any

import orjson

#: A backend's error message is cut to MAX_ERROR_MESSAGE characters for the client
#: and the log, its ``type``, ``param`` and ``code`` to MAX_ERROR_CODE: the same
#: cuts as the adapters' error events.
from backends.openai_shapes import MAX_ERROR_CODE, MAX_ERROR_MESSAGE


class RouterError(Exception):
    status: int = 500
    type: str = "internal_error"
    code: str | None = "internal_error"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        #: Sent as ``x-should-retry`` when set: False once the router has retried,
        #: so OpenAI clients do not multiply the attempts.
        self.should_retry: bool | None = None

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)

    def to_bytes(self) -> bytes:
        return orjson.dumps(self.body())

    @property
    def label(self) -> str:
        """A metric label for this kind of failure, from a bounded set (never a
        string a client or a backend chose)."""
        return self.code if self.code in OWN_CODES else "error"

    def headers(self) -> list[tuple[bytes, bytes]]:
        if self.should_retry is None:
            return []
        return [(b"x-should-retry", b"true" if self.should_retry else b"false")]


class InvalidRequest(RouterError):
    status = 400
    type = "invalid_request_error"
    code: str | None = None


class MalformedJSON(InvalidRequest):
    code = "invalid_json"


class BodyTooLarge(InvalidRequest):
    status = 413
    code = "request_too_large"


class AuthError(RouterError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class ModelNotFound(RouterError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"

    def __init__(self, model: str) -> None:
        shown = model if len(model) <= 128 else model[:125] + "..."
        super().__init__(f"The model `{shown}` does not exist.", param="model")


class NoHealthyEndpoint(RouterError):
    status = 503
    type = "service_unavailable"
    code = "no_healthy_endpoint"


class UpstreamError(RouterError):
    status = 502
    type = "upstream_error"
    code: str | None = "upstream_error"


class UpstreamConnectError(UpstreamError):
    code = "upstream_connect_error"


class UpstreamTimeout(UpstreamError):
    status = 504
    type = "timeout"
    code = "upstream_timeout"


class EndpointMisconfigured(UpstreamError):
    """The endpoint cannot serve the request as configured: fail over, but it
    is no verdict on the backend's health."""

    code = "endpoint_misconfigured"


class UpstreamHTTPError(UpstreamError):
    """An error status from a backend, its body normalised to OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str | None = None,
        param: str | None = None,
        code: str | None = None,
        retry_after: str | None = None,
    ) -> None:
        super().__init__(message, param=param)
        self.status = status
        self.type = type_ or default_type(status)
        self.code: str | None = code
        #: The backend failed (not the request): another endpoint may answer, and
        #: it counts against this one's circuit. A 5xx by default; adapters know
        #: their engines' other ways of saying it (TGI's 424, Triton's 400s).
        self.server_fault = status >= 500
        #: The backend's Retry-After (seconds or an HTTP date), passed on only
        #: when it is short, plain text.
        plain = retry_after is not None and retry_after.isascii() and retry_after.isprintable()
        self.retry_after = retry_after if plain and len(retry_after or "") <= 64 else None

    @property
    def label(self) -> str:
        return f"http_{self.status}" if 100 <= self.status <= 599 else "http_other"

    def headers(self) -> list[tuple[bytes, bytes]]:
        out = super().headers()
        if self.retry_after:
            out.append((b"retry-after", self.retry_after.encode("latin-1")))
        return out


def default_type(status: int) -> str:
    if status == 401:
        return "authentication_error"
    if status == 403:
        return "permission_error"
    if status == 404:
        return "not_found_error"
    if status == 429:
        return "rate_limit_error"
    if 400 <= status < 500:
        return "invalid_request_error"
    return "upstream_error"


def error_body(
    message: str, type_: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def normalise_upstream_error(
    status: int, body: bytes, retry_after: str | None = None
) -> UpstreamHTTPError:
    """Turn any backend error body into OpenAI's shape.

    vLLM answers ``{"error": {..., "code": 404}}`` (an integer code), TGI
    ``{"error": "...", "error_type": "..."}``, Triton ``{"error": "..."}``;
    anything else is kept as text.
    """
    message: str = ""
    type_: str | None = None
    param: str | None = None
    code: str | None = None
    if body.startswith(b"data:"):
        # Triton sends a model's first-response error as one SSE event on a 4xx.
        body = body[5:].strip().split(b"\n", 1)[0]
    try:
        parsed = orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        parsed = None
    if isinstance(parsed, dict):
        err = parsed.get("error")
        if isinstance(err, dict):
            message = str(err.get("message") or "")[:MAX_ERROR_MESSAGE]
            raw_type = err.get("type")
            type_ = raw_type[:MAX_ERROR_CODE] if isinstance(raw_type, str) and raw_type else None
            raw_param = err.get("param")
            param = raw_param[:MAX_ERROR_CODE] if isinstance(raw_param, str) else None
            raw_code = err.get("code")
            code = raw_code[:MAX_ERROR_CODE] if isinstance(raw_code, str) else None
        elif isinstance(err, str):
            message = err
            raw_type = parsed.get("error_type")
            type_ = raw_type[:MAX_ERROR_CODE] if isinstance(raw_type, str) else None
        elif isinstance(parsed.get("message"), str):
            message = parsed["message"]
        elif isinstance(parsed.get("detail"), str):
            message = parsed["detail"]
    if not 400 <= status <= 599:
        # A redirect (not followed) or a status outside HTTP's classes: no error
        # a client can act on, and not a status to pass on (uvicorn has no status
        # line past 599). The backend's fault.
        message = f"upstream answered HTTP {status}, which is not an answer kvroute relays"
        status, type_, param, code = 502, None, None, None
    message = message[:MAX_ERROR_MESSAGE]
    if not message:
        text = body[: MAX_ERROR_MESSAGE * 4].decode("utf-8", "replace").strip()
        message = text[:MAX_ERROR_MESSAGE] if text else f"upstream answered HTTP {status}"
    if type_ is not None and not _looks_like_openai_type(type_):
        type_ = None
    return UpstreamHTTPError(
        status, message, type_=type_, param=param, code=code, retry_after=retry_after
    )


def _looks_like_openai_type(type_: str) -> bool:
    # vLLM sends Python class names ("NotFoundError", "Bad Request"); OpenAI
    # clients expect snake_case types, so those are replaced by the status's.
    return type_.islower() and " " not in type_


def error_messages(err: RouterError) -> tuple[dict[str, Any], dict[str, Any]]:
    """The two ASGI messages of ``err`` as an OpenAI error response."""
    data = err.to_bytes()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(data)).encode()),
        *err.headers(),
    ]
    return (
        {"type": "http.response.start", "status": err.status, "headers": headers},
        {"type": "http.response.body", "body": data},
    )


#: The codes kvroute's own errors carry (metric labels may use them).
OWN_CODES = frozenset(
    {
        "internal_error",
        "invalid_json",
        "request_too_large",
        "invalid_api_key",
        "model_not_found",
        "no_healthy_endpoint",
        "queue_full",
        "queue_timeout",
        "upstream_error",
        "upstream_connect_error",
        "upstream_timeout",
        "endpoint_misconfigured",
        "missing_api_key",
        "model_not_allowed",
        "rate_limit_exceeded",
        "insufficient_quota",
        "quota_unavailable",
    }
)
