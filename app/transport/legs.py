"""A session's two sockets as message callbacks: how the relay's data plane reads and writes.

The relay's hot path is one event in, one event out. Run as two pump tasks, it paid a task
wake-up per message on each side, and uvicorn's ASGI receive path paused and resumed reading the
client socket around every message; that machinery was most of the relay's CPU per event
(bench/relay_bench.py under py-spy). Here each leg hands every complete message to a sink from
its protocol's `data_received`, and the sink writes to the other leg at once, synchronously.
Flow control is a proxy's (nginx's): when one side's write buffer is over its high-water mark,
the other side stops reading until it drains. (STYLE.md asks for backpressure by awaiting
`send()`; a callback cannot await, and pausing the reader is the same bound without the task.)

- `DirectWebSocketProtocol`: uvicorn's sans-I/O WebSocket protocol (`ws="websockets-sansio"`)
  that offers itself as the client leg through the `realtime_relay.direct` ASGI extension, and
  reads and writes data frames with `frames.py`. `main.server_config` selects it.
- `AsgiLeg`: the same contract over plain ASGI `receive`/`send`, for any other server
  (`uvicorn app.main:app` with its default WebSocket protocol, Hypercorn...), at the cost of a
  task each way.
- `UpstreamConnection`: websockets' asyncio client connection (through its `create_connection`
  hook) handing text messages to a sink instead of its receive queue, and writing masked data
  frames with `frames.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, ClassVar, Final, Protocol, cast

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.asyncio.client import ClientConnection
from websockets.frames import CloseCode, Frame, Opcode
from websockets.http11 import Request
from websockets.protocol import State

from app.transport.frames import (
    BINARY,
    PING,
    PONG,
    TEXT,
    ClientFrameReader,
    FrameError,
    masked_frame,
    server_frame,
)

DIRECT_EXTENSION: Final = "realtime_relay.direct"

Message = MutableMapping[str, Any]


class ClientGoneError(Exception):
    """The client's socket is closed: nothing more can be sent to it."""


class UpstreamGoneError(Exception):
    """The upstream socket is closing or closed: nothing more can be sent to it."""


class ClientSink(Protocol):
    """What a client leg calls, from its protocol callbacks, once a sink is attached."""

    def client_text(self, text: str) -> None: ...
    def client_bytes(self, data: bytes) -> None: ...
    def client_closed(self) -> None: ...
    def client_timed_out(self) -> None: ...
    def client_write_paused(self, paused: bool) -> None: ...


class UpstreamSink(Protocol):
    """What `UpstreamConnection` calls, from its protocol callbacks."""

    def upstream_text(self, data: bytes) -> None: ...
    def upstream_binary(self, data: bytes) -> None: ...
    def upstream_closed(self) -> None: ...
    def upstream_write_paused(self, paused: bool) -> None: ...


class ClientLeg(Protocol):
    """The client's socket as the data plane uses it.

    `attach` delivers the messages that arrived before it, in order, then every later one.
    `send_*` write at once and raise `ClientGoneError` once the client is gone; `reply_text`
    sends what a client frame caused (an `error` event), and stops reading the client while
    such replies wait unread past the leg's bound; `finish` sends
    whatever a leg still holds (only `AsgiLeg` holds anything) before the session closes, and
    `abort_after` bounds how long a closed connection may wait for a client that stopped
    reading (only the direct leg can: under ASGI, the server owns the socket).
    """

    def attach(self, sink: ClientSink) -> None: ...
    def send_text(self, text: str) -> None: ...
    def send_bytes(self, data: bytes) -> None: ...
    def reply_text(self, text: str) -> None: ...
    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    async def finish(self) -> None: ...
    def abort_after(self, seconds: float) -> None: ...


class _RelayReadPause:
    """The upstream's reading, paused and resumed by the relay's flow control: idempotent,
    never on a closing transport, and apart from the pauses the library itself makes."""

    transport: asyncio.Transport
    _paused_by_relay: bool

    def pause_reading(self) -> None:
        if not self._paused_by_relay:
            self._paused_by_relay = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self._paused_by_relay:
            self._paused_by_relay = False
            if not self.transport.is_closing():
                self.transport.resume_reading()


class _ClientReadPause:
    """A client leg's reading, paused by the relay's flow control (the upstream is not reading)
    as well as by the leg's own full output; `_update_reading` weighs both."""

    _paused_by_relay: bool

    def pause_reading(self) -> None:
        self._paused_by_relay = True
        self._update_reading()

    def resume_reading(self) -> None:
        self._paused_by_relay = False
        self._update_reading()

    def _update_reading(self) -> None:
        raise NotImplementedError


class DirectWebSocketProtocol(_ClientReadPause, WebSocketsSansIOProtocol):
    """uvicorn's sans-I/O WebSocket protocol, with direct delivery to an attached sink.

    Until `attach`, it is uvicorn's protocol unchanged: the ASGI app's `receive` reads a queue.
    After, each complete message goes to the sink from `data_received`, without the queue and
    without uvicorn's pause and resume of reading around each message. This extends uvicorn's
    internals (its `queue`, `frames`, flags and keepalive timer), so pyproject.toml pins the
    uvicorn versions the tests ran against.

    Reading stops, between two frames, while the relay's flow control asks (the upstream is not
    reading), and once a client frame makes the relay reply (an `error` event, a pong) while
    this socket's write buffer is over its high-water mark: the replies then wait for the client
    to read instead of piling up in memory. A client that only sends audio while it does not
    read is still read (its audio goes upstream; the upstream pushes back as nginx would), so a
    client that uploads before it reads cannot stall.
    """

    max_fragments: ClassVar[int] = 1024  # `configured` sets the relay's setting

    @classmethod
    def configured(cls, max_fragments: int) -> type[DirectWebSocketProtocol]:
        """This protocol class with the relay's limits, for uvicorn's `ws=` option."""
        return cast(
            type[DirectWebSocketProtocol],
            type(cls.__name__, (cls,), {"max_fragments": max_fragments}),
        )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sink: ClientSink | None = None
        self._paused_by_relay = False  # the relay's flow control
        self._write_blocked = False  # this socket's write buffer is over its high-water mark
        self._reply_blocked = False  # and a client frame made the relay reply meanwhile
        self._reader: ClientFrameReader | None = None  # from the opening of the connection
        self._abort: asyncio.TimerHandle | None = None

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        if reader is None:
            if self.conn.state is not State.OPEN:  # the handshake request: uvicorn's
                super().data_received(data)
                return
            # From here on, frames are read in frames.py. A client sends no frame before the 101
            # (RFC 6455 §4.1); one that did has bytes in websockets' parser, which keeps them.
            max_size = self.config.ws_max_size
            reader = self._reader = ClientFrameReader(
                max_size, self.max_fragments, self._message, self._control, self._hand_off
            )
            reader.handed_off = bool(self.conn.reader.buffer)
            reader.paused = not self._may_read()
        if reader.handed_off:
            super().data_received(data)
            return
        try:
            reader.feed(data)
        except FrameError as exc:
            self._fail(exc.code, exc.reason)

    def _fail(self, code: int, reason: str) -> None:
        self.conn.fail(CloseCode(code), reason)
        self.handle_parser_exception()

    def _hand_off(self, rest: bytes) -> None:
        super().data_received(rest)

    def _message(self, opcode: int, payload: bytes) -> None:
        sink = self.sink
        if sink is not None and not self.close_sent:
            if opcode != TEXT:
                sink.client_bytes(payload)
                return
            try:
                text = payload.decode()
            except UnicodeDecodeError:
                pass  # uvicorn's path below closes with 1007
            else:
                sink.client_text(text)
                return
        self.curr_msg_data_type = "text" if opcode == TEXT else "bytes"
        self.frames = [payload]
        super().send_receive_event_to_app()
        if self.read_paused:  # uvicorn's one message at a time, until the app receives
            self._update_reading()

    def _control(self, opcode: int, payload: bytes) -> None:
        if opcode == PING:
            if self.conn.state is State.OPEN:
                self.transport.write(server_frame(PONG, payload))  # the pong (§5.5.2)
                self._replied()
        else:
            self.handle_pong(Frame(Opcode.PONG, payload))

    def handle_cont(self, event: Frame) -> None:
        """A continuation websockets parsed (after a hand-off): bounded in count as well."""
        if len(self.frames) >= self.max_fragments:
            self._fail(1009, f"a message in more than {self.max_fragments} frames")
            return
        super().handle_cont(event)

    def handle_connect(self, event: Request) -> None:
        super().handle_connect(event)
        if self.response.status_code == 101:  # the ASGI task it started has not run yet
            self.scope["extensions"][DIRECT_EXTENSION] = {"leg": self}

    def attach(self, sink: ClientSink) -> None:
        self.sink = sink
        if self._write_blocked:  # the client was already slow to read
            sink.client_write_paused(True)
        while not self.queue.empty():  # what arrived while the session was being set up
            _deliver(cast(Message, self.queue.get_nowait()), sink)
        self.read_paused = False  # uvicorn's pause, one message at a time, ends here
        self._update_reading()

    async def receive(self) -> Any:
        message = await super().receive()
        self._update_reading()  # uvicorn may have resumed reading the socket
        return message

    async def send(self, message: Any) -> None:
        await super().send(message)
        self._update_reading()  # a close resumes reading the socket, for the close handshake

    def send_receive_event_to_app(self) -> None:
        """A message websockets parsed (after a hand-off) goes the way the reader's do."""
        if self.sink is None or self.close_sent:
            super().send_receive_event_to_app()
            return
        frames = self.frames
        data = frames[0] if len(frames) == 1 else b"".join(frames)
        self.frames = []
        self._message(TEXT if self.curr_msg_data_type == "text" else BINARY, data)

    def send_text(self, text: str) -> None:
        if self.close_sent or self.disconnected or self.conn.state is not State.OPEN:
            raise ClientGoneError
        self.transport.write(server_frame(TEXT, text.encode()))

    def send_bytes(self, data: bytes) -> None:
        if self.close_sent or self.disconnected or self.conn.state is not State.OPEN:
            raise ClientGoneError
        self.transport.write(server_frame(BINARY, data))

    def reply_text(self, text: str) -> None:
        self.send_text(text)
        self._replied()

    async def finish(self) -> None:
        pass  # every send was written at once

    def abort_after(self, seconds: float) -> None:
        """Drop the connection if it is still open in `seconds`.

        A transport's `close()` waits for its buffer to drain, which a client that does not
        read never lets happen: its socket and buffer would be held for good.
        """
        if self._abort is None and not self.disconnected:
            # Never before uvicorn's own close timer, so a slow but reading client gets its close.
            delay = max(seconds, self.close_timeout + 1.0)
            self._abort = self.loop.call_later(delay, self.transport.abort)

    # -- reading, paused by the relay's flow control and by replies the client does not read

    def _may_read(self) -> bool:
        return not (self._paused_by_relay or self._reply_blocked or self.read_paused)

    def _replied(self) -> None:
        """A client frame made the relay reply: past the high-water mark, stop reading."""
        if self._write_blocked and not self._reply_blocked:
            self._reply_blocked = True
            self._update_reading()

    def _update_reading(self) -> None:
        """Read the socket, and parse what waits, only while nothing says stop: the relay's
        flow control, replies the client has not read, or uvicorn's one message at a time
        (before `attach`). uvicorn pauses and resumes the socket itself too, so each change
        of any of them lands here; the transport's pause and resume are idempotent."""
        transport = self.transport
        if transport.is_closing():
            return
        reader = self._reader
        if not self._may_read():
            if reader is not None:
                reader.paused = True  # stops before the next frame of the data in hand
            transport.pause_reading()
            return
        transport.resume_reading()
        if reader is not None and reader.paused and not reader.handed_off:
            try:
                reader.resume()
            except FrameError as exc:
                self._fail(exc.code, exc.reason)

    def pause_writing(self) -> None:
        super().pause_writing()
        self._write_blocked = True
        if self.sink is not None:
            self.sink.client_write_paused(True)

    def resume_writing(self) -> None:
        super().resume_writing()
        self._write_blocked = self._reply_blocked = False
        if self.sink is not None:  # first, so a pause that resuming causes is the last word
            self.sink.client_write_paused(False)
        self._update_reading()

    # -- the end

    def keepalive_timeout(self) -> None:
        """The client did not answer a keepalive ping in time: the session says why.

        uvicorn would close with 1011 and no reason the relay knows of; with a sink attached,
        the session ends with a relay `client_timeout` instead.
        """
        sink = self.sink
        if sink is None or self.close_sent or self.transport.is_closing():
            super().keepalive_timeout()
            return
        self.pong_timer = None
        self.pending_ping_payload = None
        if self._paused_by_relay and not self._reply_blocked:
            # The relay stopped reading the client because the upstream is not reading: the
            # pong may be waiting unread. Not the client's fault; ping again later.
            self.schedule_ping()
            return
        sink.client_timed_out()

    def handle_close(self, event: Frame) -> None:
        super().handle_close(event)
        if self.sink is not None:
            self.sink.client_closed()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self._abort is not None:
            self._abort.cancel()
        if self.sink is not None:
            self.sink.client_closed()


def _deliver(message: Message, sink: ClientSink) -> None:
    text = message.get("text")
    if text is not None:
        sink.client_text(text)
    elif message["type"] == "websocket.disconnect":
        sink.client_closed()
    elif (data := message.get("bytes")) is not None:
        sink.client_bytes(data)


class AsgiLeg(_ClientReadPause):
    """The client leg over ASGI `receive`/`send`: works under any ASGI server.

    A reader task feeds the sink; sends go to an outbox that a writer task drains. While the
    outbox holds more than `high` messages, the sink pauses the upstream, and once a reply
    (`reply_text`) joins the outbox meanwhile, the reader stops taking the client's messages,
    so the outbox stays near `high`. Pings, fragments and keepalive are the server's here
    (`guard_uvicorn_protocol` bounds uvicorn's).
    """

    def __init__(
        self,
        receive: Callable[[], Awaitable[Message]],
        send: Callable[[Message], Awaitable[None]],
        high: int = 64,
    ) -> None:
        self._receive, self._send = receive, send
        self._high, self._low = high, high // 4
        self._outbox: deque[Message] = deque()
        self._ready = asyncio.Event()
        self._reading = asyncio.Event()
        self._reading.set()
        self._sink: ClientSink | None = None
        self._paused_by_relay = False
        self._write_paused = False
        self._reply_blocked = False
        self._gone = False
        self._finishing = False
        self._reader: asyncio.Task[None] | None = None
        self._writer: asyncio.Task[None] | None = None

    def attach(self, sink: ClientSink) -> None:
        self._sink = sink
        self._reader = asyncio.create_task(self._read(sink))
        self._writer = asyncio.create_task(self._write(sink))

    async def _read(self, sink: ClientSink) -> None:
        while True:
            await self._reading.wait()
            message = await self._receive()
            _deliver(message, sink)
            if message["type"] == "websocket.disconnect":
                return

    async def _write(self, sink: ClientSink) -> None:
        outbox = self._outbox
        while True:
            await self._ready.wait()
            while outbox:
                try:
                    await self._send(outbox.popleft())
                except (OSError, RuntimeError):  # uvicorn: ClientDisconnected, or after close
                    self._gone = True
                    sink.client_closed()
                    return
                if self._write_paused and len(outbox) <= self._low:
                    self._write_paused = self._reply_blocked = False
                    sink.client_write_paused(False)
                    self._update_reading()
            if self._finishing:
                return
            self._ready.clear()

    def _queue(self, message: Message) -> None:
        if self._gone:
            raise ClientGoneError
        self._outbox.append(message)
        self._ready.set()
        if not self._write_paused and len(self._outbox) > self._high and self._sink is not None:
            self._write_paused = True
            self._sink.client_write_paused(True)

    def _update_reading(self) -> None:
        if self._paused_by_relay or self._reply_blocked:
            self._reading.clear()
        else:
            self._reading.set()

    def send_text(self, text: str) -> None:
        self._queue({"type": "websocket.send", "text": text})

    def send_bytes(self, data: bytes) -> None:
        self._queue({"type": "websocket.send", "bytes": data})

    def reply_text(self, text: str) -> None:
        self.send_text(text)
        if self._write_paused and not self._reply_blocked:
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
        if self._writer is not None:
            self._finishing = True
            self._ready.set()
            try:
                await self._writer
            finally:
                self._writer.cancel()

    def abort_after(self, seconds: float) -> None:
        pass  # the ASGI server owns the socket and its close


class _Inbox:
    """Holds upstream messages until the data plane attaches (the session's start reads it).

    Past `limit` messages (`RELAY_UPSTREAM__MAX_QUEUE`) the connection stops reading until the
    session takes one.
    """

    def __init__(self, connection: UpstreamConnection, limit: int) -> None:
        self.messages: asyncio.Queue[tuple[Opcode, bytes] | None] = asyncio.Queue()
        self._connection, self._limit = connection, limit

    def _put(self, message: tuple[Opcode, bytes]) -> None:
        self.messages.put_nowait(message)
        if self.messages.qsize() >= self._limit:
            self._connection.pause_reading()

    async def get(self) -> tuple[Opcode, bytes] | None:
        message = await self.messages.get()
        if self.messages.qsize() < self._limit:
            self._connection.resume_reading()
        return message

    def upstream_text(self, data: bytes) -> None:
        self._put((Opcode.TEXT, data))

    def upstream_binary(self, data: bytes) -> None:
        self._put((Opcode.BINARY, data))

    def upstream_closed(self) -> None:
        self.messages.put_nowait(None)

    def upstream_write_paused(self, paused: bool) -> None:
        pass

    def replay(self, sink: UpstreamSink) -> None:
        while not self.messages.empty():
            message = self.messages.get_nowait()
            if message is None:
                sink.upstream_closed()
            elif message[0] is Opcode.TEXT:
                sink.upstream_text(message[1])
            else:
                sink.upstream_binary(message[1])


class UpstreamConnection(_RelayReadPause, ClientConnection):
    """websockets' client connection, handing each data message to a sink as it arrives.

    Pings, pongs, close frames, keepalive and `close()` stay websockets' own. Messages wait in
    an inbox (`next_message`) until `attach`; after, `send_text` writes at once.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._paused_by_relay = False
        limit = self.max_queue[0]
        self._inbox = _Inbox(self, limit if limit is not None else 16)
        self._sink: UpstreamSink = self._inbox
        self._fragments: list[bytes] = []
        self._fragmented: Opcode | None = None

    async def next_message(self) -> tuple[Opcode, bytes] | None:
        """The next message before `attach`: (TEXT or BINARY, payload), or None once closed."""
        return await self._inbox.get()

    def attach(self, sink: UpstreamSink) -> None:
        self._sink = sink
        if self.paused:  # its write buffer was already over the high-water mark
            sink.upstream_write_paused(True)
        self.resume_reading()  # the inbox's pause ends; the sink's flow control takes over
        self._inbox.replay(sink)

    def process_event(self, event: Any) -> None:
        if self.response is None or not isinstance(event, Frame):  # the handshake
            super().process_event(event)
            return
        opcode = event.opcode
        data = cast(bytes, event.data)  # frames parsed off the wire hold bytes
        if opcode is Opcode.TEXT or opcode is Opcode.BINARY:
            if not event.fin:
                self._fragmented, self._fragments = opcode, [data]
                return
        elif opcode is Opcode.CONT and self._fragmented is not None:
            self._fragments.append(data)
            if not event.fin:
                return
            opcode, data = self._fragmented, b"".join(self._fragments)
            self._fragmented, self._fragments = None, []
        else:  # control frames: pongs acknowledge keepalive pings
            super().process_event(event)
            return
        if opcode is Opcode.TEXT:
            self._sink.upstream_text(data)
        else:
            self._sink.upstream_binary(data)

    def send_text(self, text: str) -> None:
        if self.protocol.state is not State.OPEN or self.transport.is_closing():
            raise UpstreamGoneError
        self.transport.write(masked_frame(TEXT, text.encode()))

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._sink.upstream_closed()

    def pause_writing(self) -> None:
        super().pause_writing()
        self._sink.upstream_write_paused(True)

    def resume_writing(self) -> None:
        super().resume_writing()
        self._sink.upstream_write_paused(False)


def __getattr__(name: str) -> Any:
    """`WebSocketProtocol`, for `uvicorn app.main:app --ws app.transport.legs:WebSocketProtocol`:
    the direct leg with the limits of the `RELAY_` environment (read on first access, as
    `app.main.app` is), so uvicorn's CLI gets the same bounds on pings and fragments."""
    if name == "WebSocketProtocol":
        from app.config import load_settings

        return DirectWebSocketProtocol.configured(load_settings().client_max_fragments)
    raise AttributeError(name)


def guard_uvicorn_protocol(receive: Callable[..., Any], max_fragments: int) -> None:
    """Bound what uvicorn's own sans-I/O protocol does without the app, when it serves `/ws`.

    Under `uvicorn app.main:app` the client leg is ASGI (`AsgiLeg`), and uvicorn's protocol
    answers pings and joins fragments by itself: a client that sends pings without reading
    would have pongs pile up, and empty fragments would pile up in a list. The ASGI `receive`
    it hands the app is a method of that protocol, so this reaches it: past the write buffer's
    high-water mark a ping stops reading until the buffer drains, and a message in more than
    `max_fragments` frames closes with 1009. Internals of uvicorn 0.54, like the rest of this
    module; any other protocol is left alone.
    """
    protocol = getattr(receive, "__self__", None)
    if type(protocol) is not WebSocketsSansIOProtocol:
        return
    handle_ping, handle_cont = protocol.handle_ping, protocol.handle_cont
    resume_writing = protocol.resume_writing
    pinged_past_mark = False

    def guarded_ping() -> None:
        nonlocal pinged_past_mark
        handle_ping()
        if not protocol.writable.is_set() and not protocol.transport.is_closing():
            pinged_past_mark = True
            protocol.transport.pause_reading()

    def guarded_resume_writing() -> None:
        nonlocal pinged_past_mark
        resume_writing()
        if pinged_past_mark:
            pinged_past_mark = False
            if not protocol.read_paused and not protocol.transport.is_closing():
                protocol.transport.resume_reading()

    def guarded_cont(event: Frame) -> None:
        if len(protocol.frames) >= max_fragments:
            protocol.conn.fail(CloseCode.MESSAGE_TOO_BIG, f"more than {max_fragments} frames")
            protocol.handle_parser_exception()
            return
        handle_cont(event)

    # Instance attributes: the transport and uvicorn's event loop look these up per call.
    setattr(protocol, "handle_ping", guarded_ping)  # noqa: B010 - a method, not an attribute
    setattr(protocol, "resume_writing", guarded_resume_writing)  # noqa: B010
    setattr(protocol, "handle_cont", guarded_cont)  # noqa: B010
