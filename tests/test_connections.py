"""Connections before any request: the handshake deadline and the connection cap, on real
sockets against the relay under uvicorn (both HTTP parsers), and the open-file limit."""

from __future__ import annotations

import asyncio
import logging
import os
import resource
from pathlib import Path

import anyio
import httpx
import pytest
import uvicorn
from uvicorn.importer import import_from_string
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from app.transport import fast
from app.transport.connections import connection_gate, derived_max_connections
from app.transport.fast import connection_protocol
from tests.helpers import eventually, recv_until, relay_settings, start_relay, user_text

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

WAIT = 10.0
FD_DIR = Path("/proc/self/fd")
Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def open_idle(port: int, count: int) -> list[Streams]:
    """`count` TCP connections to the relay that send nothing."""
    return [await asyncio.open_connection("127.0.0.1", port) for _ in range(count)]


async def read_to_eof(reader: asyncio.StreamReader) -> bytes:
    """Everything the relay sends until it closes the connection (bounded by WAIT)."""
    async with asyncio.timeout(WAIT):
        try:
            return await reader.read()
        except ConnectionResetError:  # a close with our bytes unread is a reset: closed too
            return b""


async def still_open(reader: asyncio.StreamReader) -> bool:
    """Nothing received and not closed, within a short look."""
    try:
        await asyncio.wait_for(reader.read(1), 0.05)
    except TimeoutError:
        return True
    return False


async def close_all(streams: list[Streams]) -> None:
    for _, writer in streams:
        writer.close()
    for _, writer in streams:
        try:
            await writer.wait_closed()
        except ConnectionError:
            pass


async def session_starts(url: str) -> None:
    """A WebSocket session opens, gets its injected session and answers a message."""
    async with connect(url, open_timeout=WAIT) as ws:
        await recv_until(ws, "session.created")
        await recv_until(ws, "session.updated")
        await ws.send(user_text("hello"))
        await recv_until(ws, "conversation.item.done")


def open_fds() -> int:
    return len(os.listdir(FD_DIR))


@pytest.mark.parametrize("parser", ["httptools", "h11"])
async def test_connections_without_a_request_head_are_closed(relay_factory, upstream, parser):
    """A connection that sends nothing, one that sends half a request head, and a kept-alive one
    that starts a second request and stalls are closed after the handshake timeout; a session,
    a GET and an idle kept-alive connection outlive it."""
    settings = relay_settings(upstream.url, handshake_timeout_seconds=0.5)
    relay = await relay_factory(settings, http=connection_protocol(settings, parser))
    silent, half = await open_idle(relay.port, 2)
    half[1].write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: sl")
    kept_alive = await asyncio.open_connection("127.0.0.1", relay.port)
    async with connect(relay.ws_url, open_timeout=WAIT) as ws, httpx.AsyncClient() as client:
        await recv_until(ws, "session.updated")
        first = await client.get(f"{relay.http_url}/healthz")
        kept_alive[1].write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        async with asyncio.timeout(WAIT):
            assert (await kept_alive[0].readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
            assert await kept_alive[0].readexactly(15) == b'{"status":"ok"}'
        kept_alive[1].write(b"GET /healthz HTTP/1.1\r\nHo")  # the next request stalls
        assert await read_to_eof(silent[0]) == b""
        assert await read_to_eof(half[0]) == b""
        assert await read_to_eof(kept_alive[0]) == b""
        # Past the deadline: the session goes on, and the client's kept-alive connection serves
        # its second request.
        await ws.send(user_text("still here"))
        await recv_until(ws, "conversation.item.done")
        second = await client.get(f"{relay.http_url}/healthz")
    assert first.status_code == second.status_code == 200
    assert first.extensions["network_stream"] is second.extensions["network_stream"]
    await close_all([silent, half, kept_alive])


async def test_connections_past_the_cap_are_closed_at_once(relay_factory, upstream):
    """With RELAY_MAX_CONNECTIONS=N, N idle connections hold every slot: N+10 more are closed at
    once with a 503 and a session is refused; once the idle ones time out, a session works."""
    cap = 20
    settings = relay_settings(upstream.url, max_connections=cap, handshake_timeout_seconds=3.0)
    relay = await relay_factory(settings)
    idle = await open_idle(relay.port, cap)
    extra = await open_idle(relay.port, 10)
    for reader, _ in extra:
        assert (await read_to_eof(reader)).startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert all([await still_open(reader) for reader, _ in idle])  # refused before the deadline
    with pytest.raises(InvalidStatus) as refused:
        await connect(relay.ws_url, open_timeout=WAIT)
    assert refused.value.response.status_code == 503
    for reader, _ in idle:
        assert await read_to_eof(reader) == b""  # the handshake timeout frees the slots
    await session_starts(relay.ws_url)
    await close_all(idle + extra)


async def test_websocket_sessions_count_toward_the_cap(relay_factory, upstream):
    """Open WebSocket sessions hold their slots after the upgrade: past the cap, a new connection
    is refused until one of them ends."""
    settings = relay_settings(upstream.url, max_connections=2)
    relay = await relay_factory(settings)
    async with connect(relay.ws_url) as first, connect(relay.ws_url) as second:
        for ws in (first, second):
            await recv_until(ws, "session.updated")
        (reader, writer) = (await open_idle(relay.port, 1))[0]
        assert (await read_to_eof(reader)).startswith(b"HTTP/1.1 503")
        await close_all([(reader, writer)])
        await first.close()
        await eventually(lambda: len(relay.server.server_state.connections) == 1)
        async with httpx.AsyncClient() as client:
            assert (await client.get(f"{relay.http_url}/healthz")).status_code == 200


@pytest.mark.skipif(not FD_DIR.is_dir(), reason="counts descriptors in /proc/self/fd")
async def test_descriptors_return_to_baseline(relay_factory, upstream):
    """The relay's descriptors for timed-out idle connections are released: the process's
    count falls back to its baseline."""
    settings = relay_settings(upstream.url, handshake_timeout_seconds=0.5)
    relay = await relay_factory(settings)
    baseline = open_fds()
    count = 30
    idle = await open_idle(relay.port, count)
    await eventually(lambda: open_fds() == baseline + 2 * count)  # both ends are in this process
    try:
        # Only the test's ends are left once the relay has timed its ends out.
        await eventually(lambda: open_fds() == baseline + count)
    except TimeoutError:
        pytest.fail(f"{open_fds() - baseline} descriptors above the baseline, not {count}")
    finally:
        await close_all(idle)
    await eventually(lambda: open_fds() == baseline)


def test_derived_cap_leaves_room_for_each_session_and_the_process():
    """Unset, the cap leaves two descriptors per connection plus a reserve."""
    assert derived_max_connections(1024) == 416
    assert derived_max_connections(65536) == 28640
    assert derived_max_connections(16) == 1
    assert 2 * derived_max_connections(1024) + 64 + 1024 // 8 <= 1024


def test_cap_is_logged_once_at_start_up(caplog):
    """The cap in force is logged: given, or derived from the open-file limit."""
    caplog.set_level(logging.INFO, logger="app.transport.connections")
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    derived = connection_gate(relay_settings("ws://127.0.0.1:9"))
    given = connection_gate(relay_settings("ws://127.0.0.1:9", max_connections=7))
    assert (derived.max_connections, given.max_connections) == (derived_max_connections(soft), 7)
    assert [r.getMessage() for r in caplog.records] == [
        f"at most {derived.max_connections} open connections (derived from the open-file "
        f"limit, {soft})",
        "at most 7 open connections (RELAY_MAX_CONNECTIONS)",
    ]


async def test_untested_uvicorn_falls_back_with_one_warning(
    relay_factory, upstream, monkeypatch, caplog
):
    """On a uvicorn release the suite did not run, the stock HTTP protocol serves (no cap), with
    one warning at start-up."""
    monkeypatch.setattr(uvicorn, "__version__", "0.55.0")
    fast.warn_if_untested.cache_clear()
    caplog.set_level(logging.WARNING, logger="app.transport.fast")
    settings = relay_settings(upstream.url, max_connections=1)
    assert connection_protocol(settings) == "auto"
    assert connection_protocol(settings, "h11") == "h11"
    relay = await relay_factory(settings)
    assert relay.server.config.http == "auto"
    async with httpx.AsyncClient() as first, httpx.AsyncClient() as second:
        # No cap: while the first client's connection is kept alive, a second one is served.
        assert (await first.get(f"{relay.http_url}/healthz")).status_code == 200
        assert (await second.get(f"{relay.http_url}/healthz")).status_code == 200
    warnings = [r.getMessage() for r in caplog.records if r.name == "app.transport.fast"]
    assert len(warnings) == 1 and warnings[0].startswith("uvicorn 0.55.0: not a version")
    fast.warn_if_untested.cache_clear()


async def test_python_m_app_raises_the_open_file_limit(relay_process_factory, upstream):
    """`python -m app` raises its soft open-file limit to the hard one and logs the cap."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard <= 256:
        pytest.skip("needs a finite hard open-file limit above 256")
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))  # inherited by the relay
    try:
        relay = await relay_process_factory(upstream.url, capture_logs=True, RELAY_LOG_LEVEL="INFO")
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    limits = await anyio.Path(f"/proc/{relay.process.pid}/limits").read_text()
    relay.process.kill()
    await relay.exit_code()
    assert relay.process.stderr is not None
    logged = (await relay.process.stderr.read()).decode()
    assert f"open-file limit raised from 256 to {hard}" in logged
    cap = derived_max_connections(hard)
    assert f"at most {cap} open connections (derived from the open-file limit, {hard})" in logged
    (line,) = [line for line in limits.splitlines() if line.startswith("Max open files")]
    assert line.split()[3:5] == [str(hard), str(hard)]


def test_limits_are_read_from_the_environment(monkeypatch):
    """`uvicorn app.main:app --http app.transport.fast:HttpProtocol` gets the `RELAY_` limits."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    monkeypatch.setenv("RELAY_MAX_CONNECTIONS", "33")
    monkeypatch.setenv("RELAY_HANDSHAKE_TIMEOUT_SECONDS", "2.5")
    fast._http_protocol.cache_clear()
    try:
        protocol = fast.HttpProtocol
        assert protocol is fast.HttpProtocol  # built once
        assert (protocol.gate.max_connections, protocol.gate.handshake_timeout) == (33, 2.5)
        assert import_from_string("app.transport.fast:HttpProtocol") is protocol  # as --http does
    finally:
        fast._http_protocol.cache_clear()


async def test_uvicorn_cli_selects_the_protocol_by_import_string(upstream):
    """`uvicorn app.main:app --http app.transport.fast:HttpProtocol` (on uvloop) refuses
    connections past RELAY_MAX_CONNECTIONS, closes a silent one after
    RELAY_HANDSHAKE_TIMEOUT_SECONDS, logs its cap, and serves sessions."""
    relay = await start_relay(
        "uvicorn app.main:app",
        upstream.url,
        "INFO",
        "--http",
        "app.transport.fast:HttpProtocol",
        RELAY_HANDSHAKE_TIMEOUT_SECONDS="0.5",
        RELAY_MAX_CONNECTIONS="1",
    )
    try:
        idle, extra = await open_idle(relay.port, 2)
        assert (await read_to_eof(extra[0])).startswith(b"HTTP/1.1 503")
        assert await read_to_eof(idle[0]) == b""
        await close_all([idle, extra])
        await session_starts(f"ws://127.0.0.1:{relay.port}/v1/realtime")
    finally:
        logged = await relay.stop()
    assert "at most 1 open connections (RELAY_MAX_CONNECTIONS)" in logged
    assert "1 open connections (RELAY_MAX_CONNECTIONS): refusing new ones; 1 refused" in logged
