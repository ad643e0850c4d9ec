"""The local upstream's WebSocket server: handshake checks, connection records, fault knobs.

Handshake rules (REALTIME.md §1), checked in this order:

1. `refuse_status` set: answer with that HTTP status and a JSON error body.
2. Path must be `/v1/realtime` (OpenAI) or `/openai/v1/realtime` (Azure GA), else 404.
3. Azure GA path with `api-version` in the query: 401, as Azure answers.
4. Credential: `Authorization: Bearer <key>`; on the Azure path also `api-key: <key>`. Wrong or
   missing: 401 `invalid_api_key`. With `api_key=None` anything (or nothing) is accepted.
5. `?model=` missing: 400.

Accepted handshakes with an `OpenAI-Beta` header get an `error` event `beta_api_shape_disabled`
and a 1008 close: this upstream speaks GA only (REALTIME.md status note).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from dataclasses import dataclass, field
from http import HTTPStatus
from types import TracebackType
from typing import Any, Generic, Self, TypeVar, cast, overload
from urllib.parse import parse_qsl, urlsplit
from weakref import WeakKeyDictionary

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode
from websockets.http11 import Request, Response

from app.local_upstream.config import LocalUpstreamConfig
from app.local_upstream.events import error_event
from app.local_upstream.session import RealtimeSession

logger = logging.getLogger(__name__)
# websockets logs handshake headers (keys) and frames (audio) at DEBUG: never emit those.
_WIRE_LOGGER = logging.getLogger(f"{__name__}.websocket")
_WIRE_LOGGER.setLevel(logging.INFO)

OPENAI_PATH = "/v1/realtime"
AZURE_PATH = "/openai/v1/realtime"
CLOSE_TIMEOUT_S = 5.0

# (error type, code) of the JSON body for each refused status; others fall back by class.
_REFUSALS: dict[int, tuple[str, str]] = {
    400: ("invalid_request_error", "invalid_request"),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("invalid_request_error", "forbidden"),
    404: ("invalid_request_error", "not_found"),
    429: ("requests", "rate_limit_exceeded"),
}

T = TypeVar("T")


@dataclass
class ConnectionRecord:
    """Everything one handshake and its session did, for tests to assert on.

    Refused handshakes are recorded too: `status` is their HTTP status (101 when accepted) and
    `closed` is set at once.
    """

    path: str
    query: dict[str, str]
    headers: dict[str, str]  # lower-cased names; repeated headers joined with ", "
    status: int = 101
    events: list[dict[str, Any]] = field(default_factory=list)  # client events, in order
    sent: list[dict[str, Any]] = field(default_factory=list)  # server events, in order
    input_audio: bytearray = field(default_factory=bytearray)  # every appended byte, decoded
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    close_code: int | None = None  # as websockets reports it; 1006 when no close frame came

    def sent_types(self) -> list[str]:
        """The `type` of every server event sent, in order."""
        return [str(event["type"]) for event in self.sent]


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

    def __init__(self, config: LocalUpstreamConfig | None = None, /, **overrides: Any) -> None:
        self.config = dataclasses.replace(config or LocalUpstreamConfig(), **overrides)
        self.connections: list[ConnectionRecord] = []
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
    def url(self) -> str:
        """The OpenAI-form URL without query, e.g. `ws://127.0.0.1:PORT/v1/realtime`."""
        return f"ws://{self.config.host}:{self.port}{OPENAI_PATH}"

    @property
    def azure_url(self) -> str:
        """The Azure GA-form URL without query: `ws://127.0.0.1:PORT/openai/v1/realtime`."""
        return f"ws://{self.config.host}:{self.port}{AZURE_PATH}"

    async def __aenter__(self) -> Self:
        self._server = await serve(
            self._handle,
            self.config.host,
            self.config.port,
            process_request=self._process_request,
            process_response=self._process_response,
            max_size=None,  # server events may exceed 1 MiB (REALTIME.md §1.1); accept any size
            compression=None,
            logger=_WIRE_LOGGER,
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
        self._server.close()  # closes open sessions with 1001 going away
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                await self._server.wait_closed()
        except TimeoutError:
            logger.warning("local upstream: sessions did not close within %.1f s", CLOSE_TIMEOUT_S)
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

    async def _process_request(
        self, connection: ServerConnection, request: Request
    ) -> Response | None:
        url = urlsplit(request.path)
        headers: dict[str, str] = {}
        for name, value in request.headers.raw_items():
            key = name.lower()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        record = ConnectionRecord(
            path=url.path, query=dict(parse_qsl(url.query, keep_blank_values=True)), headers=headers
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
        error_type, code = _REFUSALS.get(
            status,
            ("server_error", "server_error") if status >= 500 else ("invalid_request_error", ""),
        )
        body = {
            "error": {"type": error_type, "code": code or None, "message": message, "param": None}
        }
        response = connection.respond(status, json.dumps(body))
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
        expected = self.config.api_key
        if expected is not None:
            given = {record.headers.get("authorization", "").removeprefix("Bearer ")}
            if azure:
                given.add(record.headers.get("api-key", ""))
            if expected not in given:
                return HTTPStatus.UNAUTHORIZED, "Incorrect API key provided."
        if not record.query.get("model"):
            return HTTPStatus.BAD_REQUEST, "Missing required parameter: 'model'."
        return None

    async def _handle(self, ws: ServerConnection) -> None:
        record = self._pending.pop(ws)

        async def send(event: dict[str, Any]) -> None:
            await ws.send(json.dumps(event))
            record.sent.append(event)

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
