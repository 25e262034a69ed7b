"""Start a server subprocess, wait until it answers ``/health``, and stop it for sure.

One launcher for everything that runs a server as a child process: ``ead-bench`` (the
embedded server, stock vLLM's server for comparisons, several replicas), the test
suite's shared and dedicated servers, and the multi-server client tests. Each server
runs in its own session (process group), because vLLM's engine has worker processes of
its own: stopping the group stops them all. A server that dies while starting is
reported with the end of its log, which is where vLLM says why.

Needs only the standard library and httpx, so the light install can use it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

__all__ = ["LaunchError", "Launched", "free_port", "launch", "serve_command"]


class LaunchError(RuntimeError):
    """The server did not come up: it exited, or it was not healthy in time."""


def free_port() -> int:
    """A loopback port free right now (the usual bind-to-0 race applies)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve_command(model: str | None = None, extra_args: Sequence[str] = ()) -> list[str]:
    """``ead-server serve`` on ``127.0.0.1:{port}`` with this interpreter (no PATH lookup).

    A template for :func:`launch`, which fills in ``{port}``.
    """
    cmd = [sys.executable, "-m", "ead_server.cli", "serve", "--port", "{port}", "--host", "127.0.0.1"]
    return cmd + (["--model", model] if model else []) + list(extra_args)


def tail(path: Path, lines: int = 40) -> str:
    """The last ``lines`` lines of a log, or ``""`` when it cannot be read."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


@dataclass
class Launched:
    """A running server: its root URL, its process (the group leader) and its log."""

    url: str  # root, e.g. http://127.0.0.1:PORT
    process: subprocess.Popen
    log: Path

    @property
    def base_url(self) -> str:
        """OpenAI-style base URL (``.../v1``), as the openai SDK and ``ead-bench`` take it."""
        return f"{self.url}/v1"

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the whole process group (no-op once it is gone)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, sig)

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM the group, then SIGKILL it after ``timeout`` s; returns the exit code."""
        if self.process.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.process.returncode

    def kill(self) -> None:
        """SIGKILL the group at once (a crash, as a test or a fault injector wants it)."""
        self.signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def wait_healthy(self, timeout: float) -> None:
        """Poll ``/health`` until it answers 200; raise :class:`LaunchError` with the log's
        end if the process exits first or ``timeout`` s pass."""
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=5.0) as http:
            while True:
                if self.process.poll() is not None:
                    raise LaunchError(f"the server exited with code {self.process.returncode} before it was "
                                      f"ready; the end of {self.log}:\n{tail(self.log)}")
                with contextlib.suppress(httpx.HTTPError):
                    if http.get(f"{self.url}/health").status_code == 200:
                        return
                if time.monotonic() > deadline:
                    raise LaunchError(f"the server was not ready after {timeout:.0f} s; the end of "
                                      f"{self.log}:\n{tail(self.log)}")
                time.sleep(0.5)


@contextlib.contextmanager
def launch(
    command: Sequence[str] | None,
    log: Path,
    *,
    port: int | None = None,
    env: Mapping[str, str] | None = None,
    startup_timeout: float = 900.0,
    stop_timeout: float = 60.0,
) -> Iterator[Launched]:
    """Run a server for the duration of the block and yield its :class:`Launched` handle.

    ``command`` is any command line, with ``{port}`` filled in (``None``: ``ead-server
    serve`` with no arguments). ``env`` is added to this process's environment. Output
    goes unbuffered to ``log`` (appended), so a log shows each request as it happens.
    On exit, normal or not, the whole process group is stopped.
    """
    port = port or free_port()
    cmd = [c.replace("{port}", str(port)) for c in command or serve_command()]
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    server = Launched(f"http://127.0.0.1:{port}", process, log)
    try:
        server.wait_healthy(startup_timeout)
        yield server
    finally:
        server.stop(stop_timeout)
