"""``POST /v1/realtime/client_secrets``: a client key buys a short-lived ``ek_`` token.

An app's backend holds the client key and hands its browser a token instead, as OpenAI's own
endpoint does (REALTIME.md; the response keeps OpenAI's GA shape, so SDKs that want an ephemeral
key accept it). The token is bound to the key's tier and client id, so sessions opened with it
count against that client's caps. Only a client key may mint: not a token (no chaining past the
TTL) and not a JWT (its own expiry would not bound the token's).
"""

from __future__ import annotations

import json
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from app.auth import Authenticator, CredentialKind, bearer_token
from app.config import Settings
from app.errors import ModelNotAllowedError, RelayError, UnauthorizedError

# Tokens are credentials: no cache may keep them.
_NO_STORE = {"Cache-Control": "no-store"}


class _ExpiresAfter(BaseModel):
    model_config = ConfigDict(extra="forbid")

    anchor: Literal["created_at"] = "created_at"
    seconds: int = Field(gt=0)


class _Session(BaseModel):
    model_config = ConfigDict(extra="allow")  # the rest of a session config is the relay's call

    type: Literal["realtime"] = "realtime"
    model: str | None = None


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")

    expires_after: _ExpiresAfter | None = None
    session: _Session | None = None


def _error(status: int, exc: RelayError | None, message: str = "", code: str = "") -> JSONResponse:
    """An OpenAI-shaped error body (`{"error": {...}}`)."""
    body = {
        "error": {
            "type": "invalid_request_error",
            "code": exc.code if exc is not None else code,
            "message": exc.message if exc is not None else message,
            "param": exc.param if exc is not None else None,
        }
    }
    headers = dict(_NO_STORE)
    if status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="realtime-relay"'
    return JSONResponse(body, status_code=status, headers=headers)


def client_secrets_router(auth: Authenticator, settings: Settings) -> APIRouter:
    """The router serving ``POST /v1/realtime/client_secrets``.

    Request: ``Authorization: Bearer <client key>`` and an optional JSON body
    ``{"expires_after": {"anchor": "created_at", "seconds": N}, "session": {"model": M}}``; N is
    clamped to `RELAY_TOKEN_TTL_SECONDS` and M must be one of the tier's models.

    Response 200: ``{"value": "ek_...", "expires_at": <unix s>, "session": {"type": "realtime",
    "model": <M or the tier's default model>}}``. 401 for a missing or unknown key, 400 for a
    malformed body or a model the tier may not use; errors have OpenAI's ``{"error": {...}}``
    shape.
    """
    router = APIRouter()

    @router.post("/v1/realtime/client_secrets")
    async def create_client_secret(request: Request) -> JSONResponse:
        token = bearer_token(request.headers.get("authorization", ""))
        if token is None:
            return _error(401, UnauthorizedError("send a client key as Authorization: Bearer"))
        try:
            identity = auth.authenticate(token)
        except UnauthorizedError as exc:
            return _error(401, exc)
        if identity.kind is not CredentialKind.KEY:
            return _error(401, UnauthorizedError("minting a token needs a client key"))
        raw = await request.body()
        try:
            body = _Request.model_validate(json.loads(raw)) if raw.strip() else _Request()
        except (ValueError, ValidationError):
            return _error(400, None, "the body is not a valid client_secrets request", "invalid")
        models = settings.tier_models(identity.tier)
        model = body.session.model if body.session and body.session.model else models[0]
        if model not in models:
            error = ModelNotAllowedError(f"model {model[:64]!r} is not available to this client")
            return _error(400, error)
        ttl = body.expires_after.seconds if body.expires_after else None
        value, expires_at = auth.mint(identity, ttl)
        result: dict[str, Any] = {
            "value": value,
            "expires_at": expires_at,
            "session": {"type": "realtime", "model": model},
        }
        return JSONResponse(result, headers=_NO_STORE)

    return router
