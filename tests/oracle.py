"""The independent computation every exactness test compares with: a plain transformers
forward pass over the same weights, and log-probs under a schedule's temperatures."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import torch


@functools.lru_cache(maxsize=4)
def _model(model_dir: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def completion_logits(model_dir: Path, prompt_ids: Sequence[int], output_ids: Sequence[int]) -> torch.Tensor:
    """Logits ``h`` [len(output_ids), V] that precede each generated token."""
    ids = torch.tensor([list(prompt_ids) + list(output_ids)])
    with torch.no_grad():
        logits = _model(str(model_dir))(ids).logits[0].float()
    start = len(prompt_ids) - 1
    return logits[start : start + len(output_ids)]


def behaviour_logprobs(
    model_dir: Path,
    prompt_ids: Sequence[int],
    output_ids: Sequence[int],
    temperatures: Sequence[float],
    top_k: int | None = None,
    min_p: float = 0.0,
) -> torch.Tensor:
    """``log_softmax(h_t / tau_t)[y_t]``, renormalised over the top-k, or over the tokens
    whose probability under ``softmax(h_t / tau_t)`` is at least ``min_p`` times the
    largest (min-p applied after the temperature, as vLLM applies it), when given."""
    h = completion_logits(model_dir, prompt_ids, output_ids) / torch.tensor(temperatures).unsqueeze(1)
    if min_p:
        probs = h.softmax(-1)
        h = h.masked_fill(probs < min_p * probs.max(-1, keepdim=True).values, float("-inf"))
    if top_k:
        kth = h.topk(top_k, dim=-1).values[:, -1:]
        h = h.masked_fill(h < kth, float("-inf"))
    return h.log_softmax(-1).gather(1, torch.tensor(output_ids).unsqueeze(1)).squeeze(1)
