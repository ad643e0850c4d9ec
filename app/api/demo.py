"""The demo's server tool: ``POST /v1/relay/demo/time``, the local time in a few known cities.

`realtime-relay --demo` without a key (the local echo upstream) configures one HTTP server tool,
`get_time` (`demo_tool`), pointing at this route on the relay itself, so a new user sees a tool
round trip: type "get time in Paris" on the page. The route is served only in that mode.

It takes the body the relay's HTTP tool executor sends (``{"name", "arguments", "call_id",
"session_id", "tier", "client"}``, `arguments` being the model's JSON text or an object) and
answers ``{"city", "time", "timezone"}``, or ``{"error": ...}`` (still 200: the model reads it
and can say it does not know that city).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

DEMO_TIME_PATH = "/v1/relay/demo/time"
DEMO_TOOL_NAME = "get_time"

# City (lower case) -> (its name as shown, IANA time zone).
CITIES: dict[str, tuple[str, str]] = {
    "paris": ("Paris", "Europe/Paris"),
    "london": ("London", "Europe/London"),
    "berlin": ("Berlin", "Europe/Berlin"),
    "new york": ("New York", "America/New_York"),
    "san francisco": ("San Francisco", "America/Los_Angeles"),
    "sao paulo": ("São Paulo", "America/Sao_Paulo"),
    "são paulo": ("São Paulo", "America/Sao_Paulo"),
    "tokyo": ("Tokyo", "Asia/Tokyo"),
    "mumbai": ("Mumbai", "Asia/Kolkata"),
    "sydney": ("Sydney", "Australia/Sydney"),
}
_KNOWN = ", ".join(sorted({shown for shown, _ in CITIES.values()}))


def demo_tool(relay_url: str) -> dict[str, Any]:
    """The `get_time` entry of RELAY_TOOLS for a relay reachable at `relay_url` (no slash)."""
    return {
        "name": DEMO_TOOL_NAME,
        "description": f"The current local time in a city (demo tool; knows {_KNOWN}).",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "A city, e.g. Paris"}},
            "required": ["city"],
        },
        "http": {"url": relay_url + DEMO_TIME_PATH, "timeout_seconds": 5},
    }


def _city_named(text: str) -> tuple[str, str] | None:
    """The known city `text` names: exactly, or as a word within it ("Paris, France")."""
    wanted = " ".join(text.lower().replace(",", " ").split())
    if wanted in CITIES:
        return CITIES[wanted]
    padded = f" {wanted} "
    matches = [key for key in CITIES if f" {key} " in padded]
    return CITIES[max(matches, key=len)] if matches else None


def local_time(arguments: Any, now: datetime) -> dict[str, str]:
    """The tool's answer for the model's `arguments` (JSON text or an object) at `now` (UTC)."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return {"error": "the arguments are not JSON"}
    city = arguments.get("city") if isinstance(arguments, dict) else None
    if not isinstance(city, str) or not city.strip():
        return {"error": f"name a city; this demo knows {_KNOWN}"}
    found = _city_named(city)
    if found is None:
        return {"error": f"this demo does not know {city[:64]!r}; it knows {_KNOWN}"}
    shown, zone = found
    try:
        there = now.astimezone(ZoneInfo(zone))
    except ZoneInfoNotFoundError:  # no system tz database and no `tzdata` package
        return {"error": "time zone data is not installed on the relay"}
    return {"city": shown, "time": there.strftime("%H:%M"), "timezone": zone}


def demo_router(clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> APIRouter:
    """The demo tool's route; `clock` gives the current time (aware), for tests."""
    router = APIRouter()

    @router.post(DEMO_TIME_PATH, include_in_schema=False)
    async def demo_time(request: Request) -> JSONResponse:
        try:
            body = json.loads(await request.body())
        except ValueError:
            return JSONResponse({"error": "the body is not JSON"}, status_code=400)
        if not isinstance(body, dict) or "arguments" not in body:
            return JSONResponse({"error": "expected the relay's tool call"}, status_code=400)
        return JSONResponse(local_time(body["arguments"], clock()))

    return router
