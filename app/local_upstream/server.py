"""The local upstream's WebSocket server: handshake checks, connection records, fault knobs.

Handshake rules (REALTIME.md §1), checked in this order:

1. `refuse_status` set: answer with that HTTP status and a JSON error body.
2. Path must be `/v1/realtime` (OpenAI) or `/openai/v1/realtime` (Azure GA), else 404.
3. Azure GA path with `api-version` in the query: 401, as Azure answers.
4. Credential: `Authorization: Bearer <key>`; on the Azure path also `api-key: <key>`. Wrong or
   missing: 401 `invalid_api_key`. With `api_key=None` anything (or nothing) is accepted.
5. `?call_id=` present: the sideband of that live WebRTC call (REALTIME.md §15.4; no `model`),
   else 404.
6. `?intent=` present: it must be `transcription` (a transcription-only session, REALTIME.md
   §14.1) and come without `model`, else 400. Otherwise `?model=` missing: 400.

Accepted handshakes with an `OpenAI-Beta` header get an `error` event `beta_api_shape_disabled`
and a 1008 close: this upstream speaks GA only (REALTIME.md status note).

The same port serves WebRTC calls over plain HTTP (`calls.py`), as OpenAI serves them beside the
WebSocket: `POST /v1/realtime/calls` and `.../{id}/hangup` (`internals.side_door` hands those
requests over). ICE host candidates are on `LocalUpstreamConfig.ice_addresses`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from http import HTTPStatus
from types import TracebackType
from typing import Any, Generic, Protocol, Self, TypeVar, cast, overload
from urllib.parse import parse_qsl, urlsplit
from weakref import WeakKeyDictionary

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode
from websockets.http11 import Request, Response

from app.local_upstream.calls import Calls
from app.local_upstream.config import LocalUpstreamConfig
from app.local_upstream.events import error_event
from app.local_upstream.http import authorized, error_body, lower_headers
from app.local_upstream.internals import side_door, side_door_enabled, use_ice_addresses
from app.local_upstream.records import CallRecord, ConnectionRecord
from app.local_upstream.session import RealtimeSession
from app.local_upstream.transcription_session import TranscriptionSession

logger = logging.getLogger(__name__)
# websockets logs handshake headers (keys) and frames (audio) at DEBUG: never emit those.
_WIRE_LOGGER = logging.getLogger(f"{__name__}.websocket")
_WIRE_LOGGER.setLevel(logging.INFO)

OPENAI_PATH = "/v1/realtime"
AZURE_PATH = "/openai/v1/realtime"
CLOSE_TIMEOUT_S = 5.0

T = TypeVar("T")


class _Session(Protocol):
    """What the server needs of a session: both `RealtimeSession` and `TranscriptionSession`."""

    async def start(self) -> None: ...
    async def receive(self, message: str | bytes) -> None: ...
    async def aclose(self) -> None: ...


class _Knob(Generic[T]):
    """A `LocalUpstream` attribute that reads and writes the same field of its config."""

    def __set_name__(self, owner: type, name: str) -> None:
        self._name = name

    @overload
    def __get__(self, obj: None, owner: type) -> _Knob[T]: ...
    @overload
    def __get__(self, obj: LocalUpstream, owner: type) -> T: ...
    def __get__(self, obj: LocalUpstream | None, owner: type) -> T | _Knob[T]:
        if obj is None:
            return self
        return cast(T, getattr(obj.config, self._name))

    def __set__(self, obj: LocalUpstream, value: T) -> None:
        setattr(obj.config, self._name, value)


class LocalUpstream:
    """A GA Realtime server on 127.0.0.1 for tests and demos: `async with LocalUpstream() as up`.

    Args:
        config: Settings; defaults to `LocalUpstreamConfig()`.
        **overrides: Fields of `LocalUpstreamConfig` to change, e.g. `api_key="sk-test"`.

    The fault knobs are also attributes (`up.refuse_status = 429`) that write through to
    `up.config`, which the server reads at each handshake and each audio delta.
    """

    api_key = _Knob[str | None]()
    refuse_status = _Knob[int | None]()
    drop_after_audio_deltas = _Knob[int | None]()
    session_created_delay = _Knob[float]()
    send_session_created = _Knob[bool]()
    realtime_pacing = _Knob[bool]()
    audio_delta_ms = _Knob[int]()
    asr = _Knob[bool]()

    def __init__(self, config: LocalUpstreamConfig | None = None, /, **overrides: Any) -> None:
        self.config = dataclasses.replace(config or LocalUpstreamConfig(), **overrides)
        self.connections: list[ConnectionRecord] = []
        self._calls = Calls(self.config)
        self._server: Server | None = None
        self._pending: WeakKeyDictionary[ServerConnection, ConnectionRecord] = WeakKeyDictionary()
        self._changed = asyncio.Condition()

    @property
    def port(self) -> int:
        """The TCP port actually bound."""
        if self._server is None:
            raise RuntimeError("LocalUpstream is not running")
        return int(next(iter(self._server.sockets)).getsockname()[1])

    @property
    def calls(self) -> list[CallRecord]:
        """Every WebRTC call answered, in order (`POST /v1/realtime/calls`)."""
        return self._calls.records

    @property
    def calls_url(self) -> str:
        """Where calls are created: `http://127.0.0.1:PORT/v1/realtime/calls`."""
        return f"http://{self.config.host}:{self.port}{OPENAI_PATH}/calls"

    @property
    def url(self) -> str:
        """The OpenAI-form URL without query, e.g. `ws://127.0.0.1:PORT/v1/realtime`."""
        return f"ws://{self.config.host}:{self.port}{OPENAI_PATH}"

    @property
    def azure_url(self) -> str:
        """The Azure GA-form URL without query: `ws://127.0.0.1:PORT/openai/v1/realtime`."""
        return f"ws://{self.config.host}:{self.port}{AZURE_PATH}"

    async def __aenter__(self) -> Self:
        use_ice_addresses(self.config.ice_addresses)
        if not side_door_enabled():
            logger.warning("local upstream: WebRTC calls are not served (untested websockets)")
        self._server = await serve(
            self._handle,
            self.config.host,
            self.config.port,
            process_request=self._process_request,
            process_response=self._process_response,
            max_size=None,  # server events may exceed 1 MiB (REALTIME.md §1.1); accept any size
            compression=None,
            logger=_WIRE_LOGGER,
            create_connection=side_door(self._calls.respond) if side_door_enabled() else None,
        )
        logger.info("local upstream listening on %s", self.url)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._server is None:
            return
        await self._calls.aclose()  # ends live calls: their sidebands close with 1000
        self._server.close()  # closes open sessions with 1001 going away
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                await self._server.wait_closed()
        except TimeoutError:
            logger.warning("local upstream: sessions did not close within %.1f s", CLOSE_TIMEOUT_S)
        await self._calls.aclose()  # a call answered while the server was stopping
        self._server = None

    # A `timeout` argument (not the caller's `asyncio.timeout`) keeps test code to one line.
    async def wait_for_connection(
        self,
        n: int = 1,
        timeout: float = 5.0,  # noqa: ASYNC109
    ) -> ConnectionRecord:
        """Wait until `n` handshakes (accepted or refused) happened; return the `n`th record."""
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: len(self.connections) >= n)
        return self.connections[n - 1]

    async def wait_for_call(
        self,
        n: int = 1,
        timeout: float = 5.0,  # noqa: ASYNC109
    ) -> CallRecord:
        """Wait until `n` WebRTC calls were answered; return the `n`th record."""
        return await self._calls.wait_for(n, timeout)

    async def _process_request(
        self, connection: ServerConnection, request: Request
    ) -> Response | None:
        url = urlsplit(request.path)
        record = ConnectionRecord(
            path=url.path,
            query=dict(parse_qsl(url.query, keep_blank_values=True)),
            headers=lower_headers(request.headers.raw_items()),
        )
        refusal = self._refusal(record)
        async with self._changed:
            self.connections.append(record)
            self._changed.notify_all()
        if refusal is None:
            self._pending[connection] = record
            return None
        status, message = refusal
        record.status = status
        record.closed.set()
        logger.info("local upstream: refused %s with %d", record.path, status)
        response = connection.respond(status, json.dumps(error_body(status, message)))
        del response.headers["Content-Type"]
        response.headers["Content-Type"] = "application/json"
        return response

    def _process_response(
        self, connection: ServerConnection, request: Request, response: Response
    ) -> None:
        # A handshake websockets itself failed (e.g. a plain GET): close its record too.
        if response.status_code != HTTPStatus.SWITCHING_PROTOCOLS:
            record = self._pending.pop(connection, None)
            if record is not None:
                record.status = response.status_code
                record.closed.set()

    def _refusal(self, record: ConnectionRecord) -> tuple[int, str] | None:
        status = self.config.refuse_status
        if status is not None:
            return status, f"Refused by the local upstream's refuse_status knob ({status})."
        if record.path not in (OPENAI_PATH, AZURE_PATH):
            return HTTPStatus.NOT_FOUND, f"Unknown path {record.path!r}."
        azure = record.path == AZURE_PATH
        if azure and "api-version" in record.query:
            return HTTPStatus.UNAUTHORIZED, "api-version is not allowed on the /openai/v1 path."
        if not authorized(self.config.api_key, record.headers, azure=azure):
            return HTTPStatus.UNAUTHORIZED, "Incorrect API key provided."
        call_id = record.query.get("call_id")
        if call_id is not None:
            if self._calls.find(call_id) is None:
                return HTTPStatus.NOT_FOUND, f"Call {call_id!r} not found."
            return None
        intent = record.query.get("intent")
        if intent is not None:
            if intent != "transcription":
                return (
                    HTTPStatus.BAD_REQUEST,
                    f"Invalid value for 'intent': {intent!r}. Supported values are: "
                    "'transcription'.",
                )
            if "model" in record.query:
                return HTTPStatus.BAD_REQUEST, "'model' and 'intent' cannot be used together."
            return None
        if not record.query.get("model"):
            return HTTPStatus.BAD_REQUEST, "Missing required parameter: 'model'."
        return None

    async def _handle(self, ws: ServerConnection) -> None:
        record = self._pending.pop(ws)
        if "call_id" in record.query:
            await self._sideband(ws, record)
            return

        async def send(event: dict[str, Any]) -> None:
            await ws.send(json.dumps(event))
            record.sent.append(event)

        session: _Session
        if "intent" in record.query:  # "transcription", as `_refusal` checked
            session = TranscriptionSession(
                config=self.config, send=send, events=record.events, input_audio=record.input_audio
            )
            logger.info("local upstream: transcription session on %s", record.path)
        else:
            session = RealtimeSession(
                model=record.query["model"],
                config=self.config,
                send=send,
                abort=ws.transport.abort,
                events=record.events,
                input_audio=record.input_audio,
            )
            logger.info("local upstream: session on %s for %s", record.path, record.query["model"])
        try:
            if "openai-beta" in record.headers:
                refusal = "The beta Realtime API shape is disabled; remove the OpenAI-Beta header."
                await send(error_event("beta_api_shape_disabled", refusal))
                await ws.close(CloseCode.POLICY_VIOLATION, "beta_api_shape_disabled")
                return
            if self.config.session_created_delay > 0:
                await asyncio.sleep(self.config.session_created_delay)
            if self.config.send_session_created:
                await session.start()
            async for message in ws:
                await session.receive(message)
        except ConnectionClosed:
            pass
        except Exception:
            logger.exception("local upstream: session failed")
            await ws.close(CloseCode.INTERNAL_ERROR)
        finally:
            await session.aclose()
            record.close_code = ws.close_code
            record.closed.set()
            logger.info("local upstream: session closed with %s", record.close_code)

    async def _sideband(self, ws: ServerConnection, record: ConnectionRecord) -> None:
        call = self._calls.find(record.query["call_id"])
        logger.info("local upstream: sideband of %s", record.query["call_id"])
        try:
            if call is None:  # it ended since the handshake was checked
                await ws.close(CloseCode.NORMAL_CLOSURE, "call ended")
            else:
                await call.serve_sideband(ws, record)
        except ConnectionClosed:
            pass
        except Exception:
            logger.exception("local upstream: sideband failed")
            await ws.close(CloseCode.INTERNAL_ERROR)
        finally:
            record.close_code = ws.close_code
            record.closed.set()
