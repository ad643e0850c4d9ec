"""Client authentication: who is connecting, and which tier they get.

A client presents a credential as `Authorization: Bearer <key>` or, from a browser, as the
subprotocol `openai-insecure-api-key.<key>` next to `realtime` (REALTIME.md §1.2). Keys come from
`RELAY_CLIENT_KEYS`, plaintext or `sha256:<hex>`, and are compared in constant time. A client with
no credential gets `RELAY_ANONYMOUS_TIER`, if one is set. The credential is never sent upstream.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from app.config import Settings
from app.errors import UnauthorizedError, UnsupportedClientError

KEY_SUBPROTOCOL_PREFIX: Final = "openai-insecure-api-key."
BETA_SUBPROTOCOL: Final = "openai-beta.realtime-v1"
ANONYMOUS: Final = "anonymous"


@dataclass(frozen=True, slots=True)
class Identity:
    """An authenticated client: its tier and a stable id for per-client limits (never the key)."""

    tier: str
    client_id: str


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
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                credential = token.strip()
        elif name == b"openai-beta":
            raise UnsupportedClientError(
                "the relay speaks the GA Realtime protocol only; drop the OpenAI-Beta header"
            )
    return credential


class Authenticator:
    """Maps credentials to identities; built once from the settings."""

    def __init__(self, settings: Settings) -> None:
        self._keys: list[tuple[bytes, str]] = []
        for key, tier in settings.client_keys.items():
            digest = bytes.fromhex(key[7:]) if key.startswith("sha256:") else _digest(key)
            self._keys.append((digest, tier))
        self.anonymous_tier = settings.anonymous_tier

    def authenticate(self, credential: str | None) -> Identity:
        """The identity behind `credential` (None: the client presented none).

        Raises:
            UnauthorizedError: an unknown key, or no key where anonymous clients are refused.
        """
        if credential is None:
            if not self.anonymous_tier:
                raise UnauthorizedError("this relay needs a client key")
            return Identity(tier=self.anonymous_tier, client_id=ANONYMOUS)
        digest = _digest(credential)
        found = None
        for known, tier in self._keys:  # every entry is compared: the time does not tell which
            if hmac.compare_digest(known, digest):
                found = (known, tier)
        if found is None:
            raise UnauthorizedError("unknown client key")
        return Identity(tier=found[1], client_id="key:" + found[0].hex()[:16])
