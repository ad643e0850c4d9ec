"""Logs at DEBUG and TRACE never carry client credentials or payloads, on either server command."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import sys
import time

import httpx
import jwt
import pytest
from websockets.asyncio.client import connect

from app.logs import JsonFormatter
from tests.conftest import UPSTREAM_KEY

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

HEADER_KEY = "ck-header-key-7f3a9c1e5b"
SUBPROTOCOL_KEY = "ck-subprotocol-key-2d8e4f6a0c"
JWT_SECRET = "jwt-secret-for-log-tests-0123456789-abcdef"
TOKEN_SECRET = "token-secret-for-log-tests-0123456789-abcdef"
PAYLOAD = "PAYLOAD-MARKER-9c2f7e"
WAIT = 10.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class _Process:
    """A relay subprocess whose stderr is read as it is written (a full pipe would block it)."""

    def __init__(self, process: asyncio.subprocess.Process, port: int) -> None:
        self.process = process
        self.port = port
        self.output = bytearray()
        assert process.stderr is not None
        self._reader = asyncio.create_task(self._read(process.stderr))

    async def _read(self, stream: asyncio.StreamReader) -> None:
        while chunk := await stream.read(65536):
            self.output += chunk

    async def stop(self) -> str:
        """Stop at once (SIGINT), and return everything it logged."""
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGINT)
        try:
            async with asyncio.timeout(WAIT):
                await self.process.wait()
        except TimeoutError:
            self.process.kill()
            await self.process.wait()
        async with asyncio.timeout(WAIT):
            await self._reader
        return self.output.decode(errors="replace")


async def start_relay(
    command: str, upstream_url: str, level: str, *options: str, **variables: str
) -> _Process:
    """The relay as `python -m app` or as `uvicorn app.main:app` (with uvicorn's `options`),
    logging at `level`, with `variables` added to the environment."""
    port = _free_port()
    env = {
        **os.environ,
        "OPENAI_API_KEY": UPSTREAM_KEY,
        "RELAY_UPSTREAM__URL": upstream_url,
        "RELAY_PORT": str(port),
        "RELAY_LOG_LEVEL": level,
        "RELAY_DRAIN_SECONDS": "0",
        "RELAY_CLIENT_KEYS": json.dumps({HEADER_KEY: "default", SUBPROTOCOL_KEY: "default"}),
        "RELAY_JWT__SECRET": JWT_SECRET,
        "RELAY_TOKEN_SECRET": TOKEN_SECRET,
        **variables,
    }
    if command == "python -m app":
        args = ["-m", "app"]
    else:  # uvicorn's own CLI, with its stock WebSocket protocol; --log-level reaches websockets
        args = ["-m", "uvicorn", "app.main:app", "--port", str(port), "--log-level", level.lower()]
        args.extend(options)
    process = await asyncio.create_subprocess_exec(
        sys.executable, *args, env=env, stderr=asyncio.subprocess.PIPE
    )
    relay = _Process(process, port)
    async with httpx.AsyncClient() as client, asyncio.timeout(WAIT):
        while True:
            try:
                if (await client.get(f"http://127.0.0.1:{port}/healthz")).status_code == 200:
                    return relay
            except httpx.TransportError:
                pass
            assert process.returncode is None, await relay.stop()
            await asyncio.sleep(0.05)


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
    relay = await start_relay(command, upstream.url, level)
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
