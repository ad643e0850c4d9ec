"""Upstream URL forms and headers for OpenAI, Azure and compatible servers; the upstream legs
(fast and portable) over real sockets: delivery, flow control, close, keepalive."""

from __future__ import annotations

import asyncio
import contextlib
from urllib.parse import parse_qs, urlsplit

import pytest
import websockets.version
from websockets.asyncio.server import ServerConnection, serve

from app.config import ConfigError, Settings, load_settings
from app.transport import fast
from app.transport.fast import FastUpstreamLeg
from app.transport.legs import PortableUpstreamLeg, UpstreamGoneError
from app.transport.upstream import Upstream, build_target, calls_url
from tests.helpers import eventually

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

WAIT = 10.0

KEY = "sk-test-0123456789abcdef"


def target(**upstream):
    return build_target(Settings(openai_api_key=KEY, upstream=upstream), "gpt-realtime")


def test_openai_form_uses_bearer_and_model_query():
    """OpenAI: /v1/realtime?model=..., Authorization: Bearer, no OpenAI-Beta header."""
    t = target()
    assert t.url == "wss://api.openai.com/v1/realtime?model=gpt-realtime"
    assert dict(t.headers) == {"Authorization": f"Bearer {KEY}"}


def test_azure_ga_form_uses_api_key_and_deployment():
    """Azure GA: /openai/v1/realtime?model=<deployment>, api-key header."""
    t = target(
        url="wss://res.openai.azure.com", kind="azure", deployments={"gpt-realtime": "my-rt"}
    )
    parts = urlsplit(t.url)
    assert parts.path == "/openai/v1/realtime"
    assert parse_qs(parts.query) == {"model": ["my-rt"]}
    assert dict(t.headers) == {"api-key": KEY}


def test_compatible_server_keeps_its_query():
    """A custom URL keeps its own query parameters and gets the model added."""
    t = target(url="ws://127.0.0.1:9/v1/realtime?tenant=a&model=old")
    assert parse_qs(urlsplit(t.url).query) == {"tenant": ["a"], "model": ["gpt-realtime"]}


def test_target_repr_hides_the_key():
    """The key never shows in a repr (and so in logs or tracebacks)."""
    assert KEY not in repr(target())


def test_azure_api_version_is_refused_at_startup():
    """The Azure GA path takes no api-version; the error names the variable."""
    with pytest.raises(ConfigError, match="RELAY_UPSTREAM__URL"):
        load_settings(
            openai_api_key=KEY,
            upstream={"url": "wss://r.openai.azure.com/openai/v1/realtime?api-version=x",
                      "kind": "azure"},
        )  # fmt: skip


# -- the upstream legs over real sockets: the fast one and the portable one, by the gate


class Sink:
    """An `UpstreamSink` that records what it is told; `pause_at` pauses the leg at that count."""

    def __init__(self, leg=None, pause_at: int | None = None):
        self.leg, self.pause_at = leg, pause_at
        self.messages: list[tuple[str, bytes]] = []
        self.closed = asyncio.Event()
        self.write_paused: list[bool] = []

    def upstream_text(self, data: bytes) -> None:
        self._got("text", data)

    def upstream_binary(self, data: bytes) -> None:
        self._got("binary", data)

    def _got(self, kind: str, data: bytes) -> None:
        self.messages.append((kind, data))
        if self.pause_at is not None and len(self.messages) >= self.pause_at:
            self.leg.pause_reading()

    def upstream_closed(self) -> None:
        self.closed.set()

    def upstream_write_paused(self, paused: bool) -> None:
        self.write_paused.append(paused)


@pytest.fixture(params=["fast", "portable"])
def leg_kind(request, monkeypatch) -> str:
    """Each upstream leg: the portable one where the gate finds an untested websockets."""
    if request.param == "portable":
        monkeypatch.setattr(websockets.version, "version", "0.0")
        assert not fast.enabled()
    else:
        assert fast.enabled()
    return request.param


@contextlib.asynccontextmanager
async def upstream_server(handler, **options):
    """A websockets server on 127.0.0.1 running `handler(ws)`; yields its URL."""
    async with serve(handler, "127.0.0.1", 0, **options) as server:
        yield f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1/realtime"


async def open_leg(url: str, kind: str, **upstream):
    settings = Settings(
        openai_api_key=KEY, upstream={"url": url, "close_timeout_seconds": 1.0, **upstream}
    )
    leg = await Upstream(settings).connect("gpt-realtime")
    assert isinstance(leg, FastUpstreamLeg if kind == "fast" else PortableUpstreamLeg)
    return leg


async def test_a_leg_carries_messages_both_ways(leg_kind):
    """What the upstream sends with the handshake, before `attach`, and after it reaches the
    sink in order (fragments joined); `send_text` reaches the upstream; its close is reported
    with its code, and sending after it raises UpstreamGoneError."""
    received: list[str] = []

    async def handler(ws: ServerConnection) -> None:
        await ws.send("one")  # in the handshake's read, for the fast leg
        await ws.send(b"\x00two")
        received.append(await ws.recv())
        await ws.send(["th", "ree"])
        await ws.close(1001)

    async with upstream_server(handler) as url:
        leg = await open_leg(url, leg_kind)
        await asyncio.sleep(0.1)  # "one" and "two" wait for the sink
        sink = Sink()
        leg.attach(sink)
        leg.send_text("hello")
        async with asyncio.timeout(WAIT):
            await sink.closed.wait()
        with pytest.raises(UpstreamGoneError):
            leg.send_text("too late")
        await leg.close(1000, 1.0)
    assert received == ["hello"]
    assert sink.messages == [("text", b"one"), ("binary", b"\x00two"), ("text", b"three")]
    assert (leg.close_code, leg.keepalive_failed) == (1001, False)


async def test_a_close_before_attach_is_reported_at_attach(leg_kind):
    """An upstream that closes before the session attaches: `attach` reports the close."""

    async def handler(ws: ServerConnection) -> None:
        await ws.close(1000)

    async with upstream_server(handler) as url:
        leg = await open_leg(url, leg_kind)
        await asyncio.sleep(0.2)
        sink = Sink()
        leg.attach(sink)
        async with asyncio.timeout(WAIT):
            await sink.closed.wait()
        await leg.close(1000, 1.0)
    assert (sink.messages, leg.close_code) == ([], 1000)


async def test_a_paused_leg_stops_reading(leg_kind):
    """While the relay pauses a leg, the upstream's sends stall within a bound (websockets'
    `max_queue` plus the sockets' buffers); resumed, every message arrives, in order."""
    size, count = 256 * 1024, 200  # 50 MiB in all
    sent = 0

    async def handler(ws: ServerConnection) -> None:
        nonlocal sent
        for index in range(count):
            await ws.send(index.to_bytes(4, "big") + bytes(size - 4))
            sent += 1
        await ws.wait_closed()

    async with upstream_server(handler) as url:
        leg = await open_leg(url, leg_kind, max_queue=4)
        sink = Sink(leg, pause_at=1)
        leg.attach(sink)
        await asyncio.sleep(1.0)
        stalled = sent
        await asyncio.sleep(0.5)
        assert sent == stalled < count, "the upstream was read while the leg was paused"
        assert len(sink.messages) <= 2  # the one that paused it, and one `recv` in flight
        assert stalled * size < 24 * 2**20
        sink.pause_at = None
        leg.resume_reading()
        await eventually(lambda: len(sink.messages) == count)
        await leg.close(1000, 1.0)
    assert [int.from_bytes(data[:4], "big") for _, data in sink.messages] == list(range(count))


async def test_close_is_bounded_when_the_upstream_stops_reading(leg_kind):
    """`close` returns within its bound, without raising, when the upstream reads nothing (the
    close frame cannot even be written): the socket is aborted."""
    stop = asyncio.Event()

    async def handler(ws: ServerConnection) -> None:
        ws.transport.pause_reading()
        await stop.wait()
        ws.transport.abort()  # no close handshake with a socket that reads nothing

    async with upstream_server(handler) as url:
        leg = await open_leg(url, leg_kind)
        leg.attach(Sink())
        chunk = "x" * 2**20
        for _ in range(32):  # more than the sockets' buffers hold
            leg.send_text(chunk)
        await asyncio.sleep(0.5)
        loop = asyncio.get_running_loop()
        started = loop.time()
        await leg.close(1000, 0.5)
        assert loop.time() - started < 2.0
        await eventually(lambda: leg.close_code is not None)
        stop.set()
    assert leg.close_code == 1006


async def test_a_keepalive_failure_is_told_apart(leg_kind):
    """An upstream that stops answering pings is closed by the relay's keepalive (1011 sent,
    nothing received): the leg reports it as such."""
    stop = asyncio.Event()

    async def handler(ws: ServerConnection) -> None:
        ws.transport.pause_reading()  # pings go unread, unanswered
        await stop.wait()
        ws.transport.abort()  # no close handshake with a socket that reads nothing

    async with upstream_server(handler) as url:
        leg = await open_leg(url, leg_kind, ping_interval_seconds=0.1, ping_timeout_seconds=0.2)
        sink = Sink()
        leg.attach(sink)
        async with asyncio.timeout(WAIT):
            await sink.closed.wait()
        stop.set()
        await leg.close(1000, 1.0)
    assert (leg.close_code, leg.keepalive_failed) == (1006, True)


@pytest.mark.parametrize(
    ("url", "kind", "calls"),
    [
        ("wss://api.openai.com/v1/realtime", "openai", "https://api.openai.com/v1/realtime/calls"),
        ("ws://127.0.0.1:9/v1/realtime?x=1", "openai", "http://127.0.0.1:9/v1/realtime/calls"),
        ("wss://res.openai.azure.com", "azure", "https://res.openai.azure.com/openai/v1/realtime/calls"),
    ],
)  # fmt: skip
def test_calls_are_created_beside_the_realtime_path(url, kind, calls):
    """WebRTC calls: the upstream's Realtime path + /calls, over HTTP(S); Azure's GA path."""
    settings = Settings(openai_api_key=KEY, upstream={"url": url, "kind": kind})
    assert calls_url(settings) == calls
