"""kvroute's public HTTP API as an OpenAPI 3.1 document, served at ``GET /openapi.json``.

Written by hand, not derived from handlers: it states the contract clients
rely on (and the fuzz tests hold kvroute to it). Request bodies describe the
fields kvroute reads and checks itself (``router.request.parse_body`` and
``parse_sampling``); every other OpenAI field is allowed and passed through to
OpenAI-kind backends. Every error is OpenAI's shape. The document is built
and serialised once, at import.
"""

from __future__ import annotations

from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

JSON = "application/json"
SSE = "text/event-stream"
SCHEMAS = "#/components/schemas/"


def ref(name: str) -> dict[str, str]:
    return {"$ref": SCHEMAS + name}


def nullable(type_: str, **constraints: Any) -> dict[str, Any]:
    return {"type": [type_, "null"], **constraints}


def error(description: str) -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": ref("Error")}}}


def json_body(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": schema}}}


def obj(properties: dict[str, Any], *required: str) -> dict[str, Any]:
    return {"type": "object", "required": list(required), "properties": properties}


def listing(item: dict[str, Any], more: dict[str, Any], *required: str) -> dict[str, Any]:
    """OpenAI's ``{"object": "list", "data": [item...], ...more}``."""
    data = {"type": "array", "items": item}
    return obj({"object": {"const": "list"}, "data": data, **more}, *required)


#: What every inference route may answer besides 200.
INFERENCE_ERRORS = {
    "400": error(
        "The body is not JSON (`invalid_json`), a field kvroute checks is missing or "
        "of the wrong type or range (`param` names it), the model's chat template "
        "refuses the conversation, or no endpoint of the model can serve the "
        "operation (`unsupported_operation`)"
    ),
    "401": error(
        "With auth enabled: no API key (`missing_api_key`) or an unknown one (`invalid_api_key`)"
    ),
    "403": error("The tenant may not use this model (`model_not_allowed`)"),
    "404": error("Unknown model (`model_not_found`)"),
    "429": error(
        "A tenant's limit: requests or tokens per minute, concurrency "
        "(`rate_limit_exceeded`), or its daily tokens (`insufficient_quota`); with Retry-After"
    ),
    "413": error("Body larger than `server.max_body_bytes` (`request_too_large`)"),
    "502": error(
        "Backend unreachable or its connection broke (`upstream_connect_error`), it "
        "cannot serve the request as configured (`endpoint_misconfigured`), or it "
        "answered 502"
    ),
    "503": error(
        "No available endpoint for the model (`no_healthy_endpoint`), the model's admission "
        "queue is full or the wait too long (`queue_full`, `queue_timeout`), the quota store "
        "is down under fail_closed (`quota_unavailable`), or the router is at its limits "
        "(`server_busy`); with Retry-After where waiting helps"
    ),
    "504": error("Backend too slow (`upstream_timeout`)"),
    "default": error("The backend's own error status (e.g. 422, 429), its body normalised"),
}

STREAM_DOC = (
    "With `stream: true`: server-sent events, each `data: <chunk JSON>`, ending "
    "with `data: [DONE]`; a stream that breaks after its first chunk ends with "
    '`data: {"error": {...}}` instead.'
)

SAMPLING: dict[str, Any] = {
    "stream": nullable("boolean"),
    "stream_options": {
        "description": "Only with `stream: true`.",
        "anyOf": [
            {
                "type": "object",
                "properties": {"include_usage": nullable("boolean")},
            },
            {"type": "null"},
        ],
    },
    "max_tokens": nullable("integer", minimum=1),
    "max_completion_tokens": nullable("integer", minimum=1),
    "temperature": nullable("number", minimum=0, maximum=2),
    "top_p": nullable("number", exclusiveMinimum=0, maximum=1),
    "top_k": nullable("integer"),
    "seed": nullable("integer"),
    "n": nullable("integer", minimum=1),
    "frequency_penalty": nullable("number", minimum=-2, maximum=2),
    "stop": {
        "anyOf": [
            {"type": "string"},
            {"type": "array", "items": {"type": "string"}},
            {"type": "null"},
        ]
    },
}

#: ``stream_options`` set (not null) requires ``stream: true``.
STREAM_OPTIONS_NEED_STREAM = {
    "if": {"required": ["stream_options"], "properties": {"stream_options": {"type": "object"}}},
    "then": {"required": ["stream"], "properties": {"stream": {"const": True}}},
}

MODEL = {"type": "string", "minLength": 1, "description": "A model or alias of GET /v1/models"}

TOKENS_OR_TEXT = {
    "anyOf": [
        {"type": "string"},
        {"type": "array", "items": {"type": "string"}},
        {"type": "array", "items": {"type": "integer"}},
        {"type": "array", "items": {"type": "array", "items": {"type": "integer"}}},
    ]
}


def request_schema(required: str, field: dict[str, Any], sampling: bool) -> dict[str, Any]:
    properties = {"model": MODEL, required: field}
    if sampling:
        properties |= SAMPLING
    else:
        properties["stream"] = nullable("boolean")
    schema: dict[str, Any] = {
        "type": "object",
        "required": ["model", required],
        "properties": properties,
        "additionalProperties": True,
    }
    if sampling:
        schema |= STREAM_OPTIONS_NEED_STREAM
    return schema


COUNT = {"type": "integer", "minimum": 0}


def answer_schema(object_: str, choice: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["id", "object", "created", "model", "choices"],
        "properties": {
            "id": {"type": "string"},
            "object": {"const": object_},
            "created": {"type": "integer"},
            "model": {"type": "string"},
            "choices": {"type": "array", "items": choice},
            "usage": ref("Usage"),
        },
    }


def choice_schema(content: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["index", *content, "finish_reason"],
        "properties": {
            "index": {"type": "integer"},
            **content,
            "finish_reason": nullable("string"),
        },
    }


def event_schema(object_: str) -> dict[str, Any]:
    """One event of a stream (the media type's schema describes each event, as
    before OpenAPI 3.2's ``itemSchema``)."""
    chunk = {
        "type": "object",
        "required": ["id", "object", "created", "model", "choices"],
        "properties": {
            "object": {"const": object_},
            "model": {"type": "string"},
            "choices": {"type": "array"},
        },
    }
    return {
        "type": "object",
        "required": ["data"],
        "description": STREAM_DOC,
        "properties": {
            "data": {
                "anyOf": [
                    {"const": "[DONE]"},
                    {
                        "type": "string",
                        "contentMediaType": JSON,
                        "contentSchema": {"anyOf": [chunk, ref("Error")]},
                    },
                ]
            }
        },
    }


SCHEMA_COMPONENTS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["message", "type", "param", "code"],
                "properties": {
                    "message": {"type": "string"},
                    "type": {"type": "string"},
                    "param": nullable("string"),
                    "code": nullable("string"),
                },
            }
        },
    },
    "ContentPart": {
        "type": "object",
        "required": ["type"],
        "description": "`text` parts ({type, text}) are read; others (image_url...) pass through.",
        "properties": {"type": {"type": "string"}, "text": {"type": "string"}},
    },
    "ChatMessage": {
        "type": "object",
        "required": ["role"],
        "properties": {
            "role": {"type": "string", "examples": ["system", "user", "assistant", "tool"]},
            "content": {
                "anyOf": [
                    {"type": "string"},
                    {"type": "array", "items": ref("ContentPart")},
                    {"type": "null"},
                ]
            },
            "name": {"type": "string"},
        },
    },
    "ChatCompletionRequest": request_schema(
        "messages", {"type": "array", "minItems": 1, "items": ref("ChatMessage")}, True
    ),
    "CompletionRequest": request_schema("prompt", TOKENS_OR_TEXT, True),
    "EmbeddingRequest": request_schema("input", TOKENS_OR_TEXT, False),
    "Usage": obj({"prompt_tokens": COUNT, "completion_tokens": COUNT, "total_tokens": COUNT}),
    "ChatCompletion": answer_schema(
        "chat.completion",
        choice_schema(
            {
                "message": {
                    "type": "object",
                    "required": ["role"],
                    "properties": {"role": {"const": "assistant"}, "content": nullable("string")},
                }
            }
        ),
    ),
    "Completion": answer_schema("text_completion", choice_schema({"text": {"type": "string"}})),
    "ChatCompletionEvent": event_schema("chat.completion.chunk"),
    "CompletionEvent": event_schema("text_completion"),
    "EmbeddingList": listing(
        obj(
            {
                "index": {"type": "integer"},
                "object": {"const": "embedding"},
                "embedding": {
                    "anyOf": [
                        {"type": "array", "items": {"type": "number"}},
                        {"type": "string", "description": "base64"},
                    ]
                },
            },
            *("index", "object", "embedding"),
        ),
        {"model": {"type": "string"}, "usage": ref("Usage")},
        *("object", "data", "model"),
    ),
    "ModelList": listing(
        obj(
            {
                "id": {"type": "string"},
                "object": {"const": "model"},
                "created": {"type": "integer"},
                "owned_by": {"type": "string"},
            },
            *("id", "object", "created", "owned_by"),
        ),
        {},
        *("object", "data"),
    ),
    "Readiness": obj(
        {"status": {"enum": ["ready", "not ready"]}, "healthy_endpoints": COUNT},
        *("status", "healthy_endpoints"),
    ),
    "ReloadOutcome": obj(
        {"result": {"type": "string"}, "errors": {"type": "array", "items": {"type": "string"}}},
        "result",
    ),
}


def inference(
    summary: str, request: str, answer: str, stream: bool, operation_id: str
) -> dict[str, Any]:
    content: dict[str, Any] = {JSON: {"schema": ref(answer)}}
    if stream:
        content[SSE] = {"schema": ref(answer + "Event")}
    return {
        "post": {
            "operationId": operation_id,
            "summary": summary,
            "security": API_KEY,
            "requestBody": {"required": True, "content": {JSON: {"schema": ref(request)}}},
            "responses": {
                "200": {"description": "The answer", "content": content},
                **INFERENCE_ERRORS,
            },
        }
    }


#: A tenant's key when ``auth.enabled``; none needed otherwise.
API_KEY: list[dict[str, list[str]]] = [{"bearerKey": []}, {"azureKey": []}, {}]


def get(operation_id: str, summary: str, responses: dict[str, Any]) -> dict[str, Any]:
    return {"get": {"operationId": operation_id, "summary": summary, "responses": responses}}


def admin(method: str, summary: str, operation_id: str, **responses: Any) -> dict[str, Any]:
    return {
        method: {
            "operationId": operation_id,
            "summary": summary,
            "tags": ["admin"],
            "security": [{"adminToken": []}],
            "responses": {
                "200": json_body("Done", {"type": "object"}),
                "401": error("No or wrong bearer token (`invalid_api_key`)"),
                "403": error("The admin API is off (`admin_disabled`), or a cross-site call"),
                **responses,
            },
        }
    }


def admin_page(summary: str, operation_id: str, media_type: str) -> dict[str, Any]:
    """A file of the fleet page: static, no data, so no token (router/admin_ui.py)."""
    return {
        "get": {
            "operationId": operation_id,
            "summary": summary,
            "tags": ["admin"],
            "responses": {
                "200": {
                    "description": "The file",
                    "content": {media_type: {"schema": {"type": "string"}}},
                },
                "403": error("The admin API is off (`admin_disabled`)"),
            },
        }
    }


ENDPOINT_ID = {"name": "endpoint_id", "in": "path", "required": True, "schema": {"type": "string"}}


def document() -> dict[str, Any]:
    drain_404 = {"404": error("No such endpoint (`not_found`)")}
    paths: dict[str, Any] = {
        "/v1/chat/completions": inference(
            "Chat completion, forwarded", "ChatCompletionRequest", "ChatCompletion", True, "chat"
        ),
        "/v1/completions": inference(
            "Text completion, forwarded", "CompletionRequest", "Completion", True, "complete"
        ),
        "/v1/embeddings": inference(
            "Embeddings, forwarded to OpenAI-kind backends",
            "EmbeddingRequest",
            "EmbeddingList",
            False,
            "embed",
        ),
        "/v1/models": {
            "get": {
                **get(
                    "models",
                    "The models the fleet serves, with aliases (those the caller may use)",
                    {
                        "200": json_body("Models", ref("ModelList")),
                        "401": INFERENCE_ERRORS["401"],
                    },
                )["get"],
                "security": API_KEY,
            }
        },
        "/health": get(
            "health",
            "The process is alive",
            {"200": json_body("Alive", obj({"status": {"const": "ok"}}, "status"))},
        ),
        "/ready": get(
            "ready",
            "Config loaded and at least one endpoint available",
            {
                "200": json_body("Ready", ref("Readiness")),
                "503": json_body("Not ready (starting, stopping, no endpoint)", ref("Readiness")),
            },
        ),
        "/metrics": get(
            "metrics",
            "Prometheus metrics; every name starts with kvroute_",
            {
                "200": {
                    "description": "Prometheus text format",
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                }
            },
        ),
        "/openapi.json": get(
            "openapi", "This document", {"200": json_body("OpenAPI 3.1", {"type": "object"})}
        ),
        "/admin/endpoints": admin("get", "Every endpoint's live state", "adminEndpoints"),
        "/admin/endpoints/{endpoint_id}/drain": {
            "parameters": [ENDPOINT_ID],
            **admin("post", "Stop sending new requests to an endpoint", "drain", **drain_404),
        },
        "/admin/endpoints/{endpoint_id}/undrain": {
            "parameters": [ENDPOINT_ID],
            **admin("post", "Resume sending requests to an endpoint", "undrain", **drain_404),
        },
        "/admin/config": admin("get", "The effective config, secrets redacted", "adminConfig"),
        "/admin/reload": admin(
            "post",
            "Reload the config file now",
            "reload",
            **{"422": json_body("The file is invalid: every error", ref("ReloadOutcome"))},
        ),
        "/admin/prefix-index": admin(
            "get",
            "Prefix-index stats per model, and the index (precise, approximate, stale) "
            "each endpoint is matched by",
            "prefixIndex",
        ),
        "/admin/kv-events": admin(
            "get", "Each KV-event subscriber: connection, sequence, gaps, blocks", "kvEvents"
        ),
        "/admin/models": admin(
            "get",
            "Per model: policy, endpoints, decisions by reason, prefix match, cached tokens",
            "adminModels",
        ),
        "/admin/overview": admin(
            "get", "Everything the fleet page shows, in one snapshot", "adminOverview"
        ),
        "/admin/ui": admin_page(
            "The fleet page (asks for the admin token)", "fleetPage", "text/html"
        ),
        "/admin/ui/fleet.js": admin_page(
            "The fleet page's script", "fleetScript", "text/javascript"
        ),
        "/admin/ui/fleet.css": admin_page("The fleet page's style", "fleetStyle", "text/css"),
        "/admin/cache": admin("get", "The response cache: store, stats, models", "adminCache"),
        "/admin/cache/purge": {
            "parameters": [
                {"name": "model", "in": "query", "required": False, "schema": {"type": "string"}}
            ],
            **admin(
                "post",
                "Drop cached answers, of one model or all",
                "purgeCache",
                **{"503": error("The cache store is unavailable")},
            ),
        },
        "/admin/tenants": admin(
            "get", "Each tenant's limits and usage; the quota store's state", "adminTenants"
        ),
        "/admin/tenants/{name}/reset": {
            "parameters": [
                {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
            ],
            **admin(
                "post",
                "Forget a tenant's counters",
                "resetTenant",
                **{
                    "404": error("No such tenant (`not_found`)"),
                    "503": error("The quota store is unavailable"),
                },
            ),
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "kvroute",
            "version": "0.1.0",
            "description": (
                "An OpenAI-compatible router for fleets of LLM inference servers. "
                "Every error is OpenAI's shape: "
                '{"error": {"message", "type", "param", "code"}}.'
            ),
        },
        "paths": paths,
        "components": {
            "schemas": SCHEMA_COMPONENTS,
            "securitySchemes": {
                "bearerKey": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "A tenant's API key (auth.enabled), as OpenAI's SDKs send it",
                },
                "azureKey": {"type": "apiKey", "in": "header", "name": "api-key"},
                "adminToken": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "admin.token from the config; every /admin call needs it",
                },
            },
        },
    }


DOCUMENT = orjson.dumps(document())


async def openapi(request: Request) -> Response:
    return Response(DOCUMENT, media_type=JSON)
