"""WebSocket frames on the data plane (RFC 6455 §5): a reader for client frames, and writers.

websockets' sans-I/O protocol parses each frame through a chain of generators and builds a
`Frame` object for it; on the relay's hot path that was the largest share of the CPU left after
the callbacks (docs/design.md, "Why the fast path exists"). Once a connection is open, the data
plane reads and writes its data frames here instead, and leaves everything else to websockets:

- `ClientFrameReader` parses what a client sends: masked text, binary and continuation frames,
  pings and pongs. At the first frame it does not handle (a close, reserved bits as compression
  sets, an unmasked or malformed frame, one over the size limit) it hands that frame and all
  that follows to websockets' protocol, which closes the connection with the right code, and is
  not used again. websockets' parser therefore only ever sees whole frames from a boundary on.
  Its owner can pause it between two frames (`paused`): what is left of the data waits in its
  buffer until `resume()`, so a client whose every frame makes the relay write something (an
  `error` event, a pong) cannot make it write more while the client is not reading.
- `server_frame` builds an unmasked frame (relay -> client); `masked_frame` builds masked ones
  (relay -> upstream, §5.3). Their masking keys come from the OS's CSPRNG 4 KiB at a time
  rather than one `getrandom` call per frame: each key is still unpredictable to the peers, which
  is what §10.3 asks of it.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from typing import Final

try:
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover - websockets built without its C extension
    from websockets.utils import apply_mask

TEXT: Final = 0x1
BINARY: Final = 0x2
PING: Final = 0x9
PONG: Final = 0xA
_CONTINUATION: Final = 0x0
_FIN: Final = 0x80
_MASK_BIT: Final = 0x80
_KEY_POOL_BYTES: Final = 4096


class FrameError(Exception):
    """A client broke the framing in a way the reader must refuse itself (RFC 6455 §7.4.1).

    websockets cannot judge these: it never saw the frames before. `code` is the close code:
    1002 for a protocol error, 1009 for a message over the size limit.
    """

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class ClientFrameReader:
    """Parses masked client frames into messages, handing everything else to websockets.

    Args:
        max_size: the largest message accepted, in bytes.
        max_fragments: the most frames one message may be split into: each costs bookkeeping
            whatever its payload, so a flood of tiny or empty fragments is bounded by count.
        on_message: called with (TEXT or BINARY, payload) for each complete message.
        on_control: called with (PING or PONG, payload).
        on_handoff: called once with the bytes from the first frame the reader does not handle
            on; the owner feeds them, and all later data, to websockets' protocol.
    """

    __slots__ = (
        "_buffer", "_needed", "_fragments", "_fragment_opcode", "_size", "_max_size",
        "_max_fragments", "handed_off", "paused", "_on_message", "_on_control", "_on_handoff",
    )  # fmt: skip

    def __init__(
        self,
        max_size: int,
        max_fragments: int,
        on_message: Callable[[int, bytes], None],
        on_control: Callable[[int, bytes], None],
        on_handoff: Callable[[bytes], None],
    ) -> None:
        # An incomplete frame, and how many bytes it needs before parsing is worth trying again:
        # a large frame trickling in small reads is appended, not re-copied at each read.
        self._buffer = bytearray()
        self._needed = 0
        self._fragments: list[bytes] = []
        self._fragment_opcode = 0
        self._size = 0
        self._max_size = max_size
        self._max_fragments = max_fragments
        self._on_message, self._on_control, self._on_handoff = on_message, on_control, on_handoff
        self.handed_off = False
        self.paused = False  # set by the owner: stop before the next frame, keep the rest

    def feed(self, data: bytes) -> None:
        """Parse `data` and what was buffered before it; keep an incomplete frame for later.

        While `paused`, the data is only buffered. The buffer is bounded by the transport: the
        owner stops reading the socket while it pauses the reader.

        Raises:
            FrameError: a frame websockets could not judge: a new message inside a fragmented
                one (1002), a continuation over `max_size`, fragments over `max_size` in all or
                more than `max_fragments` of them (1009).
        """
        if self._buffer or self.paused:
            self._buffer += data
            if len(self._buffer) < self._needed or self.paused:
                return
            data = bytes(self._buffer)
            self._buffer = bytearray()
        end = len(data)
        at = 0
        needed = 2
        while end - at >= 2:
            if self.paused:  # a callback asked to stop: the rest waits for `resume`
                needed = 0
                break
            first, second = data[at], data[at + 1]
            length = second & 0x7F
            start = at + 6  # 2 header bytes, then the 4-byte key
            if length == 126:
                if end - at < 4:
                    needed = 4
                    break
                (length,) = struct.unpack_from("!H", data, at + 2)
                start += 2
            elif length == 127:
                if end - at < 10:
                    needed = 10
                    break
                (length,) = struct.unpack_from("!Q", data, at + 2)
                start += 8
            opcode = first & 0x0F
            if (
                first & 0x70  # reserved bits: an extension the reader does not know
                or not second & _MASK_BIT  # §5.1: a client must mask every frame
                or length > self._max_size
                or (opcode > BINARY and (opcode not in (PING, PONG) or length > 125))
                or (opcode > BINARY and not first & _FIN)
            ):
                if self._fragments and opcode <= BINARY:
                    if opcode == _CONTINUATION and length > self._max_size:
                        raise FrameError(1009, f"a message over {self._max_size} bytes")
                    raise FrameError(1002, "a frame the reader cannot join to a message")
                self._hand_off(data[at:])
                return
            if end - start < length:
                needed = start + length - at
                break
            payload = apply_mask(data[start : start + length], data[start - 4 : start])
            if opcode > BINARY:
                self._on_control(opcode, payload)
            elif first & _FIN and opcode and not self._fragments:
                self._on_message(opcode, payload)
            elif opcode == _CONTINUATION and not self._fragments:
                self._hand_off(data[at:])  # websockets refuses a continuation of nothing: 1002
                return
            else:
                self._fragment(opcode, first & _FIN, payload)
            at = start + length
        if at < end:
            self._buffer += data[at:]
            self._needed = needed

    def resume(self) -> None:
        """Clear `paused` and parse what waited; may pause again (see `feed`)."""
        self.paused = False
        if self._buffer and not self.handed_off:
            self._needed = 0
            self.feed(b"")

    def _fragment(self, opcode: int, fin: int, payload: bytes) -> None:
        """Collect one frame of a fragmented message (§5.4)."""
        if opcode:
            if self._fragments:
                raise FrameError(1002, "a new message inside a fragmented one")
            self._fragment_opcode = opcode
        self._size += len(payload)
        if self._size > self._max_size:
            raise FrameError(1009, f"a message over {self._max_size} bytes")
        if len(self._fragments) >= self._max_fragments:
            raise FrameError(1009, f"a message in more than {self._max_fragments} frames")
        self._fragments.append(payload)
        if fin:
            message = b"".join(self._fragments)
            self._fragments, self._size = [], 0
            self._on_message(self._fragment_opcode, message)

    def _hand_off(self, rest: bytes) -> None:
        self.handed_off = True
        self._buffer = bytearray()
        self._on_handoff(rest)


def _header(opcode: int, length: int, mask_bit: int) -> bytes:
    if length < 126:
        return bytes((_FIN | opcode, mask_bit | length))
    if length < 0x10000:
        return struct.pack("!BBH", _FIN | opcode, mask_bit | 126, length)
    return struct.pack("!BBQ", _FIN | opcode, mask_bit | 127, length)


def server_frame(opcode: int, payload: bytes) -> bytes:
    """An unmasked, unfragmented frame, as a server sends (§5.1)."""
    return _header(opcode, len(payload), 0) + payload


class _MaskingKeys:
    """Fresh 4-byte masking keys, drawn from `os.urandom` a pool at a time (process-wide)."""

    __slots__ = ("_pool", "_at")

    def __init__(self) -> None:
        self._pool = b""
        self._at = 0

    def take(self) -> bytes:
        at = self._at
        if at == len(self._pool):
            self._pool, at = os.urandom(_KEY_POOL_BYTES), 0
        self._at = at + 4
        return self._pool[at : at + 4]


_keys = _MaskingKeys()


def masked_frame(opcode: int, payload: bytes) -> bytes:
    """A masked, unfragmented frame with a fresh key, as a client sends (§5.3)."""
    key = _keys.take()
    return _header(opcode, len(payload), _MASK_BIT) + key + apply_mask(payload, key)
