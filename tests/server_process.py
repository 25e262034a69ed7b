"""Start the real ``ead-server serve`` CLI as a subprocess on a free loopback port."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from ead_server.bench.server import free_port, serve_command


@dataclass
class Server:
    url: str  # root, e.g. http://127.0.0.1:PORT
    process: subprocess.Popen
    log: Path

    @property
    def base_url(self) -> str:
        """OpenAI-style base URL, as the openai SDK takes it."""
        return f"{self.url}/v1"

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)


@contextlib.contextmanager
def running_server(log_dir: Path, *args: str, timeout: float = 600) -> Iterator[Server]:
    """Run ``ead-server serve ARGS`` until the block ends; fail with its log if it dies."""
    port = free_port()
    log = log_dir / f"server-{port}.log"
    cmd = serve_command(port, None, args)
    with log.open("wb") as out:
        # Unbuffered, so that the log shows each answered request as it happens.
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"})
    server = Server(f"http://127.0.0.1:{port}", process, log)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"server exited with {process.returncode}:\n{log.read_text(errors='replace')[-4000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{server.url}/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"server not healthy after {timeout} s:\n{log.read_text(errors='replace')[-4000:]}")
            time.sleep(1)
        yield server
    finally:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                server.kill()
