"""The engine calls behind ead-server's own routes: generate, score, reload weights."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from copy import copy
from dataclasses import dataclass, field
from typing import Any

from vllm import SamplingParams
from vllm.sampling_params import RequestOutputKind

from ead_server import request_contract as contract
from ead_server.errors import APIError
from ead_server.vllm_adapter import targets
from ead_server.weight_gate import parse_tag

__all__ = ["LOGPROBS_MODE", "EngineCall", "completion_logprobs", "completion_targets", "context_length", "recorded_numbers",
           "finish_transfer", "generate", "load_weights", "pause", "recording_calls", "reset_cache", "resume",
           "rl_router", "rl_start_weight_update", "rl_update_weights", "rl_weight_checker", "rollout_params",
           "sample_targets", "sampling_params", "server_info_router",
           "set_weight_version", "tap_engine_calls", "target_logprobs", "version_spans", "vllm_version"]

LOGPROBS_MODE = "processed_logprobs"
"""The engine's ``logprobs_mode`` under which returned log-probs are behaviour log-probs:
taken after temperature, after the EAD processor and after min-p and top-k/top-p."""


def vllm_version() -> str:
    from vllm import __version__

    return __version__


def context_length(engine: Any) -> int:
    """The model's context length (``--max-model-len``): prompt plus output tokens."""
    return engine.model_config.max_model_len


def sampling_params(
    request: contract.Request, given: dict[str, Any], *, extra: dict[str, Any] | None = None,
    target_id: str | None = None, param_name: Callable[[str], str] = str, **fields: Any,
) -> SamplingParams:
    """vLLM's ``SamplingParams`` for a request the contract read: ``given`` are the
    truncation and penalty settings the request set (``None`` = unset: the contract pins
    them under a schedule), ``fields`` the rest; the sampled token's log-prob is returned,
    and in-pass targets are recorded under ``target_id``.

    vLLM's own checks of the values run here, as they do for ``/v1/completions``; a
    refusal is a 400 naming the field as vLLM names it, through ``param_name`` for a
    route whose protocol names it otherwise.
    """
    sampling = {"temperature": request.temperature, **{k: v for k, v in given.items() if v is not None},
                **request.sampling(given)}
    extra_args = request.extra_args({**(extra or {}), **({contract.TARGET_KEY: target_id} if target_id else {})}
                                    or None)
    try:
        return SamplingParams(logprobs=0, extra_args=extra_args, output_kind=RequestOutputKind.FINAL_ONLY,
                              **fields, **sampling)
    except ValueError as exc:  # VLLMValidationError carries the field as `parameter`
        param = getattr(exc, "parameter", None)
        raise APIError(400, str(exc.args[0]) if exc.args else str(exc), param_name(param) if param else None) from None


def rollout_params(
    request: contract.Request, *, n: int, max_tokens: int, stop: str | list[str] | None, seed: int | None,
    top_p: float | None, top_k: int | None, ignore_eos: bool = False, target_id: str | None = None,
) -> SamplingParams:
    """Sampling settings of a ``/v1/rollouts`` request (:func:`sampling_params`)."""
    return sampling_params(request, {"top_p": top_p, "top_k": top_k}, target_id=target_id, n=n,
                           max_tokens=max_tokens, stop=stop, seed=seed, ignore_eos=ignore_eos)


async def generate(engine: Any, prompt_ids: list[int], params: SamplingParams, request_id: str) -> Any:
    """The final ``RequestOutput`` of one request (``FINAL_ONLY``: all ``n`` samples at once)."""
    final = None
    async for output in engine.generate({"prompt_token_ids": prompt_ids}, params, request_id):
        final = output
    return final


def completion_logprobs(completion: Any) -> list[float]:
    """The sampled tokens' log-probs (behaviour log-probs under ``LOGPROBS_MODE``)."""
    return [step[token].logprob for step, token in zip(completion.logprobs, completion.token_ids)]


async def target_logprobs(
    engine: Any, prompt_ids: list[int], token_ids: list[int], request_id: str,
) -> tuple[list[float], int | None]:
    """Log-probs of ``token_ids`` after ``prompt_ids`` at temperature 1, untruncated, and
    the weight version that computed them.

    A scoring pass: prompt log-probs are computed from the raw logits, before any
    sampling processor, so they are the target policy's whatever the engine's mode.
    """
    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0, output_kind=RequestOutputKind.FINAL_ONLY)
    output = await generate(engine, prompt_ids + token_ids, params, request_id)
    steps = output.prompt_logprobs[len(prompt_ids):]
    spans = version_spans(output.outputs[0]) if output.outputs else None
    return [step[token].logprob for step, token in zip(steps, token_ids)], (spans[0]["version"] if spans else None)


async def recorded_numbers(engine: Any, target_id: str | None, n: int, indices: list[int]) -> list[targets.Recorded | None]:
    """The in-pass numbers the samples ``indices`` of one prompt's request recorded under
    ``target_id`` (collected, and so forgotten by the engine), ``None`` where none."""
    if target_id is None:
        return [None] * len(indices)
    ids = contract.sample_target_ids(target_id, n)
    found = await targets.collect(engine, [ids[i] for i in indices if i < len(ids)])
    return [found.get(ids[i]) if i < len(ids) else None for i in indices]


async def completion_targets(
    engine: Any, prompt_ids: list[int], completions: list[Any], temperatures: list[list[float]], request_id: str,
    recorded: list[targets.Recorded | None],
) -> list[tuple[list[float | None], str]]:
    """Each completion's target log-probs and where they came from (:func:`sample_targets`),
    given its recorded in-pass numbers (:func:`recorded_numbers`)."""
    return list(await asyncio.gather(*(
        sample_targets(engine, prompt_ids, list(c.token_ids), completion_logprobs(c), temps, version_spans(c), found,
                       f"{request_id}-{c.index}")
        for c, temps, found in zip(completions, temperatures, recorded)
    )))


async def sample_targets(
    engine: Any, prompt_ids: list[int], token_ids: list[int], behaviour: list[float], temperatures: list[float],
    spans: list[dict[str, Any]] | None, recorded: targets.Recorded | None, request_id: str,
) -> tuple[list[float | None], str]:
    """One sample's target log-probs and where they came from: ``"sampling"`` (the
    processor's in-pass numbers, exact across weight changes, since the same step made
    them) or ``"scoring"`` (a second pass, when nothing was recorded; tokens whose weights
    were replaced before it ran get ``None``)."""
    found = targets.targets_from(recorded, behaviour, temperatures) if recorded is not None else None
    if found is not None:
        return found, "sampling"
    values, version = await target_logprobs(engine, prompt_ids, token_ids, f"{request_id}-score")
    return _same_weights_only(values, version, spans), "scoring"


def _same_weights_only(values: list[float], version: int | None,
                       spans: list[dict[str, Any]] | None) -> list[float | None]:
    """Scored target log-probs where the scoring pass ran on the weights that produced the
    token, ``None`` where the weights changed in between (a ``keep`` or ``abort`` reload
    during the rollout): those weights are gone, and a number from others would be wrong."""
    if version is None or not spans:
        return list(values)
    out: list[float | None] = list(values)
    for span in spans:
        if span["version"] != version:
            out[span["start"]:span["end"]] = [None] * (span["end"] - span["start"])
    return out


async def pause(engine: Any, mode: str) -> None:
    """Stop the engine for a weight swap, and drop every cached KV.

    ``wait`` lets in-flight requests finish first, ``abort`` ends them at once (with the
    tokens they have, ``finish_reason: "abort"``), ``keep`` freezes them. With
    ``clear_cache=True`` vLLM resets the caches with ``reset_running_requests=True``, so
    frozen requests are preempted and prefill again on resume: under the new weights,
    over their whole prefix (never ``clear_cache=False``: that would serve old KV).
    """
    await engine.pause_generation(mode=mode, clear_cache=True)


async def resume(engine: Any) -> None:
    """Drop any KV computed since the pause (there should be none) and go on."""
    await reset_cache(engine)
    await engine.resume_generation()


async def reset_cache(engine: Any) -> None:
    """Drop every cached prefix; running requests are preempted and prefill again, so no
    KV computed by earlier weights survives."""
    await engine.reset_prefix_cache(reset_running_requests=True)


def rl_router() -> Any:
    """vLLM's RL routes (pause, resume, weight transfer, ...), to mount behind our admin key.

    vLLM itself mounts them only under ``VLLM_SERVER_DEV_MODE=1``, together with routes
    that bypass ``--api-key``; this is the router alone.
    """
    from vllm.entrypoints.rl.online.api_router import router

    return router


def server_info_router() -> Any:
    """vLLM's ``GET /server_info`` (a dev-mode route), which TRL's weight sync reads first
    (``VLLMClient.init_communicator``); to mount behind our admin key."""
    from vllm.entrypoints.serve.dev.server_info.api_router import router

    return router


def rl_weight_checker() -> Any:
    """vLLM's ``/weight_checker`` handler, for ours to call for the actions it allows."""
    from vllm.entrypoints.rl.online.api_router import weight_checker

    return weight_checker


def rl_start_weight_update() -> Any:
    """vLLM's ``/start_weight_update`` handler (the first phase of its weight transfer)."""
    from vllm.entrypoints.rl.online.api_router import start_weight_update

    return start_weight_update


def rl_update_weights() -> Any:
    """vLLM's ``/update_weights {"update_info"}`` handler (a phase of its weight transfer)."""
    from vllm.entrypoints.rl.online.api_router import update_weights

    return update_weights


async def load_weights(engine: Any, path: str) -> None:
    """Load a checkpoint folder into the (paused) engine, in place."""
    await engine.collective_rpc("reload_weights", kwargs={"weights_path": path})


async def set_weight_version(engine: Any, tag: str) -> None:
    """The engine's weight version: attached to every token produced from now on."""
    await engine.update_weight_version(tag)


async def finish_transfer(engine: Any) -> None:
    """The last phase of vLLM's weight transfer (weights sent by the trainer)."""
    await engine.collective_rpc("finish_weight_update")


def version_spans(completion: Any) -> list[dict[str, Any]] | None:
    """A finished completion's weight-version spans, ``[{"version", "start", "end"}, ...]``
    (``"label"`` too where the trainer named the version); ``None`` if the engine gave none."""
    spans = getattr(completion, "weight_versions", None)
    if not spans:
        return None
    out = []
    for span in spans:
        version, label = parse_tag(span.version)
        out.append({"version": version, "start": span.start, "end": span.end, **({"label": label} if label else {})})
    return out


@dataclass
class EngineCall:
    """What the adapter saw of one ``generate`` call made while handling an HTTP request:
    each sample's version spans (by completion index) and, if the request asked for
    in-pass target log-probs, the id they were recorded under."""

    spans: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    target_id: str | None = None


_RECORDER: ContextVar[list[EngineCall] | None] = ContextVar("ead_engine_calls", default=None)


@contextmanager
def recording_calls() -> Iterator[list[EngineCall]]:
    """Collect an :class:`EngineCall` for every engine request made inside the block, from
    any task it starts, in call order (one per prompt). vLLM's OpenAI handlers drop
    ``CompletionOutput.weight_versions``; the middleware records them here around the
    handler and adds them to the response."""
    calls: list[EngineCall] = []
    token = _RECORDER.set(calls)
    try:
        yield calls
    finally:
        _RECORDER.reset(token)


def tap_engine_calls(engine: Any) -> None:
    """Wrap ``engine.generate`` so that :func:`recording_calls` sees each call (idempotent).

    The entry is made when ``generate`` is called, not when it is first iterated, so the
    order of the entries is the order of the prompts even when vLLM iterates them merged.
    vLLM hands every prompt of a request the same ``SamplingParams``; a request asking for
    in-pass targets gets a copy per prompt, each with its own id.
    """
    original = engine.generate
    if getattr(original, "_ead_tap", False):
        return

    def generate(prompt: Any, params: Any, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        calls = _RECORDER.get()
        if calls is None:
            return original(prompt, params, *args, **kwargs)
        call = EngineCall()
        base = (getattr(params, "extra_args", None) or {}).get(contract.TARGET_KEY)
        if base is not None:
            call.target_id = contract.prompt_target_id(base, len(calls))
            params = copy(params)
            params.extra_args = {**params.extra_args, contract.TARGET_KEY: call.target_id}
        calls.append(call)
        return _tapped(original(prompt, params, *args, **kwargs), call)

    generate._ead_tap = True  # type: ignore[attr-defined]
    engine.generate = generate


async def _tapped(outputs: AsyncIterator[Any], call: EngineCall) -> AsyncIterator[Any]:
    async for output in outputs:
        for completion in output.outputs:
            spans = version_spans(completion)
            if spans:
                call.spans[completion.index] = spans
        yield output
