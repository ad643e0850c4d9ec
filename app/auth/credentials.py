"""Client authentication: who is connecting, and which tier they get.

A client presents a credential as `Authorization: Bearer <credential>` or, from a browser, as the
subprotocol `openai-insecure-api-key.<credential>` next to `realtime` (REALTIME.md §1.2). The
credential is never sent upstream. `Authenticator.authenticate` accepts, in this order:

- a client key from `RELAY_CLIENT_KEYS` (plaintext or `sha256:<hex>`), compared in constant time
  against every entry; the client id is ``key:`` + 16 hex digits of the key's SHA-256;
- a relay-minted token, ``ek_`` + a compact JWS (`Authenticator.mint`, served by
  `app.api.client_secrets`; `app.auth.tokens` describes it), with the client id and tier it was
  minted for and, when it was minted for one model, that model (the session may then use that
  model only);
- a JWT from an app's own login (`RELAY_JWT__*`, `app.auth.tokens`): its ``sub`` makes the client
  id (``sub:`` + sub) and its tier claim must name a configured tier.

A token whose tier the relay does not serve is refused. A client with no credential gets
`RELAY_ANONYMOUS_TIER`, if one is set. Which browser pages may connect is `app.auth.origin`'s
call.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from app.auth.tokens import MINTED_PREFIX, AppJwts, MintedTokens
from app.config import Settings
from app.errors import UnauthorizedError

KEY_SUBPROTOCOL_PREFIX: Final = "openai-insecure-api-key."
BETA_SUBPROTOCOL: Final = "openai-beta.realtime-v1"
ANONYMOUS: Final = "anonymous"


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

    The beta dialect's own offers (the `openai-beta.realtime-v1` subprotocol, the
    `OpenAI-Beta` header) carry no credential; `core.beta.is_beta` reads them.
    """
    credential = None
    for protocol in subprotocols:
        if protocol.startswith(KEY_SUBPROTOCOL_PREFIX):
            credential = protocol[len(KEY_SUBPROTOCOL_PREFIX) :]
    for name, value in headers:
        if name == b"authorization":
            token = bearer_token(value.decode("latin-1"))
            if token is not None:
                credential = token
    return credential


def bearer_token(authorization: str) -> str | None:
    """The token of an `Authorization: Bearer <token>` header value, if it is one."""
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


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
        self._minted = MintedTokens(settings)
        self._app_jwts = AppJwts(settings)

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
            claims = self._minted.verify(credential)
            tier = self._known_tier(claims.tier)
            return Identity(tier, claims.subject, CredentialKind.MINTED, claims.model)
        if credential.count(".") == 2 and self._app_jwts.configured:
            claims = self._app_jwts.verify(credential)
            tier = self._known_tier(claims.tier)
            return Identity(tier, "sub:" + claims.subject, CredentialKind.JWT)
        raise UnauthorizedError("unknown client key")

    def _known_tier(self, tier: object) -> str:
        if not isinstance(tier, str) or tier not in self.tiers:
            raise UnauthorizedError("the token's tier is not served by this relay")
        return tier

    def mint(
        self,
        identity: Identity,
        ttl_seconds: int | None = None,
        *,
        model: str | None = None,
        now: float | None = None,
    ) -> tuple[str, int]:
        """A short-lived ``ek_`` token for `identity`'s tier and client id: sessions opened with
        it count against the same per-client cap. The rest is `MintedTokens.mint`'s.

        Returns:
            The token and its expiry (Unix seconds).

        Raises:
            ValueError: `ttl_seconds` is outside OpenAI's range.
        """
        return self._minted.mint(
            identity.client_id, identity.tier, ttl_seconds, model=model, now=now
        )
