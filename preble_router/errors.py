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


def sse_error_event(status: int, message: str, code: str | None = None) -> bytes:
    """The SSE event that ends a stream whose backend failed after bytes were already sent."""
    return b"data: " + json.dumps(error_body(status, message, code)).encode() + b"\n\ndata: [DONE]\n\n"
