"""Command line: `python -m app.local_upstream --host 127.0.0.1 --port 8765 [--api-key X]`.

WebRTC calls' ICE candidates stay on 127.0.0.1 unless `--ice-address` says otherwise: a browser
then needs `--allow-loopback-in-peer-connection` (Chromium), or give the machine's own address,
or `--ice-address auto` for every interface but loopback.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal

from app.local_upstream.config import LocalUpstreamConfig
from app.local_upstream.server import LocalUpstream

logger = logging.getLogger("app.local_upstream")


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, configure logging and serve until SIGINT or SIGTERM."""
    parser = argparse.ArgumentParser(
        prog="python -m app.local_upstream",
        description="A local GA Realtime upstream that echoes what it hears.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--api-key", default=None, help="accept only this key (default: any)")
    parser.add_argument(
        "--realtime", action="store_true", help="send answer audio at playback speed"
    )
    parser.add_argument("--audio-delta-ms", type=int, default=100)
    parser.add_argument(
        "--no-asr",
        action="store_true",
        help="placeholder input transcripts instead of PocketSphinx speech recognition",
    )
    parser.add_argument(
        "--ice-address",
        action="append",
        dest="ice_addresses",
        metavar="ADDRESS",
        help="an address for WebRTC calls' ICE candidates (repeatable; default 127.0.0.1; "
        "'auto': every interface but loopback)",
    )
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    config = LocalUpstreamConfig(
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        realtime_pacing=args.realtime,
        audio_delta_ms=args.audio_delta_ms,
        asr=not args.no_asr,
    )
    if args.ice_addresses:
        config.ice_addresses = None if args.ice_addresses == ["auto"] else args.ice_addresses
    asyncio.run(_serve(config))


async def _serve(config: LocalUpstreamConfig) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with LocalUpstream(config):
        # Serving until signalled is the point of the CLI: the one wait without a timeout.
        await stop.wait()
        logger.info("local upstream stopping")


if __name__ == "__main__":
    main()
