"""Shared fixtures: tiny models on disk, and the environment every engine needs here.

Engines are expensive on 2 cores, so each fixture that starts one is module- or
session-scoped, and the suite never has more than two alive at once.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# Before anything imports vLLM or transformers: no hub, and a small explicit KV cache
# so that two engines fit in memory beside each other.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Triton's interpreter for every Triton kernel the tests run without a GPU, set before
# vLLM imports Triton: a @triton.jit function made outside the interpreter (Triton's own
# tl.max and tl.sum, when vLLM imported Triton first) cannot be called from inside it.
if not __import__("torch").cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).parent))
from tiny_model import write_tiny_llama  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    # "engine" is declared in pyproject.toml; this one only shapes `make test-fast`.
    config.addinivalue_line("markers", "slow: no engine, but a subprocess that imports vLLM (left out of make test-fast)")


@pytest.fixture(autouse=True)
def environ_kept() -> Iterator[None]:
    """Every test leaves the environment as it found it. TRL sets ``VLLM_LOGGING_LEVEL=ERROR``
    in this process when first imported (``trl/_compat.py``): servers that later tests start
    would inherit it and log nothing (a test reads a server's log)."""
    saved = dict(os.environ)
    yield
    if os.environ != saved:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny untied Llama, written once per session."""
    return write_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_tied_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama with tied embeddings, like the default model."""
    return write_tiny_llama(tmp_path_factory.mktemp("tiny-llama-tied"), tie_word_embeddings=True, seed=1)


@pytest.fixture(scope="session")
def server(tiny_model_dir, tmp_path_factory):
    """The real CLI serving the tiny model, shared by the whole session."""
    from server_process import running_server

    with running_server(tmp_path_factory.mktemp("server-logs"), "--model", str(tiny_model_dir),
                        "--served-model-name", "tiny", "--max-model-len", "512") as srv:
        yield srv


@pytest.fixture(scope="session")
def server_url(server) -> str:
    """OpenAI-style base URL (ending in /v1) of the shared test server."""
    return server.base_url


@pytest.fixture(scope="session")
def model_name() -> str:
    return "tiny"


@pytest.fixture(scope="module")
def trainer_loop_server():
    """A module's own server for a training loop (the GRPO example, ``ead-bench rl``): the
    tiny model, reloads under ``root`` with admin key ``k``; yields ``(server, root, base, tmp)``.

    A private temporary folder rather than ``tmp_path_factory``: pytest keeps only the
    three newest ``/tmp/pytest-of-USER/pytest-N`` folders, so other pytest sessions on the
    same machine can delete a long test's folder (and its checkpoints) under it.
    """
    import tempfile

    from server_process import running_server

    with tempfile.TemporaryDirectory(prefix="ead-loop-test-") as name:
        tmp = Path(name)
        root = tmp / "weights"
        base = write_tiny_llama(root / "base")
        with running_server(tmp, "--model", str(base), "--weights-root", str(root), "--admin-key", "k",
                            "--max-model-len", "512") as server:
            yield server, root, base, tmp


@pytest.fixture(params=["torch", "triton"])
def kernel_path(request, monkeypatch):
    """Run the processor through the PyTorch path or the Triton kernel (interpreted here),
    for the processor tests under both runners' interfaces."""
    from ead_kernels import temperature as T

    if request.param == "triton":
        if not T.triton_available():
            pytest.skip("triton is not installed")
        T._triton_kernel.cache_clear()
        monkeypatch.setattr(T, "_use_triton", lambda logits: True)
        yield request.param
        T._triton_kernel.cache_clear()
    else:
        yield request.param
