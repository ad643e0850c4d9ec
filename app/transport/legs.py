"""A session's two sockets as message callbacks: the contract, and the legs on public APIs only.

The relay's hot path is one event in, one event out. Run as two pump tasks, it paid a task
wake-up per message on each side, and uvicorn's ASGI receive path paused and resumed reading the
client socket around every message; that machinery was most of the relay's CPU per event
(docs/design.md, "Why the fast path exists"). So each leg hands every complete message to a sink
(the session's pipe) from its socket's callbacks, and the sink writes to the other leg at once,
synchronously. Flow control is a proxy's (nginx's): when one side's write buffer is over its
high-water mark, the other side stops being read until it drains. (STYLE.md asks for
backpressure by awaiting `send()`; a callback cannot await, and pausing the reader is the same
bound without the task.)

This module holds the contract (`ClientLeg`, `UpstreamLeg`, the sinks, the two "gone" errors)
and the portable legs, built on public APIs only, which serve wherever the fast ones cannot:

- `AsgiLeg`: the client leg over ASGI `receive`/`send`, under any ASGI server (`uvicorn
  app.main:app`, Hypercorn, or the relay's server on a library version its tests did not run),
  at the cost of a task each way.
- `PortableUpstreamLeg`: the upstream leg over websockets' public asyncio client (`recv`,
  `send`, `close`), with a reader and a writer task.

The fast legs, which extend uvicorn's and websockets' internals, are in `fast.py`, the one
module allowed to touch them.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Final, Generic, Protocol, TypeVar

from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode
from websockets.protocol import State

DIRECT_EXTENSION: Final = "realtime_relay.direct"

Message = MutableMapping[str, Any]

# Messages a portable leg holds for its writer task before it asks the other side to stop
# (and resumes it at a quarter of that): the bound `ClientLeg.reply_text` and flow control keep.
OUTBOX_HIGH: Final = 64


class ClientGoneError(Exception):
    """The client's socket is closed: nothing more can be sent to it."""


class UpstreamGoneError(Exception):
    """The upstream socket is closing or closed: nothing more can be sent to it."""


class ClientSink(Protocol):
    """What a client leg calls, from its socket's callbacks, once a sink is attached."""

    def client_text(self, text: str) -> None: ...
    def client_bytes(self, data: bytes) -> None: ...
    def client_closed(self) -> None: ...
    def client_timed_out(self) -> None: ...
    def client_write_paused(self, paused: bool) -> None: ...


class UpstreamSink(Protocol):
    """What an upstream leg calls, from its socket's callbacks, once a sink is attached."""

    def upstream_text(self, data: bytes) -> None: ...
    def upstream_binary(self, data: bytes) -> None: ...
    def upstream_closed(self) -> None: ...
    def upstream_write_paused(self, paused: bool) -> None: ...


class ClientLeg(Protocol):
    """The client's socket as the data plane uses it.

    `send_*` write at once (before `attach` too: the upstream's first events reach the client
    before the client is read) and raise `ClientGoneError` once the client is gone. `attach`
    delivers the messages that arrived before it, in order, then every later one, and reports
    what happened before it: a client already gone, a write buffer already over its mark.
    `reply_text` sends what a client frame caused (an `error` event), and stops reading the
    client while such replies wait unread past the leg's bound; `finish` sends whatever a leg
    still holds (only `AsgiLeg` holds anything) before the session closes, and `abort_after`
    bounds how long a closed connection may wait for a client that stopped reading (only the
    direct leg can: under ASGI, the server owns the socket).
    """

    def attach(self, sink: ClientSink) -> None: ...
    def send_text(self, text: str) -> None: ...
    def send_bytes(self, data: bytes) -> None: ...
    def reply_text(self, text: str) -> None: ...
    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    async def finish(self) -> None: ...
    def abort_after(self, seconds: float) -> None: ...


class UpstreamLeg(Protocol):
    """The upstream socket as the data plane uses it, from `Upstream.connect` on.

    `attach` is called right after the connect, before anyone reads a message: from then on
    every message goes to the sink as it arrives (a fast leg keeps what came in with the
    handshake until then). `send_text` writes at once and raises `UpstreamGoneError` once the
    socket is closing or closed. `close` is bounded by `within` seconds, after which it aborts
    the socket, and never raises.
    """

    @property
    def close_code(self) -> int | None:
        """The close code received (1006 for none) once closed; None while open."""
        ...

    @property
    def keepalive_failed(self) -> bool:
        """Whether the relay gave up on its keepalive pings (it sent 1011, got no close)."""
        ...

    def attach(self, sink: UpstreamSink) -> None: ...
    def send_text(self, text: str) -> None: ...
    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    async def close(self, code: int, within: float) -> None: ...


def deliver(message: Message, sink: ClientSink) -> None:
    """Hand an ASGI `websocket.receive` or `websocket.disconnect` message to a client sink."""
    text = message.get("text")
    if text is not None:
        sink.client_text(text)
    elif message["type"] == "websocket.disconnect":
        sink.client_closed()
    elif (data := message.get("bytes")) is not None:
        sink.client_bytes(data)


class ReadPause:
    """A leg's reading as the relay's flow control pauses and resumes it (the other side is not
    reading); `_update_reading` weighs that with the leg's own reasons (its full output, a
    message held before `attach`)."""

    _paused_by_relay: bool

    def pause_reading(self) -> None:
        self._paused_by_relay = True
        self._update_reading()

    def resume_reading(self) -> None:
        self._paused_by_relay = False
        self._update_reading()

    def _update_reading(self) -> None:
        raise NotImplementedError


_Item = TypeVar("_Item")


class _Outbox(Generic[_Item]):
    """What a portable leg has to send, and the writer task that sends it, in order.

    The task starts with the first item. Past `high` items waiting the outbox is `full`, until
    it is down to a quarter of that; `on_full` hears each change. A send that raises one of
    `gone_errors` makes it `gone` (the peer left): it stops, drops what is left, and calls
    `on_gone`.
    """

    def __init__(
        self,
        send: Callable[[_Item], Awaitable[object]],
        gone_errors: tuple[type[BaseException], ...],
        high: int,
    ) -> None:
        self._send, self._gone_errors = send, gone_errors
        self._high, self._low = high, high // 4
        self._items: deque[_Item] = deque()
        self._ready = asyncio.Event()
        self._finishing = False
        self._task: asyncio.Task[None] | None = None
        self.full = False
        self.gone = False
        self.on_full: Callable[[bool], None] = _ignore
        self.on_gone: Callable[[], None] = _nothing

    def put(self, item: _Item) -> None:
        items = self._items
        items.append(item)
        self._ready.set()
        if self._task is None:
            self._task = asyncio.create_task(self._write())
        if not self.full and len(items) > self._high:
            self.full = True
            self.on_full(True)

    async def _write(self) -> None:
        items = self._items
        while True:
            await self._ready.wait()
            while items:
                try:
                    await self._send(items.popleft())
                except self._gone_errors:
                    self.gone = True
                    items.clear()
                    self.on_gone()
                    return
                if self.full and len(items) <= self._low:
                    self.full = False
                    self.on_full(False)
            if self._finishing:
                return
            self._ready.clear()

    async def finish(self) -> None:
        """Send what is left, then end the task; cancelled, it cancels the task too."""
        task = self._task
        if task is None:
            return
        self._finishing = True
        self._ready.set()
        try:
            await task
        finally:
            task.cancel()

    async def cancel(self) -> None:
        """End the task now, dropping what is left."""
        task = self._task
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def _ignore(_: bool) -> None:
    pass


def _nothing() -> None:
    pass


class AsgiLeg(ReadPause):
    """The client leg over ASGI `receive`/`send`: works under any ASGI server.

    A reader task, started by `attach`, feeds the sink; sends go to an outbox that a writer task
    drains, started by the first send (which may come before `attach`). While the outbox holds
    more than `high` messages, the sink pauses the upstream, and once a reply (`reply_text`)
    joins the outbox meanwhile, the reader stops taking the client's messages, so the outbox
    stays near `high`. Pings, fragments and keepalive are the server's here
    (`fast.guard_uvicorn_protocol` bounds uvicorn's, on the versions the tests ran).
    """

    def __init__(
        self,
        receive: Callable[[], Awaitable[Message]],
        send: Callable[[Message], Awaitable[None]],
        high: int = OUTBOX_HIGH,
    ) -> None:
        self._receive = receive
        # uvicorn raises ClientDisconnected (an OSError) once the client is gone, RuntimeError
        # after a close; other servers raise one or the other.
        self._outbox: _Outbox[Message] = _Outbox(send, (OSError, RuntimeError), high)
        self._outbox.on_full = self._outbox_full
        self._outbox.on_gone = self._client_gone
        self._reading = asyncio.Event()
        self._reading.set()
        self._sink: ClientSink | None = None
        self._paused_by_relay = False
        self._reply_blocked = False
        self._reader: asyncio.Task[None] | None = None

    def attach(self, sink: ClientSink) -> None:
        self._sink = sink
        if self._outbox.gone:  # a send before `attach` found the client gone
            sink.client_closed()
            return
        if self._outbox.full:
            sink.client_write_paused(True)
        self._reader = asyncio.create_task(self._read(sink))

    async def _read(self, sink: ClientSink) -> None:
        while True:
            await self._reading.wait()
            message = await self._receive()
            deliver(message, sink)
            if message["type"] == "websocket.disconnect":
                return

    def _outbox_full(self, full: bool) -> None:
        if self._sink is not None:  # else `attach` reports a pause still in force
            self._sink.client_write_paused(full)
        if not full:  # after the sink, so a pause that resuming causes is the last word
            self._reply_blocked = False
            self._update_reading()

    def _client_gone(self) -> None:
        if self._sink is not None:  # else `attach` reports it
            self._sink.client_closed()

    def _update_reading(self) -> None:
        if self._paused_by_relay or self._reply_blocked:
            self._reading.clear()
        else:
            self._reading.set()

    def send_text(self, text: str) -> None:
        if self._outbox.gone:
            raise ClientGoneError
        self._outbox.put({"type": "websocket.send", "text": text})

    def send_bytes(self, data: bytes) -> None:
        if self._outbox.gone:
            raise ClientGoneError
        self._outbox.put({"type": "websocket.send", "bytes": data})

    def reply_text(self, text: str) -> None:
        self.send_text(text)
        if self._outbox.full and not self._reply_blocked:
            self._reply_blocked = True
            self._update_reading()

    async def finish(self) -> None:
        """Stop reading, let the writer send what it holds, and end both tasks.

        The caller bounds this with a timeout; cancelled, it cancels the writer too.
        """
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        await self._outbox.finish()

    def abort_after(self, seconds: float) -> None:
        pass  # the ASGI server owns the socket and its close


class PortableUpstreamLeg:
    """The upstream leg over websockets' public asyncio API: `recv`, `send`, `close`.

    A reader task, started by `attach`, takes each message with `recv()` and hands it to the
    sink; `pause_reading` stops it calling `recv()`. websockets then reads ahead at most its
    `max_queue` messages (`RELAY_UPSTREAM__MAX_QUEUE`) before it stops reading the socket, so
    a paused leg holds a bounded amount. Sends go to an outbox that a writer task drains with
    `send()`, which waits while the socket's write buffer is over its high-water mark; past
    `high` messages waiting, the sink pauses the client. Keepalive and the close handshake are
    websockets' own.
    """

    def __init__(self, connection: ClientConnection, high: int = OUTBOX_HIGH) -> None:
        self.connection = connection
        self._outbox: _Outbox[str] = _Outbox(connection.send, (ConnectionClosed,), high)
        self._outbox.on_full = self._outbox_full
        self._reading = asyncio.Event()
        self._reading.set()
        self._sink: UpstreamSink | None = None
        self._reader: asyncio.Task[None] | None = None
        self._closed: ConnectionClosed | None = None

    @property
    def close_code(self) -> int | None:
        return self.connection.close_code

    @property
    def keepalive_failed(self) -> bool:
        closed = self._closed
        return (
            closed is not None
            and closed.rcvd is None
            and closed.sent is not None
            and closed.sent.code == CloseCode.INTERNAL_ERROR
        )

    def attach(self, sink: UpstreamSink) -> None:
        self._sink = sink
        if self._outbox.full:
            sink.upstream_write_paused(True)
        self._reader = asyncio.create_task(self._read(sink))

    async def _read(self, sink: UpstreamSink) -> None:
        recv, reading = self.connection.recv, self._reading
        try:
            while True:
                if not reading.is_set():
                    await reading.wait()
                message = await recv()
                if isinstance(message, str):
                    sink.upstream_text(message.encode())
                else:
                    sink.upstream_binary(message)
        except ConnectionClosed as exc:
            # Reported once what came before it has been delivered, as the fast leg does; a
            # paused leg learns of it when it is resumed.
            self._closed = exc
            sink.upstream_closed()

    def _outbox_full(self, full: bool) -> None:
        if self._sink is not None:  # else `attach` reports a pause still in force
            self._sink.upstream_write_paused(full)

    def send_text(self, text: str) -> None:
        if self._outbox.gone or self.connection.state is not State.OPEN:
            raise UpstreamGoneError
        self._outbox.put(text)

    def pause_reading(self) -> None:
        self._reading.clear()

    def resume_reading(self) -> None:
        self._reading.set()

    async def close(self, code: int, within: float) -> None:
        """Close within `within` seconds: drop unsent messages, read to the close, abort after."""
        self.resume_reading()  # the close frame may wait behind unread messages
        await self._outbox.cancel()
        connection = self.connection
        try:
            async with asyncio.timeout(within):
                await connection.close(code)
                if self._reader is not None:
                    await asyncio.wait({self._reader})  # delivers the rest, then the close
        except (TimeoutError, OSError):
            # An upstream that stopped reading holds websockets' close in its write; `transport`
            # is the asyncio transport every protocol is handed (no other way to abort).
            connection.transport.abort()
        finally:
            if self._reader is not None and not self._reader.done():
                self._reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._reader
