"""Server tools run by an HTTP request to the application's own endpoint (RELAY_TOOLS `http`).

The relay sends the call to the configured URL with the configured headers (credentials the
relay holds, never shown to the model or the client): for POST and PUT a JSON body

    {"name": ..., "arguments": {...}, "call_id": ..., "session_id": ..., "tier": ..., "client": ...}

and for GET the same fields as query parameters (`arguments` as JSON text), since a GET body is
ignored by many servers. A 2xx answer is the output: a JSON body as compact JSON text, any other
body as it is. A non-2xx status, a timeout and a failed connection each give the model an
`{"error": ...}` output. The body is read up to a bound, so a huge answer costs no more memory
than the output the model may get.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, Final

import httpx2

from app.codes import ToolOutcome
from app.config import ServerToolSettings
from app.tools.calls import (
    TIMED_OUT,
    UNAVAILABLE,
    ToolCall,
    ToolContext,
    ToolResult,
    compact_json,
    failure,
)

# Bytes read per character of output allowed: a UTF-8 character takes at most 4 bytes, and
# compacting a JSON body drops its whitespace, so a body past this is certainly cut.
BYTES_PER_CHAR: Final = 8


class HttpTool:
    """One server tool that the relay runs over HTTP.

    Args:
        settings: its RELAY_TOOLS entry (with `http` set).
        max_output_chars: the longest output the model gets (bounds the body read).
    """

    def __init__(self, settings: ServerToolSettings, max_output_chars: int) -> None:
        if settings.http is None or settings.name is None:
            raise ValueError("an HTTP tool needs a name and its http settings")
        self.name = settings.name
        self._settings = settings
        self._http = settings.http
        self._max_bytes = max_output_chars * BYTES_PER_CHAR

    def definition(self) -> dict[str, Any]:
        """The GA function tool the model is given."""
        return {
            "type": "function",
            "name": self.name,
            "description": self._settings.description,
            "parameters": self._settings.parameters,
        }

    async def run(
        self,
        client: httpx2.AsyncClient,
        arguments: dict[str, Any],
        call: ToolCall,
        context: ToolContext,
    ) -> ToolResult:
        """Send the call and turn the answer into a result; never raises but CancelledError."""
        fields: dict[str, Any] = {
            "name": self.name,
            "arguments": arguments,
            "call_id": call.call_id,
            "session_id": context.session_id,
            "tier": context.tier,
            "client": context.client,
        }
        headers = {key: value.get_secret_value() for key, value in self._http.headers.items()}
        # The output is capped as it is read: a compressed body could expand far past the cap
        # in one chunk before the cap applies.
        headers.setdefault("Accept-Encoding", "identity")
        timeout = self._http.timeout_seconds
        if self._http.method == "GET":
            params = {
                key: compact_json(value) if key == "arguments" else value
                for key, value in fields.items()
                if value is not None
            }
            request = client.build_request(
                "GET", self._http.url, params=params, headers=headers, timeout=timeout
            )
        else:
            request = client.build_request(
                self._http.method, self._http.url, json=fields, headers=headers, timeout=timeout
            )
        try:
            # httpx2's timeout bounds each read; this bounds the whole call (a slow drip too).
            async with asyncio.timeout(timeout):
                response = await client.send(request, stream=True)
                try:
                    if not response.is_success:
                        return failure(
                            ToolOutcome.ERROR, f"the tool failed (HTTP {response.status_code})"
                        )
                    body = await self._read(response)
                finally:
                    await response.aclose()
        except (TimeoutError, httpx2.TimeoutException):
            return TIMED_OUT
        except httpx2.TransportError:
            return UNAVAILABLE
        except httpx2.HTTPError:  # a body that cannot be decoded, and the like
            return failure(ToolOutcome.ERROR, "the tool failed")
        return ToolResult(_output(response, body), ToolOutcome.OK)

    async def _read(self, response: httpx2.Response) -> bytes:
        """The body, or its first `_max_bytes` and a byte more when it is longer."""
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.aiter_bytes():
            chunks.append(chunk)
            size += len(chunk)
            if size > self._max_bytes:
                break
        return b"".join(chunks)[: self._max_bytes + 1]


def _output(response: httpx2.Response, body: bytes) -> str:
    """The model's output for a 2xx `body`: compact JSON if it is JSON, else the text."""
    try:
        text = body.decode(response.charset_encoding or "utf-8", errors="replace")
    except LookupError:  # a charset Python does not know
        text = body.decode("utf-8", errors="replace")
    media_type = response.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type == "application/json" or media_type.endswith("+json"):
        try:
            return compact_json(json.loads(text))
        except (ValueError, RecursionError):
            pass  # cut, or not JSON after all: pass the text on as it is
    return text
