"""Logs at DEBUG and TRACE never carry client credentials or payloads, on either server command."""

from __future__ import annotations

import asyncio
import json
import logging
import time

import httpx
import jwt
import pytest
from websockets.asyncio.client import connect

from app.logs import JsonFormatter
from tests.helpers import UPSTREAM_KEY, start_relay

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

HEADER_KEY = "ck-header-key-7f3a9c1e5b"
SUBPROTOCOL_KEY = "ck-subprotocol-key-2d8e4f6a0c"
JWT_SECRET = "jwt-secret-for-log-tests-0123456789-abcdef"
TOKEN_SECRET = "token-secret-for-log-tests-0123456789-abcdef"
PAYLOAD = "PAYLOAD-MARKER-9c2f7e"
WAIT = 10.0
# What the relay under test accepts: every one of these credentials must stay out of its logs.
CREDENTIALS = {
    "RELAY_CLIENT_KEYS": json.dumps({HEADER_KEY: "default", SUBPROTOCOL_KEY: "default"}),
    "RELAY_JWT__SECRET": JWT_SECRET,
    "RELAY_TOKEN_SECRET": TOKEN_SECRET,
}


def user_text(text: str) -> str:
    content = [{"type": "input_text", "text": text}]
    item = {"type": "message", "role": "user", "content": content}
    return json.dumps({"type": "conversation.item.create", "item": item})


async def session_turn(url: str, marker: str, **options: object) -> None:
    """Open a session, send a message carrying `marker`, and read its echo back."""
    async with connect(url, **options) as ws:  # type: ignore[arg-type]
        await ws.send(user_text(marker))
        async with asyncio.timeout(WAIT):
            while True:
                text = await ws.recv()
                assert isinstance(text, str)
                event = json.loads(text)
                assert event["type"] != "error", event
                if event["type"] == "conversation.item.done" and marker in text:
                    return


@pytest.mark.parametrize("level", ["DEBUG", "TRACE"])
@pytest.mark.parametrize("command", ["python -m app", "uvicorn app.main:app"])
async def test_debug_logs_carry_no_credentials_or_payloads(upstream, command, level):
    """With the relay logging at DEBUG (or TRACE), a key in the Authorization header, one in the
    browser subprotocol, a JWT and a minted `ek_` token, and the events' text, are all absent
    from everything the process logged, while DEBUG lines are there."""
    relay = await start_relay(command, upstream.url, level, **CREDENTIALS)
    try:
        url = f"ws://127.0.0.1:{relay.port}/v1/realtime"
        claims = {"sub": "user-42", "tier": "default", "exp": int(time.time()) + 60}
        token = jwt.encode(claims, JWT_SECRET, algorithm="HS256")
        async with httpx.AsyncClient(timeout=WAIT) as client:
            response = await client.post(
                f"http://127.0.0.1:{relay.port}/v1/realtime/client_secrets",
                headers={"Authorization": f"Bearer {HEADER_KEY}"},
            )
        assert response.status_code == 200
        minted = response.json()["value"]
        credentials = [HEADER_KEY, SUBPROTOCOL_KEY, token, minted]
        await session_turn(
            url, f"{PAYLOAD}-header", additional_headers={"Authorization": f"Bearer {HEADER_KEY}"}
        )
        subprotocols = ["realtime", f"openai-insecure-api-key.{SUBPROTOCOL_KEY}"]
        await session_turn(url, f"{PAYLOAD}-subprotocol", subprotocols=subprotocols)
        await session_turn(
            url, f"{PAYLOAD}-jwt", additional_headers={"Authorization": f"Bearer {token}"}
        )
        await session_turn(
            url, f"{PAYLOAD}-minted", subprotocols=["realtime", f"openai-insecure-api-key.{minted}"]
        )
    finally:
        logged = await relay.stop()
    assert " DEBUG " in logged, logged[-2000:]  # DEBUG logging is on and reaches the output
    assert "connection open" in logged  # websockets' own INFO lines stay
    for secret in [*credentials, UPSTREAM_KEY, PAYLOAD]:
        assert secret not in logged, f"{secret!r} was logged"


def test_json_formatter_keeps_session_fields():
    """The JSON formatter writes the session id and tier as fields of their own."""
    record = logging.LogRecord(
        "app.transport.relay", logging.INFO, __file__, 1, "closed %d", (1000,), None
    )
    record.session, record.tier = "abc", "pro"
    entry = json.loads(JsonFormatter().format(record))
    assert entry["message"] == "closed 1000"
    assert (entry["session"], entry["tier"], entry["level"]) == ("abc", "pro", "INFO")
