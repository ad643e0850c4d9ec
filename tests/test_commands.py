"""The commands that run the relay: `realtime-relay`, and any ASGI server on `app.main:app`."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import UPSTREAM_KEY

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]


def test_realtime_relay_is_the_installed_command():
    """`realtime-relay` is installed with the package and is the relay's own server."""
    command = Path(sys.executable).parent / "realtime-relay"
    done = subprocess.run([command, "--help"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0
    assert done.stdout.startswith("usage: realtime-relay")
    assert "--demo" in done.stdout


async def test_an_asgi_server_is_told_it_runs_the_portable_path(upstream):
    """`uvicorn app.main:app` logs once that it is the portable path and names the command."""
    env = {
        **os.environ,
        "OPENAI_API_KEY": UPSTREAM_KEY,
        "RELAY_UPSTREAM__URL": upstream.url,
        "RELAY_LOG_LEVEL": "INFO",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        *("-m", "uvicorn", "app.main:app", "--host", "127.0.0.1", "--port", "0"),
        env=env,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stderr is not None
    lines: list[str] = []
    try:
        async with asyncio.timeout(30):
            while not any("Application startup complete" in line for line in lines):
                lines.append((await process.stderr.readline()).decode())
    finally:
        process.kill()
        await process.wait()
    notes = [line for line in lines if "portable path" in line]
    assert len(notes) == 1
    assert "realtime-relay" in notes[0]
