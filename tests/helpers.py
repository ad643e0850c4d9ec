"""Helpers the tests share: audio, settings, waiting for events and closes, scripted upstreams,
credentials for the auth tests, and a relay run as a subprocess."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import math
import os
import signal
import socket
import struct
import sys
import time
from asyncio import Task
from asyncio.subprocess import Process
from dataclasses import dataclass
from typing import Any

import httpx
import jwt
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from app.config import Settings

UPSTREAM_KEY = "sk-test-upstream-0123456789"
CLIENT_KEY = "client-key-for-tests-1"
TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "Weather for a city (server-side secret description)",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
}
SERVER_INSTRUCTIONS = "SERVER INSTRUCTIONS: be brief"
WAIT = 10.0
START_TIMEOUT = 10.0
# A GA `response.done` usage with the cached tokens broken down (REALTIME.md §8.1).
GA_USAGE = {
    "total_tokens": 498,
    "input_tokens": 452,
    "output_tokens": 46,
    "input_token_details": {
        "text_tokens": 294,
        "audio_tokens": 158,
        "image_tokens": 0,
        "cached_tokens": 384,
        "cached_tokens_details": {"text_tokens": 256, "audio_tokens": 128, "image_tokens": 0},
    },
    "output_token_details": {"text_tokens": 12, "audio_tokens": 34},
}


def relay_settings(upstream_url: str, **overrides: Any) -> Settings:
    """Settings for a relay in front of `upstream_url`, as a test would write them."""
    upstream = {"url": upstream_url, "connect_timeout_seconds": 5.0, "close_timeout_seconds": 2.0}
    upstream.update(overrides.pop("upstream", {}))
    return Settings(openai_api_key=UPSTREAM_KEY, upstream=upstream, **overrides)


class _OnLoopback:
    port: int

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass
class RelayServer(_OnLoopback):
    """A relay served by uvicorn on 127.0.0.1, and the app behind it."""

    server: uvicorn.Server
    port: int
    app: Any

    @property
    def relay(self) -> Any:
        return self.app.state.relay

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        value = self.relay.metrics.registry.get_sample_value(name, labels or {})
        return 0.0 if value is None else float(value)


@dataclass
class RelayProcess(_OnLoopback):
    """A relay run as `python -m app` in a subprocess, for signal and multi-replica tests."""

    process: Process
    port: int

    async def exit_code(self) -> int:
        async with asyncio.timeout(START_TIMEOUT):
            return await self.process.wait()


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


# Credentials for the auth tests: a plaintext key, a key configured by its hash, and secrets.

PRO_KEY = "ck-test-pro-0123456789abcdef"
FREE_KEY = "ck-test-free-0123456789abcdef"
JWT_SECRET = "jwt-secret-for-tests-0123456789-abcdef"
TOKEN_SECRET = "token-secret-for-tests-0123456789-abcdef"
AUTH_TIERS = {"pro": {"models": ["gpt-realtime", "gpt-realtime-mini"]}, "free": {}, "default": {}}


def auth_settings(**overrides: Any) -> Settings:
    """Settings with `AUTH_TIERS`, `PRO_KEY` (plaintext), `FREE_KEY` (as its hash) and
    `TOKEN_SECRET`, and `overrides`."""
    options: dict[str, Any] = {
        "openai_api_key": "sk-test",
        "tiers": AUTH_TIERS,
        "client_keys": {
            PRO_KEY: "pro",
            "sha256:" + hashlib.sha256(FREE_KEY.encode()).hexdigest(): "free",
        },
        "token_secret": TOKEN_SECRET,
    }
    options.update(overrides)
    return Settings(**options)


def hs256(claims: dict[str, Any], secret: str = JWT_SECRET) -> str:
    """An app JWT: `claims` signed with HS256."""
    return jwt.encode(claims, secret, algorithm="HS256")


def jwt_claims(**overrides: Any) -> dict[str, Any]:
    """An app JWT's claims (``sub``, ``tier`` pro, ``exp`` in a minute); None drops a claim."""
    values: dict[str, Any] = {"sub": "user-42", "tier": "pro", "exp": int(time.time()) + 60}
    values.update(overrides)
    return {key: value for key, value in values.items() if value is not None}


# A relay run as a subprocess, with its log captured.


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class CapturedRelay:
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
) -> CapturedRelay:
    """The relay as `python -m app` or as `uvicorn app.main:app` (with uvicorn's `options`),
    logging at `level`, with `variables` added to the environment; returns once it is healthy."""
    port = _free_port()
    env = {
        **os.environ,
        "OPENAI_API_KEY": UPSTREAM_KEY,
        "RELAY_UPSTREAM__URL": upstream_url,
        "RELAY_PORT": str(port),
        "RELAY_LOG_LEVEL": level,
        "RELAY_DRAIN_SECONDS": "0",
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
    relay = CapturedRelay(process, port)
    async with httpx.AsyncClient() as client, asyncio.timeout(WAIT):
        while True:
            try:
                if (await client.get(f"http://127.0.0.1:{port}/healthz")).status_code == 200:
                    return relay
            except httpx.TransportError:
                pass
            assert process.returncode is None, await relay.stop()
            await asyncio.sleep(0.05)


async def run_node_driver(command: list[str], within: float, env: dict[str, str] | None = None):
    """Run a Node driver (and whatever it starts) in its own process group, bounded: SIGTERM
    past `within` seconds (so it can clean up), SIGKILL for what is left; its last line as JSON."""
    process = await asyncio.create_subprocess_exec(
        *command,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
        start_new_session=True,
    )
    timed_out = False
    try:
        async with asyncio.timeout(within):
            stdout, stderr = await process.communicate()
    except TimeoutError:
        timed_out = True
        os.killpg(process.pid, signal.SIGTERM)
        try:
            async with asyncio.timeout(5):
                stdout, stderr = await process.communicate()
        except TimeoutError:
            os.killpg(process.pid, signal.SIGKILL)
            stdout, stderr = await process.communicate()
    finally:
        with contextlib.suppress(ProcessLookupError):  # children that outlived the driver
            os.killpg(process.pid, signal.SIGKILL)
    errors = stderr.decode(errors="replace")
    if timed_out:
        raise AssertionError(f"{command[-1]} took over {within:.0f} s\n{errors}")
    output = stdout.decode(errors="replace").strip()
    assert process.returncode == 0, f"{command[-1]} exited {process.returncode}\n{errors}{output}"
    return json.loads(output.splitlines()[-1])


# A server tool for the tests: get_time over HTTP, on loopback.

TOOL_SECRET = "Bearer tool-secret-7f3a"
GET_TIME = {
    "name": "get_time",
    "description": "The time now in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "description": "the city"}},
        "required": ["city"],
    },
}


class ToolServer:
    """An HTTP tool endpoint on loopback that records each call and answers as told."""

    def __init__(self) -> None:
        self.calls: list[tuple[dict[str, str], Any]] = []
        self.status = 200
        self.body: Any = {"time": "10:42", "timezone": "Europe/Paris"}
        self.delay = 0.0
        self.url = ""

    def app(self) -> FastAPI:
        api = FastAPI()

        @api.post("/tool")
        async def tool(request: Request) -> Response:
            self.calls.append((dict(request.headers), await request.json()))
            await asyncio.sleep(self.delay)
            if isinstance(self.body, str):
                return Response(self.body, status_code=self.status, media_type="text/plain")
            return JSONResponse(self.body, status_code=self.status)

        return api


def http_tool(server: ToolServer, **http: Any) -> dict[str, Any]:
    return {
        **GET_TIME,
        "http": {"url": server.url, "headers": {"Authorization": TOOL_SECRET}, **http},
    }


# A Realtime WebSocket client's moves, for the local upstream's tests.

PCM_BYTES_PER_MS = 48  # 24 kHz PCM16


async def send_event(ws: Any, event_type: str, **fields: Any) -> None:
    await ws.send(json.dumps({"type": event_type, **fields}))


async def recv_event(ws: Any, within: float = WAIT) -> dict[str, Any]:
    async with asyncio.timeout(within):
        event: dict[str, Any] = json.loads(await ws.recv())
    return event


async def events_until(
    ws: Any, event_type: str, count: int = 1, within: float = WAIT
) -> list[dict[str, Any]]:
    """Receive events up to and including the `count`th of `event_type`."""
    events: list[dict[str, Any]] = []
    while sum(e["type"] == event_type for e in events) < count:
        events.append(await recv_event(ws, within))
    return events


async def append_audio(ws: Any, audio: bytes, chunk_ms: int = 100) -> None:
    """`audio` (24 kHz PCM16) as `input_audio_buffer.append` events of `chunk_ms` each."""
    step = chunk_ms * PCM_BYTES_PER_MS
    for i in range(0, len(audio), step):
        chunk = base64.b64encode(audio[i : i + step]).decode()
        await send_event(ws, "input_audio_buffer.append", audio=chunk)


async def start_server(config: uvicorn.Config, sock: socket.socket) -> tuple[uvicorn.Server, Task]:
    """Serve `config` on the bound `sock`; return once uvicorn has started (bounded), or raise
    what stopped it."""
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    async with asyncio.timeout(START_TIMEOUT):
        while not server.started:
            if task.done():
                task.result()
            await asyncio.sleep(0.01)
    return server, task


def loopback_socket() -> socket.socket:
    """A TCP socket bound to a free port of 127.0.0.1."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock
