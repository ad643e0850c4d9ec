"""``POST /v1/realtime/client_secrets``: a client key buys a short-lived ``ek_`` token.

An app's backend holds the client key and hands its browser a token instead, as OpenAI's own
endpoint does (REALTIME.md; the response keeps OpenAI's GA shape, so SDKs that want an ephemeral
key accept it). The token is bound to the key's tier and client id, so sessions opened with it
count against that client's caps, and to the session model when the request names one, so a
browser cannot spend it on another model. Only a client key may mint: not a token (no chaining
past the TTL) and not a JWT (its own expiry would not bound the token's).
"""

from __future__ import annotations

import json
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, StrictInt, ValidationError

from app.api.responses import NO_STORE, error_response
from app.auth.credentials import Authenticator, CredentialKind, bearer_token
from app.auth.tokens import MAX_TOKEN_TTL_SECONDS, MIN_TOKEN_TTL_SECONDS
from app.config import Settings
from app.errors import (
    TRANSCRIPTION_NOT_ALLOWED,
    ModelNotAllowedError,
    UnauthorizedError,
)


class _ExpiresAfter(BaseModel):
    model_config = ConfigDict(extra="forbid")

    anchor: Literal["created_at"] = "created_at"
    # Range-checked in the route, to answer with OpenAI's codes rather than pydantic's.
    seconds: StrictInt | None = None


class _Session(BaseModel):
    model_config = ConfigDict(extra="allow")  # the rest of a session config is the relay's call

    type: Literal["realtime", "transcription"] = "realtime"
    model: str | None = None


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")

    expires_after: _ExpiresAfter | None = None
    session: _Session | None = None


def _ttl_error(seconds: int) -> JSONResponse | None:
    """OpenAI's 400 for an `expires_after.seconds` outside 10-7200, else None."""
    param = "expires_after.seconds"
    if seconds < MIN_TOKEN_TTL_SECONDS:
        message = f"integer below minimum value. Expected a value >= {MIN_TOKEN_TTL_SECONDS}"
        code = "integer_below_min_value"
    elif seconds > MAX_TOKEN_TTL_SECONDS:
        message = f"integer above maximum value. Expected a value <= {MAX_TOKEN_TTL_SECONDS}"
        code = "integer_above_max_value"
    else:
        return None
    message = f"Invalid {param!r}: {message}, but got {seconds} instead."
    return error_response(400, message=message, code=code, param=param)


def client_secrets_router(auth: Authenticator, settings: Settings) -> APIRouter:
    """The router serving ``POST /v1/realtime/client_secrets``.

    Request: ``Authorization: Bearer <client key>`` and an optional JSON body
    ``{"expires_after": {"anchor": "created_at", "seconds": N}, "session": {"type": "realtime",
    "model": M}}``. N must be 10-7200, as OpenAI's, and is capped at (and defaults to)
    `RELAY_TOKEN_TTL_SECONDS`. M must be one of the tier's models; the token is then good for M
    only (a session opened with it uses M, and asking for another is `model_not_allowed`).
    Without M the token is good for any of the tier's models. With ``"type": "transcription"``
    the token opens transcription sessions only (``/ws?intent=transcription``), if the tier may.

    Response 200: ``{"value": "ek_...", "expires_at": <unix s>, "session": {"type": "realtime",
    "model": <M or the tier's default model>}}`` (``{"type": "transcription"}`` for those).
    401 for a missing or unknown key; 400 for a malformed body (``invalid``), an N out of range
    (``integer_below_min_value`` or ``integer_above_max_value``, param
    ``expires_after.seconds``, as OpenAI's) or a model the tier may not use
    (``model_not_allowed``); errors have OpenAI's ``{"error": {...}}`` shape.
    """
    router = APIRouter()

    @router.post("/v1/realtime/client_secrets")
    async def create_client_secret(request: Request) -> JSONResponse:
        token = bearer_token(request.headers.get("authorization", ""))
        if token is None:
            return error_response(
                401, UnauthorizedError("send a client key as Authorization: Bearer")
            )
        try:
            identity = auth.authenticate(token)
        except UnauthorizedError as exc:
            return error_response(401, exc)
        if identity.kind is not CredentialKind.KEY:
            return error_response(401, UnauthorizedError("minting a token needs a client key"))
        raw = await request.body()
        try:
            body = _Request.model_validate(json.loads(raw)) if raw.strip() else _Request()
        except (ValueError, ValidationError):
            message = "the body is not a valid client_secrets request"
            return error_response(400, message=message, code="invalid")
        ttl = body.expires_after.seconds if body.expires_after else None
        if ttl is not None and (refusal := _ttl_error(ttl)) is not None:
            return refusal
        if body.session is not None and body.session.type == "transcription":
            transcription = settings.session.transcription
            if transcription is None or not settings.tiers[identity.tier].transcription_sessions:
                error = ModelNotAllowedError(TRANSCRIPTION_NOT_ALLOWED)
                return error_response(400, error)
            # Bound to the transcription model: good for `?intent=transcription` sessions only.
            bound: str | None = str(transcription.get("model", ""))
            session: dict[str, Any] = {"type": "transcription"}
        else:
            models = settings.tier_models(identity.tier)
            bound = body.session.model if body.session and body.session.model else None
            model = bound or models[0]
            if model not in models:
                error = ModelNotAllowedError(
                    f"model {model[:64]!r} is not available to this client"
                )
                return error_response(400, error)
            session = {"type": "realtime", "model": model}
        value, expires_at = auth.mint(identity, ttl, model=bound)
        result: dict[str, Any] = {"value": value, "expires_at": expires_at, "session": session}
        return JSONResponse(result, headers=NO_STORE)

    return router
