"""The engine calls behind ead-server's own routes: generate, score, reload weights."""

from __future__ import annotations

from typing import Any

from vllm import SamplingParams
from vllm.sampling_params import RequestOutputKind

from ead_server.request_policy import NEUTRAL_SAMPLING, SCHEDULE_KEY, PolicyError
from ead_server.schedule import ResolvedSchedule

__all__ = ["LOGPROBS_MODE", "completion_logprobs", "context_length", "generate", "reload_weights",
           "rollout_params", "schedule_extra_args", "target_logprobs", "vllm_version"]

LOGPROBS_MODE = "processed_logprobs"
"""The engine's ``logprobs_mode`` under which returned log-probs are behaviour log-probs:
taken after temperature, after the EAD processor and after min-p and top-k/top-p."""


def vllm_version() -> str:
    from vllm import __version__

    return __version__


def schedule_extra_args(schedule: ResolvedSchedule, extra_args: dict[str, Any] | None = None) -> dict[str, Any]:
    """``extra_args`` carrying ``schedule`` for the processor, beside any others."""
    return {**(extra_args or {}), SCHEDULE_KEY: schedule.as_request()}


def context_length(engine: Any) -> int:
    """The model's context length (``--max-model-len``): prompt plus output tokens."""
    return engine.model_config.max_model_len


def rollout_params(
    *, n: int, max_tokens: int, stop: str | list[str] | None, seed: int | None, temperature: float | None,
    top_p: float | None, top_k: int | None, schedule: ResolvedSchedule | None,
) -> SamplingParams:
    """Sampling settings of a rollout: the request policy's neutral settings unless asked,
    temperature 1 under a schedule (which sets each token's), and the sampled token's
    log-prob returned.

    vLLM's own checks of the values run here, as they do for ``/v1/completions``; a
    refusal is a :class:`PolicyError` naming the field as vLLM names it.
    """
    chosen = {k: v for k, v in {"top_p": top_p, "top_k": top_k}.items() if v is not None}
    try:
        return SamplingParams(
            n=n, max_tokens=max_tokens, stop=stop, seed=seed, logprobs=0,
            temperature=1.0 if temperature is None else temperature, **{**NEUTRAL_SAMPLING, **chosen},
            extra_args=schedule_extra_args(schedule) if schedule else None, output_kind=RequestOutputKind.FINAL_ONLY,
        )
    except ValueError as exc:  # VLLMValidationError carries the field as `parameter`
        raise PolicyError(str(exc.args[0]) if exc.args else str(exc), getattr(exc, "parameter", None)) from None


async def generate(engine: Any, prompt_ids: list[int], params: SamplingParams, request_id: str) -> Any:
    """The final ``RequestOutput`` of one request (``FINAL_ONLY``: all ``n`` samples at once)."""
    final = None
    async for output in engine.generate({"prompt_token_ids": prompt_ids}, params, request_id):
        final = output
    return final


def completion_logprobs(completion: Any) -> list[float]:
    """The sampled tokens' log-probs (behaviour log-probs under ``LOGPROBS_MODE``)."""
    return [step[token].logprob for step, token in zip(completion.logprobs, completion.token_ids)]


async def target_logprobs(engine: Any, prompt_ids: list[int], token_ids: list[int], request_id: str) -> list[float]:
    """Log-probs of ``token_ids`` after ``prompt_ids`` at temperature 1, untruncated.

    A scoring pass: prompt log-probs are computed from the raw logits, before any
    sampling processor, so they are the target policy's whatever the engine's mode.
    """
    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0, output_kind=RequestOutputKind.FINAL_ONLY)
    output = await generate(engine, prompt_ids + token_ids, params, request_id)
    steps = output.prompt_logprobs[len(prompt_ids):]
    return [step[token].logprob for step, token in zip(steps, token_ids)]


async def reload_weights(engine: Any, path: str) -> None:
    """Load a checkpoint into the running engine, in place, and drop all cached KV.

    In-flight requests are drained first; cached prefixes computed with the old
    weights must never serve the new ones.
    """
    await engine.pause_generation(mode="wait", clear_cache=True)
    try:
        await engine.collective_rpc("reload_weights", kwargs={"weights_path": path})
        await engine.reset_prefix_cache()
    finally:
        await engine.resume_generation()
