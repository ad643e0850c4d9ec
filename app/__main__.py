"""`realtime-relay` (or `python -m app`): run the relay under uvicorn with its settings.

With `--demo` and no `OPENAI_API_KEY`, the bundled local upstream (it echoes your speech back)
runs in the same process and the relay points at it; the log and the page say so.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Callable

from app.config import ConfigError, load_settings
from app.logs import configure_logging
from app.main import RelayServer, create_app, server_config
from app.transport.connections import raise_open_file_limit

logger = logging.getLogger("app")


async def _serve(demo: bool) -> None:
    overrides: dict[str, object] = {}
    local = None
    if demo and not os.environ.get("OPENAI_API_KEY"):
        from app.local_upstream import LocalUpstream

        local = LocalUpstream(realtime_pacing=True)
        await local.__aenter__()
        overrides = {
            "openai_api_key": "demo-no-key",
            "upstream": {"url": local.url, "kind": "openai", "demo": True},
        }
    try:
        settings = load_settings(**overrides)
        configure_logging(settings.log_level, settings.log_format)
        if local is not None:
            logger.warning("=" * 72)
            logger.warning("DEMO MODE: OPENAI_API_KEY is not set. The relay talks to the bundled")
            logger.warning("local upstream at %s, which echoes your speech back.", local.url)
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
    except ConfigError as exc:
        sys.exit(f"realtime-relay: {exc}")
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
