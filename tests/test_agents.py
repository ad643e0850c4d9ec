"""An unmodified `@openai/agents` RealtimeSession (Node, WebSocket transport) through the relay.

The agent has no tools of its own; the relay has one server tool, `get_time`, run over HTTP
against a real tool server on loopback. The local upstream calls it when the user's text names
it, and answers "The tool returned: <output>" after the relay sends the output back. The SDK
must complete the turn without ever seeing the call: no function_call event, no tool URL or
secret, and none of its own "Tool ... not found" errors.

Needs Node.js and `npm ci --prefix tests/agents`; `scripts/bootstrap.sh test` installs both.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from app.config import DEFAULT_CLIENT_MAY_SET
from tests.helpers import (
    CLIENT_KEY,
    START_TIMEOUT,
    loopback_socket,
    relay_settings,
    run_node_driver,
    start_server,
)

pytestmark = [pytest.mark.anyio, pytest.mark.node, pytest.mark.timeout(90)]

DRIVER_DIR = Path(__file__).resolve().parent / "agents"
SCRIPT = DRIVER_DIR / "tool_turn.mjs"
DRIVER_TIMEOUT = 45.0  # seconds for the whole Node run (it takes about 2 s)
INSTALL = (
    "run `scripts/bootstrap.sh test` "
    "(or: apt-get install nodejs npm && npm ci --prefix tests/agents)"
)

TOOL_SECRET = "tool-secret"
TOOL_MARKER = "tool-output-5d1c9e"  # in the tool's answer, so the client's answer can be traced
TOOL_PARAMETERS = {
    "type": "object",
    "properties": {"city": {"type": "string", "description": "The city, e.g. Paris"}},
    "required": ["city"],
}
USER_TEXT = "Please get time in Paris."  # names the tool the way the local upstream looks for it

# What the SDK's session.update sets beyond the default tier's fields (agents-realtime 0.20.0,
# `_getMergedSessionConfig` and `_updateTracingConfig`): its instructions, model, both audio
# formats, tool choice and tracing. The default tier ignores those (locked_fields "ignore").
SDK_CLIENT_MAY_SET = [
    *DEFAULT_CLIENT_MAY_SET,
    "instructions",
    "model",
    "tool_choice",
    "tracing",
    "audio.input.format",
    "audio.output.format",
]


@dataclass
class ToolServer:
    """An HTTP tool endpoint on 127.0.0.1 that records each call and answers with JSON."""

    port: int = 0
    calls: list[dict[str, Any]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/tools/get_time"

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        body = b""
        more = True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        headers = {name.decode().lower(): value.decode() for name, value in scope["headers"]}
        self.calls.append(
            {"method": scope["method"], "path": scope["path"], "headers": headers, "body": body}
        )
        try:
            arguments = json.loads(body)["arguments"]  # an object (JSON text also accepted)
            arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
            city = str(arguments.get("city", ""))
        except (ValueError, KeyError, TypeError, AttributeError):
            city = ""
        answer = json.dumps({"city": city, "time": "13:37", "marker": TOOL_MARKER}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": answer})


@contextlib.asynccontextmanager
async def tool_server() -> AsyncIterator[ToolServer]:
    """A `ToolServer` under uvicorn on a pre-bound loopback socket, stopped afterwards."""
    tools = ToolServer()
    sock = loopback_socket()
    tools.port = sock.getsockname()[1]
    config = uvicorn.Config(tools, lifespan="off", log_level="warning")
    server, task = await start_server(config, sock)
    try:
        yield tools
    finally:
        server.should_exit = True
        async with asyncio.timeout(START_TIMEOUT):
            await task
        sock.close()


def driver_command(url: str, text: str) -> list[str]:
    """The node command line, or a failure that says what to install."""
    node = shutil.which("node")
    missing = []
    if node is None:
        missing.append("Node.js (node)")
    if not (DRIVER_DIR / "node_modules" / "@openai" / "agents" / "package.json").is_file():
        missing.append(f"@openai/agents ({DRIVER_DIR / 'node_modules'})")
    if missing:
        pytest.fail(f"missing {', '.join(missing)}: {INSTALL}", pytrace=False)
    return [str(node), str(SCRIPT), url, text]


async def run_driver(command: list[str], client_key: str) -> dict[str, Any]:
    """Run the Node driver, bounded; its JSON summary."""
    env = {**os.environ, "RELAY_TEST_CLIENT_KEY": client_key}
    summary: dict[str, Any] = await run_node_driver(command, DRIVER_TIMEOUT, env)
    return summary


def tool_settings(upstream_url: str, tool_url: str, tier: dict[str, Any]) -> Any:
    """A relay with the `get_time` HTTP tool and one tier (`tier`) for `CLIENT_KEY`."""
    tool = {
        "name": "get_time",
        "description": "The local time in a city",
        "parameters": TOOL_PARAMETERS,
        "http": {"url": tool_url, "headers": {"Authorization": f"Bearer {TOOL_SECRET}"}},
    }
    return relay_settings(
        upstream_url,
        tools=[tool],
        tiers={"agents": tier},
        client_keys={CLIENT_KEY: "agents"},
        anonymous_tier="",
    )


def model_call(record: Any) -> dict[str, Any]:
    """The upstream's (the model's) one `get_time` call: its call id and parsed arguments."""
    done = [e for e in record.sent if e["type"] == "response.function_call_arguments.done"]
    assert len(done) == 1, [event["type"] for event in record.sent]
    assert done[0]["name"] == "get_time"
    return {"call_id": done[0]["call_id"], "arguments": json.loads(done[0]["arguments"])}


@pytest.mark.parametrize(
    "tier",
    [{"client_may_set": SDK_CLIENT_MAY_SET}, {}],
    ids=["tier-allows-the-sdk-session", "default-fields"],
)
async def test_agents_sdk_completes_a_turn_that_used_a_server_tool(upstream, relay_factory, tier):
    """The SDK's turn completes through a hidden server tool: the tool ran, the SDK never saw it."""
    async with tool_server() as tools:
        relay = await relay_factory(tool_settings(upstream.url, tools.url, tier))
        command = driver_command(f"ws://127.0.0.1:{relay.port}/v1/realtime", USER_TEXT)
        seen = await run_driver(command, CLIENT_KEY)

    # The model called the tool, and the tool server got that call with the secret header.
    assert len(upstream.connections) == 1
    record = upstream.connections[0]
    call = model_call(record)
    assert len(tools.calls) == 1, tools.calls
    request = tools.calls[0]
    assert (request["method"], request["path"]) == ("POST", "/tools/get_time")
    assert request["headers"]["authorization"] == f"Bearer {TOOL_SECRET}"
    assert request["headers"]["content-type"].startswith("application/json")
    body = json.loads(request["body"])
    assert body["name"] == "get_time"
    assert body["call_id"] == call["call_id"]
    assert body["tier"] == "agents"
    arguments = body["arguments"]
    arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
    assert arguments == call["arguments"]
    assert set(call["arguments"]) <= set(TOOL_PARAMETERS["properties"]), call

    # The relay gave the output to the model and asked for the follow-up answer.
    outputs = [
        event["item"]
        for event in record.events
        if event["type"] == "conversation.item.create"
        and event["item"].get("type") == "function_call_output"
    ]
    assert [item["call_id"] for item in outputs] == [call["call_id"]]
    assert TOOL_MARKER in outputs[0]["output"]

    # The client's answer carries the tool's output.
    assert TOOL_MARKER in seen["answer"], seen["answer"]
    assert seen["answer"].startswith("The tool returned:"), seen["answer"]

    # It never saw the call, the tool's address or secret, nor ran (or missed) a tool itself.
    shown = json.dumps(seen)
    assert "function_call" not in shown
    assert f"127.0.0.1:{tools.port}" not in shown
    assert TOOL_SECRET not in shown
    assert seen["toolEvents"] == []
    assert "not found" not in json.dumps(seen["errors"]).lower()
    # No error at all, on either tier: the default tier ignores the fields it locks (issue 15).
    assert seen["errors"] == [], [error_code(error) for error in seen["errors"]]
    updates = [event for event in record.events if event["type"] == "session.update"][1:]
    assert updates, "the SDK's session.update reached the upstream"
    voices = [u["session"].get("audio", {}).get("output", {}).get("voice") for u in updates]
    assert "cedar" in voices  # its legitimate choice went through
    if not tier:  # and what the tier locks did not
        assert "AGENT INSTRUCTIONS" not in json.dumps(updates)


def error_code(emission: Any) -> str | None:
    """The relay's `error.code` inside one of the SDK session's `error` emissions, if any."""
    if not isinstance(emission, dict):
        return None
    inner = emission.get("error")
    while isinstance(inner, dict):
        if isinstance(inner.get("code"), str):
            return str(inner["code"])
        inner = inner.get("error")
    return None
