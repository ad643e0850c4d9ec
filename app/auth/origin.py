"""Origin: which browser pages may open a session (`check_origin`, against cross-site WebSocket
hijacking). Clients that are not browsers send no `Origin` and are not concerned."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from typing import Final
from urllib.parse import urlsplit

from app.errors import OriginNotAllowedError

_DEFAULT_PORTS: Final = {"http": 80, "ws": 80, "https": 443, "wss": 443}


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
