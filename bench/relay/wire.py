"""What the bench's processes agree on: the key, the stamps in `event_id`, event heads, audio."""

from __future__ import annotations

import array
import asyncio
import base64
import math
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
UPSTREAM_KEY = "sk-bench-upstream-0123456789"
MODEL = "gpt-realtime-mini"
RATE = 24_000
STAMP = '"event_id":"t:'
APPEND_HEAD = '{"type":"input_audio_buffer.append","event_id":"t:'
BARE_APPEND = '{"type":"input_audio_buffer.append","audio":"'  # what the relay sends upstream
SID_ID = "sid:"  # event_id of the input_audio_buffer.clear that names a session for the upstream
# Opus mode (issue 5): the relay's query, and the type byte of binary audio frames each way.
OPUS_QUERY = "input_codec=opus&input_rate=48000&output_codec=opus&output_bitrate=32000"
AUDIO_IN = b"\x01"
AUDIO_OUT = 0x02


def tone_b64(ms: int, hz: float = 440.0, phase: int = 0) -> str:
    """Base64 of `ms` of a PCM16 sine tone, as a browser would append it."""
    samples = ms * RATE // 1000
    pcm = array.array(
        "h", (int(8000 * math.sin(2 * math.pi * hz * (phase + i) / RATE)) for i in range(samples))
    )
    return base64.b64encode(pcm.tobytes()).decode("ascii")


def event(event_type: str, body: str = "") -> str:
    """A server event, type first and stamped now: `{"type":..,"event_id":"t:<ns>",<body>}`."""
    tail = "," + body + "}" if body else "}"
    return f'{{"type":"{event_type}","event_id":"t:{time.monotonic_ns()}"{tail}'


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop where it is installed, as the relay runs; asyncio's otherwise."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop
