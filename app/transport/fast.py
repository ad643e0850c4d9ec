"""The fast transport: everything that extends uvicorn's or websockets' internals, and its gate.

Speed and the connection bounds need more than the libraries' public APIs (legs.py explains
the data plane; connections.py the bounds). Every subclass, override and patch of non-public
parts of uvicorn or websockets lives here, and nowhere else:

- `DirectWebSocketProtocol`: uvicorn's sans-I/O WebSocket protocol, offering itself as the
  client leg through the `realtime_relay.direct` ASGI extension (`main.server_config` selects it).
- `guard_uvicorn_protocol`: bounds uvicorn's own sans-I/O protocol behind ASGI `receive`
  (`uvicorn app.main:app`): pongs to a client that does not read, fragments.
- `UpstreamConnection` and `FastUpstreamLeg`: websockets' asyncio client connection handing
  each message to the session as it arrives, and writing frames itself (`frames.py`).
- `connection_protocol`: uvicorn's HTTP protocols (h11, httptools) with the connection cap and
  the request-head deadline.
- `WebSocketProtocol` and `HttpProtocol`, for uvicorn's `--ws` and `--http` options.

All of it is used only when the installed uvicorn and websockets are versions the test suite ran
(`TESTED_UVICORN`, `TESTED_WEBSOCKETS`; `enabled()`). On any other, the relay runs the portable
path, on public APIs only: uvicorn's stock protocols, `legs.AsgiLeg` and
`legs.PortableUpstreamLeg`, and says so once at start-up (`warn_if_untested`).

The table lists exact releases, not minor versions: uvicorn changed the very internals the
direct leg relies on inside one minor series (0.52.1 added the close timer, `disconnected` and
the dropping of messages after a close to the sans-I/O protocol of 0.52.0), and neither library
promises its internals across any release. A release that is not in the table runs the portable
path until the suite has run on it (`scripts/test-versions.sh` takes the versions to install)
and it is added here.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from typing import Any, ClassVar, Final, Literal, cast

import h11
import uvicorn
import websockets.version
from uvicorn.config import HTTP_PROTOCOLS, WS_PROTOCOLS
from uvicorn.importer import import_from_string
from websockets.asyncio.client import ClientConnection
from websockets.frames import CloseCode, Frame, Opcode
from websockets.http11 import Request
from websockets.protocol import State

from app.config import Settings, load_settings
from app.transport.connections import (
    REFUSAL,
    ConnectionGate,
    connection_gate,
    raise_open_file_limit,
)
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
from app.transport.legs import (
    DIRECT_EXTENSION,
    ClientGoneError,
    ClientSink,
    Message,
    ReadPause,
    UpstreamGoneError,
    UpstreamSink,
    deliver,
)

# uvicorn's protocol modules are internals: a release outside the table may have moved them.
# Then `enabled()` is false, and the classes below, built on a stand-in, are never used.
try:
    from uvicorn.protocols.http.h11_impl import H11Protocol
    from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
except ImportError:  # pragma: no cover - no such uvicorn in the supported range
    H11Protocol = WebSocketsSansIOProtocol = asyncio.Protocol  # type: ignore[assignment, misc]
try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # httptools is optional to uvicorn; "auto" then means h11, as in uvicorn
    HttpToolsProtocol = None  # type: ignore[assignment, misc]

logger = logging.getLogger(__name__)

# The releases the suite ran on: the oldest and the newest of each supported range (CI runs
# them with `scripts/test-versions.sh`), and those `make test` installs. Older ones do not fit:
# uvicorn 0.52.0's sans-I/O protocol has no close timer nor `disconnected`, websockets 14.0's
# connections no `close_code`.
TESTED_UVICORN: Final = frozenset({"0.52.1", "0.54.0"})
TESTED_WEBSOCKETS: Final = frozenset({"14.1", "15.0.1", "17.4"})


def untested(
    uvicorn_version: str | None = None, websockets_version: str | None = None
) -> list[str]:
    """The installed libraries (or the versions given) the suite did not run, as "name version"."""
    found = []
    uvicorn_version = uvicorn_version or uvicorn.__version__
    websockets_version = websockets_version or websockets.version.version
    if uvicorn_version not in TESTED_UVICORN:
        found.append(f"uvicorn {uvicorn_version}")
    if websockets_version not in TESTED_WEBSOCKETS:
        found.append(f"websockets {websockets_version}")
    return found


def enabled() -> bool:
    """Whether the fast transport may run: both libraries are versions the suite ran."""
    return not untested()


@functools.cache
def warn_if_untested() -> None:
    """Say once, at start-up, that the portable path serves, and why."""
    found = untested()
    if found:
        logger.warning(
            "%s: not a version this relay's tests ran; serving on the portable path (public APIs "
            "only: no direct data path, connection cap or request-head deadline)",
            " and ".join(found),
        )


# -- the client leg


class DirectWebSocketProtocol(ReadPause, WebSocketsSansIOProtocol):
    """uvicorn's sans-I/O WebSocket protocol, with direct delivery to an attached sink.

    Until `attach`, it is uvicorn's protocol unchanged: the ASGI app's `receive` reads a queue,
    and `send_text` writes at once (the session sends the upstream's first events before it
    reads the client). After, each complete message goes to the sink from `data_received`,
    without the queue and without uvicorn's pause and resume of reading around each message.
    This extends uvicorn's internals (its `queue`, `frames`, flags and keepalive timer).

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
        # What arrived while the session was being set up, and a close or a lost connection
        # (uvicorn queues a `websocket.disconnect` for either).
        while not self.queue.empty():
            deliver(cast(Message, self.queue.get_nowait()), sink)
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
        if self.sink is not None:  # else `attach` reports it
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


def guard_uvicorn_protocol(receive: Callable[..., Any], max_fragments: int) -> None:
    """Bound what uvicorn's own sans-I/O protocol does without the app, when it serves `/ws`.

    Under `uvicorn app.main:app` the client leg is ASGI (`AsgiLeg`), and uvicorn's protocol
    answers pings and joins fragments by itself: a client that sends pings without reading
    would have pongs pile up, and empty fragments would pile up in a list. The ASGI `receive`
    it hands the app is a method of that protocol, so this reaches it: past the write buffer's
    high-water mark a ping stops reading until the buffer drains, and a message in more than
    `max_fragments` frames closes with 1009. Only on the versions the tests ran (`enabled()`);
    any other protocol is left alone.
    """
    protocol = getattr(receive, "__self__", None)
    if type(protocol) is not WebSocketsSansIOProtocol or not enabled():
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


# -- the upstream leg


class UpstreamConnection(ReadPause, ClientConnection):
    """websockets' client connection, handing each data message to a sink as it arrives.

    Pings, pongs, close frames, keepalive and `close()` stay websockets' own; data frames never
    reach its receive queue. What arrives with the handshake, before `attach`, is kept (reading
    stops meanwhile, so at most one read's worth) and handed over by `attach`.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sink: UpstreamSink | None = None
        self._early: list[tuple[Opcode, bytes] | None] = []  # None: the connection was lost
        self._paused_by_relay = False
        self._read_paused = False
        self._fragments: list[bytes] = []
        self._fragmented: Opcode | None = None

    def attach(self, sink: UpstreamSink) -> None:
        self.sink = sink
        if self.paused:  # websockets' flag: the write buffer is over its high-water mark
            sink.upstream_write_paused(True)
        early, self._early = self._early, []
        for message in early:
            if message is None:
                sink.upstream_closed()
            elif message[0] is Opcode.TEXT:
                sink.upstream_text(message[1])
            else:
                sink.upstream_binary(message[1])
        self._update_reading()

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
        sink = self.sink
        if sink is None:
            self._early.append((opcode, data))
            self._update_reading()
        elif opcode is Opcode.TEXT:
            sink.upstream_text(data)
        else:
            sink.upstream_binary(data)

    def send_text(self, text: str) -> None:
        if self.protocol.state is not State.OPEN or self.transport.is_closing():
            raise UpstreamGoneError
        self.transport.write(masked_frame(TEXT, text.encode()))

    @property
    def keepalive_failed(self) -> bool:
        """websockets' keepalive failed the connection: 1011 sent, no close received."""
        sent = self.protocol.close_sent
        return (
            sent is not None
            and sent.code == CloseCode.INTERNAL_ERROR
            and self.protocol.close_rcvd is None
        )

    # -- reading, paused by the relay's flow control, and before `attach` once a message came

    def _update_reading(self) -> None:
        """Pause or resume the socket when the relay's want changes, and only then: apart from
        the pauses websockets makes itself (none once data frames skip its queue)."""
        paused = self._paused_by_relay or bool(self.sink is None and self._early)
        if paused is self._read_paused:
            return
        self._read_paused = paused
        if paused:
            self.transport.pause_reading()
        elif not self.transport.is_closing():
            self.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self.sink is not None:
            self.sink.upstream_closed()
        else:
            self._early.append(None)

    def pause_writing(self) -> None:
        super().pause_writing()
        if self.sink is not None:  # else `attach` reports it
            self.sink.upstream_write_paused(True)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self.sink is not None:
            self.sink.upstream_write_paused(False)


class FastUpstreamLeg:
    """`UpstreamConnection` as an `legs.UpstreamLeg`.

    A separate object because the leg's `close(code, within)` is not websockets' `close(code,
    reason)`; the calls of the hot path are the connection's own bound methods.
    """

    def __init__(self, connection: UpstreamConnection) -> None:
        self.connection = connection
        self.attach = connection.attach
        self.send_text = connection.send_text
        self.pause_reading = connection.pause_reading
        self.resume_reading = connection.resume_reading

    @property
    def close_code(self) -> int | None:
        return self.connection.close_code

    @property
    def keepalive_failed(self) -> bool:
        return self.connection.keepalive_failed

    async def close(self, code: int, within: float) -> None:
        """Close within `within` seconds, whatever state it is in; abort the socket after."""
        connection = self.connection
        connection.resume_reading()  # the close frame may wait behind unread messages
        try:
            async with asyncio.timeout(within):
                await connection.close(code)
        except (TimeoutError, OSError):
            connection.transport.abort()


# -- client connections before any request (connections.py has the limits)


class _Admission(asyncio.Protocol):
    """What the two HTTP protocols share: the cap at `connection_made` and the head deadline.

    The subclass arms the deadline when a request starts (`_await_head`) and disarms it when
    the request head is complete (`_head_received`); uvicorn's keep-alive timer covers the
    idle time between requests.
    """

    gate: ClassVar[ConnectionGate]
    connections: Any  # uvicorn's `server_state.connections`: every open HTTP and WebSocket
    transport: asyncio.Transport
    loop: asyncio.AbstractEventLoop
    cycle: Any  # the request being answered, if any
    _refused: bool = False
    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        cap = self.gate.max_connections
        if cap is not None and len(self.connections) >= cap:
            self._refused = True  # never added to `connections`, never parsed
            self.gate.refuse(self.loop.time())
            # Best effort: if the client's request is already in our socket buffer, the close
            # is a reset and the client may see that instead of the 503. Either way, at once.
            cast(asyncio.Transport, transport).write(REFUSAL)  # uvloop's are not subclasses
            transport.close()
            return
        super().connection_made(transport)
        self._await_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._head_received()
        if not self._refused:
            super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if not self._refused:  # bytes that raced the close
            super().data_received(data)

    def _await_head(self) -> None:
        if self._head_timer is None and not self.transport.is_closing():
            self._head_timer = self.loop.call_later(
                self.gate.handshake_timeout, self._head_timed_out
            )

    def _head_received(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.cycle is not None and not self.cycle.response_complete:
            # HTTP pipelining: uvicorn stops reading while it answers an earlier request, so
            # the rest of this head may be waiting in the socket. Look again later.
            self._await_head()
            return
        if not self.transport.is_closing():
            # No response: like nginx's client_header_timeout, the connection is just closed.
            logger.debug("no request head within %.1f s: closing", self.gate.handshake_timeout)
            self.transport.close()


class _H11Admission(_Admission, H11Protocol):
    """h11's protocol with the cap and the head deadline."""

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._refused or self.transport.get_protocol() is not self:  # upgraded, or refused
            return
        # h11 reports a request only once its head is complete; until then the client is IDLE.
        if self.conn.their_state is h11.IDLE:
            self._await_head()
        else:
            self._head_received()

    def handle_websocket_upgrade(self, event: h11.Request) -> None:
        self._head_received()
        super().handle_websocket_upgrade(event)


if HttpToolsProtocol is not None:

    class _HttpToolsAdmission(_Admission, HttpToolsProtocol):
        """httptools' protocol with the cap and the head deadline."""

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._await_head()  # the first byte of a request (kept-alive ones included)

        def on_headers_complete(self) -> None:
            self._head_received()
            super().on_headers_complete()


Implementation = Literal["auto", "httptools", "h11"]


def _base(implementation: Implementation) -> type[_Admission]:
    if implementation == "h11" or (implementation == "auto" and HttpToolsProtocol is None):
        return _H11Admission
    if HttpToolsProtocol is None:
        raise ValueError("the httptools HTTP protocol needs httptools installed")
    return _HttpToolsAdmission


def connection_protocol(
    settings: Settings, implementation: Implementation = "auto"
) -> type[asyncio.Protocol] | str:
    """The `http=` for uvicorn's config: its HTTP protocol with the settings' limits.

    `implementation` picks the parser as uvicorn's `http=` does ("auto": httptools if installed,
    else h11). On an untested library version, that name itself: uvicorn's stock protocol.
    """
    if not enabled():
        return implementation
    base = _base(implementation)
    gate = connection_gate(settings)
    # A class per server: uvicorn builds protocols from a class, and its limits are the server's.
    return type(base.__name__.lstrip("_"), (base,), {"gate": gate})


# -- uvicorn's command line: `--ws app.transport.fast:WebSocketProtocol` and
#    `--http app.transport.fast:HttpProtocol`


@functools.cache
def _http_protocol() -> type[asyncio.Protocol]:
    raise_open_file_limit()
    protocol = connection_protocol(load_settings())
    if isinstance(protocol, str):  # untested: uvicorn's own class, as `--http auto` gives
        return cast(type[asyncio.Protocol], import_from_string(HTTP_PROTOCOLS[protocol]))
    return protocol


@functools.cache
def _ws_protocol() -> type[asyncio.Protocol]:
    if not enabled():  # uvicorn's own class, as `--ws auto` gives
        return cast(type[asyncio.Protocol], import_from_string(WS_PROTOCOLS["auto"]))
    return DirectWebSocketProtocol.configured(load_settings().client_max_fragments)


def __getattr__(name: str) -> Any:
    """`WebSocketProtocol` and `HttpProtocol`, for uvicorn's `--ws` and `--http`: the direct
    leg and the HTTP protocols with the limits of the `RELAY_` environment, built on first
    access (as `app.main.app` is), so importing this module reads no environment. On an
    untested library version, uvicorn's own, with the start-up warning."""
    if name == "WebSocketProtocol":
        warn_if_untested()
        return _ws_protocol()
    if name == "HttpProtocol":
        warn_if_untested()
        return _http_protocol()
    raise AttributeError(name)
