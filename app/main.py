"""The ASGI application: `create_app(settings)`, and `app` for `uvicorn app.main:app`.

The lifespan opens the shared clients (the limiter) and closes them; `/ws` and `/v1/realtime`
are the relay (`relay.py`), `/metrics` the Prometheus scrape, `/healthz` and `/readyz` the
probes, and `/` the bundled page from `static/` (found next to the code, not the working dir).
"""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import signal
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST

from app.api.admin import admin_router
from app.api.calls import calls_router
from app.api.client_secrets import client_secrets_router
from app.api.demo import demo_router
from app.audio.wire import OUTPUT_CODECS
from app.auth.credentials import credential_from
from app.config import Settings, load_settings
from app.errors import RelayError
from app.limits import make_limiter
from app.limits.spend import make_spend_store
from app.logs import configure_logging, guard_wire_logs
from app.metrics import RelayMetrics
from app.tools import Toolbox
from app.transport import fast
from app.transport.relay import Receive, Relay, Scope, Send

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"


VOICES = ("alloy", "ash", "ballad", "coral", "echo", "sage", "shimmer", "verse", "marin", "cedar")


def session_options(settings: Settings, tier: str) -> dict[str, Any]:
    """The body of `GET /v1/relay/options`: a tier's choices, for clients such as the page."""
    tier_settings = settings.tiers[tier]
    may_set = tier_settings.client_may_set
    session = settings.session
    return {
        "tier": tier,
        "models": settings.tier_models(tier),
        "client_may_set": may_set,
        "voices": list(VOICES) if "audio.output.voice" in may_set else [session.voice],
        "voice": session.voice,
        "turn_detection": session.turn_detection,
        "demo": settings.upstream.demo,
        "input_codecs": ["pcm16", "opus", "g711_ulaw", "g711_alaw"],
        "output_codecs": list(OUTPUT_CODECS),
        # Transcription-only sessions (`/ws?intent=transcription`), for live captions.
        "transcription": tier_settings.transcription_sessions and session.transcription is not None,
        # How the tier's clients may connect: `/ws`, and WebRTC calls (`/v1/realtime/calls`).
        "transports": ["websocket", "webrtc"] if tier_settings.webrtc else ["websocket"],
    }


RELAY_PATHS = frozenset({"/ws", "/v1/realtime"})


class RelayApp:
    """The ASGI app: WebSockets on `RELAY_PATHS` go straight to the relay, the rest to FastAPI.

    Starlette's middleware wraps `send` for every scope; sending each relayed frame through it
    cost about 5% of the relay's CPU under load, so the relay's sockets bypass it.
    """

    def __init__(self, api: FastAPI, relay: Relay) -> None:
        self.api = api
        self.relay = relay
        self.state = api.state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket" and scope["path"] in RELAY_PATHS:
            await self.relay(scope, receive, send)
        else:
            await self.api(scope, receive, send)


def create_app(settings: Settings | None = None) -> RelayApp:
    """Build the relay app. Without `settings`, they are read from the environment."""
    settings = settings if settings is not None else load_settings()
    # Here, not only in configure_logging: whoever configures logging, no level logs a key.
    guard_wire_logs()
    logger.debug("websockets' DEBUG lines (handshake headers, frames) are left out of the logs")
    metrics = RelayMetrics(settings)
    toolbox = Toolbox(settings, metrics)
    spend = make_spend_store(settings)
    relay = Relay(settings, metrics, make_limiter(settings), toolbox, spend)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        if settings.upstream.demo:
            logger.warning(
                "DEMO MODE: no OPENAI_API_KEY; sessions go to the local echo upstream at %s",
                settings.upstream.url,
            )
        await toolbox.start()  # lists the MCP servers' tools; bounded, never raises
        try:
            yield {"relay": relay}
        finally:
            await relay.end_calls()  # before the clients they use are closed
            await toolbox.aclose()
            await spend.aclose()
            await relay.limiter.aclose()
            await relay.upstream.aclose()

    app = FastAPI(title="realtime-relay", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.relay = relay

    @app.get("/v1/relay/options")
    async def options(request: Request) -> JSONResponse:
        """What the caller's tier may use: models, changeable fields, voices, codecs."""
        try:
            credential = credential_from(request.headers.raw, ())
            identity = relay.auth.authenticate(credential)
        except RelayError as exc:
            body = {"error": {"code": exc.code, "message": exc.message}}
            return JSONResponse(body, status_code=401)
        return JSONResponse(session_options(settings, identity.tier))

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        if relay.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        if not await relay.limiter.ready():
            return JSONResponse({"status": "limiter unavailable"}, status_code=503)
        return JSONResponse({"status": "ready"})

    app.include_router(client_secrets_router(relay.auth, settings))
    app.include_router(calls_router(relay))
    app.include_router(admin_router(settings, spend))
    if settings.upstream.demo:  # the demo's get_time tool (app/api/demo.py)
        app.include_router(demo_router())

    @app.get("/metrics", include_in_schema=False)
    async def scrape() -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    if STATIC_DIR.is_dir():
        app.mount("/", StaticFiles(directory=STATIC_DIR, html=True), name="static")
    else:  # a wheel install carries app/ only; the page lives in the source tree or the image
        logger.warning("no %s: the bundled page is not served", STATIC_DIR)
    return RelayApp(app, relay)


def server_config(app: RelayApp, settings: Settings, **overrides: Any) -> uvicorn.Config:
    """Uvicorn's configuration for the relay: one worker, sized frames, no deflate on audio,
    capped connections with a deadline for their request head.

    On a uvicorn or websockets release the tests did not run (`fast.enabled()`), uvicorn's
    stock protocols serve instead (the portable path: no direct leg, cap or deadline), and one
    warning says so."""
    # Uvicorn's sans-I/O websockets protocol, delivering the relay's messages by callback
    # (fast.py; docs/design.md, "Why the fast path exists").
    fast.warn_if_untested()
    ws: Any = "auto"  # uvicorn's own, on a release the tests did not run
    if fast.enabled():
        ws = fast.DirectWebSocketProtocol.configured(settings.client_max_fragments)
    options: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "lifespan": "on",
        "log_config": None,  # configure_logging owns the handlers
        # A little above the relay's own limit, so oversized frames get an `error` event first.
        "ws_max_size": settings.client_max_message_bytes + 2**20,
        "ws_per_message_deflate": False,
        "ws": ws,
        "timeout_graceful_shutdown": settings.graceful_shutdown_seconds,
        "proxy_headers": True,
    }
    if settings.tls.certfile is not None:
        # TLS on the relay's own port (RELAY_TLS__*), for clients that reach it directly over
        # wss:// (openai-node's Realtime clients use no other scheme). Behind an ingress: unset.
        options["ssl_certfile"] = settings.tls.certfile
        options["ssl_keyfile"] = settings.tls.keyfile
    options.update(overrides)
    if "http" not in options:
        # Uvicorn's HTTP protocol with RELAY_MAX_CONNECTIONS and RELAY_HANDSHAKE_TIMEOUT_SECONDS
        # (connections.py): uvicorn alone never times out a connection that sends nothing.
        options["http"] = fast.connection_protocol(settings)
    return uvicorn.Config(app, **options)


class RelayServer(uvicorn.Server):
    """Uvicorn with a graceful drain: the first SIGTERM drains the relay before shutting down.

    Uvicorn alone would close every WebSocket with 1012 at once. Here SIGTERM makes `/readyz`
    fail and refuses new sessions at once, warns live ones, closes those left after
    `drain_seconds` with 1012, and only then lets uvicorn shut down. SIGINT, or a second
    SIGTERM, stops at once.
    """

    def __init__(self, config: uvicorn.Config, relay: Relay, drain_seconds: float) -> None:
        super().__init__(config)
        self.relay = relay
        self.drain_seconds = drain_seconds
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain: asyncio.Task[None] | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        # What start-up built lives as long as the process: keep it out of the collector's full
        # passes, which took tens of milliseconds under load.
        gc.collect()
        gc.freeze()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig == signal.SIGTERM and self._drain is None and self._loop is not None:
            self._loop.call_soon_threadsafe(self._start_drain)
            return
        super().handle_exit(sig, frame)

    def _start_drain(self) -> None:
        if self._drain is None:
            self._drain = asyncio.create_task(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        try:
            await self.relay.drain(self.drain_seconds)
        finally:
            self.should_exit = True


@functools.cache
def _note_portable_path() -> None:
    """Say once that `uvicorn app.main:app` is not the relay's own server (uvicorn's CLI may
    build the app twice)."""
    logger.warning(
        "served as an ASGI app (e.g. `uvicorn app.main:app`): sessions run on the portable path "
        "(a task per message each way), with no SIGTERM drain; run `realtime-relay` for the "
        "direct path, the drain and the relay's connection bounds"
    )


def __getattr__(name: str) -> Any:
    """`app` is built on first access, so importing this module reads no environment."""
    if name == "app":
        settings = load_settings()
        configure_logging(settings.log_level, settings.log_format)
        _note_portable_path()
        fast.warn_if_untested()
        return create_app(settings)
    raise AttributeError(name)
