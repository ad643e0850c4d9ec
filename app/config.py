"""The relay's one `Settings` class: every knob, from the environment (and an optional TOML file).

Variables use the prefix ``RELAY_`` and ``__`` for nesting (``RELAY_UPSTREAM__URL`` sets
``upstream.url``); dict and list fields take JSON. The upstream key is read from ``OPENAI_API_KEY``.
``RELAY_CONFIG_FILE`` names a TOML file read under the environment (the environment wins).
Only this module reads the environment; everything else receives a `Settings`.
"""

from __future__ import annotations

import os
import re
from enum import StrEnum
from typing import Any, Final, Literal

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

DEFAULT_INSTRUCTIONS = (
    "You are a helpful, concise voice assistant. Answer in short spoken sentences."
)

# Session fields a client may change unless its tier says otherwise: how it hears and is heard,
# never what the model is told or may call (REALTIME.md §5 for the paths).
DEFAULT_CLIENT_MAY_SET = (
    "audio.output.voice",
    "audio.output.speed",
    "audio.input.turn_detection",
    "audio.input.transcription",
    "audio.input.noise_reduction",
    "output_modalities",
)

# The voices OpenAI names for the Realtime models (REALTIME.md §5): a tier may pick among these,
# not a custom voice object.
NAMED_VOICES: Final = (
    "alloy", "ash", "ballad", "cedar", "coral", "echo", "marin", "sage", "shimmer", "verse",
)  # fmt: skip
# Stands, in `allowed_values`, for the server's own value of that path (RELAY_SESSION__...).
SERVER_VALUE: Final = "$server"
# What the default tier may pick within the fields it may set (`allowed_values`).
DEFAULT_ALLOWED_VALUES: Final[dict[str, Any]] = {
    "audio.output.voice": list(NAMED_VOICES),
    "audio.output.speed": {"min": 0.25, "max": 1.5},
    "audio.input.transcription.model": [SERVER_VALUE],
    "audio.input.turn_detection.idle_timeout_ms": {"min": 5_000, "max": 30_000},
}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class UpstreamKind(StrEnum):
    """How the upstream wants to be addressed and authenticated."""

    OPENAI = "openai"  # Authorization: Bearer <key>, ?model=<model>
    AZURE = "azure"  # api-key: <key>, /openai/v1/realtime?model=<deployment>


class UpstreamSettings(_Section):
    """Where the relay connects, and how the upstream leg of each session behaves."""

    url: str = "wss://api.openai.com/v1/realtime"
    kind: UpstreamKind = UpstreamKind.OPENAI
    # Azure addresses deployments, not models: model name -> deployment name (default: same name).
    deployments: dict[str, str] = {}
    connect_timeout_seconds: float = Field(10.0, gt=0)
    # Server events can exceed 1 MiB (conversation.item.retrieved carries audio), REALTIME.md §1.1.
    max_message_bytes: int = Field(64 * 2**20, ge=2**20)
    ping_interval_seconds: float | None = Field(20.0, gt=0)
    ping_timeout_seconds: float | None = Field(20.0, gt=0)
    close_timeout_seconds: float = Field(5.0, gt=0)
    # Upstream messages held behind a client's paced binary audio (or read ahead by the portable
    # upstream leg); past it the upstream is not read.
    max_queue: int = Field(16, ge=1)
    # permessage-deflate buys ~25% on base64 audio at a large CPU cost; off unless asked for.
    compression: bool = False
    # True when the upstream is the bundled local echo server (the no-key demo); the page says so.
    demo: bool = False

    @field_validator("url")
    @classmethod
    def _websocket_url(cls, value: str) -> str:
        if not value.startswith(("ws://", "wss://")):
            raise ValueError("must be a ws:// or wss:// URL")
        return value


class SessionSettings(_Section):
    """The session the server injects into every upstream connection (GA field names)."""

    model: str = "gpt-realtime-mini"
    instructions: str = DEFAULT_INSTRUCTIONS
    voice: str = "marin"
    tools: list[dict[str, Any]] = []
    tool_choice: str | dict[str, Any] = "auto"
    output_modalities: list[Literal["audio", "text"]] = ["audio"]
    # None turns server VAD off (push-to-talk); REALTIME.md §5 for the fields.
    turn_detection: dict[str, Any] | None = {
        "type": "server_vad",
        "threshold": 0.5,
        "prefix_padding_ms": 300,
        "silence_duration_ms": 500,
        "create_response": True,
        "interrupt_response": True,
    }
    transcription: dict[str, Any] | None = {"model": "gpt-4o-mini-transcribe"}
    noise_reduction: dict[str, Any] | None = None
    max_output_tokens: int | Literal["inf"] = "inf"
    # A client sending G.711 gets an audio/pcmu|pcma upstream session (no conversion, the model
    # hears the line as it is); False converts its audio to PCM16 24 kHz instead.
    g711_passthrough: bool = True
    # Opus encoder complexity for clients that take Opus output. 2 rather than libopus' 10: a
    # packet's encode stays short enough to keep per-frame latency low under load, for a small
    # loss of quality (figures in docs/design.md, "Pacing binary audio").
    opus_complexity: int = Field(2, ge=0, le=10)
    # Any further GA session fields, merged last (e.g. {"truncation": "auto"}).
    extra: dict[str, Any] = {}

    @field_validator("tools")
    @classmethod
    def _function_tools(cls, tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for tool in tools:
            if tool.get("type") != "function" or not isinstance(tool.get("name"), str):
                raise ValueError("each tool must be {'type': 'function', 'name': ..., ...}")
        return tools


_TOOL_NAME = r"^[A-Za-z0-9_-]{1,64}$"  # what OpenAI accepts as a function name

# Item kinds a client may create (conversation.item.create, response.create's input) unless its
# tier says otherwise: its own words and the outputs of its own tools' calls.
DEFAULT_CLIENT_MAY_CREATE: Final = ("user_message", "function_call_output")
ITEM_KINDS: Final = frozenset(
    {
        "user_message",
        "assistant_message",
        "system_message",
        "function_call",
        "function_call_output",
        "mcp_call",
        "mcp_list_tools",
        "mcp_approval_request",
        "mcp_approval_response",
    }
)


class HttpToolSettings(_Section):
    """How the relay runs a server tool over HTTP: it POSTs the call as JSON to `url`."""

    url: str
    method: Literal["POST", "PUT", "GET"] = "POST"
    # Sent with every call (e.g. an Authorization header): secrets, never logged or shown.
    headers: dict[str, SecretStr] = {}
    timeout_seconds: float = Field(10.0, gt=0)


class ServerToolSettings(_Section):
    """One entry of RELAY_TOOLS: a function tool the relay runs itself, or an MCP server's tools.

    Either `http` with `name`, `description` and `parameters` (JSON Schema), or `mcp`: the label
    of a server in RELAY_MCP_SERVERS, whose (allowed) tools are listed at start-up and injected
    under names prefixed with the label.
    """

    name: str | None = Field(None, pattern=_TOOL_NAME)
    description: str = ""
    parameters: dict[str, Any] = {"type": "object", "properties": {}}
    http: HttpToolSettings | None = None
    mcp: str | None = None

    @model_validator(mode="after")
    def _one_executor(self) -> ServerToolSettings:
        if (self.http is None) == (self.mcp is None):
            raise ValueError("a server tool has one executor: 'http' or 'mcp'")
        if self.http is not None and self.name is None:
            raise ValueError("an http tool needs a 'name'")
        return self


class McpServerSettings(_Section):
    """An MCP server the relay is a client of (streamable HTTP)."""

    url: str
    headers: dict[str, SecretStr] = {}
    allowed_tools: list[str] | None = None  # None: every tool the server lists
    timeout_seconds: float = Field(10.0, gt=0)


class TierSettings(_Section):
    """What one tier of clients may use: models, changeable fields and limits."""

    # Allowed models; the first is the tier's default. Empty: the session's model only.
    models: list[str] = []
    # Session fields (dotted GA paths) a client may change; a path also covers what lies below it.
    client_may_set: list[str] = list(DEFAULT_CLIENT_MAY_SET)
    max_sessions: int | None = Field(None, ge=0)
    max_sessions_per_client: int | None = Field(None, ge=0)
    # OpenAI's own cap on a session's length; null for none.
    max_session_seconds: float | None = Field(3600.0, gt=0)
    idle_timeout_seconds: float | None = Field(None, gt=0)
    # Budgets: a session that reaches either is warned at 80 %, then ended (budget_exhausted).
    max_tokens_per_session: int | None = Field(None, gt=0)
    max_cost_usd_per_session: float | None = Field(None, gt=0)
    # Spend per client identity per UTC day, across replicas (Redis, or in process without it).
    max_cost_usd_per_client_per_day: float | None = Field(None, gt=0)
    # Responses one session may have at once (out-of-band ones included), and start per minute.
    max_concurrent_responses: int = Field(1, ge=1)
    max_responses_per_minute: int | None = Field(None, ge=1)
    # Dotted path -> allowed values (a list; "$server" is the server's own value) or
    # {"min", "max"} for numbers, inside what the tier may set; outside them is field_locked.
    allowed_values: dict[str, Any] = dict(DEFAULT_ALLOWED_VALUES)
    # The server tools (RELAY_TOOLS names, or MCP labels) this tier's sessions get; None: all.
    tools: list[str] | None = None
    # Forward the server tools' calls and outputs to the client (for "looking it up..." UIs).
    show_tool_calls: bool = False
    # A field the tier may not set (or a value outside allowed_values) in a client's
    # session.update / response.create: "ignore" removes it and forwards the rest, "refuse"
    # refuses the whole event with field_locked.
    locked_fields: Literal["ignore", "refuse"] = "ignore"
    # Item kinds a client may create (ITEM_KINDS).
    client_may_create: list[str] = list(DEFAULT_CLIENT_MAY_CREATE)
    # Transcription-only sessions (`/ws?intent=transcription`: live captions), transcribed by
    # RELAY_SESSION__TRANSCRIPTION's model; what a client may change is `client_may_set`'s
    # transcription paths.
    transcription_sessions: bool = True
    # WebRTC calls (`POST /v1/realtime/calls`): the relay holds the call's sideband, so a client
    # can change locked fields over its data channel until the relay puts them back; false keeps
    # the tier on the WebSocket path, where nothing passes unjudged.
    webrtc: bool = True

    @field_validator("client_may_create")
    @classmethod
    def _known_kinds(cls, kinds: list[str]) -> list[str]:
        unknown = sorted(set(kinds) - ITEM_KINDS)
        if unknown:
            raise ValueError(f"unknown item kinds {unknown}; known: {sorted(ITEM_KINDS)}")
        return kinds

    @field_validator("allowed_values")
    @classmethod
    def _value_rules(cls, rules: dict[str, Any]) -> dict[str, Any]:
        for path, rule in rules.items():
            if any(not part for part in path.split(".")):
                raise ValueError(f"allowed_values: {path!r} is not a dotted path")
            if isinstance(rule, list):
                continue
            bounds = rule.keys() if isinstance(rule, dict) else ()
            numbers = isinstance(rule, dict) and all(
                isinstance(rule[key], int | float) and not isinstance(rule[key], bool)
                for key in bounds
            )
            if not (bounds and set(bounds) <= {"min", "max"} and numbers):
                raise ValueError(
                    f"allowed_values[{path!r}]: a list of values, or {{'min', 'max'}} numbers"
                )
        return rules


class JwtSettings(_Section):
    """Client JWTs issued by an app's own login: HS256 with a secret, or RS256/ES256 with a key."""

    secret: SecretStr | None = None  # HS256
    public_key: str | None = None  # PEM, for RS256 / ES256
    algorithms: list[Literal["HS256", "RS256", "ES256"]] = ["HS256"]
    tier_claim: str = "tier"
    audience: str | None = None
    issuer: str | None = None
    leeway_seconds: float = Field(5.0, ge=0)


class ModelPrice(_Section):
    """USD per million tokens, by direction and kind, and per minute of duration-billed audio.

    Missing kinds cost nothing. `per_minute` prices transcription usage of type `duration`
    (whisper-1 reports seconds, not tokens: REALTIME.md §14.4).
    """

    input_text: float = 0.0
    input_audio: float = 0.0
    input_image: float = 0.0
    cached_text: float = 0.0
    cached_audio: float = 0.0
    cached_image: float = 0.0
    output_text: float = 0.0
    output_audio: float = 0.0
    per_minute: float = 0.0


_PER_MILLION_FIELDS: Final = (
    "input_text", "input_audio", "input_image", "cached_text", "cached_audio", "cached_image",
    "output_text", "output_audio",
)  # fmt: skip


def _price(*per_million: float) -> ModelPrice:
    return ModelPrice(**dict(zip(_PER_MILLION_FIELDS, per_million, strict=True)))


# OpenAI's published list prices (USD / 1M tokens): text, audio, image in; cached text, audio,
# image; text, audio out; whisper-1 per minute. Override with RELAY_PRICES; models neither
# listed nor aliased (RELAY_PRICE_ALIASES) are counted as unpriced.
DEFAULT_PRICES: dict[str, ModelPrice] = {
    "gpt-4o-realtime-preview": _price(5.0, 40.0, 0, 2.5, 2.5, 0, 20.0, 80.0),
    "gpt-4o-mini-realtime-preview": _price(0.6, 10.0, 0, 0.3, 0.3, 0, 2.4, 20.0),
    "gpt-realtime": _price(4.0, 32.0, 5.0, 0.4, 0.4, 0.5, 16.0, 64.0),
    "gpt-realtime-mini": _price(0.6, 10.0, 0.8, 0.06, 0.3, 0.08, 2.4, 20.0),
    "gpt-4o-transcribe": _price(2.5, 6.0, 0, 0, 0, 0, 10.0, 0),
    "gpt-4o-mini-transcribe": _price(1.25, 3.0, 0, 0, 0, 0, 5.0, 0),
    "whisper-1": ModelPrice(per_minute=0.006),
}

# The dated snapshots of the priced models (the SDKs' model enums), priced as their family.
# Not gpt-4o-realtime-preview-2024-10-01: it was listed at its own, higher audio prices.
DEFAULT_PRICE_ALIASES: dict[str, str] = {
    "gpt-realtime-2025-08-28": "gpt-realtime",
    "gpt-realtime-mini-2025-10-06": "gpt-realtime-mini",
    "gpt-realtime-mini-2025-12-15": "gpt-realtime-mini",
    "gpt-4o-realtime-preview-2024-12-17": "gpt-4o-realtime-preview",
    "gpt-4o-realtime-preview-2025-06-03": "gpt-4o-realtime-preview",
    "gpt-4o-mini-realtime-preview-2024-12-17": "gpt-4o-mini-realtime-preview",
    "gpt-4o-mini-transcribe-2025-12-15": "gpt-4o-mini-transcribe",
}


class TlsSettings(_Section):
    """TLS on the relay's own listener: a PEM certificate chain and its unencrypted key.

    Off by default, as behind an ingress or load balancer that ends TLS. Clients that connect
    only over ``wss://`` (openai-node's Realtime clients) need it when they reach the relay
    directly.
    """

    certfile: str | None = None
    keyfile: str | None = None

    @field_validator("certfile", "keyfile")
    @classmethod
    def _readable(cls, value: str | None) -> str | None:
        if value is not None and not (os.path.isfile(value) and os.access(value, os.R_OK)):
            raise ValueError(f"{value!r} is not a readable file")
        return value

    @model_validator(mode="after")
    def _a_pair(self) -> TlsSettings:
        if (self.certfile is None) != (self.keyfile is None):
            raise ValueError("set both RELAY_TLS__CERTFILE and RELAY_TLS__KEYFILE, or neither")
        if self.certfile is not None:
            import ssl  # only here: most relays never load a certificate

            # Load them now, so a wrong file, a mismatched pair or an encrypted key stops the
            # relay with the variables named instead of a traceback from uvicorn (or, for an
            # encrypted key, OpenSSL asking for its passphrase on the terminal).
            try:
                context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
                context.load_cert_chain(self.certfile, self.keyfile, password=lambda: b"")
            except (ssl.SSLError, OSError) as exc:
                raise ValueError(
                    "RELAY_TLS__CERTFILE and RELAY_TLS__KEYFILE are not a PEM certificate and "
                    f"its unencrypted private key ({exc})"
                ) from None
        return self


class Settings(BaseSettings):
    """Every setting of the relay. Build once (`load_settings`) and pass down."""

    model_config = SettingsConfigDict(
        env_prefix="RELAY_",
        env_nested_delimiter="__",
        extra="ignore",
        frozen=True,
    )

    openai_api_key: SecretStr = Field(
        validation_alias=AliasChoices("OPENAI_API_KEY", "openai_api_key"),
        description="The server-held upstream key; never logged or sent to a client.",
    )
    upstream: UpstreamSettings = UpstreamSettings()
    session: SessionSettings = SessionSettings()
    tiers: dict[str, TierSettings] = {"default": TierSettings()}
    # client key -> tier; a key may be given as "sha256:<hex>" of the key.
    client_keys: dict[str, str] = {}
    # Tier of clients that present no key (the bundled page by default); "" refuses them.
    # Unset, it is "default" if that tier exists, else "".
    anonymous_tier: str = "default"
    # Limits (app/limits/). No URL: an in-process limiter for a single instance.
    redis_url: str | None = None
    lease_ttl_seconds: float = Field(30.0, gt=1)
    # Redis unreachable at admission: refuse the session (default) or admit it.
    limits_fail_open: bool = False
    # The upstream account's concurrent-session cap per model, shared by every tier.
    model_limits: dict[str, int] = {}
    # Client auth beyond static keys (app/auth/).
    jwt: JwtSettings = JwtSettings()
    # Signs the relay's own short-lived `ek_` tokens; set the same value on every replica.
    token_secret: SecretStr | None = None
    token_ttl_seconds: int = Field(600, ge=10, le=7200)
    # Browser origins allowed to open /ws ("*": any). The page's own origin is always allowed.
    allowed_origins: list[str] = []
    prices: dict[str, ModelPrice] = DEFAULT_PRICES
    # model -> the priced model it is billed as (exact names only: never matched by prefix).
    price_aliases: dict[str, str] = DEFAULT_PRICE_ALIASES
    # Answers GET /v1/relay/admin/spend (Authorization: Bearer <key>); unset: no admin API.
    admin_key: SecretStr | None = None
    # TLS on the relay's own port (RELAY_TLS__CERTFILE, RELAY_TLS__KEYFILE); off by default.
    tls: TlsSettings = TlsSettings()
    # Server tools: run by the relay, hidden from clients (app/tools/).
    tools: list[ServerToolSettings] = []
    mcp_servers: dict[str, McpServerSettings] = {}
    # Server tool calls one session may run at once; more wait their turn.
    tool_concurrency: int = Field(4, ge=1)
    # The longest tool output the model gets; longer is cut, and says so.
    tool_max_output_chars: int = Field(16_000, ge=256)
    # Largest client message accepted; larger ones close the session with 1009.
    client_max_message_bytes: int = Field(16 * 2**20, ge=2**16)
    # Frames one client message may be split into (RFC 6455 §5.4): each costs bookkeeping
    # whatever its payload, so a flood of tiny or empty fragments must be bounded by count.
    client_max_fragments: int = Field(1024, ge=1)
    # A connection must finish its HTTP request (a WebSocket handshake included) within this,
    # or it is closed: half-open connections would otherwise hold a file descriptor forever.
    handshake_timeout_seconds: float = Field(10.0, gt=0)
    # Open client connections per process; past it new connections are closed at once. Unset:
    # derived from the open-file limit, leaving room for each session's upstream and Redis.
    max_connections: int | None = Field(None, ge=1)
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    # On SIGTERM: readiness fails and new sessions are refused at once; live sessions are warned
    # and closed with 1012 (clients reconnect elsewhere) after this window.
    drain_seconds: float = Field(20.0, ge=0)
    # Uvicorn's wait for open connections after the drain, before the lifespan teardown.
    graceful_shutdown_seconds: float = Field(5.0, ge=0)
    log_level: str = "INFO"
    log_format: Literal["text", "json"] = "text"

    @model_validator(mode="before")
    @classmethod
    def _anonymous_default(cls, data: Any) -> Any:
        # Anonymous clients get the tier named "default" when there is one and nothing else is
        # said; a configuration without such a tier refuses them rather than guess a tier.
        if isinstance(data, dict) and "anonymous_tier" not in data:
            tiers = data.get("tiers")
            if isinstance(tiers, dict) and "default" not in tiers:
                data = {**data, "anonymous_tier": ""}
        return data

    @model_validator(mode="after")
    def _tiers_exist(self) -> Settings:
        if not self.tiers:
            raise ValueError("RELAY_TIERS: at least one tier is needed")
        for key, tier in self.client_keys.items():
            if key.startswith("sha256:") and not re.fullmatch(r"[0-9a-fA-F]{64}", key[7:]):
                raise ValueError("RELAY_CLIENT_KEYS: a sha256: key needs 64 hex digits")
            if tier not in self.tiers:
                name = key.split(":", 1)[0] if key.startswith("sha256:") else "a key"
                raise ValueError(f"RELAY_CLIENT_KEYS: {name} maps to unknown tier {tier!r}")
        if self.anonymous_tier and self.anonymous_tier not in self.tiers:
            raise ValueError(f"RELAY_ANONYMOUS_TIER: unknown tier {self.anonymous_tier!r}")
        names = [tool.name for tool in self.tools if tool.name is not None]
        labels = [tool.mcp for tool in self.tools if tool.mcp is not None]
        if len(set(names)) != len(names):
            raise ValueError("RELAY_TOOLS: two tools share a name")
        for label in labels:
            if label not in self.mcp_servers:
                raise ValueError(f"RELAY_TOOLS: no MCP server {label!r} in RELAY_MCP_SERVERS")
        client_tools = {str(tool.get("name")) for tool in self.session.tools}
        if client_tools & set(names):
            raise ValueError(
                "RELAY_TOOLS: a server tool has the name of a RELAY_SESSION__TOOLS tool"
            )
        for tier_name, tier_settings in self.tiers.items():
            for tool_name in tier_settings.tools or []:
                if tool_name not in names and tool_name not in labels:
                    raise ValueError(
                        f"RELAY_TIERS: tier {tier_name!r} names unknown server tool {tool_name!r}"
                    )
        if self.upstream.kind is UpstreamKind.AZURE and "api-version" in self.upstream.url:
            raise ValueError("RELAY_UPSTREAM__URL: the Azure GA endpoint takes no api-version")
        return self

    @model_validator(mode="after")
    def _cost_limits_are_priced(self) -> Settings:
        # A cost budget over an unpriced model would count $0 and never end anything.
        priced = set(self.prices) | {alias for alias, name in self.price_aliases.items()
                                     if name in self.prices}  # fmt: skip
        for name, tier in self.tiers.items():
            if (
                tier.max_cost_usd_per_session is None
                and tier.max_cost_usd_per_client_per_day is None
            ):
                continue
            unpriced = [model for model in self.tier_models(name) if model not in priced]
            if unpriced:
                raise ValueError(
                    f"RELAY_TIERS: tier {name!r} has a cost limit but no price for {unpriced} "
                    "(RELAY_PRICES or RELAY_PRICE_ALIASES)"
                )
        return self

    def tier_models(self, tier: str) -> list[str]:
        """The models `tier` may use, its default first."""
        return self.tiers[tier].models or [self.session.model]

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources = [init_settings, env_settings]
        config_file = os.environ.get("RELAY_CONFIG_FILE")
        if config_file:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=config_file))
        return tuple(sources)


class ConfigError(Exception):
    """Invalid configuration, with the variables to fix named."""


def variable_name(loc: tuple[int | str, ...]) -> str:
    """The environment variable that sets the field at `loc`."""
    if loc and loc[0] in ("OPENAI_API_KEY", "openai_api_key"):
        return "OPENAI_API_KEY"
    return "RELAY_" + "__".join(str(part) for part in loc).upper()


def load_settings(**overrides: Any) -> Settings:
    """Build `Settings` from the environment, failing with the names of bad variables."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            where = variable_name(error["loc"]) if error["loc"] else "configuration"
            problems.append(f"{where}: {error['msg']}")
        raise ConfigError("invalid configuration: " + "; ".join(problems)) from None
