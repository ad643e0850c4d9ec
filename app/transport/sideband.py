"""A WebRTC call's sideband: the session core's adapter when the client's events bypass the relay.

A WebRTC client's audio and data-channel events travel between the browser and the upstream
directly (https://developers.openai.com/api/docs/guides/realtime-webrtc); the relay holds the
call's control socket, the "sideband" (`?call_id=`,
https://developers.openai.com/api/docs/guides/realtime-server-controls), on which it sees the
session's server events and sends its own. `Sideband` is the core's `Decisions` port for that
socket: what the core sends upstream goes on it; what the core would show or reply to the client
is dropped, as the client reads the upstream itself. The core still counts usage, runs the server
tools, keeps the budgets and deadlines, and puts back what the client changed of the server's
session (`core.watch`); how the call ends is the caller's to carry out (it hangs up).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from app.core.session import Ending
from app.errors import UpstreamClosedError
from app.transport.driver import CoreDriver, CoreFactory, Log, ToolRunner
from app.transport.legs import UpstreamGoneError, UpstreamLeg


class Sideband(CoreDriver):
    """One call's control socket and the core behind it."""

    def __init__(
        self,
        upstream: UpstreamLeg,
        *,
        session: dict[str, Any],
        core: CoreFactory,
        log: Log,
        run_tool: ToolRunner | None = None,
        tool_concurrency: int = 4,
        on_spent: Callable[[float], None] = lambda usd: None,
    ) -> None:
        self.upstream, self.session = upstream, session
        super().__init__(
            core, log=log, run_tool=run_tool, tool_concurrency=tool_concurrency, on_spent=on_spent
        )

    async def run(self) -> Ending:
        """Run until the core decides how the call ends (a failure it did not foresee raises)."""
        # The call was created with the server's session: it is in place already.
        self.core.start(time.perf_counter(), injected=self.session)
        self.upstream.attach(self)
        try:
            return await self.ended
        finally:
            await self.stop()
            self.upstream.resume_reading()  # for the close handshake

    def failed(self, exc: Exception) -> None:
        if isinstance(exc, UpstreamGoneError):
            self.core.fail(UpstreamClosedError("the call's sideband closed"))
        else:
            super().failed(exc)

    # -- the core's decisions about sockets

    def to_upstream(self, text: str) -> None:
        self.upstream.send_text(text)

    def to_client(self, event_type: str, text: str) -> None:
        pass  # the client has the event already, from the upstream

    def reply(self, text: str) -> None:
        pass  # the client's events never pass through the relay: nothing to answer

    def flush_input(self) -> None:
        pass  # the call's audio is RTP, never the relay's

    def opened(self) -> None:
        pass  # no client socket to read

    # -- the sideband socket (legs.UpstreamSink)

    def upstream_binary(self, data: bytes) -> None:
        self.log.warning("dropped a binary frame from the sideband")

    def upstream_closed(self) -> None:
        if self.ended.done():
            self.settled()
            return
        upstream = self.upstream
        self.core.upstream_closed(
            upstream.close_code, keepalive_failed=upstream.keepalive_failed, client_slow=False
        )

    def upstream_write_paused(self, paused: bool) -> None:
        pass  # the relay's own events are few (tool outputs, restores): nothing to hold back
