"""Hostile clients and stalled peers, over raw sockets: what the relay holds stays bounded.

Each attack is bounded in bytes and time. Memory is read from `/proc` of a relay run as its
own process, `python -m app` (the direct leg) or `uvicorn app.main:app` (the ASGI leg).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import socket
import struct

import pytest
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection
from websockets.frames import Frame, Opcode

from tests.helpers import closed, recv_until, relay_settings, scripted_upstream, tone

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(90)]

MiB = 2**20
CLOSE = 0x8
PING = 0x9
PONG = 0xA


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


class RawClient:
    """A WebSocket client on a raw socket: it sends crafted frames and reads only when told."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, port: int, path: str = "/ws") -> RawClient:
        sock = socket.socket()
        # Small buffers on our side, so what the relay holds is not hidden in ours.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        reader, writer = await asyncio.open_connection(sock=sock, limit=2**16)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        async with asyncio.timeout(10):
            head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head[:40]
        return cls(reader, writer)

    async def flood(self, chunk: bytes, limit: int, seconds: float = 8.0) -> int:
        """Write `chunk` for `seconds` or up to `limit` bytes; the bytes handed to the socket.

        A write that waits is waited for until the end of the window: a relay that reads
        slowly is still reading, one that stopped reading is not.
        """
        written = 0
        deadline = asyncio.get_running_loop().time() + seconds
        while written < limit:
            self.writer.write(chunk)
            written += len(chunk)
            try:
                async with asyncio.timeout_at(deadline):
                    await self.writer.drain()
            except (TimeoutError, ConnectionError):  # the window is over, or the relay closed
                break
        return written

    async def frame(self) -> tuple[int, bytes]:
        """The next frame from the relay (unmasked, unfragmented): opcode and payload."""
        head = await self.reader.readexactly(2)
        length = head[1] & 0x7F
        if length == 126:
            (length,) = struct.unpack("!H", await self.reader.readexactly(2))
        elif length == 127:
            (length,) = struct.unpack("!Q", await self.reader.readexactly(8))
        return head[0] & 0x0F, await self.reader.readexactly(length)

    async def close_code(self) -> int:
        """Read up to the relay's close frame; its code."""
        while True:
            opcode, payload = await self.frame()
            if opcode == CLOSE:
                return int(struct.unpack("!H", payload[:2])[0])

    def abort(self) -> None:
        self.writer.transport.abort()


@contextlib.asynccontextmanager
async def raw_client(port: int, path: str = "/ws"):
    client = await RawClient.connect(port, path)
    try:
        yield client
    finally:
        client.abort()


async def grown_while(pid: int, attack) -> tuple[int, object]:
    """How much the relay's RSS grew over `attack()`, and what the attack returned."""
    before = rss_bytes(pid)
    result = await attack()
    await asyncio.sleep(0.5)  # let the relay act on what it read
    return rss_bytes(pid) - before, result


async def read_until_events(client: RawClient, event_type: str, count: int) -> int:
    """Read events until `count` of `event_type`; fail on anything but those and the start."""
    seen = 0
    async with asyncio.timeout(60):
        while seen < count:
            opcode, payload = await client.frame()
            if opcode == PING:  # the server's keepalive
                continue
            assert opcode == 0x1, f"opcode {opcode}: {payload[:80]!r}"
            event = json.loads(payload)
            if event["type"] == event_type:
                seen += 1
            else:
                assert event["type"] in ("session.created", "session.updated"), event
    return seen


@pytest.mark.parametrize("portable", [False, True], ids=["direct", "asgi"])
async def test_error_flood_from_a_client_that_does_not_read(
    relay_process_factory, upstream, portable
):
    """Invalid frames from a client that reads nothing stop being read, and each gets its error."""
    relay = await relay_process_factory(upstream.url, portable=portable)
    frame = Frame(Opcode.TEXT, b"x").serialize(mask=True)  # 7 bytes: an invalid_json each
    async with raw_client(relay.port) as client:
        await asyncio.sleep(0.5)  # the session starts: created and updated wait unread
        grown, written = await grown_while(
            relay.process.pid, lambda: client.flood(frame * 4096, 12 * MiB)
        )
        assert isinstance(written, int)
        # Before the fix, 12 MiB of these made the relay hold ~333 MB of `error` events.
        assert grown < 20 * MiB, f"the relay grew {grown / MiB:.0f} MiB"
        assert written < 12 * MiB, "the relay kept reading a client that did not read"
        # Reading again, the client gets an error for every frame it sent, in order.
        frames = written // len(frame)
        assert await read_until_events(client, "error", frames) == frames


# The relay's server; uvicorn's CLI with uvicorn's own WebSocket protocol, which answers pings
# and joins fragments itself (the relay guards it, fast.guard_uvicorn_protocol); and uvicorn's
# CLI with the relay's protocol (`--ws app.transport.fast:WebSocketProtocol`).
CLI_WITH_RELAY_PROTOCOL = {
    "portable": True,
    "uvicorn_args": ("--ws", "app.transport.fast:WebSocketProtocol"),
}
SERVERS = [{}, {"portable": True}, CLI_WITH_RELAY_PROTOCOL]
SERVER_IDS = ["python-m-app", "uvicorn-cli", "uvicorn-cli-ws"]


@pytest.mark.parametrize("server", SERVERS, ids=SERVER_IDS)
async def test_ping_flood_from_a_client_that_does_not_read(relay_process_factory, upstream, server):
    """Pings from a client that reads nothing stop being read; every ping gets its pong."""
    relay = await relay_process_factory(upstream.url, **server)
    ping = Frame(Opcode.PING, b"p" * 125).serialize(mask=True)
    async with raw_client(relay.port) as client:
        await asyncio.sleep(0.5)
        grown, written = await grown_while(
            relay.process.pid, lambda: client.flood(ping * 512, 400 * MiB)
        )
        assert isinstance(written, int)
        # Before the fix, 400 MiB of pings made the relay hold ~612 MB of pongs.
        assert grown < 20 * MiB, f"the relay grew {grown / MiB:.0f} MiB"
        assert written < 100 * MiB
        pongs = 0
        async with asyncio.timeout(60):
            while pongs < written // len(ping):
                opcode, payload = await client.frame()
                if opcode == PONG:
                    assert payload == b"p" * 125
                    pongs += 1


@pytest.mark.parametrize("server", SERVERS, ids=SERVER_IDS)
@pytest.mark.parametrize("payload", [b"", b"x"], ids=["empty", "one-byte"])
async def test_fragment_flood_closes_with_1009(relay_process_factory, upstream, payload, server):
    """A message split into more frames than RELAY_CLIENT_MAX_FRAGMENTS closes with 1009."""
    relay = await relay_process_factory(upstream.url, RELAY_CLIENT_MAX_FRAGMENTS="1000", **server)
    start = Frame(Opcode.TEXT, b"[", fin=False).serialize(mask=True)
    fragment = Frame(Opcode.CONT, payload, fin=False).serialize(mask=True)
    async with raw_client(relay.port) as client:
        # Just past the bound, so the relay has read it all when it closes (no reset).
        client.writer.write(start + fragment * 1000)
        async with asyncio.timeout(10):
            assert await client.close_code() == 1009


@pytest.mark.parametrize("protocol", ["direct", "websockets-sansio"])
async def test_an_oversized_continuation_closes_with_1009(relay_factory, upstream, protocol):
    """A continuation frame over the size limit closes with 1009 on both client legs."""
    options = {} if protocol == "direct" else {"ws": protocol}
    relay = await relay_factory(
        relay_settings(upstream.url, client_max_message_bytes=2**16), **options
    )
    async with connect(relay.ws_url) as ws:
        await recv_until(ws, "session.updated")
        start = Frame(Opcode.TEXT, b"[", fin=False).serialize(mask=True)
        # The header of a 2 MiB continuation is enough: its length is over the limit.
        header = bytes((0x00, 0x80 | 127)) + struct.pack("!Q", 2 * MiB) + b"\x00\x00\x00\x00"
        ws.transport.write(start + header)
        assert (await closed(ws))[0] == 1009


@pytest.mark.parametrize("delta", [123, "not base64!", ["a"], "AAE"], ids=str)
async def test_a_malformed_upstream_delta_is_skipped_with_opus_output(relay_factory, delta):
    """An audio delta that is not base64 PCM is skipped; the good audio after it arrives."""
    pcm = tone(100)

    async def script(ws: ServerConnection) -> None:
        bad = {"type": "response.output_audio.delta", "delta": delta}
        good = {"type": "response.output_audio.delta", "delta": base64.b64encode(pcm).decode()}
        await ws.send(json.dumps(bad))
        await ws.send(json.dumps(good))
        await ws.send(json.dumps({"type": "response.output_audio.done"}))
        await ws.wait_closed()

    async with scripted_upstream(script) as url:
        relay = await relay_factory(relay_settings(url))
        async with connect(f"{relay.ws_url}?output_codec=opus") as ws:
            messages: list = []
            async with asyncio.timeout(10):
                while not (
                    messages
                    and isinstance(messages[-1], dict)
                    and messages[-1]["type"] == "response.output_audio.done"
                ):
                    message = await ws.recv()
                    messages.append(message if isinstance(message, bytes) else json.loads(message))
            deltas = [m for m in messages if isinstance(m, dict) and m["type"].endswith("delta")]
            assert len(deltas) == 1 and deltas[0]["relay_audio"]["frames"] == 5
            assert sum(isinstance(m, bytes) for m in messages) == 5
            await ws.send(json.dumps({"type": "input_audio_buffer.clear"}))  # still open
    upstream_errors = relay.metric(
        "realtime_relay_errors_total", {"source": "upstream", "code": "invalid_audio"}
    )
    assert upstream_errors == 1


async def test_a_client_that_stops_answering_pings_gets_client_timeout(relay_factory, upstream):
    """A client that answers no keepalive ping is ended with `client_timeout` and 1011."""
    relay = await relay_factory(
        relay_settings(upstream.url), ws_ping_interval=0.5, ws_ping_timeout=0.5
    )
    async with raw_client(relay.port) as client:
        await asyncio.sleep(3)  # not reading, so no pong: the relay gives up on us
        events = []
        async with asyncio.timeout(10):
            while True:
                opcode, payload = await client.frame()
                if opcode == CLOSE:
                    code = struct.unpack("!H", payload[:2])[0]
                    break
                if opcode == 0x1:
                    events.append(json.loads(payload))
    assert events[-1]["type"] == "error"
    assert events[-1]["error"]["code"] == "client_timeout"
    assert code == 1011
    labels = {
        "tier": "default",
        "model": "gpt-realtime-mini",
        "outcome": "client_timeout",
        "transport": "websocket",
    }
    assert relay.metric("realtime_relay_sessions_total", labels) == 1


async def test_a_client_that_never_reads_is_dropped_after_the_close(relay_factory, upstream):
    """A session ended while its client reads nothing does not hold the connection for good."""
    relay = await relay_factory(
        relay_settings(upstream.url, tiers={"default": {"max_session_seconds": 1}})
    )
    frame = Frame(Opcode.TEXT, b"x").serialize(mask=True)
    async with raw_client(relay.port) as client:
        await client.flood(frame * 4096, 8 * MiB, seconds=3)  # the relay's buffer to us fills
        # Expired after 1 s; the close cannot get through, so the relay drops the socket
        # (after uvicorn's 10 s close timer) and leaves no session behind.
        async with asyncio.timeout(20):
            # Polling: no event signals that both sets are empty.
            while relay.relay.sessions or relay.server.server_state.connections:  # noqa: ASYNC110
                await asyncio.sleep(0.1)
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
            async with asyncio.timeout(10):
                while True:
                    await client.frame()


async def test_a_stalled_upstream_ends_with_upstream_timeout(relay_factory):
    """An upstream that stops answering keepalive pings ends the session: upstream_timeout."""
    stalled = asyncio.Event()

    async def script(ws: ServerConnection) -> None:
        ws.transport.pause_reading()  # reads nothing more: pings go unanswered
        stalled.set()
        await asyncio.sleep(30)

    async with scripted_upstream(script) as url:
        settings = relay_settings(
            url, upstream={"ping_interval_seconds": 0.3, "ping_timeout_seconds": 0.3}
        )
        relay = await relay_factory(settings)
        async with connect(relay.ws_url) as ws:
            error = await recv_until(ws, "error")
            code, _ = await closed(ws)
    assert error["error"]["code"] == "upstream_timeout"
    assert code == 1014


async def test_a_refusal_after_a_client_frame_closes_cleanly(relay_factory):
    """A client that sent a frame before an upstream failure gets its close handshake through."""
    silent = socket.socket()  # listens, never answers: the upstream handshake times out
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    url = f"ws://127.0.0.1:{silent.getsockname()[1]}/v1/realtime"
    relay = await relay_factory(relay_settings(url, upstream={"connect_timeout_seconds": 1.0}))
    try:
        async with connect(relay.ws_url) as ws:
            await ws.send(json.dumps({"type": "input_audio_buffer.clear"}))  # as SDKs do at once
            error = await recv_until(ws, "error")
            # The client's close reply is read, so the relay ends the TCP connection at once,
            # long before either side's 10 s close timer (or the relay's abort, 4 s here).
            async with asyncio.timeout(3):
                code, _ = await closed(ws)
                await ws.wait_closed()
    finally:
        silent.close()
    assert error["error"]["code"] == "upstream_unavailable"
    assert code == 1014


async def test_a_bad_frame_read_during_setup_closes_with_its_code(relay_factory, upstream):
    """Frames held while the session starts are judged at attach: a protocol error is 1002."""
    relay = await relay_factory(relay_settings(upstream.url))
    async with raw_client(relay.port) as client:
        client.writer.write(
            Frame(Opcode.TEXT, b'{"type":"input_audio_buffer.clear"}').serialize(mask=True)
            + Frame(Opcode.TEXT, b"[", fin=False).serialize(mask=True)
            + Frame(Opcode.TEXT, b"[]").serialize(mask=True)  # a new message inside one
        )
        async with asyncio.timeout(10):
            assert await client.close_code() == 1002


async def test_a_client_that_uploads_before_it_reads_is_still_read(relay_factory):
    """Audio from a client that does not read yet reaches the upstream; nothing stalls it."""
    appends = 0

    async def script(ws: ServerConnection) -> None:
        nonlocal appends
        delta = json.dumps({"type": "response.output_audio.delta", "delta": "A" * 64_000})

        async def flood() -> None:  # far more than the client's and the relay's buffers
            for _ in range(200):
                await ws.send(delta)

        sending = asyncio.create_task(flood())
        try:
            async for message in ws:
                if json.loads(message)["type"] == "input_audio_buffer.append":
                    appends += 1
        finally:
            sending.cancel()

    async with scripted_upstream(script) as url:
        relay = await relay_factory(relay_settings(url))
        chunk = base64.b64encode(bytes(48_000)).decode()
        append = json.dumps({"type": "input_audio_buffer.append", "audio": chunk})
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        sock.connect(("127.0.0.1", relay.port))
        async with connect(relay.ws_url, sock=sock, max_queue=2) as ws:
            async with asyncio.timeout(20):
                for _ in range(100):  # 6.4 MB, sent before anything is read
                    await ws.send(append)
                while appends < 100:  # noqa: ASYNC110 - the upstream counts, nothing signals
                    await asyncio.sleep(0.05)
            # The client really read nothing meanwhile: the relay holds output for it.
            (session,) = relay.relay.sessions
            assert session.leg.transport.get_write_buffer_size() > 65536


async def test_the_paced_audio_backlog_is_bounded(relay_factory):
    """Upstream events behind paced Opus packets wait in a backlog of at most max_queue."""
    pcm = base64.b64encode(tone(1000)).decode()  # 50 packets: 100 ms of pacing each
    sent = 0

    async def script(ws: ServerConnection) -> None:
        nonlocal sent
        delta = json.dumps({"type": "response.output_audio.delta", "delta": pcm})
        for _ in range(300):
            await ws.send(delta)
            sent += 1
        await ws.wait_closed()

    async with scripted_upstream(script) as url:
        relay = await relay_factory(relay_settings(url, upstream={"max_queue": 4}))
        async with connect(f"{relay.ws_url}?output_codec=opus", max_queue=None) as ws:
            await recv_until(ws, "session.updated")
            (session,) = relay.relay.sessions
            longest = 0
            for _ in range(100):  # the client reads all along: only pacing holds events back
                await asyncio.sleep(0.01)
                longest = max(longest, len(session.pipe._backlog))
            assert sent < 300  # the upstream was held back, not read into the relay's memory
    # Pausing takes effect after the socket read in progress: its messages (at most 256 KiB
    # of them, uvloop's read size) may still join the backlog.
    assert 0 < longest <= 4 + 256 * 1024 // len(pcm) + 1
