"""What the local upstream records of each WebSocket connection and each WebRTC call, for tests."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ConnectionRecord:
    """Everything one handshake and its session did, for tests to assert on.

    Refused handshakes are recorded too: `status` is their HTTP status (101 when accepted) and
    `closed` is set at once. A call's sideband is a connection too (`query["call_id"]`).
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


@dataclass
class CallRecord:
    """One WebRTC call the local upstream answered (`POST /v1/realtime/calls`), for tests.

    `events` and `sent` are the data channel's; each sideband's are in its `ConnectionRecord`
    in `sidebands`. `closed` is set once the call has ended and everything of it is closed.
    """

    id: str  # "rtc_..."
    path: str
    headers: dict[str, str]  # lower-cased names; repeated headers joined with ", "
    offer: str  # the SDP offer, as posted
    session: dict[str, Any] | None  # the `session` part, as posted (None without one)
    answer: str = ""  # the SDP answer
    events: list[dict[str, Any]] = field(default_factory=list)  # client events, data channel
    sent: list[dict[str, Any]] = field(default_factory=list)  # server events, data channel
    sidebands: list[ConnectionRecord] = field(default_factory=list)  # every one attached
    hung_up: bool = False  # `POST .../hangup` ended it
    end_reason: str | None = None  # "hangup", "peer closed", "peer failed", "shutdown", ...
    closed: asyncio.Event = field(default_factory=asyncio.Event)

    def sent_types(self) -> list[str]:
        """The `type` of every server event sent on the data channel, in order."""
        return [str(event["type"]) for event in self.sent]
