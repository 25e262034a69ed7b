"""The server launcher's lifecycle, with a stand-in server (no engine)."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path

import httpx
import pytest

from ead_server.launcher import LaunchError, launch, serve_command

# Answers /health after a short start-up, like the real server; forks a child, like the
# engine's worker processes, to check that the whole process group is stopped.
FAKE_SERVER = """
import http.server, os, sys, time
port, pidfile = int(sys.argv[1]), sys.argv[2]
child = os.fork()
if child == 0:
    time.sleep(3600)
    os._exit(0)
open(pidfile, "w").write(f"{os.getpid()} {child}")
time.sleep(0.5)
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()
    def log_message(self, *a):
        pass
http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie child of ours has exited; reap it.
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        return True


def _wait_dead(pids: list[int], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(_alive(p) for p in pids):
            return True
        time.sleep(0.05)
    return False


def test_default_command_runs_the_ead_server_cli() -> None:
    cmd = serve_command("/models/x")
    assert cmd[:3] == [sys.executable, "-m", "ead_server.cli"]
    assert cmd[3:] == ["serve", "--port", "{port}", "--host", "127.0.0.1", "--model", "/models/x"]
    assert "--model" not in serve_command(None)
    assert serve_command(None, ["--dtype=float32"])[-1] == "--dtype=float32"


@pytest.mark.parametrize("fail", [False, True])
def test_server_is_up_inside_and_stopped_after(tmp_path: Path, fail: bool) -> None:
    script, pidfile = tmp_path / "fake.py", tmp_path / "pids"
    script.write_text(FAKE_SERVER)
    command = [sys.executable, str(script), "{port}", str(pidfile)]
    with pytest.raises(RuntimeError, match="boom") if fail else contextlib.nullcontext():
        with launch(command, tmp_path / "server.log", startup_timeout=30) as server:
            assert server.base_url == f"http://127.0.0.1:{server.port}/v1"
            assert httpx.get(f"{server.url}/health").status_code == 200
            pids = [int(p) for p in pidfile.read_text().split()]
            if fail:
                raise RuntimeError("boom")
    assert _wait_dead(pids), "the server or its child outlived the benchmark"


def test_a_server_that_dies_at_start_is_reported_with_its_log(tmp_path: Path) -> None:
    command = [sys.executable, "-c", "import sys; print('no model here'); sys.exit(3)"]
    with pytest.raises(LaunchError, match="(?s)exited with code 3.*no model here"):
        with launch(command, tmp_path / "server.log", startup_timeout=30):
            pass

