"""``GET /v1/relay/admin/spend``: today's spend per tier, and one client's, for operators.

Served only when `RELAY_ADMIN_KEY` is set (otherwise the path is unknown: 404), to a request that
presents that key as ``Authorization: Bearer <key>``. The key is compared in constant time and
never logged or echoed.
"""

from __future__ import annotations

import hmac
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from app.auth.credentials import bearer_token
from app.config import Settings
from app.errors import LimiterUnavailableError, RelayError, UnauthorizedError
from app.limits.spend import Clock, SpendStore, utc_day, utc_now

ADMIN_SPEND_PATH = "/v1/relay/admin/spend"

# Spend figures are for the operator's eyes only: no cache may keep them.
_NO_STORE = {"Cache-Control": "no-store"}


def _refusal(status: int, exc: RelayError) -> JSONResponse:
    """An OpenAI-shaped error body (`{"error": {...}}`), as the relay's other routes answer."""
    body = {
        "error": {"type": exc.error_type, "code": exc.code, "message": exc.message, "param": None}
    }
    headers = dict(_NO_STORE)
    if status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="realtime-relay admin"'
    return JSONResponse(body, status_code=status, headers=headers)


def admin_router(settings: Settings, store: SpendStore, *, clock: Clock = utc_now) -> APIRouter:
    """The router serving ``GET /v1/relay/admin/spend[?client=<id>]``; empty without an admin key.

    Request: ``Authorization: Bearer <RELAY_ADMIN_KEY>``.

    Response 200: ``{"day": "YYYY-MM-DD", "client": <id> | null, "client_usd": <float> | null,
    "tiers": {<tier>: <float>}}``: today's (UTC) spend per tier, and `client`'s when the query
    names one (0.0 for a client that spent nothing today). 401 ``unauthorized`` for a missing or
    wrong key; 503 ``limiter_unavailable`` when the spend store cannot be reached; 404 for every
    request when no admin key is configured.

    Args:
        settings: the relay's settings (`admin_key`).
        store: the relay's spend store.
        clock: the current time, for the `day` of the answer (give the store's clock in tests).
    """
    router = APIRouter()
    if settings.admin_key is None or not settings.admin_key.get_secret_value():
        return router
    admin_key = settings.admin_key.get_secret_value().encode()

    @router.get(ADMIN_SPEND_PATH, include_in_schema=False)
    async def spend(request: Request, client: str | None = None) -> JSONResponse:
        token = bearer_token(request.headers.get("authorization", ""))
        # The header's raw bytes (Starlette decodes it as Latin-1) against the key's UTF-8:
        # compare_digest refuses non-ASCII text, which a request may carry.
        if token is None or not hmac.compare_digest(token.encode("latin-1"), admin_key):
            return _refusal(401, UnauthorizedError("send the admin key as Authorization: Bearer"))
        day = utc_day(clock())
        try:
            tiers = await store.totals_by_tier()
            client_usd = None if client is None else await store.today(client)
        except LimiterUnavailableError as exc:
            return _refusal(503, exc)
        result: dict[str, Any] = {
            "day": day,
            "client": client,
            "client_usd": client_usd,
            "tiers": tiers,
        }
        return JSONResponse(result, headers=_NO_STORE)

    return router
