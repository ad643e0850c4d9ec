"""Server tools (app/tools/): real HTTP tools and real MCP servers on loopback, run by a Toolbox."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import mcp_types
import pytest
import uvicorn
from mcp.server.mcpserver import MCPServer
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from app.codes import ToolOutcome
from app.config import Settings
from app.metrics import RelayMetrics
from app.tools import Toolbox, ToolCall, ToolContext
from app.tools.calls import ToolResult
from app.tools.mcp_tools import MAX_NAME, output, tool_name
from tests.helpers import UPSTREAM_KEY, eventually

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

WAIT = 10.0
HTTP_SECRET = "http-tool-secret-5d1f0c9a"
MCP_SECRET = "mcp-server-secret-83be27f4"
VALID_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
CONTEXT = ToolContext(session_id="session-1", tier="default", client="user-7")


# -- servers on loopback


@dataclass
class Served:
    """An ASGI app under uvicorn on a loopback port."""

    port: int
    server: uvicorn.Server
    task: asyncio.Task[None]

    async def stop(self) -> None:
        self.server.should_exit = True
        async with asyncio.timeout(WAIT):
            await self.task


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., Awaitable[Served]]]:
    """Serves ASGI apps under uvicorn on pre-bound loopback sockets; stops them after the test."""
    running: list[Served] = []

    async def start(app: ASGIApp, port: int = 0) -> Served:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1)
        server = uvicorn.Server(config)
        task = asyncio.create_task(server.serve(sockets=[sock]))
        await eventually(lambda: server.started or task.done())
        if task.done():
            task.result()  # it failed to start: raise its error
        served = Served(sock.getsockname()[1], server, task)
        running.append(served)
        return served

    yield start
    for served in reversed(running):
        if not served.task.done():
            await served.stop()


@dataclass
class ToolServer:
    """An application's tool endpoint: records each request, answers as its path says."""

    requests: list[dict[str, Any]] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    def app(self) -> Starlette:
        async def answer(request: Request) -> Response:
            body = await request.body()
            self.requests.append(
                {
                    "method": request.method,
                    "headers": dict(request.headers),
                    "query": dict(request.query_params),
                    "json": json.loads(body) if body else None,
                }
            )
            kind = request.path_params["kind"]
            if kind == "json":  # spaced out on purpose: the model gets it compact
                city = (self.requests[-1]["json"] or {}).get("arguments", {}).get("city")
                text = json.dumps({"city": city, "sky": "clear", "temp": 21}, indent=2)
                return Response(text, media_type="application/json")
            if kind == "text":
                return PlainTextResponse("sunny, 21 degrees")
            if kind == "notjson":
                return Response("sunny, {not json", media_type="application/json")
            if kind == "fail":
                return PlainTextResponse("a stack trace the model must not see", 500)
            if kind == "slow":
                with anyio.move_on_after(WAIT):
                    await self.release.wait()
                return PlainTextResponse("late")
            if kind == "huge":
                return PlainTextResponse("x" * 100_000)
            return JSONResponse({"query": dict(request.query_params)})

        return Starlette(routes=[Route("/{kind}", answer, methods=["GET", "POST", "PUT"])])


def require_bearer(app: ASGIApp, token: str, seen: list[str]) -> ASGIApp:
    """`app` behind a bearer token check; records the Authorization headers it sees."""
    expected = f"Bearer {token}".encode()

    async def guarded(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            authorization = dict(scope["headers"]).get(b"authorization", b"")
            seen.append(authorization.decode())
            if authorization != expected:
                await PlainTextResponse("unauthorized", 401)(scope, receive, send)
                return
        await app(scope, receive, send)

    return guarded


def weather_mcp() -> MCPServer:
    """An MCP server with a few tools: text, structured, failing, slow, and one not allowed."""
    server = MCPServer("weather")

    @server.tool(description="The weather in a city.")
    def lookup(city: str) -> str:
        return f"sunny in {city}"

    @server.tool(name="forecast.week", description="A week's forecast.")
    def forecast(days: int) -> dict[str, Any]:
        return {"days": days, "sky": "clear"}

    @server.tool(description="Always fails.")
    def broken() -> str:
        raise ValueError("the database is down")

    @server.tool(description="Takes its time.")
    async def slow() -> str:
        await anyio.sleep(WAIT)
        return "late"

    @server.tool(description="Not for the model.")
    def admin() -> str:
        return "you should not see this"

    return server


def legacy_only(app: ASGIApp) -> ASGIApp:
    """`app` as a server from before MCP 2026-07-28: `server/discover` is unknown (HTTP 404),
    so clients fall back to the `initialize` handshake and a stateful session."""

    async def legacy(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and (b"mcp-method", b"server/discover") in scope["headers"]:
            await PlainTextResponse("not found", 404)(scope, receive, send)
            return
        await app(scope, receive, send)

    return legacy


async def serve_mcp(
    serve: Callable[..., Awaitable[Served]],
    seen: list[str],
    port: int = 0,
    legacy: bool = False,
) -> Served:
    app = require_bearer(weather_mcp().streamable_http_app(), MCP_SECRET, seen)
    return await serve(legacy_only(app) if legacy else app, port)


# -- the toolbox


def http_tool(name: str, url: str, **http: Any) -> dict[str, Any]:
    return {
        "name": name,
        "description": f"The {name} tool.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        "http": {"url": url, "headers": {"Authorization": f"Bearer {HTTP_SECRET}"}, **http},
    }


def mcp_server(port: int, token: str = MCP_SECRET, **options: Any) -> dict[str, Any]:
    return {
        "url": f"http://127.0.0.1:{port}/mcp",
        "headers": {"Authorization": f"Bearer {token}"},
        **options,
    }


@dataclass
class Box:
    toolbox: Toolbox
    metrics: RelayMetrics
    settings: Settings

    async def run(self, name: str, arguments: str = "{}", context: ToolContext = CONTEXT) -> str:
        async with asyncio.timeout(WAIT):
            return await self.toolbox.run(ToolCall(f"call-{name}", name, arguments), context)

    def count(self, tool: str, outcome: str) -> float | None:
        labels = {"tool": tool, "outcome": outcome}
        return self.metrics.registry.get_sample_value("realtime_relay_tool_calls_total", labels)

    def names(self, tier: str = "default") -> frozenset[str]:
        return self.toolbox.names(self.settings.tiers[tier])


@pytest.fixture
async def toolbox_factory() -> AsyncIterator[Callable[..., Awaitable[Box]]]:
    """Builds and starts Toolboxes from settings keywords; closes them after the test."""
    started: list[Toolbox] = []

    async def start(**options: Any) -> Box:
        settings = Settings(openai_api_key=UPSTREAM_KEY, **options)
        metrics = RelayMetrics(settings)
        toolbox = Toolbox(settings, metrics)
        started.append(toolbox)
        async with asyncio.timeout(WAIT):
            await toolbox.start()
        return Box(toolbox, metrics, settings)

    yield start
    for toolbox in started:
        async with asyncio.timeout(WAIT):
            await toolbox.aclose()


@pytest.fixture
async def tool_server(
    serve: Callable[..., Awaitable[Served]],
) -> AsyncIterator[tuple[ToolServer, str]]:
    """The application's tool endpoint, and its base URL."""
    endpoint = ToolServer()
    served = await serve(endpoint.app())
    yield endpoint, f"http://127.0.0.1:{served.port}"
    endpoint.release.set()


# -- HTTP tools


async def test_http_tool_gets_the_call_and_the_server_held_header(tool_server, toolbox_factory):
    """An HTTP tool receives the model's arguments, the call's context and the relay's header."""
    endpoint, base = tool_server
    box = await toolbox_factory(tools=[http_tool("weather", f"{base}/json")])

    output = await box.run("weather", '{"city": "Paris"}')

    assert output == '{"city":"Paris","sky":"clear","temp":21}'  # compact JSON
    (request,) = endpoint.requests
    assert request["method"] == "POST"
    assert request["headers"]["authorization"] == f"Bearer {HTTP_SECRET}"
    assert request["json"] == {
        "name": "weather",
        "arguments": {"city": "Paris"},
        "call_id": "call-weather",
        "session_id": "session-1",
        "tier": "default",
        "client": "user-7",
    }
    assert box.count("weather", "ok") == 1


async def test_http_text_answer_is_the_output_as_it_is(tool_server, toolbox_factory):
    """A 2xx text body is the output, unchanged; PUT sends the same JSON body."""
    endpoint, base = tool_server
    box = await toolbox_factory(tools=[http_tool("weather", f"{base}/text", method="PUT")])

    assert await box.run("weather", '{"city": "Oslo"}') == "sunny, 21 degrees"
    assert endpoint.requests[0]["method"] == "PUT"
    assert endpoint.requests[0]["json"]["arguments"] == {"city": "Oslo"}


async def test_http_body_labelled_json_that_is_not_is_passed_as_text(tool_server, toolbox_factory):
    """A 2xx body that claims JSON but does not parse is the output as it is."""
    _, base = tool_server
    box = await toolbox_factory(tools=[http_tool("weather", f"{base}/notjson")])

    assert await box.run("weather") == "sunny, {not json"
    assert box.count("weather", "ok") == 1


async def test_http_get_sends_the_call_as_query_parameters(tool_server, toolbox_factory):
    """A GET tool gets the call's fields as query parameters, the arguments as JSON text."""
    endpoint, base = tool_server
    box = await toolbox_factory(tools=[http_tool("weather", f"{base}/echo", method="GET")])

    output = json.loads(await box.run("weather", '{"city": "Rome"}'))

    assert endpoint.requests[0]["method"] == "GET"
    assert endpoint.requests[0]["headers"]["authorization"] == f"Bearer {HTTP_SECRET}"
    assert output["query"] == {
        "name": "weather",
        "arguments": '{"city":"Rome"}',
        "call_id": "call-weather",
        "session_id": "session-1",
        "tier": "default",
        "client": "user-7",
    }


async def test_http_failures_give_readable_errors_and_are_counted(
    tool_server, toolbox_factory, serve
):
    """A 500, a timeout and a refused connection each give an error output and their outcome."""
    _, base = tool_server
    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        nowhere = f"http://127.0.0.1:{closed.getsockname()[1]}/json"
    box = await toolbox_factory(
        tools=[
            http_tool("failing", f"{base}/fail"),
            http_tool("slow", f"{base}/slow", timeout_seconds=0.3),
            http_tool("gone", nowhere),
        ]
    )

    assert json.loads(await box.run("failing")) == {"error": "the tool failed (HTTP 500)"}
    assert json.loads(await box.run("slow")) == {"error": "the tool timed out"}
    assert json.loads(await box.run("gone")) == {"error": "the tool is unavailable"}

    assert box.count("failing", "error") == 1
    assert box.count("slow", "timeout") == 1
    assert box.count("gone", "unavailable") == 1
    assert box.count("failing", "ok") == 0


async def test_long_output_is_cut_and_says_so(tool_server, toolbox_factory):
    """An output past RELAY_TOOL_MAX_OUTPUT_CHARS is cut to that length and marked."""
    _, base = tool_server
    box = await toolbox_factory(
        tools=[http_tool("huge", f"{base}/huge")], tool_max_output_chars=1000
    )

    output = await box.run("huge")

    assert len(output) == 1000
    assert output.startswith("x" * 900)
    assert output.endswith("\n[output truncated to 1000 characters]")
    assert box.count("huge", "truncated") == 1


async def test_arguments_that_are_not_an_object_are_refused(tool_server, toolbox_factory):
    """Arguments that are not a JSON object never reach the tool: invalid_arguments."""
    endpoint, base = tool_server
    box = await toolbox_factory(tools=[http_tool("weather", f"{base}/json")])

    for arguments in ("[1, 2]", "not json", '"Paris"', ""):
        output = json.loads(await box.run("weather", arguments))
        assert output == {"error": "the arguments are not a JSON object"}

    assert endpoint.requests == []
    assert box.count("weather", "invalid_arguments") == 4


async def test_a_tier_gets_only_its_tools(tool_server, toolbox_factory):
    """Definitions follow the tier's `tools`; a call to a tool outside them is not run."""
    endpoint, base = tool_server
    box = await toolbox_factory(
        tools=[http_tool("weather", f"{base}/text"), http_tool("news", f"{base}/text")],
        tiers={"default": {}, "basic": {"tools": ["weather"]}},
    )
    basic = box.settings.tiers["basic"]

    assert box.toolbox.definitions(basic) == [
        {
            "type": "function",
            "name": "weather",
            "description": "The weather tool.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        }
    ]
    assert box.names() == {"weather", "news"}
    basic_context = ToolContext(session_id="s", tier="basic", client=None)
    output = json.loads(await box.run("news", "{}", basic_context))
    assert output == {"error": "the tool is unavailable"}
    assert endpoint.requests == []
    assert json.loads(await box.run("invented")) == {"error": "the tool is unavailable"}
    assert box.count("other", "unavailable") == 1


# -- MCP tools


async def test_mcp_tools_are_listed_named_and_called(serve, toolbox_factory):
    """An MCP server's allowed tools are injected under unique names and run with its header."""
    seen: list[str] = []
    served = await serve_mcp(serve, seen)
    allowed = ["lookup", "forecast.week", "broken", "slow"]
    box = await toolbox_factory(
        tools=[{"mcp": "weather"}],
        mcp_servers={"weather": mcp_server(served.port, allowed_tools=allowed)},
    )

    definitions = box.toolbox.definitions(box.settings.tiers["default"])
    names = [tool["name"] for tool in definitions]
    assert sorted(names) == [
        "weather__broken",
        "weather__forecast_week",
        "weather__lookup",
        "weather__slow",
    ]
    lookup = next(tool for tool in definitions if tool["name"] == "weather__lookup")
    assert lookup["type"] == "function"
    assert lookup["description"] == "The weather in a city."
    assert lookup["parameters"]["properties"]["city"]["type"] == "string"
    assert box.count("weather__lookup", "ok") == 0  # series exist once listed

    assert await box.run("weather__lookup", '{"city": "Lyon"}') == "sunny in Lyon"
    forecast = await box.run("weather__forecast_week", '{"days": 3}')
    assert json.loads(forecast) == {"days": 3, "sky": "clear"}
    assert seen and all(header == f"Bearer {MCP_SECRET}" for header in seen)
    assert box.count("weather__lookup", "ok") == 1
    assert box.count("weather__forecast_week", "ok") == 1


async def test_mcp_failures_give_readable_errors(serve, toolbox_factory):
    """An MCP error result, bad arguments and a slow tool each give an error output."""
    served = await serve_mcp(serve, [])
    box = await toolbox_factory(
        tools=[{"mcp": "weather"}],
        mcp_servers={"weather": mcp_server(served.port, timeout_seconds=1.0)},
    )

    broken = json.loads(await box.run("weather__broken"))
    assert "broken" in broken["error"]
    missing = json.loads(await box.run("weather__lookup", "{}"))
    assert "city" in missing["error"]
    assert json.loads(await box.run("weather__slow")) == {"error": "the tool timed out"}
    assert json.loads(await box.run("weather__lookup", "[]")) == {
        "error": "the arguments are not a JSON object"
    }

    assert box.count("weather__broken", "error") == 1
    assert box.count("weather__lookup", "error") == 1
    assert box.count("weather__slow", "timeout") == 1
    assert box.count("weather__lookup", "invalid_arguments") == 1
    # The connection outlives a timed-out call.
    assert await box.run("weather__lookup", '{"city": "Nice"}') == "sunny in Nice"


async def test_unreachable_mcp_servers_are_left_out_without_hanging(
    tool_server, serve, toolbox_factory, caplog
):
    """A refused, a silent and an unauthorised MCP server: start() returns, their tools absent."""
    caplog.set_level(logging.WARNING, logger="app.tools")
    _, base = tool_server
    served = await serve_mcp(serve, [])
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        refused_port = closed.getsockname()[1]
    with socket.socket() as silent:  # accepts connections (the backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        box = await toolbox_factory(
            tools=[http_tool("weather", f"{base}/text"), *({"mcp": label} for label in "abc")],
            mcp_servers={
                "a": mcp_server(refused_port),
                "b": mcp_server(silent.getsockname()[1], timeout_seconds=0.5),
                "c": mcp_server(served.port, token="wrong-token"),
            },
        )

    assert box.names() == {"weather"}
    assert await box.run("weather") == "sunny, 21 degrees"
    messages = [record.getMessage() for record in caplog.records]
    for label in "abc":
        assert any(f"MCP server {label!r} unreachable" in message for message in messages)


@pytest.mark.parametrize("legacy", [False, True], ids=["modern", "legacy"])
async def test_a_restarted_mcp_server_is_reconnected(serve, toolbox_factory, legacy):
    """A server restarted between calls answers the next call; one down answers unavailable."""
    served = await serve_mcp(serve, [], legacy=legacy)
    box = await toolbox_factory(
        tools=[{"mcp": "weather"}], mcp_servers={"weather": mcp_server(served.port)}
    )
    arguments = '{"city": "Bern"}'
    assert await box.run("weather__lookup", arguments) == "sunny in Bern"

    # A legacy session is lost with the server: the call is turned away unrun (HTTP 404), and
    # sent again on a new connection.
    await served.stop()
    served = await serve_mcp(serve, [], port=served.port, legacy=legacy)
    assert await box.run("weather__lookup", arguments) == "sunny in Bern"

    await served.stop()
    down = json.loads(await box.run("weather__lookup", arguments))
    assert down == {"error": "the tool is unavailable"}
    assert "weather__lookup" in box.names()  # the last listing stays while it is away

    await serve_mcp(serve, [], port=served.port, legacy=legacy)
    async with asyncio.timeout(WAIT):
        while (output := await box.run("weather__lookup", arguments)) != "sunny in Bern":
            assert json.loads(output) == {"error": "the tool is unavailable"}
            await asyncio.sleep(0.1)
    assert box.count("weather__lookup", "ok") == 3


async def test_secrets_never_reach_logs_or_outputs(tool_server, serve, toolbox_factory, caplog):
    """Tool and MCP headers stay out of every log line (all loggers, DEBUG) and every output."""
    caplog.set_level(logging.DEBUG)
    _, base = tool_server
    served = await serve_mcp(serve, [])
    box = await toolbox_factory(
        tools=[
            http_tool("weather", f"{base}/json"),
            http_tool("failing", f"{base}/fail"),
            {"mcp": "weather"},
            {"mcp": "locked"},
        ],
        mcp_servers={
            "weather": mcp_server(served.port),
            "locked": mcp_server(served.port, token=f"{MCP_SECRET}-wrong"),
        },
    )
    outputs = [
        await box.run("weather", '{"city": "Paris"}'),
        await box.run("failing"),
        await box.run("weather__lookup", '{"city": "Paris"}'),
        await box.run("weather__broken"),
    ]
    await box.toolbox.aclose()

    assert any("tool weather__broken: error in" in record.getMessage() for record in caplog.records)
    for secret in (HTTP_SECRET, MCP_SECRET):
        assert secret not in caplog.text
        assert all(secret not in output for output in outputs)
    assert "stack trace" not in outputs[1]


# -- outputs and names


def test_mcp_results_become_outputs():
    """Content blocks are joined as text, structured-only results are JSON, errors are wrapped."""
    text = mcp_types.TextContent(text="sunny")
    image = mcp_types.ImageContent(data="AAAA", mime_type="image/png")
    page = mcp_types.TextResourceContents(uri="file:///page.txt", text="page text")
    blob = mcp_types.BlobResourceContents(uri="file:///a.bin", blob="AAAA")
    link = mcp_types.ResourceLink(name="doc", uri="https://example.com/doc")
    blocks = [
        text,
        image,
        mcp_types.EmbeddedResource(resource=page),
        mcp_types.EmbeddedResource(resource=blob),
        link,
    ]

    mixed = output(mcp_types.CallToolResult(content=blocks))
    assert mixed == ToolResult(
        "sunny\n[image content, image/png]\npage text\n[binary resource file:///a.bin]\n"
        "[resource https://example.com/doc]",
        ToolOutcome.OK,
    )
    structured = output(mcp_types.CallToolResult(content=[], structured_content={"a": [1, 2]}))
    assert structured == ToolResult('{"a":[1,2]}', ToolOutcome.OK)
    both = mcp_types.CallToolResult(content=[text], structured_content={"result": "sunny"})
    assert output(both).output == "sunny"
    failed = output(mcp_types.CallToolResult(content=[], is_error=True))
    assert failed == ToolResult('{"error": "the tool failed"}', ToolOutcome.ERROR)


def test_mcp_tool_names_are_valid_unique_and_stable():
    """Injected names match OpenAI's pattern, fit in 64 characters and never collide."""
    assert tool_name("docs", "search") == "docs__search"
    assert tool_name("my docs", "find.page") == "my_docs__find_page"

    long = tool_name("a-very-long-server-label", "and_an_even_longer_tool_name_" * 3)
    assert VALID_NAME.match(long) and len(long) == MAX_NAME
    assert long == tool_name("a-very-long-server-label", "and_an_even_longer_tool_name_" * 3)
    other = tool_name("a-very-long-server-label", "and_an_even_longer_tool_name_" * 3 + "2")
    assert other != long and len(other) == MAX_NAME

    first = tool_name("docs", "a.b")
    second = tool_name("docs", "a_b", taken={first})
    assert first == "docs__a_b" and second != first and VALID_NAME.match(second)
