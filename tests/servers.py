"""Loopback servers of a test's own: a free port, and a redis-server the test can kill and restart."""
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A redis-server on a free 127.0.0.1 port with its files in `folder`. With `durable`, it writes
    every command to its append-only file before answering, so what it acknowledged survives a
    kill -9 and a restart; otherwise a restart starts it empty."""

    def __init__(self, folder: Path, durable: bool = False):
        self.port, self.dir, self.durable, self.proc = free_port(), folder, durable, None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        import redis

        persistence = ["--appendonly", "yes", "--appendfsync", "always"] if self.durable else ["--appendonly", "no"]
        self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      *persistence, "--dir", str(self.dir)], stdout=subprocess.DEVNULL)
        client = redis.Redis.from_url(self.url)
        for _ in range(200):
            try:
                client.ping()
                return
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()


@contextmanager
def kvblend_serve(args: list[str], folder: Path, up_within_s: float) -> Iterator[str]:
    """A real `kvblend serve ARGS` on a free loopback port (log in `folder`), yielding its base URL
    once /v1/models answers; the server and its vLLM processes are stopped afterwards."""
    import httpx
    import pytest

    port = free_port()
    command = [sys.executable, "-c", "from kvblend.cli import app; app()", "serve", "--port", str(port), *args]
    log = open(folder / "server.log", "w")
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.time() + up_within_s
        while True:
            if proc.poll() is not None:
                pytest.fail(f"kvblend serve exited early:\n{(folder / 'server.log').read_text()[-3000:]}")
            try:
                httpx.get(f"{base}/models", timeout=10)
                break
            except httpx.TransportError:
                if time.time() > deadline:
                    pytest.fail(f"kvblend serve did not come up in {up_within_s:.0f} s")
                time.sleep(1)
        yield base
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
