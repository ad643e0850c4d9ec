"""The data plane's frame reader and writers, checked against websockets' frames (no sockets)."""

from __future__ import annotations

import os
import random

import pytest
from websockets.frames import Close, CloseCode, Frame, Opcode
from websockets.streams import StreamReader

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

SIZES = (0, 1, 125, 126, 127, 65_535, 65_536, 200_000)


class Collector:
    """A reader's callbacks, recorded."""

    def __init__(self, max_size: int = 2**20, max_fragments: int = 1024) -> None:
        self.messages: list[tuple[int, bytes]] = []
        self.controls: list[tuple[int, bytes]] = []
        self.handed_off: list[bytes] = []
        self.reader = ClientFrameReader(
            max_size, max_fragments, self._message, self._control, self.handed_off.append
        )

    def _message(self, opcode: int, payload: bytes) -> None:
        self.messages.append((opcode, payload))

    def _control(self, opcode: int, payload: bytes) -> None:
        self.controls.append((opcode, payload))


def client_frame(opcode: Opcode, data: bytes, fin: bool = True) -> bytes:
    """A frame as a client (websockets) writes it: masked."""
    return Frame(opcode, data, fin).serialize(mask=True)


def crafted(first: int, payload: bytes) -> bytes:
    """A masked frame with any first byte: websockets refuses to write invalid ones."""
    key = b"\x01\x02\x03\x04"
    masked = bytes(byte ^ key[i % 4] for i, byte in enumerate(payload))
    if len(payload) < 126:
        return bytes((first, 0x80 | len(payload))) + key + masked
    return bytes((first, 0x80 | 126)) + len(payload).to_bytes(2, "big") + key + masked


def parse(data: bytes, mask: bool) -> Frame:
    """One frame parsed by websockets, as the peer would parse it."""
    reader = StreamReader()
    reader.feed_data(data)
    parser = Frame.parse(reader.read_exact, mask=mask, max_size=None, extensions=[])
    with pytest.raises(StopIteration) as done:
        next(parser)
    frame = done.value.value
    assert isinstance(frame, Frame)
    assert reader.buffer == b"", "the frame is exactly as long as its header says"
    return frame


@pytest.mark.parametrize("size", SIZES)
def test_reader_reads_what_websockets_writes(size):
    """A masked text or binary frame of any length class comes out as its message."""
    payload = os.urandom(size)
    sink = Collector()
    sink.reader.feed(client_frame(Opcode.BINARY, payload) + client_frame(Opcode.TEXT, b"hi"))
    assert sink.messages == [(BINARY, payload), (TEXT, b"hi")]
    assert not sink.handed_off


def test_reader_reassembles_frames_split_anywhere():
    """Messages come out whole and in order however the stream is cut into reads."""
    rng = random.Random(7)
    payloads = [os.urandom(rng.choice(SIZES[:6])) for _ in range(12)]
    stream = b"".join(client_frame(Opcode.BINARY, p) for p in payloads)
    for _ in range(20):
        sink = Collector()
        at = 0
        while at < len(stream):
            step = rng.choice((1, 2, 3, 7, 100, 5000, 70_000))
            sink.reader.feed(stream[at : at + step])
            at += step
        assert sink.messages == [(BINARY, p) for p in payloads]


def test_reader_joins_fragments_with_controls_between():
    """A fragmented message is one message; a ping between its fragments is answered first."""
    sink = Collector()
    sink.reader.feed(
        client_frame(Opcode.TEXT, b'{"type":', fin=False)
        + client_frame(Opcode.PING, b"p1")
        + client_frame(Opcode.CONT, b'"x"', fin=False)
        + client_frame(Opcode.CONT, b"}")
        + client_frame(Opcode.PONG, b"p2")
    )
    assert sink.messages == [(TEXT, b'{"type":"x"}')]
    assert sink.controls == [(PING, b"p1"), (PONG, b"p2")]


@pytest.mark.parametrize(
    "frame",
    [
        client_frame(Opcode.CLOSE, Close(CloseCode.NORMAL_CLOSURE, "bye").serialize()),
        Frame(Opcode.TEXT, b"unmasked").serialize(mask=False),
        crafted(0x80 | 0x40 | 0x1, b"compressed"),  # RSV1, as permessage-deflate sets it
        crafted(0x80 | 0x9, b"x" * 126),
        crafted(0x9, b"fragmented"),
        client_frame(Opcode.CONT, b"no start"),
        crafted(0x80 | 0x3, b""),  # a reserved opcode
    ],
    ids=["close", "unmasked", "rsv1", "long-ping", "fragmented-ping", "lone-cont", "opcode-3"],
)
def test_reader_hands_off_what_it_does_not_handle(frame):
    """From the first frame it does not handle on, every byte goes to websockets, in order."""
    sink = Collector()
    before = client_frame(Opcode.TEXT, b"before")
    after = client_frame(Opcode.TEXT, b"after")
    sink.reader.feed(before + frame + after[:3])
    assert sink.messages == [(TEXT, b"before")]
    assert sink.handed_off == [frame + after[:3]]
    assert sink.reader.handed_off


@pytest.mark.parametrize(
    "frame",
    [client_frame(Opcode.TEXT, b"two"), crafted(0x80 | 0x40 | 0x1, b"compressed")],
    ids=["text", "rsv1-text"],
)
def test_a_new_message_inside_a_fragmented_one_is_a_protocol_error(frame):
    """A data frame where a continuation is due fails with 1002 (websockets never saw the rest)."""
    sink = Collector()
    with pytest.raises(FrameError) as error:
        sink.reader.feed(client_frame(Opcode.TEXT, b"one", fin=False) + frame)
    assert error.value.code == 1002
    assert sink.messages == [] and sink.handed_off == []


def test_a_large_frame_in_small_reads():
    """A frame trickling in small reads comes out whole, once."""
    payload = os.urandom(300_000)
    stream = client_frame(Opcode.BINARY, payload)
    sink = Collector()
    for at in range(0, len(stream), 1448):
        sink.reader.feed(stream[at : at + 1448])
    assert sink.messages == [(BINARY, payload)]


def test_size_limit():
    """One frame over the limit is handed off (websockets closes 1009); fragments raise."""
    sink = Collector(max_size=1000)
    big = client_frame(Opcode.BINARY, b"x" * 1001)
    sink.reader.feed(big)
    assert sink.handed_off == [big]
    sink = Collector(max_size=1000)
    sink.reader.feed(client_frame(Opcode.BINARY, b"x" * 600, fin=False))
    with pytest.raises(FrameError) as error:
        sink.reader.feed(client_frame(Opcode.CONT, b"x" * 600))
    assert error.value.code == 1009


def test_an_oversized_continuation_is_1009():
    """A continuation whose own length is over the limit fails with 1009, not 1002."""
    sink = Collector(max_size=1000)
    sink.reader.feed(client_frame(Opcode.TEXT, b"[", fin=False))
    with pytest.raises(FrameError) as error:
        sink.reader.feed(client_frame(Opcode.CONT, b"x" * 1001))
    assert error.value.code == 1009


@pytest.mark.parametrize("payload", [b"", b"x"])
def test_fragment_count_limit(payload):
    """A message in more frames than `max_fragments`, empty ones included, fails with 1009."""
    sink = Collector(max_fragments=10)
    stream = client_frame(Opcode.TEXT, b"[", fin=False)
    stream += client_frame(Opcode.CONT, payload, fin=False) * 8 + client_frame(Opcode.CONT, b"]")
    sink.reader.feed(stream)  # 10 frames: accepted
    assert sink.messages == [(TEXT, b"[" + payload * 8 + b"]")]
    with pytest.raises(FrameError) as error:
        sink.reader.feed(stream[:-7] + client_frame(Opcode.CONT, payload, fin=False) * 2)
    assert error.value.code == 1009


def test_a_paused_reader_keeps_the_rest_until_resumed():
    """Paused from a callback, the reader stops before the next frame and loses none."""
    sink = Collector()
    delivered: list[bytes] = []

    def message(opcode: int, payload: bytes) -> None:
        delivered.append(payload)
        sink.reader.paused = True  # as a full write buffer does

    sink.reader._on_message = message
    frames = [client_frame(Opcode.TEXT, str(n).encode()) for n in range(5)]
    sink.reader.feed(b"".join(frames) + frames[0][:3])  # and a frame's first bytes
    assert delivered == [b"0"]
    sink.reader.feed(frames[0][3:])  # read while paused: kept, not parsed
    assert delivered == [b"0"]
    for expected in (b"1", b"2", b"3", b"4", b"0"):
        sink.reader.resume()
        assert delivered[-1] == expected
    sink.reader.resume()
    assert len(delivered) == 6


@pytest.mark.parametrize("size", SIZES)
def test_writers_write_what_websockets_reads(size):
    """Server frames parse unmasked and client frames masked, with the payload intact."""
    payload = os.urandom(size)
    frame = parse(server_frame(TEXT, payload), mask=False)
    assert (frame.opcode, frame.fin, frame.data) == (Opcode.TEXT, True, payload)
    frame = parse(masked_frame(BINARY, payload), mask=True)
    assert (frame.opcode, frame.fin, frame.data) == (Opcode.BINARY, True, payload)


def test_masking_keys_are_fresh():
    """Every masked frame has its own key (RFC 6455 §5.3), past the end of a key pool."""
    keys = {masked_frame(TEXT, b"same")[2:6] for _ in range(3000)}
    assert len(keys) > 2990  # 3000 draws of 32 random bits: a repeat is about 0.1% likely
