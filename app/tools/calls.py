"""What a server tool call is, and the outputs it can end with.

A call is the model's `function_call` item as the session core hands it over: its `call_id`,
the `name` the model used and its `arguments`, a JSON string the model wrote (REALTIME.md §7).
Whatever happens, the call ends with a `ToolResult`: an output string for the
`function_call_output` item, and the `ToolOutcome` it is counted under. A failed call's output
is a small JSON object, `{"error": "..."}`, that the model can read and speak about.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from app.codes import ToolOutcome


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A call the model made to a server tool.

    Attributes:
        call_id: the `call_id` of the model's `function_call` item.
        name: the tool's name as the model used it (an MCP tool's injected name).
        arguments: the arguments as the model wrote them: JSON text, not yet parsed.
    """

    call_id: str
    name: str
    arguments: str


@dataclass(frozen=True, slots=True)
class ToolContext:
    """The session a call comes from, passed on to HTTP tools.

    Attributes:
        session_id: the relay's id of the session.
        tier: the session's tier.
        client: the client's identity (a JWT's `sub`), when it has one.
    """

    session_id: str
    tier: str
    client: str | None


@dataclass(frozen=True, slots=True)
class ToolResult:
    """How a call ended: the output the model gets, and the outcome it is counted under."""

    output: str
    outcome: ToolOutcome


def failure(outcome: ToolOutcome, message: str) -> ToolResult:
    """A failed call's result: `{"error": message}` for the model."""
    return ToolResult(json.dumps({"error": message}, ensure_ascii=False), outcome)


INVALID_ARGUMENTS = failure(ToolOutcome.INVALID_ARGUMENTS, "the arguments are not a JSON object")
TIMED_OUT = failure(ToolOutcome.TIMEOUT, "the tool timed out")
UNAVAILABLE = failure(ToolOutcome.UNAVAILABLE, "the tool is unavailable")


def parse_arguments(text: str) -> dict[str, Any] | None:
    """The model's arguments as a dict, or None unless they are a JSON object."""
    try:
        value = json.loads(text)
    except (ValueError, TypeError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def compact_json(value: Any) -> str:
    """`value` as compact JSON text (non-ASCII kept: the model reads it as text)."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def capped(result: ToolResult, limit: int) -> ToolResult:
    """`result` with its output cut to `limit` characters, marked as cut, if it is longer.

    The mark is a line at the end, so the output stays within `limit` exactly and the model
    knows it did not see everything. A cut successful output is counted as `truncated`; a cut
    error keeps its outcome.
    """
    if len(result.output) <= limit:
        return result
    mark = f"\n[output truncated to {limit} characters]"
    outcome = ToolOutcome.TRUNCATED if result.outcome is ToolOutcome.OK else result.outcome
    return ToolResult(result.output[: max(limit - len(mark), 0)] + mark, outcome)
