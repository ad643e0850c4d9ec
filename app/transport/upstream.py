"""The upstream leg: URL forms, headers and auth for OpenAI, Azure and compatible servers.

Everything here is decided once per model (`UpstreamTarget`), so opening a session only formats
nothing and connects. Upstream is always the GA protocol: no `OpenAI-Beta` header is sent
(REALTIME.md §1.1), and Azure's GA path takes `?model=<deployment>` and no `api-version` (§1.4).
Failures of `websockets` are translated here, once, into `UpstreamError`s.

`Upstream.connect` returns the session's upstream leg: the fast one (`fast.FastUpstreamLeg`) on
the library versions the tests ran, else the portable one (`legs.PortableUpstreamLeg`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidHandshake, InvalidStatus

from app.config import Settings, UpstreamKind
from app.errors import UpstreamError, UpstreamRefusedError
from app.transport import fast
from app.transport.legs import PortableUpstreamLeg, UpstreamLeg

USER_AGENT = "realtime-relay/0.1"

# websockets logs handshake headers (the key) and every frame (audio) at DEBUG: this logger
# never emits below INFO, whatever the root level is.
_WIRE_LOGGER = logging.getLogger(f"{__name__}.websocket")
_WIRE_LOGGER.setLevel(logging.INFO)
AZURE_GA_PATH = "/openai/v1/realtime"


@dataclass(frozen=True, slots=True)
class UpstreamTarget:
    """Where and how one model's sessions connect. Holds the key: never log or show it."""

    url: str
    headers: tuple[tuple[str, str], ...]

    def __repr__(self) -> str:  # the headers carry the key
        return f"UpstreamTarget(url={self.url!r})"


def _with_query(url: str, **params: str) -> str:
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k not in params]
    query.extend(params.items())
    return urlunsplit(parts._replace(query=urlencode(query)))


def build_target(settings: Settings, model: str) -> UpstreamTarget:
    """The URL and headers for a session of `model` on the configured upstream."""
    upstream = settings.upstream
    key = settings.openai_api_key.get_secret_value()
    if upstream.kind is UpstreamKind.AZURE:
        parts = urlsplit(upstream.url)
        if parts.path in ("", "/"):
            parts = parts._replace(path=AZURE_GA_PATH)
        deployment = upstream.deployments.get(model, model)
        url = _with_query(urlunsplit(parts), model=deployment)
        auth = ("api-key", key)
    else:
        url = _with_query(upstream.url, model=model)
        auth = ("Authorization", f"Bearer {key}")
    return UpstreamTarget(url=url, headers=(auth,))


class Upstream:
    """Opens upstream connections with the settings' timeouts, sizes and keepalive."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings.upstream
        self._targets = {model: build_target(settings, model) for model in _all_models(settings)}
        self._fallback = settings

    def target(self, model: str) -> UpstreamTarget:
        target = self._targets.get(model)
        if target is None:  # a model admitted later by configuration only; built once, then kept
            target = self._targets[model] = build_target(self._fallback, model)
        return target

    async def connect(self, model: str) -> UpstreamLeg:
        """Open a session's upstream socket: attach a sink to the leg before awaiting anything.

        Raises:
            UpstreamRefusedError: the handshake was answered with an HTTP error status.
            UpstreamError: unreachable, timed out, or not a WebSocket server.
        """
        target = self.target(model)
        upstream = self.settings
        direct = fast.enabled()
        try:
            connection = await connect(
                target.url,
                create_connection=fast.UpstreamConnection if direct else ClientConnection,
                additional_headers=target.headers,
                user_agent_header=USER_AGENT,
                open_timeout=upstream.connect_timeout_seconds,
                close_timeout=upstream.close_timeout_seconds,
                ping_interval=upstream.ping_interval_seconds,
                ping_timeout=upstream.ping_timeout_seconds,
                max_size=upstream.max_message_bytes,
                compression="deflate" if upstream.compression else None,
                max_queue=upstream.max_queue,
                logger=_WIRE_LOGGER,
            )
        except InvalidStatus as exc:
            raise UpstreamRefusedError(exc.response.status_code) from exc
        except TimeoutError as exc:
            raise UpstreamError("the upstream did not answer in time") from exc
        except (OSError, InvalidHandshake) as exc:
            raise UpstreamError("the upstream could not be reached") from exc
        if isinstance(connection, fast.UpstreamConnection):
            return fast.FastUpstreamLeg(connection)
        return PortableUpstreamLeg(connection)


def _all_models(settings: Settings) -> set[str]:
    models = {settings.session.model}
    for tier in settings.tiers.values():
        models.update(tier.models)
    return models
