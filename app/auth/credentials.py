"""Client authentication: who is connecting, from where, and which tier they get.

A client presents a credential as `Authorization: Bearer <credential>` or, from a browser, as the
subprotocol `openai-insecure-api-key.<credential>` next to `realtime` (REALTIME.md §1.2). The
credential is never sent upstream. `Authenticator.authenticate` accepts, in this order:

- a client key from `RELAY_CLIENT_KEYS` (plaintext or `sha256:<hex>`), compared in constant time
  against every entry; the client id is ``key:`` + 16 hex digits of the key's SHA-256;
- a relay-minted token, ``ek_`` + a compact JWS (`Authenticator.mint`, served by
  `app.api.client_secrets`): HS256 under a key derived from `RELAY_TOKEN_SECRET`, audience
  `EK_AUDIENCE`, with the client id (``sub``), ``tier``, ``iat``, ``exp``, ``jti`` and, when it
  was minted for one model, ``model`` (the session may then use that model only). Its claims are
  readable, not secret. Its own key and audience keep it apart from an app's JWTs: neither passes
  as the other even where one secret is configured for both;
- a JWT from an app's own login (`RELAY_JWT__*`): HS256 with a secret or RS256/ES256 with a PEM
  public key; ``exp`` and ``sub`` are required (client id ``sub:`` + sub) and the tier claim must
  name a configured tier. A token without the claim is refused rather than given a default tier:
  the issuer is misconfigured, and guessing a tier would hide it.

A client with no credential gets `RELAY_ANONYMOUS_TIER`, if one is set. `check_origin` refuses
browsers from origins not allowed (cross-site WebSocket hijacking).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import secrets
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final
from urllib.parse import urlsplit

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from app.config import ConfigError, Settings
from app.errors import OriginNotAllowedError, UnauthorizedError, UnsupportedClientError

logger = logging.getLogger(__name__)

KEY_SUBPROTOCOL_PREFIX: Final = "openai-insecure-api-key."
BETA_SUBPROTOCOL: Final = "openai-beta.realtime-v1"
ANONYMOUS: Final = "anonymous"
MINTED_PREFIX: Final = "ek_"
# The `aud` of every ek_ token; an app JWT never carries it (and an ek_ token fails `_verify_jwt`
# for carrying one where none, or another, is expected).
EK_AUDIENCE: Final = "realtime-relay:ek"
# OpenAI's bounds for `expires_after.seconds` (API reference, RealtimeCreateClientSecretRequest).
MIN_TOKEN_TTL_SECONDS: Final = 10
MAX_TOKEN_TTL_SECONDS: Final = 7200
# RFC 7518 §3.2: an HMAC-SHA256 key must be at least as long as the hash output.
MIN_SECRET_BYTES: Final = 32
# ek_ tokens are signed with HMAC(RELAY_TOKEN_SECRET, this), not the secret itself, so that a
# secret also configured as RELAY_JWT__SECRET still signs nothing the other path accepts.
_EK_KEY_CONTEXT: Final = b"realtime-relay:ek:hs256"
_EK_CLAIMS: Final = ["aud", "sub", "tier", "iat", "exp", "jti"]
# Replicas verify each other's tokens: allow for a little clock skew on `iat` and `exp`.
_EK_LEEWAY_SECONDS: Final = 5
_DEFAULT_PORTS: Final = {"http": 80, "ws": 80, "https": 443, "wss": 443}


class CredentialKind(StrEnum):
    """What a client authenticated with."""

    ANONYMOUS = "anonymous"
    KEY = "key"
    MINTED = "minted"
    JWT = "jwt"


@dataclass(frozen=True, slots=True)
class Identity:
    """An authenticated client: its tier and a stable id for per-client limits (never the key).

    `model` is set when the credential is bound to one model (an ek_ token minted for it): the
    session then uses that model and may not ask for another.
    """

    tier: str
    client_id: str
    kind: CredentialKind = CredentialKind.KEY
    model: str | None = None


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def credential_from(
    headers: Iterable[tuple[bytes, bytes]], subprotocols: Iterable[str]
) -> str | None:
    """The credential a client presented, from its headers or its offered subprotocols.

    Raises:
        UnsupportedClientError: the client asked for the beta dialect (the relay speaks GA).
    """
    credential = None
    for protocol in subprotocols:
        if protocol.startswith(KEY_SUBPROTOCOL_PREFIX):
            credential = protocol[len(KEY_SUBPROTOCOL_PREFIX) :]
        elif protocol == BETA_SUBPROTOCOL:
            raise UnsupportedClientError(
                "the relay speaks the GA Realtime protocol only; drop the beta subprotocol"
            )
    for name, value in headers:
        if name == b"authorization":
            token = bearer_token(value.decode("latin-1"))
            if token is not None:
                credential = token
        elif name == b"openai-beta":
            raise UnsupportedClientError(
                "the relay speaks the GA Realtime protocol only; drop the OpenAI-Beta header"
            )
    return credential


def bearer_token(authorization: str) -> str | None:
    """The token of an `Authorization: Bearer <token>` header value, if it is one."""
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def _endpoint(scheme: str, netloc: str) -> tuple[str, int | None] | None:
    """(host, port) of `netloc`, the port defaulting to the scheme's; None if unparsable."""
    try:
        parts = urlsplit("//" + netloc)
        host, port = parts.hostname, parts.port
    except ValueError:
        return None
    return (host, port or _DEFAULT_PORTS.get(scheme)) if host else None


def _not_rebindable(host: str) -> bool:
    """True for hosts DNS cannot repoint: IP literals and localhost (RFC 6761 §6.3)."""
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _normalise_origin(origin: str) -> str:
    return origin.strip().rstrip("/").lower()


def check_origin(headers: Iterable[tuple[bytes, bytes]], allowed_origins: Sequence[str]) -> None:
    """Refuse a browser whose page is not an allowed origin.

    Browsers always send `Origin` on a WebSocket handshake and a page cannot forge it, so this
    stops cross-site WebSocket hijacking (RFC 6455 §10.2). A request passes when it has no
    `Origin` (not a browser), when its origin is listed exactly as ``scheme://host[:port]`` or
    the list holds ``"*"``, or when it is the relay's own origin on an IP address or
    ``localhost``: the origin's ``host[:port]`` equals the request's `Host` (or
    `X-Forwarded-Host`, set by a proxy that rewrites `Host`; a page cannot set either), as for
    the bundled page. A host *name* is trusted only when listed: with DNS rebinding an attacker's
    name can point at the relay, and then its page's `Origin` and `Host` agree.

    Raises:
        OriginNotAllowedError: the origin is none of those.
    """
    origins: list[str] = []
    hosts: list[str] = []
    for name, value in headers:
        if name == b"origin":
            origins.append(value.decode("latin-1"))
        elif name in (b"host", b"x-forwarded-host"):
            hosts.extend(host.strip().lower() for host in value.decode("latin-1").split(","))
    if not origins or "*" in allowed_origins:
        return
    allowed = {_normalise_origin(origin) for origin in allowed_origins}
    for origin in origins:
        normalised = _normalise_origin(origin)
        if normalised in allowed:
            continue
        parts = urlsplit(normalised)
        own = _endpoint(parts.scheme, parts.netloc)
        if (
            own is not None
            and _not_rebindable(own[0])
            and any(_endpoint(parts.scheme, host) == own for host in hosts)
        ):
            continue
        raise OriginNotAllowedError(f"origin {origin[:100]!r} may not use this relay")


class Authenticator:
    """Maps credentials to identities and mints short-lived tokens; built once from settings.

    Raises:
        ConfigError: a secret is too short, or the JWT key does not fit the algorithms.
    """

    def __init__(self, settings: Settings) -> None:
        self._keys: list[tuple[bytes, str]] = []
        for key, tier in settings.client_keys.items():
            digest = bytes.fromhex(key[7:]) if key.startswith("sha256:") else _digest(key)
            self._keys.append((digest, tier))
        self.anonymous_tier = settings.anonymous_tier
        self.tiers = frozenset(settings.tiers)
        self.token_ttl = settings.token_ttl_seconds
        if settings.token_secret is not None:
            token_secret = settings.token_secret.get_secret_value().encode()
            if len(token_secret) < MIN_SECRET_BYTES:
                raise ConfigError(f"RELAY_TOKEN_SECRET: use at least {MIN_SECRET_BYTES} bytes")
            self._secret_is_local = False
        else:
            token_secret = secrets.token_bytes(MIN_SECRET_BYTES)
            self._secret_is_local = True
        self._ek_key = hmac.new(token_secret, _EK_KEY_CONTEXT, hashlib.sha256).digest()
        self._jwt = settings.jwt
        self._jwt_keys = _jwt_keys(settings)

    # Authentication

    def authenticate(self, credential: str | None) -> Identity:
        """The identity behind `credential` (None: the client presented none).

        Raises:
            UnauthorizedError: an unknown key, an expired or forged token, or no credential
                where anonymous clients are refused. The message is safe to show.
        """
        if credential is None:
            if not self.anonymous_tier:
                raise UnauthorizedError("this relay needs a client key")
            return Identity(self.anonymous_tier, ANONYMOUS, CredentialKind.ANONYMOUS)
        digest = _digest(credential)
        found = None
        for known, tier in self._keys:  # every entry is compared: the time does not tell which
            if hmac.compare_digest(known, digest):
                found = (known, tier)
        if found is not None:
            return Identity(found[1], "key:" + found[0].hex()[:16], CredentialKind.KEY)
        if credential.startswith(MINTED_PREFIX):
            return self._verify_minted(credential)
        if credential.count(".") == 2 and self._jwt_keys:
            return self._verify_jwt(credential)
        raise UnauthorizedError("unknown client key")

    def _known_tier(self, tier: object) -> str:
        if not isinstance(tier, str) or tier not in self.tiers:
            raise UnauthorizedError("the token's tier is not served by this relay")
        return tier

    # Minted tokens

    def mint(
        self,
        identity: Identity,
        ttl_seconds: int | None = None,
        *,
        model: str | None = None,
        now: float | None = None,
    ) -> tuple[str, int]:
        """A short-lived ``ek_`` token for `identity`'s tier and client id.

        Args:
            identity: whom the token stands for; sessions opened with it count against the
                same per-client cap.
            ttl_seconds: the lifetime, `MIN_TOKEN_TTL_SECONDS` to `MAX_TOKEN_TTL_SECONDS` as
                OpenAI's; capped at (and by default) `RELAY_TOKEN_TTL_SECONDS`.
            model: bind the token to this model: its sessions use it and no other. The caller
                checks that the tier may use it.
            now: the issue time (Unix seconds), the clock by default.

        Returns:
            The token and its expiry (Unix seconds).

        Raises:
            ValueError: `ttl_seconds` is outside OpenAI's range.
        """
        if ttl_seconds is not None and not (
            MIN_TOKEN_TTL_SECONDS <= ttl_seconds <= MAX_TOKEN_TTL_SECONDS
        ):
            raise ValueError(f"ttl_seconds must be {MIN_TOKEN_TTL_SECONDS}-{MAX_TOKEN_TTL_SECONDS}")
        if self._secret_is_local:
            self._secret_is_local = False  # warn once
            logger.warning(
                "RELAY_TOKEN_SECRET is not set: minted tokens use a per-process secret and only "
                "work on the replica that minted them, until it restarts"
            )
        ttl = self.token_ttl if ttl_seconds is None else min(ttl_seconds, self.token_ttl)
        issued_at = int(time.time() if now is None else now)
        claims: dict[str, Any] = {
            "aud": EK_AUDIENCE,
            "sub": identity.client_id,
            "tier": identity.tier,
            "iat": issued_at,
            "exp": issued_at + ttl,
            "jti": secrets.token_urlsafe(16),
        }
        if model is not None:
            claims["model"] = model
        token = jwt.encode(claims, self._ek_key, algorithm="HS256")
        return MINTED_PREFIX + token, issued_at + ttl

    def _verify_minted(self, token: str) -> Identity:
        try:
            claims = jwt.decode(
                token[len(MINTED_PREFIX) :],
                self._ek_key,
                algorithms=["HS256"],
                audience=EK_AUDIENCE,
                leeway=_EK_LEEWAY_SECONDS,
                options={"require": _EK_CLAIMS, "strict_aud": True},
            )
        except jwt.ExpiredSignatureError:
            raise UnauthorizedError("the token has expired") from None
        except jwt.PyJWTError:
            raise UnauthorizedError("invalid token") from None
        client_id, model = claims["sub"], claims.get("model")
        if not client_id or not (model is None or (isinstance(model, str) and model)):
            raise UnauthorizedError("invalid token")
        tier = self._known_tier(claims["tier"])
        return Identity(tier, client_id, CredentialKind.MINTED, model)

    # JWTs

    def _verify_jwt(self, token: str) -> Identity:
        settings = self._jwt
        try:
            algorithm = jwt.get_unverified_header(token).get("alg")
            if not isinstance(algorithm, str) or algorithm not in self._jwt_keys:
                raise UnauthorizedError("invalid token")
            key = self._jwt_keys[algorithm]
            claims = jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                audience=settings.audience,
                issuer=settings.issuer,
                leeway=settings.leeway_seconds,
                options={"require": ["exp", "sub"]},
            )
        except jwt.ExpiredSignatureError:
            raise UnauthorizedError("the token has expired") from None
        except jwt.PyJWTError:
            raise UnauthorizedError("invalid token") from None
        subject = claims["sub"]
        if not isinstance(subject, str) or not subject:
            raise UnauthorizedError("invalid token")
        if settings.tier_claim not in claims:
            raise UnauthorizedError(f"the token has no {settings.tier_claim!r} claim")
        tier = self._known_tier(claims[settings.tier_claim])
        return Identity(tier, "sub:" + subject, CredentialKind.JWT)


def _jwt_keys(settings: Settings) -> dict[str, Any]:
    """Algorithm -> verification key, for the algorithms a key is configured for.

    Each algorithm gets only its own kind of key, so a public key is never tried as an HMAC
    secret (the algorithm-confusion attack).
    """
    config = settings.jwt
    keys: dict[str, Any] = {}
    if config.secret is not None and "HS256" in config.algorithms:
        secret = config.secret.get_secret_value().encode()
        if len(secret) < MIN_SECRET_BYTES:
            raise ConfigError(f"RELAY_JWT__SECRET: use at least {MIN_SECRET_BYTES} bytes")
        keys["HS256"] = secret
    if config.public_key is not None:
        try:
            public_key = load_pem_public_key(config.public_key.encode())
        except ValueError:
            raise ConfigError("RELAY_JWT__PUBLIC_KEY: not a PEM public key") from None
        if "RS256" in config.algorithms and isinstance(public_key, rsa.RSAPublicKey):
            keys["RS256"] = public_key
        if "ES256" in config.algorithms and isinstance(public_key, ec.EllipticCurvePublicKey):
            if not isinstance(public_key.curve, ec.SECP256R1):
                raise ConfigError("RELAY_JWT__PUBLIC_KEY: ES256 needs a P-256 key")
            keys["ES256"] = public_key
        if not set(keys) & {"RS256", "ES256"}:
            raise ConfigError(
                "RELAY_JWT__PUBLIC_KEY: the key fits none of RELAY_JWT__ALGORITHMS "
                "(RS256 needs an RSA key, ES256 a P-256 key)"
            )
    return keys
