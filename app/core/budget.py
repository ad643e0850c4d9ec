"""A session's spending and response limits, sans-I/O: what it has used, and what it may start.

`Budget` adds up what the upstream's usage reports (`response.done`, transcription completions)
in tokens and USD at the configured prices, and says when the session reaches 80 % of either
limit (one warning) and 100 % (the end). `ResponseGate` decides whether a client's
`response.create` may start one more response: at most `max_concurrent` at once, counting the
ones asked for but not yet created (out-of-band `conversation: "none"` responses included), and
at most `per_minute` started in any 60 s.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from enum import Enum, auto
from typing import Final

WARN_AT: Final = 0.8
# A response asked for but not created within this long is no longer counted as coming (the
# upstream refused it, and said so in an `error` the relay cannot always tie to it).
_PENDING_SECONDS: Final = 10.0


class Reached(Enum):
    """What a session's spending has just reached."""

    WARNING = auto()  # 80 % of a limit: warn once
    LIMIT = auto()  # a limit: the session ends


@dataclass(slots=True)
class Budget:
    """Tokens and USD a session has used, against its tier's limits (None: no limit)."""

    max_tokens: int | None = None
    max_cost_usd: float | None = None
    tokens: int = 0
    cost_usd: float = 0.0
    warned: bool = False

    def add(self, tokens: int, cost_usd: float) -> tuple[Reached, str] | None:
        """Count usage; what it reached, and which limit (`session_tokens`, `session_cost`)."""
        self.tokens += tokens
        self.cost_usd += cost_usd
        shares = []
        if self.max_tokens is not None:
            shares.append((self.tokens / self.max_tokens, "session_tokens"))
        if self.max_cost_usd is not None:
            shares.append((self.cost_usd / self.max_cost_usd, "session_cost"))
        if not shares:
            return None
        share, scope = max(shares)
        if share >= 1.0:
            return Reached.LIMIT, scope
        if share >= WARN_AT and not self.warned:
            self.warned = True
            return Reached.WARNING, scope
        return None


class ResponseGate:
    """How many responses a session may start: at once, and per minute."""

    def __init__(self, max_concurrent: int, per_minute: int | None) -> None:
        self.max_concurrent = max_concurrent
        self.per_minute = per_minute
        self._pending: deque[float] = deque()  # asked for, not yet created: when
        self._started: deque[float] = deque()  # accepted in the last minute: when

    def refusal(self, now: float, active: int) -> str | None:
        """Why one more `response.create` may not start now, or None if it may."""
        pending = self._pending
        while pending and pending[0] <= now - _PENDING_SECONDS:
            pending.popleft()
        if active + len(pending) >= self.max_concurrent:
            return f"at most {self.max_concurrent} response(s) at once"
        if self.per_minute is not None:
            started = self._started
            while started and started[0] <= now - 60.0:
                started.popleft()
            if len(started) >= self.per_minute:
                return f"at most {self.per_minute} responses per minute"
        return None

    def accepted(self, now: float) -> None:
        """A client's `response.create` went upstream."""
        self._pending.append(now)
        if self.per_minute is not None:
            self._started.append(now)

    def created(self) -> None:
        """A response was created upstream (the client's, or one the server started)."""
        if self._pending:
            self._pending.popleft()
