"""Graceful drain on SIGTERM, with the relay as a real subprocess (`python -m app`)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
import time
from asyncio.subprocess import Process

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests.conftest import UPSTREAM_KEY

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

DRAIN_SECONDS = 2.0
WAIT = 10.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def start_relay(upstream_url: str, **env: str) -> tuple[Process, int]:
    """`python -m app` on a free port, waited for until /healthz answers."""
    port = free_port()
    environment = {
        **os.environ,
        "OPENAI_API_KEY": UPSTREAM_KEY,
        "RELAY_UPSTREAM__URL": upstream_url,
        "RELAY_PORT": str(port),
        "RELAY_DRAIN_SECONDS": str(DRAIN_SECONDS),
        "RELAY_LOG_LEVEL": "WARNING",
        **env,
    }
    process = await asyncio.create_subprocess_exec(sys.executable, "-m", "app", env=environment)
    async with httpx.AsyncClient() as client, asyncio.timeout(WAIT):
        while True:
            try:
                if (await client.get(f"http://127.0.0.1:{port}/healthz")).status_code == 200:
                    return process, port
            except httpx.TransportError:
                pass
            assert process.returncode is None, "the relay exited at start-up"
            await asyncio.sleep(0.05)


async def exit_code(process: Process) -> int:
    async with asyncio.timeout(WAIT):
        return await process.wait()


async def next_event(ws) -> dict:
    async with asyncio.timeout(WAIT):
        return json.loads(await ws.recv())


async def until_closed(ws) -> list[dict]:
    events = []
    async with asyncio.timeout(WAIT):
        try:
            while True:
                events.append(json.loads(await ws.recv()))
        except ConnectionClosed:
            return events


async def test_sigterm_drains_then_closes_with_1012(upstream):
    """SIGTERM: readiness fails, new sessions are refused, live ones warned then closed 1012."""
    process, port = await start_relay(upstream.url)
    try:
        url = f"ws://127.0.0.1:{port}/ws"
        live = [await connect(url) for _ in range(2)]
        for ws in live:
            assert (await next_event(ws))["type"] == "session.created"
        async with httpx.AsyncClient() as http:
            assert (await http.get(f"http://127.0.0.1:{port}/readyz")).status_code == 200
            signalled = time.monotonic()
            process.send_signal(signal.SIGTERM)
            warnings = [await next_event(ws) for ws in live]  # session.updated may come first
            for i, warning in enumerate(warnings):
                while warning["type"] != "error":
                    warning = await next_event(live[i])
                assert warning["error"]["code"] == "server_shutting_down"
            assert (await http.get(f"http://127.0.0.1:{port}/readyz")).status_code == 503
        async with connect(url) as late:
            refused = await next_event(late)
            assert refused["error"]["code"] == "server_shutting_down"
            await until_closed(late)
            assert late.close_code == 1012
        for ws in live:
            await until_closed(ws)
            assert ws.close_code == 1012
        closed_after = time.monotonic() - signalled
        assert DRAIN_SECONDS * 0.9 <= closed_after < DRAIN_SECONDS + 5
        assert await exit_code(process) == 0
        assert all(record.closed.is_set() for record in upstream.connections)
    finally:
        if process.returncode is None:
            process.kill()
            await exit_code(process)


async def test_sessions_that_end_during_the_drain_let_it_finish_early(upstream):
    """With no live session left, the relay exits without waiting out the window."""
    process, port = await start_relay(upstream.url, RELAY_DRAIN_SECONDS="30")
    try:
        ws = await connect(f"ws://127.0.0.1:{port}/ws")
        assert (await next_event(ws))["type"] == "session.created"
        process.send_signal(signal.SIGTERM)
        await ws.close()
        started = time.monotonic()
        assert await exit_code(process) == 0
        assert time.monotonic() - started < 10
    finally:
        if process.returncode is None:
            process.kill()
            await exit_code(process)
