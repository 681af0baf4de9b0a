"""OpenAI-style error responses."""

from __future__ import annotations

import json

from starlette.responses import JSONResponse

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
          429: "rate_limit_error", 500: "api_error", 502: "api_error", 503: "service_unavailable", 504: "timeout_error"}


def error_body(status: int, message: str, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": _TYPES.get(status, "api_error"), "param": param,
                      "code": code or str(status)}}


def error_response(status: int, message: str, code: str | None = None, param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, code, param), status_code=status)


def sse_error_event(status: int, message: str, code: str | None = None, api: str = "openai") -> bytes:
    """The SSE event that ends a stream whose backend failed after bytes were already sent, in the stream's own
    protocol: api "messages" (Anthropic: an `error` event), "responses" (OpenAI Responses: an `error` event), else
    OpenAI's chat and completions (an error object, then [DONE])."""
    if api == "messages":
        event = {"type": "error", "error": {"type": _TYPES.get(status, "api_error"), "message": message}}
        return b"event: error\ndata: " + json.dumps(event).encode() + b"\n\n"
    if api == "responses":
        event = {"type": "error", "code": code or str(status), "message": message, "param": None}
        return b"event: error\ndata: " + json.dumps(event).encode() + b"\n\n"
    return b"data: " + json.dumps(error_body(status, message, code)).encode() + b"\n\ndata: [DONE]\n\n"
