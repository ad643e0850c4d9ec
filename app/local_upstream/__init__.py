"""A small GA Realtime upstream for tests and key-less demos (`python -m app.local_upstream`).

It speaks the GA dialect of OpenAI's Realtime WebSocket API (REALTIME.md) closely enough to test
the relay end to end: handshake and auth in the OpenAI and Azure GA forms, `session.update`,
input audio with an energy VAD, input transcription by a real recognizer (PocketSphinx, when
installed), conversation items, streamed responses that echo the user's audio, function calls
with arguments taken from the user's words, cancellation, truncation, usage, transcription-only
sessions (`?intent=transcription`), and fault knobs (refused handshakes, crashes, delays). Every
client and server event is recorded per connection.

It also answers WebRTC calls (REALTIME.md §15) on the same port: `POST /v1/realtime/calls` with
an SDP offer, the `oai-events` data channel, the caller's audio heard and echoed on the answer's
track, the `?call_id=` sideband WebSocket and `POST .../hangup`. Each call is recorded too.

    async with LocalUpstream(api_key="sk-test") as up:
        ...  # connect to f"{up.url}?model=gpt-realtime", or post an offer to up.calls_url
        record = await up.wait_for_connection()  # or: call = await up.wait_for_call()

Modules: `server` (handshake, records), `session` (client events), `transcription_session`
(the transcription-only kind), `input_audio` (buffer and VAD turns), `transcription` (transcript
events and usage), `asr` (PocketSphinx), `response` (streaming), `arguments` (tool-call arguments),
`session_config` (session objects), `conversation` (items, tokens), `vad`, `pcm`, `events`;
for calls `calls` (HTTP routes), `call` (one call), `media` (its audio tracks), `http` (requests
on the WebSocket port), `internals` (the library internals they need), and `records`.
"""

from app.local_upstream.config import LocalUpstreamConfig
from app.local_upstream.records import CallRecord, ConnectionRecord
from app.local_upstream.server import LocalUpstream

__all__ = ["CallRecord", "ConnectionRecord", "LocalUpstream", "LocalUpstreamConfig"]
