"""Bearer tokens: the relay's own ``ek_`` tokens, minted and verified, and an app's JWTs, verified.

- An ``ek_`` token (`MintedTokens`) is ``ek_`` + a compact JWS: HS256 under a key derived from
  `RELAY_TOKEN_SECRET`, audience `EK_AUDIENCE`, with the client id (``sub``), ``tier``, ``iat``,
  ``exp``, ``jti`` and, when it was minted for one model, ``model`` (the session may then use that
  model only). Its claims are readable, not secret. Its own key and audience keep it apart from an
  app's JWTs: neither passes as the other even where one secret is configured for both.
- A JWT from an app's own login (`AppJwts`, `RELAY_JWT__*`): HS256 with a secret or RS256/ES256
  with a PEM public key; ``exp`` and ``sub`` are required and so is the tier claim. A token
  without the claim is refused rather than given a default tier: the issuer is misconfigured, and
  guessing a tier would hide it.

Both verifiers return the token's `Claims`; whether the relay serves its tier is for
`app.auth.credentials.Authenticator` to say.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import time
from dataclasses import dataclass
from typing import Any, Final

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from app.config import ConfigError, Settings
from app.errors import UnauthorizedError

logger = logging.getLogger(__name__)

MINTED_PREFIX: Final = "ek_"
# The `aud` of every ek_ token; an app JWT never carries it (and an ek_ token fails
# `AppJwts.verify` for carrying one where none, or another, is expected).
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


@dataclass(frozen=True, slots=True)
class Claims:
    """What a verified token says: whom it stands for (``sub``, never empty), its tier claim (not
    yet checked against the tiers served) and, for an ``ek_`` token minted for one, its model."""

    subject: str
    tier: object
    model: str | None = None


class MintedTokens:
    """Mints and verifies ``ek_`` tokens; built once from settings.

    Raises:
        ConfigError: `RELAY_TOKEN_SECRET` is too short.
    """

    def __init__(self, settings: Settings) -> None:
        self.ttl = settings.token_ttl_seconds
        if settings.token_secret is not None:
            token_secret = settings.token_secret.get_secret_value().encode()
            if len(token_secret) < MIN_SECRET_BYTES:
                raise ConfigError(f"RELAY_TOKEN_SECRET: use at least {MIN_SECRET_BYTES} bytes")
            self._secret_is_local = False
        else:
            token_secret = secrets.token_bytes(MIN_SECRET_BYTES)
            self._secret_is_local = True
        self._key = hmac.new(token_secret, _EK_KEY_CONTEXT, hashlib.sha256).digest()

    def mint(
        self,
        client_id: str,
        tier: str,
        ttl_seconds: int | None = None,
        *,
        model: str | None = None,
        now: float | None = None,
    ) -> tuple[str, int]:
        """A short-lived ``ek_`` token for `client_id` in `tier`.

        Args:
            client_id: whom the token stands for; sessions opened with it count against the
                same per-client cap.
            tier: the tier its sessions get.
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
        ttl = self.ttl if ttl_seconds is None else min(ttl_seconds, self.ttl)
        issued_at = int(time.time() if now is None else now)
        claims: dict[str, Any] = {
            "aud": EK_AUDIENCE,
            "sub": client_id,
            "tier": tier,
            "iat": issued_at,
            "exp": issued_at + ttl,
            "jti": secrets.token_urlsafe(16),
        }
        if model is not None:
            claims["model"] = model
        token = jwt.encode(claims, self._key, algorithm="HS256")
        return MINTED_PREFIX + token, issued_at + ttl

    def verify(self, token: str) -> Claims:
        """The claims of `token`, an ``ek_`` token.

        Raises:
            UnauthorizedError: the token has expired, is forged or lacks a claim.
        """
        try:
            claims = jwt.decode(
                token[len(MINTED_PREFIX) :],
                self._key,
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
        return Claims(client_id, claims["tier"], model)


class AppJwts:
    """Verifies JWTs from an app's own login (`RELAY_JWT__*`); built once from settings.

    Raises:
        ConfigError: the secret is too short, or the public key does not fit the algorithms.
    """

    def __init__(self, settings: Settings) -> None:
        self._config = settings.jwt
        self._keys = _jwt_keys(settings)

    @property
    def configured(self) -> bool:
        """True when some algorithm has a key: without one no JWT is accepted."""
        return bool(self._keys)

    def verify(self, token: str) -> Claims:
        """The claims of `token`, a JWT.

        Raises:
            UnauthorizedError: the token has expired, is forged, or lacks ``sub`` or the tier
                claim.
        """
        settings = self._config
        try:
            algorithm = jwt.get_unverified_header(token).get("alg")
            if not isinstance(algorithm, str) or algorithm not in self._keys:
                raise UnauthorizedError("invalid token")
            key = self._keys[algorithm]
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
        return Claims(subject, claims[settings.tier_claim])


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
