"""The local upstream's WebRTC calls over HTTP: creating them, hanging them up, finding them.

Routes (REALTIME.md §15.1, §15.5;
https://developers.openai.com/api/docs/api-reference/realtime-calls/create-call and
`.../hangup-call`),
under `/v1/realtime/calls` and Azure's `/openai/v1/realtime/calls`:

- `POST /v1/realtime/calls`: the body is the caller's SDP offer, as `application/sdp`, or as
  `multipart/form-data` with an `sdp` part and an optional `session` part (a GA session object,
  `type: "realtime"`, applied as a `session.update` would be; without it, the defaults). The
  answer is `201`, `Content-Type: application/sdp`, `Location: /v1/realtime/calls/rtc_<hex>` and
  the SDP answer with its candidates.
- `POST /v1/realtime/calls/{id}/hangup`: `200` with an empty body once the call has ended;
  `404` for a call that does not exist (any more).

Checked in this order: the size (413 over `http.MAX_BODY_BYTES`, while reading), path (404),
method (405; `OPTIONS` gets 204), `refuse_status` (creation only), the credential as on the
WebSocket (401), then the body: 415 for another content type; 400 for an offer that is not SDP,
has no media section or that aiortc cannot answer, a form without `sdp`, or a `session` part
that is not a JSON object or not a valid session (with the `code` and `param` a `session.update`
would get). Every refusal is OpenAI's JSON error.
"""

from __future__ import annotations

import asyncio
import email.message
import email.parser
import email.policy
import json
import logging
import re
import secrets
from typing import Any, Final
from urllib.parse import parse_qsl, urlsplit

from aiortc.exceptions import InvalidAccessError, InvalidStateError

from app.local_upstream.call import Call
from app.local_upstream.config import LocalUpstreamConfig
from app.local_upstream.events import ClientEventError
from app.local_upstream.http import (
    HttpRequest,
    HttpResponse,
    authorized,
    error_body,
    error_response,
)
from app.local_upstream.records import CallRecord

logger = logging.getLogger(__name__)

CALLS_PATHS: Final = ("/v1/realtime/calls", "/openai/v1/realtime/calls")
DEFAULT_MODEL: Final = "gpt-realtime"
ANSWER_TIMEOUT_S: Final = 5.0  # an answer takes tens of milliseconds
_HANGUP = re.compile(r"(/openai)?/v1/realtime/calls/([^/]+)/hangup")


class Calls:
    """The WebRTC calls of one local upstream: its HTTP routes and its records of calls."""

    def __init__(self, config: LocalUpstreamConfig) -> None:
        self.config = config
        self.records: list[CallRecord] = []  # every call answered, in order
        self._calls: dict[str, Call] = {}  # until each is closed, ending ones too
        self._changed = asyncio.Condition()

    def find(self, call_id: str) -> Call | None:
        """The live call of that id, if any."""
        call = self._calls.get(call_id)
        return None if call is None or call.ended.is_set() else call

    async def wait_for(self, n: int, timeout: float) -> CallRecord:  # noqa: ASYNC109
        """Wait until `n` calls were answered; return the `n`th record."""
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: len(self.records) >= n)
        return self.records[n - 1]

    async def aclose(self) -> None:
        """End every call (the server is stopping) and wait until each is closed."""
        await asyncio.gather(*(call.end("shutdown") for call in list(self._calls.values())))

    async def respond(self, request: HttpRequest) -> HttpResponse:
        """Answer one HTTP request on the server's port."""
        path = urlsplit(request.target).path
        hangup = _HANGUP.fullmatch(path)
        if path not in CALLS_PATHS and hangup is None:
            return error_response(404, f"Unknown path {path!r}.")
        if request.method == "OPTIONS":
            return HttpResponse(204, headers={"Allow": "POST, OPTIONS"})
        if request.method != "POST":
            response = error_response(405, f"Use POST on {path}, not {request.method}.")
            response.headers["Allow"] = "POST, OPTIONS"
            return response
        status = self.config.refuse_status
        if hangup is None and status is not None:
            message = f"Refused by the local upstream's refuse_status knob ({status})."
            return error_response(status, message)
        azure = path.startswith("/openai/")
        if not authorized(self.config.api_key, request.headers, azure=azure):
            return error_response(401, "Incorrect API key provided.")
        if hangup is not None:
            return await self._hang_up(hangup.group(2))
        return await self._create(request, path)

    async def _create(self, request: HttpRequest, path: str) -> HttpResponse:
        read = _read_offer(request)
        if isinstance(read, HttpResponse):
            return read
        offer, part = read
        query = dict(parse_qsl(urlsplit(request.target).query))
        model = part.get("model") if part is not None else None
        record = CallRecord(
            id=f"rtc_{secrets.token_hex(16)}",
            path=path,
            headers=request.headers,
            offer=offer,
            session=part,
        )
        try:
            call = Call(
                record,
                self.config,
                model if isinstance(model, str) else query.get("model", DEFAULT_MODEL),
                self._closed,
            )
        except ClientEventError as exc:
            body = error_body(400, exc.message, code=exc.code)
            body["error"]["param"] = exc.param  # type: ignore[index]
            return HttpResponse(
                400, json.dumps(body).encode(), {"Content-Type": "application/json"}
            )
        try:
            async with asyncio.timeout(ANSWER_TIMEOUT_S):
                record.answer = await call.answer(offer)
        except (ValueError, LookupError, InvalidAccessError, InvalidStateError) as exc:
            await call.end("refused")
            logger.info("local upstream: offer refused (%s)", type(exc).__name__)
            return error_response(400, "The offer is not an SDP offer this server can answer.")
        except BaseException:
            await call.end("refused")
            raise
        self._calls[call.id] = call
        async with self._changed:
            self.records.append(record)
            self._changed.notify_all()
        logger.info("local upstream: call %s answered", call.id)
        headers = {"Content-Type": "application/sdp", "Location": f"/v1/realtime/calls/{call.id}"}
        return HttpResponse(201, record.answer.encode(), headers)

    async def _hang_up(self, call_id: str) -> HttpResponse:
        call = self.find(call_id)
        if call is None:
            return error_response(404, f"Call {call_id!r} not found.")
        await call.hang_up()
        return HttpResponse(200)

    def _closed(self, call: Call) -> None:
        self._calls.pop(call.id, None)


def _read_offer(request: HttpRequest) -> tuple[str, dict[str, Any] | None] | HttpResponse:
    """The offer and the `session` part (None without one), or the response refusing them."""
    content_type = request.headers.get("content-type", "")
    kind = content_type.split(";")[0].strip().lower()
    session: dict[str, Any] | None = None
    if kind == "application/sdp":
        sdp = request.body
    elif kind == "multipart/form-data":
        parts = _form_parts(content_type, request.body)
        if "sdp" not in parts:
            return error_response(400, "The form has no 'sdp' part.")
        sdp = parts["sdp"]
        if "session" in parts:
            try:
                session = json.loads(parts["session"])
            except ValueError:
                return error_response(400, "The 'session' part is not JSON.")
            if not isinstance(session, dict):
                return error_response(400, "The 'session' part must be a JSON object.")
    else:
        return error_response(415, "Send the offer as application/sdp or multipart/form-data.")
    try:
        offer = sdp.decode("utf-8")
    except UnicodeDecodeError:
        offer = ""
    if not offer.lstrip().startswith("v=0"):
        return error_response(400, "The offer is not an SDP session description.")
    if "\nm=" not in offer:
        return error_response(400, "The offer has no media: no audio and no data channel.")
    return offer, session


def _form_parts(content_type: str, body: bytes) -> dict[str, bytes]:
    """The named parts of a `multipart/form-data` body (RFC 7578), each part's bytes as sent."""
    head = f"Content-Type: {content_type}\r\n\r\n".encode("latin-1")
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    parts: dict[str, bytes] = {}
    if not message.is_multipart():
        return parts
    for part in message.iter_parts():
        if not isinstance(part, email.message.EmailMessage):
            continue
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True)
        if isinstance(name, str) and isinstance(payload, bytes) and name not in parts:
            parts[name] = payload
    return parts
