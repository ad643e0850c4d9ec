"""A private `redis-server` for tests: a free loopback port, no persistence, stop and restart.

Tests never touch a shared Redis. A test that needs one starts a `RedisServer` (through a
fixture that closes it), may `kill`, `stop` and `restart` it on the same port, and always
cleans up: `close` (or leaving the `with` block) ends the process and removes its directory.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _ping(port: int) -> bool:
    """One RESP PING over a raw socket, so the server's readiness does not depend on redis-py."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"*1\r\n$4\r\nPING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """A `redis-server` subprocess on 127.0.0.1, started by the constructor.

    Args:
        options: further `redis-server` arguments (``"--sentinel"`` for a Sentinel).
        config: the text of a config file to start from.
        executable: the server binary (default: `redis-server` on PATH).

    Fails (never skips) when `redis-server` is not installed: the limits tests need it.
    """

    def __init__(
        self, *options: str, config: str | None = None, executable: str | None = None
    ) -> None:
        found = executable or shutil.which("redis-server")
        if found is None:
            raise RuntimeError(
                "redis-server is not installed (or not on PATH); the Redis limiter tests need "
                "it: install the redis-server package (apt-get install redis-server)"
            )
        self.executable = found
        self.options = options  # further redis-server arguments, e.g. "--cluster-enabled", "yes"
        self.port = _free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="relay-redis-"))
        self.config_file: Path | None = None
        if config is not None:  # Sentinel insists on a config file it can rewrite
            self.config_file = self.dir / "redis.conf"
            self.config_file.write_text(config)
        self.process: subprocess.Popen[bytes] | None = None
        try:
            self.start()
        except BaseException:
            self.close()
            raise

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        """Start the server (empty) and wait until it answers PING."""
        if self.running:
            return
        command = [
            self.executable,
            *([str(self.config_file)] if self.config_file is not None else []),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.dir),
            "--logfile",
            str(self.dir / "redis.log"),
            *self.options,
        ]
        self.process = subprocess.Popen(
            command, cwd=self.dir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + START_TIMEOUT
        while not _ping(self.port):
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited at start: {self._log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not answer in {START_TIMEOUT} s")
            time.sleep(0.02)

    def _log_tail(self) -> str:
        try:
            return (self.dir / "redis.log").read_text()[-500:]
        except OSError:
            return "(no log)"

    def _end(self, graceful: bool) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        if graceful:
            process.terminate()
            try:
                process.wait(STOP_TIMEOUT)
                return
            except subprocess.TimeoutExpired:
                pass
        process.kill()
        process.wait(STOP_TIMEOUT)

    def kill(self) -> None:
        """SIGKILL the server, as a crash would; its data is gone (nothing is persisted)."""
        self._end(graceful=False)

    def stop(self) -> None:
        """Stop the server: SIGTERM, then SIGKILL if it lingers. `start` or `restart` brings it
        back (empty) on the same port."""
        self._end(graceful=True)

    def restart(self) -> None:
        """Kill the server if it runs and start an empty one on the same port."""
        self.kill()
        self.start()

    def close(self) -> None:
        """Stop the server for good and remove its directory; idempotent."""
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
