"""The data plane's two legs over real sockets: frames, pings, flow control, any ASGI server."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import socket

import pytest
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame, Opcode

from app.transport.legs import DirectWebSocketProtocol
from tests.conftest import relay_settings
from tests.helpers import (
    WAIT,
    closed,
    eventually,
    recv_until,
    scripted_upstream,
    settings_for,
    tone,
    user_text,
)

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

# The relay's own server protocol (the default), and uvicorn's, which it drives through ASGI.
SERVER_PROTOCOLS = ["direct", "websockets-sansio"]


async def start_relay(relay_factory, settings, protocol: str = "direct", **options):
    if protocol != "direct":
        options["ws"] = protocol
    return await relay_factory(settings, **options)


async def turn(ws, audio: bytes) -> list[dict]:
    """Push-to-talk: append `audio` in 20 ms events, commit, ask; every event up to the end."""
    await ws.send(json.dumps({"type": "session.update", "session": {"type": "realtime"}}))
    for at in range(0, len(audio), 960):
        chunk = base64.b64encode(audio[at : at + 960]).decode()
        await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": chunk}))
    await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
    await ws.send(json.dumps({"type": "response.create"}))
    seen: list[dict] = []
    await recv_until(ws, "response.done", seen)
    return seen


def output_audio(events: list[dict]) -> bytes:
    return b"".join(
        base64.b64decode(e["delta"]) for e in events if e["type"] == "response.output_audio.delta"
    )


@pytest.mark.parametrize("protocol", SERVER_PROTOCOLS)
async def test_a_turn_under_each_server_protocol(relay_factory, upstream, protocol):
    """Every audio byte goes up in order and comes back, whichever server protocol runs `/ws`."""
    settings = settings_for(upstream, session={"turn_detection": None})
    relay = await start_relay(relay_factory, settings, protocol)
    audio = tone(300) + bytes(24 * 2 * 100)
    async with connect(relay.ws_url) as ws:
        await recv_until(ws, "session.updated")
        seen = await turn(ws, audio)
    assert bytes(upstream.connections[0].input_audio) == audio
    assert output_audio(seen) == audio
    assert seen[-1]["response"]["usage"]["total_tokens"] > 0
    await eventually(lambda: not relay.relay.sessions)
    await eventually(lambda: not leg_tasks())  # the ASGI leg's reader and writer ended too


def leg_tasks() -> list[asyncio.Task]:
    return [t for t in asyncio.all_tasks() if "Leg." in t.get_coro().__qualname__]


async def test_compressed_client_frames(relay_factory, upstream):
    """With permessage-deflate on, compressed client frames, text and binary, reach upstream."""
    settings = settings_for(upstream, session={"turn_detection": None})
    relay = await relay_factory(settings, ws_per_message_deflate=True)
    audio = tone(200)
    async with connect(relay.ws_url, compression="deflate") as ws:
        await recv_until(ws, "session.updated")
        await ws.send(b"\x01" + audio)  # a binary PCM16 frame (wire.py)
        seen = await turn(ws, audio)  # and JSON appends
    assert bytes(upstream.connections[0].input_audio) == audio + audio
    assert output_audio(seen) == audio + audio


@pytest.mark.parametrize("protocol", ["direct", "websockets-sansio"])
async def test_a_client_that_stops_reading_loses_nothing(relay_factory, upstream, protocol):
    """A long answer to a client that reads nothing for a while arrives whole and in order."""
    settings = settings_for(upstream, session={"turn_detection": None})
    relay = await start_relay(relay_factory, settings, protocol)
    audio = tone(200) * 600  # 120 s: about 8 MB of deltas
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)  # no autotuning up to 32 MB
    sock.connect(("127.0.0.1", relay.port))
    async with connect(relay.ws_url, sock=sock, max_queue=4) as ws:
        await recv_until(ws, "session.updated")
        for at in range(0, len(audio), 48_000):
            chunk = base64.b64encode(audio[at : at + 48_000]).decode()
            await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": chunk}))
        await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
        await ws.send(json.dumps({"type": "response.create"}))
        record = upstream.connections[0]
        await eventually(lambda: "response.output_audio.delta" in record.sent_types())
        (session,) = relay.relay.sessions
        buffered = 0
        for _ in range(100):  # the upstream writes, the relay forwards, nobody reads
            await asyncio.sleep(0.01)
            if isinstance(session.leg, DirectWebSocketProtocol):
                buffered = max(buffered, session.leg.transport.get_write_buffer_size())
        seen: list[dict] = []
        await recv_until(ws, "response.done", seen)
    assert output_audio(seen) == audio
    indexes = [e["event_id"] for e in seen if e["type"] == "response.output_audio.delta"]
    sent = [e["event_id"] for e in record.sent if e["type"] == "response.output_audio.delta"]
    assert indexes == sent
    # While the client did not read, the relay stopped reading the upstream rather than hold
    # the answer in its own memory.
    assert buffered < 2**20


async def test_client_ping_is_answered(relay_factory, upstream):
    """A client's ping gets its pong mid-session, and the session goes on."""
    relay = await relay_factory(settings_for(upstream))
    async with connect(relay.ws_url, ping_interval=None) as ws:
        await recv_until(ws, "session.updated")
        pong = await ws.ping(b"are you there")
        async with asyncio.timeout(WAIT):
            await pong
        await ws.send(json.dumps({"type": "input_audio_buffer.clear"}))
        await recv_until(ws, "input_audio_buffer.cleared")


async def test_relay_keepalive_survives_its_own_pings(relay_factory, upstream):
    """The relay pings clients; their pongs keep a session open past several ping timeouts."""
    relay = await relay_factory(settings_for(upstream), ws_ping_interval=0.1, ws_ping_timeout=0.3)
    async with connect(relay.ws_url, ping_interval=None) as ws:
        await recv_until(ws, "session.created")
        await asyncio.sleep(1.5)
        await ws.send(json.dumps({"type": "input_audio_buffer.clear"}))
        await recv_until(ws, "input_audio_buffer.cleared")


async def test_fragmented_client_message_is_one_event(relay_factory, upstream):
    """A message sent in fragments reaches the upstream as one event."""
    relay = await relay_factory(settings_for(upstream))
    text = user_text("in three parts", event_id="frag-1")
    async with connect(relay.ws_url) as ws:
        await recv_until(ws, "session.updated")
        await ws.send([text[:10], text[10:20], text[20:]])
        await recv_until(ws, "conversation.item.added")
    events = upstream.connections[0].events
    assert [e for e in events if e.get("event_id") == "frag-1"] == [json.loads(text)]


async def test_invalid_utf8_closes_with_1007(relay_factory, upstream):
    """A text frame that is not UTF-8 closes the connection with 1007."""
    relay = await relay_factory(settings_for(upstream))
    async with connect(relay.ws_url) as ws:
        await recv_until(ws, "session.updated")
        await ws.send(b'{"type":"\xff"}', text=True)
        assert (await closed(ws))[0] == 1007
    record = upstream.connections[0]
    async with asyncio.timeout(WAIT):
        await record.closed.wait()


async def test_unmasked_client_frame_closes_with_1002(relay_factory, upstream):
    """A client frame without a mask is a protocol error: close 1002."""
    relay = await relay_factory(settings_for(upstream))
    async with connect(relay.ws_url) as ws:
        await recv_until(ws, "session.updated")
        ws.transport.write(Frame(Opcode.TEXT, b"{}").serialize(mask=False))
        assert (await closed(ws))[0] == 1002


async def test_fragments_over_the_limit_close_with_1009(relay_factory, upstream):
    """A message over the size limit is refused even when each fragment is under it."""
    relay = await relay_factory(settings_for(upstream, client_max_message_bytes=2**16))
    part = "A" * 400_000  # the server's frame limit is the relay's plus 1 MiB
    async with connect(relay.ws_url) as ws:
        await recv_until(ws, "session.updated")
        await ws.send([part, part, part])
        assert (await closed(ws))[0] == 1009


async def test_fragmented_and_binary_upstream_frames(relay_factory):
    """A fragmented upstream event arrives whole; a binary upstream frame is dropped."""

    async def script(ws: ServerConnection) -> None:
        await ws.send(b"\x00binary")
        event = json.dumps({"type": "conversation.item.done", "item": {"id": "item_1"}})
        await ws.send([event[:7], event[7:30], event[30:]])
        await ws.wait_closed()

    async with scripted_upstream(script) as url:
        relay = await relay_factory(relay_settings(url))
        async with connect(relay.ws_url) as ws:
            seen: list[dict] = []
            done = await recv_until(ws, "conversation.item.done", seen)
    assert done["item"] == {"id": "item_1"}
    assert [e["type"] for e in seen] == ["session.created", "session.updated", done["type"]]


async def test_paced_audio_goes_out_before_the_upstream_close(relay_factory):
    """Opus packets of a last delta all reach the client before the upstream's close does."""
    pcm = tone(200)

    async def script(ws: ServerConnection) -> None:
        delta = {"type": "response.output_audio.delta", "delta": base64.b64encode(pcm).decode()}
        await ws.send(json.dumps(delta))
        await ws.send(json.dumps({"type": "response.output_audio.done"}))
        await ws.close(1000)

    async with scripted_upstream(script) as url:
        relay = await relay_factory(relay_settings(url))
        async with connect(f"{relay.ws_url}?output_codec=opus") as ws:
            messages = []
            with contextlib.suppress(ConnectionClosed):
                async with asyncio.timeout(WAIT):
                    async for message in ws:
                        messages.append(
                            message if isinstance(message, bytes) else json.loads(message)
                        )
            close_code = ws.close_code
    kinds = ["frame" if isinstance(m, bytes) else m["type"] for m in messages]
    delta = next(m for m in messages if isinstance(m, dict) and m["type"].endswith("delta"))
    announced = delta["relay_audio"]["frames"]
    at = kinds.index("response.output_audio.delta")
    assert announced == 10  # 200 ms in 20 ms packets
    assert kinds[at + 1 : at + 1 + announced] == ["frame"] * announced
    assert kinds[at + 1 + announced] == "response.output_audio.done"
    assert close_code == 1000


async def test_upstream_text_that_is_not_utf8(relay_factory):
    """An upstream text frame that is not UTF-8 ends the session with an error and 1014."""

    async def script(ws: ServerConnection) -> None:
        await ws.send(b'{"type":"\xff"}', text=True)
        await ws.wait_closed()

    async with scripted_upstream(script) as url:
        relay = await relay_factory(relay_settings(url))
        async with connect(relay.ws_url) as ws:
            error = await recv_until(ws, "error")
            assert (await closed(ws))[0] == 1014
    assert "UTF-8" in error["error"]["message"]


async def test_an_upstream_that_stops_reading_holds_the_client_back(relay_factory):
    """While the upstream reads nothing, the relay stops reading the client, not buffer it all."""
    stalled, done = asyncio.Event(), asyncio.Event()

    async def script(ws: ServerConnection) -> None:
        stalled.set()
        await done.wait()  # reads nothing more
        ws.transport.abort()

    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)  # accepted sockets inherit it
    sock.bind(("127.0.0.1", 0))
    async with scripted_upstream(script, sock) as url:
        relay = await relay_factory(relay_settings(url))
        async with connect(relay.ws_url) as ws:
            await recv_until(ws, "session.updated")
            await stalled.wait()
            chunk = base64.b64encode(bytes(48_000)).decode()
            append = json.dumps({"type": "input_audio_buffer.append", "audio": chunk})

            async def push() -> None:
                for _ in range(128):  # 8 MB
                    await ws.send(append)

            pushing = asyncio.create_task(push())
            (session,) = relay.relay.sessions
            buffered = 0
            for _ in range(100):
                await asyncio.sleep(0.01)
                buffered = max(buffered, session.upstream.transport.get_write_buffer_size())
            pushing.cancel()
            done.set()
            ws.transport.abort()
    assert buffered < 2**20


async def test_a_new_message_inside_a_fragmented_one_closes_with_1002(relay_factory, upstream):
    """A text frame where a continuation is due is a protocol error: close 1002."""
    relay = await relay_factory(settings_for(upstream))
    async with connect(relay.ws_url) as ws:
        await recv_until(ws, "session.updated")
        first = Frame(Opcode.TEXT, b'{"type":', fin=False).serialize(mask=True)
        ws.transport.write(first + Frame(Opcode.TEXT, b"{}").serialize(mask=True))
        assert (await closed(ws))[0] == 1002
