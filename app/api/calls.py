"""`POST /v1/realtime/calls`: WebRTC calls through the relay, as OpenAI's endpoint takes them.

The body is the caller's SDP offer, as `application/sdp` (what agents-js' `OpenAIRealtimeWebRTC`
and browsers post) or as `multipart/form-data` with an `sdp` part and an optional `session` part
(OpenAI's "unified interface": https://developers.openai.com/api/docs/guides/realtime-webrtc).
The caller authenticates as on `/ws` (`Authorization: Bearer` a client key, JWT or `ek_` token;
its `Origin` checked); `transport/call.py` admits it and creates the call. The answer is `201`,
the SDP answer, and `Location: /v1/realtime/calls/<call id>` (agents-js reads the id from it).
Refusals carry the codes of `/ws` as OpenAI-shaped JSON with a 4xx status (5xx for the upstream's
failures). `POST /v1/realtime/calls/{id}/hangup` lets the caller end its own call.

Browsers post cross-origin with `Authorization`, so `OPTIONS` answers the CORS preflight for the
origins `/ws` allows, and `Location` is exposed to them.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Final

from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException

from app.api.responses import NO_STORE, error_response, status_for
from app.auth.credentials import credential_from
from app.auth.origin import check_origin
from app.errors import RelayError
from app.transport.call import open_call
from app.transport.relay import Relay

logger = logging.getLogger(__name__)

CALLS_PATH: Final = "/v1/realtime/calls"
# SDP offers are a few KiB (a browser's, with candidates, under 8 KiB); a session part is the
# size of a session.update.
MAX_BODY_BYTES: Final = 256 * 1024
_ALLOWED_HEADERS: Final = "Authorization, Content-Type, X-OpenAI-Agents-SDK"


def _invalid(message: str, param: str | None = None, status: int = 400) -> Response:
    return error_response(status, message=message, code="invalid_request", param=param)


async def _offer(request: Request) -> tuple[bytes, dict[str, Any] | None] | Response:
    """The SDP offer and the `session` part (None without one), or the response refusing them."""
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
        return _invalid(f"the body is larger than {MAX_BODY_BYTES} bytes", status=413)
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "application/sdp":
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY_BYTES:
                return _invalid(f"the body is larger than {MAX_BODY_BYTES} bytes", status=413)
        return bytes(body), None
    if kind != "multipart/form-data":
        return _invalid("send the offer as application/sdp or multipart/form-data", status=415)
    if length is None:  # the form parser spools file parts: the whole body must be bounded
        return _invalid("a multipart offer needs a Content-Length", status=411)
    try:
        form = await request.form(max_files=2, max_fields=4, max_part_size=MAX_BODY_BYTES)
    except (HTTPException, MultiPartException):
        return _invalid("the body is not a valid multipart/form-data form")
    parts: dict[str, bytes] = {}
    for name in ("sdp", "session"):
        value = form.get(name)
        if isinstance(value, UploadFile):  # a part with a filename (a Blob, from Node or a form)
            parts[name] = await value.read(MAX_BODY_BYTES + 1)
        elif isinstance(value, str):
            parts[name] = value.encode()
        if len(parts.get(name, b"")) > MAX_BODY_BYTES:
            return _invalid(f"the {name!r} part is larger than {MAX_BODY_BYTES} bytes", status=413)
    if "sdp" not in parts:
        return _invalid("the form has no 'sdp' part", param="sdp")
    if "session" not in parts:
        return parts["sdp"], None
    try:
        session = json.loads(parts["session"])
    except (ValueError, RecursionError):
        return _invalid("the 'session' part is not JSON", param="session")
    if not isinstance(session, dict):
        return _invalid("the 'session' part must be a JSON object", param="session")
    return parts["sdp"], session


def _cors(request: Request, relay: Relay) -> dict[str, str]:
    """The CORS headers for an allowed cross-origin caller (none for others, or same-origin)."""
    origin = request.headers.get("origin")
    if origin is None:
        return {}
    try:
        check_origin(request.headers.raw, relay.settings.allowed_origins)
    except RelayError:
        return {}
    return {
        "Access-Control-Allow-Origin": origin,
        "Access-Control-Expose-Headers": "Location",
        "Vary": "Origin",
    }


def calls_router(relay: Relay) -> APIRouter:
    """The router serving `/v1/realtime/calls` (see the module)."""
    router = APIRouter()

    @router.options(CALLS_PATH)
    @router.options(CALLS_PATH + "/{call_id}/hangup")
    async def preflight(request: Request) -> Response:
        cors = _cors(request, relay)
        if not cors:
            return Response(status_code=403)
        headers = {
            **cors,
            "Access-Control-Allow-Methods": "POST",
            "Access-Control-Allow-Headers": _ALLOWED_HEADERS,
            "Access-Control-Max-Age": "600",
        }
        return Response(status_code=204, headers=headers)

    @router.post(CALLS_PATH)
    async def create_call(request: Request) -> Response:
        cors = _cors(request, relay)
        try:  # who it is, before its body is read (`open_call` admits it in full)
            relay.identify(request.headers.raw)
        except RelayError as exc:
            return error_response(status_for(exc), exc, headers=cors)
        read = await _offer(request)
        if not isinstance(read, Response) and not read[0].lstrip().startswith(b"v=0"):
            read = _invalid("the offer is not an SDP session description", param="sdp")
        if isinstance(read, Response):
            read.headers.update(cors)
            return read
        offer, requested = read
        try:
            call, answer = await open_call(
                relay, request.headers.raw, offer, requested, request.query_params.get("model")
            )
        except RelayError as exc:
            return error_response(status_for(exc), exc, headers=cors)
        if await request.is_disconnected():  # nobody will read the answer: end the call
            call.hang_up()
        location = f"{CALLS_PATH}/{call.call_id}"
        headers = {**NO_STORE, **cors, "Location": location}
        return Response(answer, status_code=201, media_type="application/sdp", headers=headers)

    @router.post(CALLS_PATH + "/{call_id}/hangup")
    async def hang_up(call_id: str, request: Request) -> Response:
        cors = _cors(request, relay)
        try:  # while draining too: ending a call is always welcome
            check_origin(request.headers.raw, relay.settings.allowed_origins)
            identity = relay.auth.authenticate(credential_from(request.headers.raw, ()))
        except RelayError as exc:
            return error_response(status_for(exc), exc, headers=cors)
        call = relay.calls.get(call_id)
        if call is None or call.identity.client_id != identity.client_id:
            message = "no such call of this client"
            return error_response(404, message=message, code="not_found", headers=cors)
        call.hang_up()
        return Response(status_code=200, headers=cors)

    return router
