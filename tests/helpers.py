"""Helpers the tests share: audio, settings, waiting for events and closes, scripted upstreams."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import socket
import struct

from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from tests.conftest import relay_settings

CLIENT_KEY = "client-key-for-tests-1"
TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "Weather for a city (server-side secret description)",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
}
SERVER_INSTRUCTIONS = "SERVER INSTRUCTIONS: be brief"
WAIT = 10.0


def tone(ms: int, freq: float = 300.0, amplitude: float = 8000.0) -> bytes:
    """PCM16 24 kHz mono: a sine of `ms` milliseconds."""
    count = 24 * ms
    return struct.pack(
        f"<{count}h",
        *(int(amplitude * math.sin(2 * math.pi * freq * i / 24000)) for i in range(count)),
    )


def settings_for(upstream, **overrides):
    overrides.setdefault("client_keys", {CLIENT_KEY: "default"})
    overrides.setdefault("session", {"instructions": SERVER_INSTRUCTIONS, "tools": [TOOL]})
    return relay_settings(upstream.url, **overrides)


async def recv_until(ws, event_type: str, seen: list[dict] | None = None) -> dict:
    """Receive events until one of `event_type`; collect all of them in `seen`."""
    async with asyncio.timeout(WAIT):
        while True:
            event = json.loads(await ws.recv())
            if seen is not None:
                seen.append(event)
            if event["type"] == event_type:
                return event


def user_text(text: str, event_id: str | None = None) -> str:
    """A client event adding a user text message."""
    content = [{"type": "input_text", "text": text}]
    event = {
        "type": "conversation.item.create",
        "item": {"type": "message", "role": "user", "content": content},
    }
    if event_id is not None:
        event["event_id"] = event_id
    return json.dumps(event)


async def eventually(check) -> None:
    """Wait (bounded) until `check()` is true."""
    async with asyncio.timeout(WAIT):
        while True:
            if check():
                return
            await asyncio.sleep(0.02)


async def closed(ws) -> tuple[int | None, str]:
    async with asyncio.timeout(WAIT):
        try:
            while True:
                await ws.recv()
        except ConnectionClosed:
            pass
    return ws.close_code, ws.close_reason


@contextlib.asynccontextmanager
async def scripted_upstream(script, sock: socket.socket | None = None):
    """A Realtime server that starts a session, then runs `script(ws)`; yields its URL."""

    async def handler(ws: ServerConnection) -> None:
        await ws.send(json.dumps({"type": "session.created", "session": {"type": "realtime"}}))
        update = json.loads(await ws.recv())
        await ws.send(json.dumps({"type": "session.updated", "session": update["session"]}))
        await script(ws)

    if sock is None:
        async with serve(handler, "127.0.0.1", 0) as server:
            yield f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1/realtime"
    else:
        async with serve(handler, sock=sock, max_queue=1):
            yield f"ws://127.0.0.1:{sock.getsockname()[1]}/v1/realtime"


async def until_closed(ws) -> list[dict]:
    """Every event the client gets until the relay closes the connection (bounded)."""
    events = []
    async with asyncio.timeout(WAIT):
        try:
            while True:
                events.append(json.loads(await ws.recv()))
        except ConnectionClosed:
            return events
