"""A small GA Realtime upstream for tests and key-less demos (`python -m app.local_upstream`).

It speaks the GA dialect of OpenAI's Realtime WebSocket API (REALTIME.md) closely enough to test
the relay end to end: handshake and auth in the OpenAI and Azure GA forms, `session.update`,
input audio with an energy VAD, conversation items, streamed responses that echo the user's audio,
function calls with arguments taken from the user's words, cancellation, truncation, usage, and
fault knobs (refused handshakes, crashes, delays). Every client and server event is recorded per
connection.

    async with LocalUpstream(api_key="sk-test") as up:
        ...  # connect to f"{up.url}?model=gpt-realtime"
        record = await up.wait_for_connection()

Modules: `server` (handshake, records), `session` (client events), `response` (streaming),
`arguments` (tool-call arguments), `session_config` (session object), `conversation` (items,
tokens), `vad`, `pcm`, `events`.
"""

from app.local_upstream.config import LocalUpstreamConfig
from app.local_upstream.server import ConnectionRecord, LocalUpstream

__all__ = ["ConnectionRecord", "LocalUpstream", "LocalUpstreamConfig"]
