"""The embedded limiter: leases held in this process, for a single relay instance."""

from __future__ import annotations

import secrets
import time
from collections.abc import Sequence

from app.limits.leases import Cap, Lease, Renewal, RenewalResult, limit_error


class MemoryLimiter:
    """The embedded default: leases in this process, for a single relay instance.

    No `await` separates checking a cap from taking it, so each call is atomic on the event loop.
    Its store cannot lose its data, but a lease can still lapse (an event loop blocked past the
    TTL), so renewals follow the same rules as Redis's, with members timed by the monotonic clock.
    """

    def __init__(self, ttl_seconds: float = 30.0) -> None:
        self.ttl = ttl_seconds
        self._caps: dict[str, dict[str, float]] = {}  # cap key -> member -> expiry (monotonic)

    def _live(self, key: str, now: float) -> dict[str, float]:
        holders = self._caps.setdefault(key, {})
        for token in [t for t, expiry in holders.items() if expiry <= now]:
            del holders[token]
        return holders

    async def acquire(self, caps: Sequence[Cap]) -> Lease:
        now_ns = time.monotonic_ns()
        now = now_ns / 1e9
        member = f"{now_ns // 1_000_000:013d}:{secrets.token_hex(16)}"
        for cap in caps:
            if len(self._live(cap.key, now)) >= cap.limit:
                raise limit_error(cap)
        for cap in caps:
            self._caps[cap.key][member] = now + self.ttl
        return Lease(token=member, caps=tuple(caps))

    async def renew(self, lease: Lease) -> RenewalResult:
        now = time.monotonic()
        member = lease.token
        retaken = False
        for cap in lease.caps:
            holders = self._live(cap.key, now)
            retaken = retaken or member not in holders
            holders[member] = now + self.ttl
        for cap in lease.caps:
            holders = self._caps[cap.key]
            excess = len(holders) - cap.limit
            if excess > 0 and sum(other > member for other in holders) < excess:
                self._remove(lease)
                return RenewalResult(Renewal.OVER_LIMIT, cap)
        return RenewalResult(Renewal.RETAKEN if retaken else Renewal.HELD)

    def _remove(self, lease: Lease) -> None:
        for cap in lease.caps:
            holders = self._caps.get(cap.key)
            if holders is not None:
                holders.pop(lease.token, None)
                if not holders:
                    del self._caps[cap.key]

    async def release(self, lease: Lease) -> None:
        self._remove(lease)

    async def ready(self) -> bool:
        return True

    async def aclose(self) -> None:
        self._caps.clear()
