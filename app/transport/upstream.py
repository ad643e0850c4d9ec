"""The upstream leg: URL forms, headers and auth for OpenAI, Azure and compatible servers.

Everything here is decided once per model (`UpstreamTarget`), so opening a session only formats
nothing and connects. Upstream is always the GA protocol: no `OpenAI-Beta` header is sent
(REALTIME.md §1.1), and Azure's GA path takes `?model=<deployment>` and no `api-version` (§1.4).
Failures of `websockets` are translated here, once, into `UpstreamError`s.

`Upstream.connect` returns the session's upstream leg: the fast one (`fast.FastUpstreamLeg`) on
the library versions the tests ran, else the portable one (`legs.PortableUpstreamLeg`).

WebRTC calls (https://developers.openai.com/api/docs/guides/realtime-webrtc) are created and hung
up over HTTP at `<upstream URL>/calls` (`https://` for `wss://`), with the server's key:
`create_call` posts the caller's SDP offer and the server's session as `multipart/form-data`, as
OpenAI's "unified interface" takes them, and `hang_up` ends a call; the call's sideband is a
WebSocket opened by `connect` with `?call_id=`.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import httpx2
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidHandshake, InvalidStatus

from app.config import Settings, UpstreamKind
from app.errors import UpstreamError, UpstreamRefusedError
from app.transport import fast
from app.transport.legs import PortableUpstreamLeg, UpstreamLeg

USER_AGENT = "realtime-relay/0.1"

# websockets logs handshake headers (the key) and every frame (audio) at DEBUG: this logger
# never emits below INFO, whatever the root level is.
logger = logging.getLogger(__name__)
_WIRE_LOGGER = logging.getLogger(f"{__name__}.websocket")
_WIRE_LOGGER.setLevel(logging.INFO)
AZURE_GA_PATH = "/openai/v1/realtime"
# A call id, as the last segment of the upstream's `Location` (OpenAI's are `rtc_...`).
CALL_ID: Final = re.compile(r"[A-Za-z0-9_-]{1,128}")
# The largest SDP answer the relay takes from the upstream (OpenAI's are about 1 KiB).
MAX_ANSWER_BYTES: Final = 64 * 1024


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


def calls_url(settings: Settings) -> str:
    """Where WebRTC calls are created: the upstream's Realtime path + `/calls`, over HTTP(S)."""
    upstream = settings.upstream
    parts = urlsplit(upstream.url)
    path = parts.path.rstrip("/")
    if upstream.kind is UpstreamKind.AZURE and not path:
        path = AZURE_GA_PATH
    scheme = "https" if parts.scheme == "wss" else "http"
    return urlunsplit((scheme, parts.netloc, f"{path}/calls", "", ""))


def build_target(settings: Settings, model: str, *, transcription: bool = False) -> UpstreamTarget:
    """The URL and headers for a session of `model` on the configured upstream.

    A transcription session is addressed by `?intent=transcription` and no model, on OpenAI and
    on Azure alike: its model is chosen in its `session.update`
    (https://developers.openai.com/api/docs/guides/realtime-transcription).
    """
    target = {"intent": "transcription"} if transcription else None
    return _target(settings, target or {"model": model})


def _target(settings: Settings, query: dict[str, str]) -> UpstreamTarget:
    """The URL with `query` (Azure: its GA path, and `model` mapped to a deployment)."""
    upstream = settings.upstream
    key = settings.openai_api_key.get_secret_value()
    if upstream.kind is UpstreamKind.AZURE:
        parts = urlsplit(upstream.url)
        if parts.path in ("", "/"):
            parts = parts._replace(path=AZURE_GA_PATH)
        if "model" in query:
            query = {"model": upstream.deployments.get(query["model"], query["model"])}
        url = _with_query(urlunsplit(parts), **query)
        auth = ("api-key", key)
    else:
        url = _with_query(upstream.url, **query)
        auth = ("Authorization", f"Bearer {key}")
    return UpstreamTarget(url=url, headers=(auth,))


class Upstream:
    """Opens upstream connections with the settings' timeouts, sizes and keepalive."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings.upstream
        self._targets = {model: build_target(settings, model) for model in _all_models(settings)}
        self._fallback = settings
        self._transcription = build_target(settings, "", transcription=True)
        self._calls = calls_url(settings)
        self._http: httpx2.AsyncClient | None = None

    def target(self, model: str) -> UpstreamTarget:
        target = self._targets.get(model)
        if target is None:  # a model admitted later by configuration only; built once, then kept
            target = self._targets[model] = build_target(self._fallback, model)
        return target

    async def connect(
        self, model: str, *, transcription: bool = False, call_id: str | None = None
    ) -> UpstreamLeg:
        """Open a session's upstream socket (`transcription`: a transcription-only session;
        `call_id`: the sideband of that WebRTC call).

        A sink is attached to the leg before anything is awaited.

        Raises:
            UpstreamRefusedError: the handshake was answered with an HTTP error status.
            UpstreamError: unreachable, timed out, or not a WebSocket server.
        """
        if call_id is not None:
            target = _target(self._fallback, {"call_id": call_id})
        else:
            target = self._transcription if transcription else self.target(model)
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

    # -- WebRTC calls, over HTTP

    def _client(self) -> httpx2.AsyncClient:
        if self._http is None:  # on first use: most relays never take a call
            timeout = httpx2.Timeout(self.settings.connect_timeout_seconds)
            self._http = httpx2.AsyncClient(timeout=timeout, follow_redirects=False)
        return self._http

    def _headers(self) -> dict[str, str]:
        return dict(self.target(self._fallback.session.model).headers)

    async def create_call(self, offer: bytes, session: dict[str, Any]) -> tuple[str, bytes]:
        """Create a WebRTC call from the caller's SDP `offer` with the server's `session`.

        Returns the call's id and the upstream's SDP answer.

        Raises:
            UpstreamRefusedError: the upstream answered with an HTTP error status (its message
                is logged, not shown: it may describe the server's session).
            UpstreamError: unreachable, timed out, or an answer the relay cannot use.
        """
        upstream = self._fallback.upstream
        if upstream.kind is UpstreamKind.AZURE and isinstance(session.get("model"), str):
            session = {
                **session,
                "model": upstream.deployments.get(session["model"], session["model"]),
            }
        described = json.dumps(session, separators=(",", ":")).encode()
        files: dict[str, tuple[str | None, bytes, str]] = {
            "sdp": (None, offer, "application/sdp"),
            "session": (None, described, "application/json"),
        }
        headers = {**self._headers(), "Accept": "application/sdp", "User-Agent": USER_AGENT}
        try:
            response = await self._client().post(self._calls, files=files, headers=headers)
        except httpx2.TimeoutException as exc:
            raise UpstreamError("the upstream did not answer in time") from exc
        except httpx2.HTTPError as exc:
            raise UpstreamError("the upstream could not be reached") from exc
        if response.status_code not in (200, 201):
            _log_refusal(response)
            raise UpstreamRefusedError(response.status_code)
        call_id = response.headers.get("location", "").rstrip("/").rpartition("/")[2]
        if not CALL_ID.fullmatch(call_id) or len(response.content) > MAX_ANSWER_BYTES:
            raise UpstreamError("the upstream's answer names no call")
        return call_id, response.content

    async def hang_up(self, call_id: str) -> bool:
        """End a call (`POST /calls/{id}/hangup`); whether the upstream took it. Never raises."""
        url = f"{self._calls}/{call_id}/hangup"
        try:
            response = await self._client().post(url, headers=self._headers())
        except Exception as exc:  # unreachable, or the client closed at shutdown
            logger.warning("hang-up of %s failed: %s", call_id, type(exc).__name__)
            return False
        if response.status_code >= 300:
            logger.info("hang-up of %s answered %d", call_id, response.status_code)
        return response.status_code < 300

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()


def _log_refusal(response: httpx2.Response) -> None:
    try:
        error = response.json().get("error") or {}
        detail = f"{error.get('code')}: {str(error.get('message'))[:200]}"
    except (ValueError, AttributeError):
        detail = "no JSON error"
    logger.warning("the upstream refused a call (%d): %s", response.status_code, detail)


def _all_models(settings: Settings) -> set[str]:
    models = {settings.session.model}
    for tier in settings.tiers.values():
        models.update(tier.models)
    return models
