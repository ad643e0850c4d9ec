"""The servers a run goes through: the echo upstream, the relay as users run it, nginx, or none.

The relay is started as the ``realtime-relay`` command installed beside this Python, configured
by ``RELAY_*`` variables like any deployment, a fresh process per run.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bench.relay.measure import descendants
from bench.relay.processes import START_TIMEOUT, Lines, Processes, free_port, wait_http
from bench.relay.wire import (
    APPEND_HEAD,
    AUDIO_IN,
    MODEL,
    OPUS_QUERY,
    ROOT,
    UPSTREAM_KEY,
    tone_b64,
)

TARGETS = ("direct", "relay", "nginx")

NGINX_CONF = """\
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    map $http_upgrade $connection_upgrade {{ default upgrade; '' close; }}
    server {{
        listen 127.0.0.1:{port} backlog=1024;
        location / {{
            proxy_pass http://127.0.0.1:{upstream};
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_set_header Host $host;
            proxy_set_header Authorization "Bearer {key}";
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 3600s;
            proxy_send_timeout 3600s;
            tcp_nodelay on;
        }}
    }}
}}
"""


@dataclass
class Upstream:
    port: int
    process: subprocess.Popen[bytes]


@contextlib.contextmanager
def upstream_process(
    response_ms: int, delta_ms: int, processes: Processes, turn_seconds: float = 3.0
) -> Iterator[Upstream]:
    """The echo upstream (`bench.relay.upstream`) in its own process, for the whole bench."""
    argv = [
        sys.executable,
        "-m",
        "bench.relay.upstream",
        f"--response-ms={response_ms}",
        f"--delta-ms={delta_ms}",
        f"--turn-seconds={turn_seconds}",
    ]
    process = processes.start(argv, cwd=ROOT, stdout=subprocess.PIPE)
    try:
        line = Lines(process).readline(START_TIMEOUT)
        yield Upstream(int(line.split()[1]), process)
    finally:
        processes.stop(process)


@dataclass
class Hop:
    """What the load generators connect to for one run, and the process whose cost is measured."""

    name: str
    url: str
    auth: bool
    process: subprocess.Popen[bytes] | None = None
    log: Path | None = None
    opus: bool = False  # Opus both ways (the relay only)
    port: int = 0

    def pids(self) -> list[int]:
        return descendants(self.process.pid) if self.process is not None else []


def relay_command() -> list[str]:
    """The `realtime-relay` command of this environment (`python -m app`), as users run it."""
    script = Path(sys.executable).parent / "realtime-relay"
    if not script.exists():
        sys.exit(f"{script} is missing: install the project first (scripts/bootstrap.sh test)")
    return [str(script)]


def start_hop(
    target: str, up_port: int, tmp: Path, processes: Processes, codec: str = "json"
) -> Hop:
    """Start `target` in front of the upstream on `up_port` and wait until it answers."""
    path = f"/v1/realtime?model={MODEL}"
    if target == "direct":
        return Hop("direct", f"ws://127.0.0.1:{up_port}{path}", auth=True)
    port = free_port()
    log = tmp / f"{target}.log"
    if target == "relay":
        env = {
            **os.environ,
            "OPENAI_API_KEY": UPSTREAM_KEY,
            "RELAY_UPSTREAM__URL": f"ws://127.0.0.1:{up_port}/v1/realtime",
            "RELAY_HOST": "127.0.0.1",
            "RELAY_PORT": str(port),
            "RELAY_LOG_LEVEL": "WARNING",
            "RELAY_GRACEFUL_SHUTDOWN_SECONDS": "2",
            # Short `--turn-seconds` ask for a response while the last one still runs: the
            # default tier refuses that (rate_limited, as OpenAI would refuse it), and the bench
            # measures the hop, not that rule.
            "RELAY_TIERS": '{"default": {"max_concurrent_responses": 4}}',
        }
        env.pop("RELAY_CONFIG_FILE", None)
        with log.open("wb") as out:
            process = processes.start(relay_command(), cwd=ROOT, env=env, stdout=out, stderr=out)
        wait_http(f"http://127.0.0.1:{port}/healthz", process, log)
        if codec == "opus":
            url = f"ws://127.0.0.1:{port}/ws?model={MODEL}&{OPUS_QUERY}"
            return Hop("relay", url, False, process, log, opus=True, port=port)
        url = f"ws://127.0.0.1:{port}{path}"
        return Hop("relay", url, auth=False, process=process, log=log, port=port)
    prefix = tmp / f"nginx-{port}"
    prefix.mkdir()
    conf = prefix / "nginx.conf"
    conf.write_text(NGINX_CONF.format(tmp=prefix, port=port, upstream=up_port, key=UPSTREAM_KEY))
    argv = ["nginx", "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")]
    with log.open("wb") as out:
        process = processes.start(argv, stdout=out, stderr=out)
    # Any HTTP answer (426 or 401 from the upstream) means nginx is up and proxying.
    wait_http(f"http://127.0.0.1:{port}/v1/realtime", process, prefix / "error.log")
    return Hop("nginx", f"ws://127.0.0.1:{port}{path}", auth=False, process=process, log=log)


def stop_hop(hop: Hop, processes: Processes) -> None:
    if hop.process is not None:
        processes.stop(hop.process, signal.SIGTERM)


def warm_up(hop: Hop, packets: list[bytes] | None = None) -> None:
    """Two short sessions, so lazy imports and first-use caches are not counted per session.

    Opus mode: each sends Opus packets and asks for a response, so both codec paths are warm.
    """
    from websockets.sync.client import connect

    headers = [("Authorization", f"Bearer {UPSTREAM_KEY}")] if hop.auth else []
    chunk = tone_b64(20)
    for _ in range(2):
        with connect(hop.url, additional_headers=headers, open_timeout=10, close_timeout=3) as ws:
            ws.recv(timeout=10)
            if hop.opus and packets:
                for packet in packets[:5]:
                    ws.send(AUDIO_IN + packet)
                ws.send('{"type":"response.create"}')
                deadline = time.monotonic() + 5
                with contextlib.suppress(TimeoutError):
                    while time.monotonic() < deadline:  # until the response's audio has passed
                        message = ws.recv(timeout=5)
                        if isinstance(message, str) and '"response.done"' in message[:40]:
                            break
                continue
            for _ in range(5):
                ws.send(f'{APPEND_HEAD}{time.monotonic_ns()}","audio":"{chunk}"}}')
            time.sleep(0.2)
