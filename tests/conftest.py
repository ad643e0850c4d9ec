"""Fixtures: real servers on free loopback ports, each cleaned up by the factory that made it."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import httpx
import numpy as np
import pytest
import uvicorn

from app.config import Settings
from app.local_upstream import LocalUpstream
from app.main import create_app, server_config
from tests.audio_tools import resample, speech_wav
from tests.helpers import (
    START_TIMEOUT,
    UPSTREAM_KEY,
    RelayProcess,
    RelayServer,
    ToolServer,
    loopback_socket,
    relay_settings,
    start_server,
)
from tests.redis_server import RedisServer


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that use a private Redis are marked `redis`, so `-m "not redis"` skips them."""
    for item in items:
        if "redis_server" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.redis)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def upstream_factory() -> AsyncIterator[Callable[..., Awaitable[LocalUpstream]]]:
    """Starts local Realtime upstreams (port 0); all are stopped after the test."""
    started: list[LocalUpstream] = []

    async def start(**options: Any) -> LocalUpstream:
        options.setdefault("api_key", UPSTREAM_KEY)
        upstream = LocalUpstream(**options)
        await upstream.__aenter__()
        started.append(upstream)
        return upstream

    yield start
    for upstream in reversed(started):
        await upstream.__aexit__(None, None, None)


@pytest.fixture
async def upstream(upstream_factory: Callable[..., Awaitable[LocalUpstream]]) -> LocalUpstream:
    return await upstream_factory()


@pytest.fixture
async def relay_factory() -> AsyncIterator[Callable[..., Awaitable[RelayServer]]]:
    """Serves relay apps under uvicorn on pre-bound loopback sockets; stops them after the test."""
    running: list[tuple[RelayServer, asyncio.Task[None]]] = []

    async def start(settings: Settings, **server_options: Any) -> RelayServer:
        """`server_options` override uvicorn's config, e.g. `ws="websockets-sansio"`."""
        app = create_app(settings)
        sock = loopback_socket()
        port = sock.getsockname()[1]
        options = {"port": port, "log_level": "warning", **server_options}
        server, task = await start_server(server_config(app, settings, **options), sock)
        handle = RelayServer(server=server, port=port, app=app)
        running.append((handle, task))
        return handle

    yield start
    for handle, task in reversed(running):
        handle.server.should_exit = True
        async with asyncio.timeout(START_TIMEOUT):
            await task


@pytest.fixture
async def relay(
    relay_factory: Callable[[Settings], Awaitable[RelayServer]], upstream: LocalUpstream
) -> RelayServer:
    return await relay_factory(relay_settings(upstream.url))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
async def relay_process_factory() -> AsyncIterator[Callable[..., Awaitable[RelayProcess]]]:
    """Starts `python -m app` with the given environment; kills what is left after the test."""
    started: list[RelayProcess] = []

    async def start(
        upstream_url: str,
        capture_logs: bool = False,
        portable: bool = False,
        uvicorn_args: tuple[str, ...] = (),
        **env: str,
    ) -> RelayProcess:
        """`portable`: run `uvicorn app.main:app` (uvicorn's own WebSocket protocol, ASGI), with
        `uvicorn_args` added to its command line."""
        port = _free_port()
        environment = {
            **os.environ,
            "OPENAI_API_KEY": UPSTREAM_KEY,
            "RELAY_UPSTREAM__URL": upstream_url,
            "RELAY_PORT": str(port),
            "RELAY_LOG_LEVEL": "WARNING",
            **env,
        }
        stderr = asyncio.subprocess.PIPE if capture_logs else None
        command = ["-m", "app"]
        if portable:
            command = ["-m", "uvicorn", "app.main:app", "--host", "127.0.0.1", "--port", str(port)]
            command.extend(uvicorn_args)
        process = await asyncio.create_subprocess_exec(
            sys.executable, *command, env=environment, stderr=stderr
        )
        handle = RelayProcess(process, port)
        started.append(handle)
        async with httpx.AsyncClient() as client, asyncio.timeout(START_TIMEOUT):
            while True:
                try:
                    if (await client.get(f"{handle.http_url}/healthz")).status_code == 200:
                        return handle
                except httpx.TransportError:
                    pass
                assert process.returncode is None, "the relay exited at start-up"
                await asyncio.sleep(0.05)

    yield start
    for handle in started:
        if handle.process.returncode is None:
            handle.process.kill()
            await handle.exit_code()


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A private, empty redis-server on a free port (never the shared one), stopped after."""
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="session")
def speech(tmp_path_factory: pytest.TempPathFactory) -> Callable[[int], np.ndarray]:
    """A factory: rate in Hz -> espeak-ng speech as int16 at that rate (made once per run)."""
    source, source_rate = speech_wav(tmp_path_factory.mktemp("speech") / "speech.wav")
    cache: dict[int, np.ndarray] = {}

    def at(rate: int) -> np.ndarray:
        if rate not in cache:
            cache[rate] = resample(source, source_rate, rate)
        return cache[rate]

    return at


@pytest.fixture
async def tool_server() -> AsyncIterator[ToolServer]:
    """A `ToolServer` under uvicorn on a free loopback port, stopped after the test."""
    server = ToolServer()
    sock = loopback_socket()
    server.url = f"http://127.0.0.1:{sock.getsockname()[1]}/tool"
    config = uvicorn.Config(server.app(), log_level="warning", lifespan="off")
    running, task = await start_server(config, sock)
    yield server
    running.should_exit = True
    await task
