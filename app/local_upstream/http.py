"""Plain HTTP requests on the local upstream's WebSocket port: reading, answering, error bodies.

OpenAI serves WebRTC calls over HTTP beside its Realtime WebSocket (REALTIME.md §15.1, §15.5):
`POST /v1/realtime/calls` and `POST /v1/realtime/calls/{id}/hangup`. The local upstream answers
them on the port of its WebSocket server (`internals.side_door` hands it the bytes), so a relay
derives `http://HOST:PORT/v1/realtime/calls` from its `ws://HOST:PORT/v1/realtime` upstream.

`RequestReader` is sans-I/O: it parses bytes with h11 (chunked bodies, `Expect: 100-continue`,
malformed requests) and ends in a complete `HttpRequest`, or in the `HttpResponse` that refuses
it: 400 when it is not HTTP/1.1, 413 past `MAX_BODY_BYTES`. Each connection carries one request
and then closes (`Connection: close`), which every HTTP client handles.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Final

import h11

MAX_BODY_BYTES: Final = 1 << 20  # an SDP offer is a few KiB, a session part less
MAX_HEAD_BYTES: Final = 16 * 1024
CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"

# (error type, code) of the JSON body for each refused status; others fall back by class.
_ERRORS: dict[int, tuple[str, str]] = {
    400: ("invalid_request_error", "invalid_request"),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("invalid_request_error", "forbidden"),
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    413: ("invalid_request_error", "request_too_large"),
    415: ("invalid_request_error", "unsupported_content_type"),
    429: ("requests", "rate_limit_exceeded"),
}


@dataclass
class HttpRequest:
    """One complete request; header names lower-cased, repeated ones joined with ", "."""

    method: str
    target: str
    headers: dict[str, str]
    body: bytes = b""


@dataclass
class HttpResponse:
    """A response to write, then close the connection."""

    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)

    def encode(self) -> bytes:
        """The bytes on the wire, with `Content-Length` and `Connection: close`."""
        try:
            reason = HTTPStatus(self.status).phrase
        except ValueError:
            reason = ""
        lines = [f"HTTP/1.1 {self.status} {reason}"]
        lines += [f"{name}: {value}" for name, value in self.headers.items()]
        lines += [f"Content-Length: {len(self.body)}", "Connection: close"]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + self.body


def error_body(status: int, message: str, *, code: str | None = None) -> dict[str, object]:
    """OpenAI's error object for an HTTP refusal: `{"error": {message, type, code, param}}`."""
    error_type, default_code = _ERRORS.get(
        status,
        ("server_error", "server_error") if status >= 500 else ("invalid_request_error", ""),
    )
    return {
        "error": {
            "message": message,
            "type": error_type,
            "code": code or default_code or None,
            "param": None,
        }
    }


def error_response(status: int, message: str, *, code: str | None = None) -> HttpResponse:
    """A JSON error response (the shape agents-js and the SDKs read `error.message` from)."""
    body = json.dumps(error_body(status, message, code=code)).encode()
    return HttpResponse(status, body, {"Content-Type": "application/json"})


def authorized(expected: str | None, headers: dict[str, str], *, azure: bool) -> bool:
    """Whether the request carries the key: `Authorization: Bearer <key>`, or on Azure's paths
    also `api-key: <key>` (REALTIME.md §1). `expected=None` accepts anything, or nothing."""
    if expected is None:
        return True
    given = {headers.get("authorization", "").removeprefix("Bearer ")}
    if azure:
        given.add(headers.get("api-key", ""))
    return expected in given


def lower_headers(items: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Header names lower-cased; a repeated header's values joined with ", "."""
    headers: dict[str, str] = {}
    for name, value in items:
        key = name.lower()
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    return headers


class RequestReader:
    """Reads one request from bytes as they arrive.

    Feed it with `receive(data)` (`b""` at the end of the stream). It returns, in order: the
    bytes to write at once (`CONTINUE` for a client that waits for it), then, once, the
    finished `HttpRequest` or the `HttpResponse` refusing the request; `None` until then.
    """

    def __init__(self, max_body: int = MAX_BODY_BYTES) -> None:
        self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
        self._max_body = max_body
        self._request: HttpRequest | None = None
        self._body = bytearray()
        self._continued = False
        self.done = False

    def receive(self, data: bytes) -> tuple[bytes, HttpRequest | HttpResponse | None]:
        """Take `data`; return (bytes to write now, the outcome once there is one)."""
        if self.done:
            return b"", None
        try:
            self._h11.receive_data(data)
            outcome = self._events()
        except h11.RemoteProtocolError:
            outcome = error_response(400, "The request is not valid HTTP/1.1.")
        if outcome is not None:
            self.done = True
            return b"", outcome
        if not self._continued and self._h11.they_are_waiting_for_100_continue:
            self._continued = True
            return CONTINUE, None
        return b"", None

    def _events(self) -> HttpRequest | HttpResponse | None:
        while True:
            event = self._h11.next_event()
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return None
            if isinstance(event, h11.Request):
                self._request = HttpRequest(
                    method=event.method.decode("ascii"),
                    target=event.target.decode("ascii"),
                    headers=lower_headers(
                        (name.decode("latin-1"), value.decode("latin-1"))
                        for name, value in event.headers
                    ),
                )
                length = self._request.headers.get("content-length", "0")
                if length.isdigit() and int(length) > self._max_body:
                    return self._too_large()
            elif isinstance(event, h11.Data):
                self._body += event.data
                if len(self._body) > self._max_body:
                    return self._too_large()
            elif isinstance(event, h11.EndOfMessage) and self._request is not None:
                self._request.body = bytes(self._body)
                return self._request
            elif isinstance(event, h11.ConnectionClosed):
                return error_response(400, "The request ended early.")

    def _too_large(self) -> HttpResponse:
        return error_response(413, f"The body is larger than {self._max_body} bytes.")
