"""Settings and fault knobs of the local upstream."""

from __future__ import annotations

from dataclasses import dataclass, field

from app.local_upstream.session_config import DEFAULT_INSTRUCTIONS


@dataclass
class LocalUpstreamConfig:
    """How the local upstream listens, answers and misbehaves.

    The fault knobs are read when they matter (at each handshake or each audio delta), so a test
    may change them on a running server, e.g. `up.refuse_status = 429` between two connections.

    Attributes:
        host: Interface to listen on.
        port: TCP port; 0 picks a free one (read it back from `LocalUpstream.port`).
        api_key: The only credential accepted; `None` accepts any credential, or none.
        instructions: Default instructions announced in `session.created`.
        audio_delta_ms: Duration of audio in each `response.output_audio.delta`.
        realtime_pacing: Send answer audio at playback speed instead of as fast as possible.
        refuse_status: Answer every handshake with this HTTP status and a JSON error body.
        drop_after_audio_deltas: Abort the TCP connection (no close frame) after this many audio
            deltas of a response, as a crashed upstream would.
        session_created_delay: Seconds to wait after the handshake before `session.created`.
        send_session_created: Whether to send `session.created` at all.
        asr: Transcribe input audio with PocketSphinx (`asr.py`) when a session asks for input
            transcription. False sends the placeholder "(1.23 s of speech)" and never loads the
            recognizer: for benchmarks with hundreds of sessions.
        ice_addresses: The addresses a WebRTC call's ICE host candidates are on (loopback by
            default, for tests on one machine); `None`, or the entry "auto", lets aioice use
            every interface but loopback (the demo uses both). It applies to every aiortc peer
            in the process, a test's caller too (`internals.use_ice_addresses`).

    `refuse_status` refuses `POST /v1/realtime/calls` too; `session_created_delay` and
    `send_session_created` apply to WebSocket sessions only.
    """

    host: str = "127.0.0.1"
    port: int = 0
    api_key: str | None = None
    instructions: str = DEFAULT_INSTRUCTIONS
    audio_delta_ms: int = 100
    realtime_pacing: bool = False
    refuse_status: int | None = None
    drop_after_audio_deltas: int | None = None
    session_created_delay: float = 0.0
    send_session_created: bool = True
    asr: bool = True
    ice_addresses: list[str] | None = field(default_factory=lambda: ["127.0.0.1"])
