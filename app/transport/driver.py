"""What every transport adapter of the session core does alike.

An adapter (`pipe.Pipe` for a client WebSocket, `sideband.Sideband` for a WebRTC call's control
socket) builds the session core with itself as the core's `Decisions` port. `CoreDriver` carries
out the decisions that are not about sockets: the timer the core asks for, the server tool calls
it asks to run (each a task, at most `RELAY_TOOL_CONCURRENCY` at once per session, cancelled with
the session), what it spent, and its end, which `ended` resolves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from typing import Final

from app.core.session import Decisions, Ending, SessionCore
from app.errors import UpstreamError

Log = logging.Logger | logging.LoggerAdapter[logging.Logger]
CoreFactory = Callable[[Decisions], SessionCore]  # builds a session's core around its adapter
ToolRunner = Callable[[str, str, str], Awaitable[str]]  # (call id, name, arguments) -> output

_UNAVAILABLE: Final = '{"error": "the tool is not available"}'
_FAILED: Final = '{"error": "the tool failed"}'
_TOO_MANY_CALLS: Final = '{"error": "too many tool calls at once; try again"}'


class CoreDriver(ABC):
    """The core's timer, tool calls, spend reports and end; an adapter adds its sockets."""

    def __init__(
        self,
        core: CoreFactory,
        *,
        log: Log,
        run_tool: ToolRunner | None = None,
        tool_concurrency: int = 4,
        on_spent: Callable[[float], None] = lambda usd: None,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.ended: asyncio.Future[Ending] = self.loop.create_future()
        self.log = log
        self.spent = on_spent
        self._run_tool = run_tool
        self._tool_slots = asyncio.Semaphore(tool_concurrency)
        self._max_tool_calls = 4 * tool_concurrency
        self._tool_tasks: set[asyncio.Task[None]] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._settled: asyncio.Event | None = None
        self.core = core(self)

    def failed(self, exc: Exception) -> None:
        """Something raised while the session ran: a bug, raised by `run`."""
        if not self.ended.done():
            self.ended.set_exception(exc)

    async def stop(self) -> None:
        """After the end: no more timer, and the tool calls' tasks cancelled (bounded)."""
        if not self.ended.done():
            self.ended.cancel()
        if self._timer is not None:
            self._timer.cancel()
        for task in self._tool_tasks:
            task.cancel()
        if self._tool_tasks:  # a session's tasks end with it (bounded: they were cancelled)
            await asyncio.wait(self._tool_tasks, timeout=1.0)

    # -- the upstream's messages (legs.UpstreamSink)

    def upstream_text(self, data: bytes) -> None:
        """An upstream text message, to the core, stamped with its arrival."""
        if self.ended.done():  # the core only counts what the responses in flight cost
            if self.core.settling:
                self._settling_text(data)
            return
        start = time.perf_counter()
        try:
            try:
                text = data.decode()
            except UnicodeDecodeError:
                self.core.fail(UpstreamError("the upstream sent a frame that is not UTF-8"))
                return
            self.core.upstream_text(text, start)
        except Exception as exc:
            self.failed(exc)

    # -- after the end: what the responses in flight cost

    def _settling_text(self, data: bytes) -> None:
        """An upstream message after the end, while the core settles (`SessionCore.settling`)."""
        try:
            self.core.upstream_text(data.decode(errors="replace"), time.perf_counter())
        except Exception as exc:  # the session has ended: nothing left to fail
            self.log.warning("after the end: %s", type(exc).__name__)
        if not self.core.settling:
            self.settled()

    def settled(self) -> None:
        """Nothing more to settle: the core is done, or the upstream is gone."""
        if self._settled is not None:
            self._settled.set()

    async def settle(self, within: float) -> None:
        """After the end, wait (at most `within`) for the responses that were in flight to
        report their usage: what they cost is billed, so it counts."""
        if not self.core.settling:
            return
        self._settled = asyncio.Event()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                await self._settled.wait()

    # -- the core's decisions about sockets: the adapter's

    @abstractmethod
    def to_upstream(self, text: str) -> None: ...
    @abstractmethod
    def to_client(self, event_type: str, text: str) -> None: ...
    @abstractmethod
    def reply(self, text: str) -> None: ...
    @abstractmethod
    def flush_input(self) -> None: ...
    @abstractmethod
    def opened(self) -> None: ...

    # -- the core's decisions that are not about sockets (core.session.Decisions)

    def run_tool(self, call_id: str, name: str, arguments: str) -> None:
        if len(self._tool_tasks) >= self._max_tool_calls:  # running and waiting their turn
            self.log.warning("tool %s: too many calls at once; answered with an error", name)
            self.core.tool_done(call_id, _TOO_MANY_CALLS, time.perf_counter())
            return
        task = self.loop.create_task(self._tool_call(call_id, name, arguments))
        self._tool_tasks.add(task)
        task.add_done_callback(self._tool_tasks.discard)

    async def _tool_call(self, call_id: str, name: str, arguments: str) -> None:
        output = _UNAVAILABLE  # the core runs only the tools the session was given
        if self._run_tool is not None:
            try:
                async with self._tool_slots:
                    output = await self._run_tool(call_id, name, arguments)
            except Exception as exc:  # a bug: the model still gets an answer, the call closes
                self.log.error("tool %s failed: %s", name, type(exc).__name__)
                output = _FAILED
        try:
            self.core.tool_done(call_id, output, time.perf_counter())
        except Exception as exc:
            self.failed(exc)

    def schedule(self, at: float | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if at is not None and not self.ended.done():
            self._timer = self.loop.call_later(max(at - time.perf_counter(), 0.0), self._fire)

    def _fire(self) -> None:
        self._timer = None
        try:
            self.core.timer(time.perf_counter())
        except Exception as exc:
            self.failed(exc)

    def end(self, ending: Ending) -> None:
        if not self.ended.done():
            self.ended.set_result(ending)
