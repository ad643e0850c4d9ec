"""`realtime-relay` (or `python -m app`): run the relay under uvicorn with its settings.

With `--demo` and no `OPENAI_API_KEY`, the bundled local upstream (it echoes your speech back)
runs in the same process and the relay points at it; the log and the page say so. Unless
RELAY_TOOLS is set, the demo also gets one harmless server tool, `get_time`, served by the relay
itself (`app/api/demo.py`), and, unless RELAY_TIERS is set, a default tier that shows tool calls,
so the page shows a tool round trip. The local upstream is a test and demo tool that the
container image leaves out: there `--demo` without a key stops at start-up with one line saying so.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from app.api.demo import DEMO_TOOL_NAME, demo_tool
from app.config import ConfigError, Settings, load_settings
from app.logs import configure_logging
from app.main import RelayServer, create_app, server_config
from app.transport.connections import raise_open_file_limit

if TYPE_CHECKING:
    from app.local_upstream import LocalUpstream

logger = logging.getLogger("app")


class DemoUnavailableError(Exception):
    """`--demo` without a key, where the local upstream is not installed (the container image)."""


def _local_upstream_class() -> type[LocalUpstream]:
    # Imported here, not at the top: production installs (the image) leave the package out.
    try:
        from app.local_upstream import LocalUpstream
    except ModuleNotFoundError as exc:
        missing = exc.name or "app.local_upstream"
        raise DemoUnavailableError(
            f"--demo needs the local upstream, which is not installed here ({missing} is "
            "missing); set OPENAI_API_KEY to use OpenAI"
        ) from None
    return LocalUpstream


def _loopback_url(host: str, port: int) -> str:
    """How the relay reaches itself over HTTP when it listens on `host`:`port`."""
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def with_demo_tool(settings: Settings, **overrides: Any) -> Settings:
    """`settings` plus the demo's `get_time` tool, unless the user configured tools.

    The tool calls the relay's own demo route, so it needs the relay's port in advance (not 0).
    Unless the user configured tiers, the default tier shows tool calls, so the page can show
    the call (`overrides`: what `settings` were loaded with).
    """
    if "tools" in settings.model_fields_set or settings.port == 0:
        return settings
    if any(tool.get("name") == DEMO_TOOL_NAME for tool in settings.session.tools):
        return settings  # a client tool of that name: RELAY_TOOLS may not shadow it
    demo: dict[str, Any] = {"tools": [demo_tool(_loopback_url(settings.host, settings.port))]}
    if "tiers" not in settings.model_fields_set:
        demo["tiers"] = {"default": {"show_tool_calls": True}}
    return load_settings(**overrides, **demo)


async def _serve(demo: bool) -> None:
    overrides: dict[str, object] = {}
    local = None
    if demo and not os.environ.get("OPENAI_API_KEY"):
        # ICE on the machine's own addresses, which a browser reaches, and on loopback, which
        # reaches a machine with no other interface (a browser offers loopback candidates only
        # with a flag: the tests' upstreams use 127.0.0.1 alone).
        local = _local_upstream_class()(realtime_pacing=True, ice_addresses=["auto", "127.0.0.1"])
        await local.__aenter__()
        overrides = {
            "openai_api_key": "demo-no-key",
            "upstream": {"url": local.url, "kind": "openai", "demo": True},
        }
    try:
        settings = load_settings(**overrides)
        if local is not None:
            settings = with_demo_tool(settings, **overrides)
        configure_logging(settings.log_level, settings.log_format)
        if local is not None:
            logger.warning("=" * 72)
            logger.warning("DEMO MODE: OPENAI_API_KEY is not set. The relay talks to the bundled")
            logger.warning("local upstream at %s, which echoes your speech back.", local.url)
            if any(tool.name == DEMO_TOOL_NAME for tool in settings.tools):
                logger.warning('Type "get time in Paris" on the page to see a server tool run.')
            logger.warning("Set OPENAI_API_KEY to talk to OpenAI.")
            logger.warning("=" * 72)
        raise_open_file_limit()  # before server_config derives the connection cap from it
        app = create_app(settings)
        server = RelayServer(server_config(app, settings), app.state.relay, settings.drain_seconds)
        await server.serve()
    finally:
        if local is not None:
            await local.__aexit__(None, None, None)


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:  # uvloop is optional (no Windows build); asyncio's loop works too
        return None
    return uvloop.new_event_loop


def main() -> None:
    parser = argparse.ArgumentParser(prog="realtime-relay", description=__doc__)
    parser.add_argument(
        "--demo",
        action="store_true",
        help="without OPENAI_API_KEY, use the bundled local echo upstream",
    )
    args = parser.parse_args()
    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            runner.run(_serve(args.demo))
    except (ConfigError, DemoUnavailableError) as exc:
        sys.exit(f"realtime-relay: {exc}")
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
