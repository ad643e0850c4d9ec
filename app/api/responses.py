"""HTTP error responses in OpenAI's shape (`{"error": {"type", "code", "message", "param"}}`),
with the status each of the relay's refusals maps to."""

from __future__ import annotations

from typing import Final

from fastapi.responses import JSONResponse

from app.errors import ClientError, ErrorCode, RelayError, UpstreamError, UpstreamRefusedError

# Tokens and call answers are for one client: no cache may keep them.
NO_STORE: Final = {"Cache-Control": "no-store"}

_STATUS: Final[dict[str, int]] = {
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.ORIGIN_NOT_ALLOWED: 403,
    ErrorCode.MODEL_NOT_ALLOWED: 403,
    ErrorCode.UNSUPPORTED_PROTOCOL: 403,
    ErrorCode.SESSION_LIMIT_REACHED: 429,
    ErrorCode.BUDGET_EXHAUSTED: 429,
    ErrorCode.LIMITER_UNAVAILABLE: 503,
    ErrorCode.SERVER_SHUTTING_DOWN: 503,
    ErrorCode.UPSTREAM_RATE_LIMITED: 429,
}


def status_for(exc: RelayError) -> int:
    """The HTTP status of a refusal: 4xx for the client's, 502/503 for the upstream's."""
    status = _STATUS.get(exc.code)
    if status is not None:
        return status
    if isinstance(exc, ClientError):
        return 400
    if isinstance(exc, UpstreamRefusedError | UpstreamError):
        return 502
    return 500


def error_response(
    status: int,
    exc: RelayError | None = None,
    *,
    message: str = "",
    code: str = "",
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """An OpenAI-shaped error body: from `exc`, or from `message`, `code` and `param`."""
    body = {
        "error": {
            "type": exc.error_type if exc is not None else "invalid_request_error",
            "code": exc.code if exc is not None else code,
            "message": exc.message if exc is not None else message,
            "param": exc.param if exc is not None else param,
        }
    }
    headers = {**NO_STORE, **(headers or {})}
    if status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="realtime-relay"'
    return JSONResponse(body, status_code=status, headers=headers)
