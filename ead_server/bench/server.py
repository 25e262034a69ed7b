"""Starting and stopping the embedded ``ead-server`` when no ``--base-url`` is given.

The server runs as ``python -m ead_server.cli serve`` on a free loopback port, in its own
process group (the engine has worker processes of its own), logs to ``OUT/server.log``,
and is stopped -- the whole group -- when the benchmark ends, fails or is interrupted.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx

__all__ = ["ServerError", "embedded_server", "free_port", "serve_command"]


class ServerError(RuntimeError):
    """The embedded server did not come up."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve_command(port: int, model: str | None, extra_args: Sequence[str] = ()) -> list[str]:
    cmd = [sys.executable, "-m", "ead_server.cli", "serve", "--port", str(port), "--host", "127.0.0.1"]
    return cmd + (["--model", model] if model else []) + list(extra_args)


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _stop(proc: subprocess.Popen, timeout: float) -> None:
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


@contextlib.contextmanager
def embedded_server(
    log_path: Path,
    *,
    model: str | None = None,
    extra_args: Sequence[str] = (),
    startup_timeout: float = 900.0,
    stop_timeout: float = 30.0,
    command: Sequence[str] | None = None,
) -> Iterator[str]:
    """Run a server for the duration of the block; yields its base URL (``.../v1``).

    ``command`` replaces the default ``serve`` command; ``{port}`` in it is filled in.
    """
    port = free_port()
    cmd = [c.format(port=port) for c in command] if command else serve_command(port, model, extra_args)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + startup_timeout
        with httpx.Client(timeout=5.0) as http:
            while True:
                if proc.poll() is not None:
                    raise ServerError(
                        f"the embedded server exited with code {proc.returncode} before it was ready; "
                        f"the end of {log_path}:\n{_tail(log_path)}"
                    )
                with contextlib.suppress(httpx.HTTPError):
                    if http.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise ServerError(f"the embedded server was not ready after {startup_timeout:.0f} s; see {log_path}")
                time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        _stop(proc, stop_timeout)
