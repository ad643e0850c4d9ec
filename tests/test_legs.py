"""The data plane's two legs over real sockets: frames, pings, flow control, any ASGI server,
the portable path on library versions the suite did not run; `AsgiLeg` before `attach`."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import socket

import pytest
import uvicorn
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame, Opcode

from app.transport import fast
from app.transport.fast import DirectWebSocketProtocol
from app.transport.legs import AsgiLeg, ClientGoneError, PortableUpstreamLeg
from tests.helpers import (
    WAIT,
    closed,
    eventually,
    recv_until,
    relay_settings,
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
    """The portable legs' reader and writer tasks still running."""
    names = ("Leg.", "_Outbox.")
    return [t for t in asyncio.all_tasks() if any(n in t.get_coro().__qualname__ for n in names)]


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
                transport = session.upstream.connection.transport
                buffered = max(buffered, transport.get_write_buffer_size())
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


def test_the_suite_runs_on_tested_library_versions():
    """The installed uvicorn and websockets are in fast.py's table, so the suite tests the fast
    path; on a new release, add it there once the whole suite passes on it."""
    assert fast.untested() == []


async def test_an_untested_release_runs_the_portable_path(
    relay_factory, upstream, monkeypatch, caplog
):
    """On a uvicorn release the suite did not run, uvicorn's stock protocols, `AsgiLeg` and the
    portable upstream leg carry a whole turn both ways; one warning says so at start-up."""
    monkeypatch.setattr(uvicorn, "__version__", "0.55.0")
    fast.warn_if_untested.cache_clear()
    caplog.set_level(logging.WARNING, logger="app.transport.fast")
    settings = settings_for(upstream, session={"turn_detection": None})
    await relay_factory(settings)  # a second server in the process: still one warning
    relay = await relay_factory(settings)
    assert (relay.server.config.ws, relay.server.config.http) == ("auto", "auto")
    upstream_legs = []
    connect_upstream = relay.relay.upstream.connect

    async def recording(model: str, **target):
        upstream_legs.append(await connect_upstream(model, **target))
        return upstream_legs[-1]

    monkeypatch.setattr(relay.relay.upstream, "connect", recording)
    audio = tone(300) + bytes(24 * 2 * 100)
    async with connect(relay.ws_url) as ws:
        await recv_until(ws, "session.updated")
        (session,) = relay.relay.sessions
        assert type(session.leg) is AsgiLeg
        assert [type(leg) for leg in upstream_legs] == [PortableUpstreamLeg]
        seen = await turn(ws, audio)
    assert bytes(upstream.connections[0].input_audio) == audio
    assert output_audio(seen) == audio
    await eventually(lambda: not relay.relay.sessions)
    await eventually(lambda: not leg_tasks())
    warnings = [r.getMessage() for r in caplog.records if r.name == "app.transport.fast"]
    assert len(warnings) == 1 and warnings[0].startswith("uvicorn 0.55.0: not a version")
    fast.warn_if_untested.cache_clear()


# -- AsgiLeg before `attach`: the session sends the upstream's first events before it reads


class ClientSinkRecord:
    def __init__(self):
        self.calls: list[tuple] = []

    def client_text(self, text):
        self.calls.append(("text", text))

    def client_bytes(self, data):
        self.calls.append(("bytes", data))

    def client_closed(self):
        self.calls.append(("closed",))

    def client_timed_out(self):
        self.calls.append(("timed_out",))

    def client_write_paused(self, paused):
        self.calls.append(("write_paused", paused))


class FakeAsgi:
    """ASGI `receive`/`send` of one WebSocket: `send` waits while `blocked`, or raises once
    `gone`; `receive` returns what `incoming` holds."""

    def __init__(self):
        self.sent: list[dict] = []
        self.incoming: asyncio.Queue[dict] = asyncio.Queue()
        self.unblocked = asyncio.Event()
        self.unblocked.set()
        self.gone = False

    async def receive(self):
        return await self.incoming.get()

    async def send(self, message):
        await self.unblocked.wait()
        if self.gone:
            raise OSError("client disconnected")
        self.sent.append(message)


async def test_asgi_leg_sends_before_attach():
    """Sends before `attach` go out in order; `attach` then delivers the client's messages."""
    asgi = FakeAsgi()
    leg = AsgiLeg(asgi.receive, asgi.send)
    leg.send_text("session.created")
    leg.send_text("session.updated")
    await eventually(lambda: len(asgi.sent) == 2)
    sink = ClientSinkRecord()
    asgi.incoming.put_nowait({"type": "websocket.receive", "text": "hello"})
    leg.attach(sink)
    await eventually(lambda: sink.calls == [("text", "hello")])
    asgi.incoming.put_nowait({"type": "websocket.disconnect", "code": 1000})
    await eventually(lambda: sink.calls[-1] == ("closed",))
    await leg.finish()
    assert [m["text"] for m in asgi.sent] == ["session.created", "session.updated"]


async def test_asgi_leg_reports_at_attach_a_client_gone_before():
    """A client found gone by a send before `attach`: `attach` reports it, and later sends
    raise ClientGoneError."""
    asgi = FakeAsgi()
    asgi.gone = True
    leg = AsgiLeg(asgi.receive, asgi.send)
    leg.send_text("session.created")
    await asyncio.sleep(0.05)
    sink = ClientSinkRecord()
    leg.attach(sink)
    assert sink.calls == [("closed",)]
    with pytest.raises(ClientGoneError):
        leg.send_text("session.updated")
    await leg.finish()


async def test_asgi_leg_reports_at_attach_a_write_pause_from_before():
    """A client that did not read what was sent before `attach`: `attach` reports the pause,
    and the end of it follows once the outbox drains."""
    asgi = FakeAsgi()
    asgi.unblocked.clear()
    leg = AsgiLeg(asgi.receive, asgi.send, high=4)
    for index in range(6):
        leg.send_text(f"event {index}")
    sink = ClientSinkRecord()
    leg.attach(sink)
    assert sink.calls == [("write_paused", True)]
    asgi.unblocked.set()
    await eventually(lambda: len(asgi.sent) == 6)
    assert sink.calls == [("write_paused", True), ("write_paused", False)]
    asgi.incoming.put_nowait({"type": "websocket.disconnect", "code": 1000})
    await leg.finish()
