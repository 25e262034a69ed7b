"""ead-server's additions to vLLM's OpenAI app: middleware, rollouts, and the weight routes
of :mod:`ead_server.weights`.

vLLM calls them through our endpoint plugin (``ead_server.vllm_adapter.serving``):
:func:`attach` while it builds the app, :func:`init_state` once the engine exists. Auth
follows vLLM's: ``--api-key`` guards every route but the public probes (vLLM's
middleware, then :mod:`ead_server.guard` for the routes vLLM leaves open);
``--admin-key`` additionally guards the admin routes, as a dependency. The guard also
bounds bodies and enforces :mod:`ead_server.limits`.
"""

from __future__ import annotations

import argparse
import asyncio
import uuid
from typing import Any

from fastapi import APIRouter, Depends, FastAPI
from starlette.datastructures import State

from ead_server import __version__, weights
from ead_server.app_state import AppState, ServerConfig, get_state
from ead_server.chat_messages import check_conversation
from ead_server.errors import APIError
from ead_server.guard import Guard, api_keys_from_args
from ead_server.limits import Limits
from ead_server.limits import router as limits_router
from ead_server.openai_middleware import REQUESTS, ScheduleMiddleware
from ead_server.openapi_schema import document_schedule
from ead_server.protocol import Rollout, RolloutRequest, RolloutResponse
from ead_server.request_policy import PolicyError, check_temperature, resolve_schedule
from ead_server.schedule import ResolvedSchedule
from ead_server.vllm_adapter import engine as vllm_engine
from ead_server.weight_gate import WeightGate


def attach(app: FastAPI) -> None:
    """Add our routes, error handler and middleware while vLLM builds its app.

    vLLM adds its own middleware (auth, CORS, ...) after this, each outside the ones
    before it, so ours is innermost: vLLM's auth answers unauthenticated requests first.
    Our ``/version`` replaces vLLM's (vLLM lets plugin routes win).
    """
    gate = WeightGate()
    app.state.ead_gate = gate
    args = getattr(app.state, "args", argparse.Namespace())
    app.state.ead_limits = Limits.from_args(args)
    app.add_middleware(ScheduleMiddleware, gate=gate)
    app.add_middleware(Guard, limits=app.state.ead_limits, api_keys=api_keys_from_args(args))  # in front of it
    app.include_router(limits_router)
    document_schedule(app)
    app.add_exception_handler(APIError, lambda _request, exc: exc.response())
    app.include_router(router)
    weights.attach(app)


async def init_state(engine: Any, state: State, args: argparse.Namespace) -> None:
    """Give the routes the engine and the configuration, once the engine exists; start
    the engine's weight version at ours, and let responses see its version spans."""
    config = ServerConfig.from_args(args)
    state.ead_gate.path = config.model_path
    state.ead = AppState(engine=engine, config=config, gate=state.ead_gate)
    await vllm_engine.set_weight_version(engine, state.ead_gate.tag)
    vllm_engine.tap_engine_calls(engine)


router = APIRouter()


@router.get("/version")
async def version() -> dict[str, str]:
    return {"version": vllm_engine.vllm_version(), "ead_server": __version__}


@router.post("/v1/rollouts", response_model=RolloutResponse)
async def rollouts(body: RolloutRequest, state: AppState = Depends(get_state)) -> RolloutResponse:
    """Token-level rollouts with behaviour (and optionally target) log-probs."""
    seeds = body.seed if isinstance(body.seed, list) else [
        None if body.seed is None else body.seed + i for i in range(len(body.prompts or body.messages or []))
    ]
    try:  # the checks /v1/completions makes, in its order: the schedule, then vLLM's
        schedule = resolve_schedule(body.temperature_schedule)
        if schedule is not None:
            check_temperature(body.temperature)
        params = [vllm_engine.rollout_params(n=body.n, max_tokens=body.max_tokens, stop=body.stop, seed=seed,
                                             temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                                             schedule=schedule, ignore_eos=body.ignore_eos) for seed in seeds]
    except PolicyError as exc:
        raise APIError(400, exc.message, exc.param) from None
    for i, conversation in enumerate(body.messages or ()):
        check_conversation(conversation, f"messages[{i}]")
    REQUESTS.labels("rollouts", schedule.type if schedule else "none").inc()
    tokenizer = state.engine.get_tokenizer()
    prompts = body.prompts if body.prompts is not None else body.messages
    prompt_ids = [_prompt_ids(tokenizer, p, chat=body.messages is not None) for p in prompts]
    context = vllm_engine.context_length(state.engine)
    for ids in prompt_ids:
        if len(ids) + body.max_tokens > context:
            raise APIError(400, f"this model's context is {context} tokens; a prompt of {len(ids)} tokens leaves "
                                f"room for {context - len(ids)} new tokens, not max_tokens={body.max_tokens}",
                           "max_tokens")
    temperature = 1.0 if body.temperature is None else body.temperature
    async with state.gate.reading() as lease_version:
        per_prompt = await asyncio.gather(*(
            _rollouts_for_prompt(state.engine, i, ids, p, schedule, temperature, body) for i, (ids, p) in
            enumerate(zip(prompt_ids, params))
        ))
    rollouts = [r for group in per_prompt for r in group]
    first = [r.weight_versions[0].version for r in rollouts if r.weight_versions]
    return RolloutResponse(weight_version=min(first, default=lease_version), temperature_schedule=schedule,
                           rollouts=rollouts)


def _prompt_ids(tokenizer: Any, prompt: Any, *, chat: bool) -> list[int]:
    if chat:
        text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        return tokenizer.encode(text, add_special_tokens=False)
    if isinstance(prompt, str):
        return tokenizer.encode(prompt)
    return list(prompt)


async def _rollouts_for_prompt(
    engine: Any, index: int, prompt_ids: list[int], params: Any, schedule: ResolvedSchedule | None,
    temperature: float, body: RolloutRequest,
) -> list[Rollout]:
    request_id = f"rollout-{uuid.uuid4().hex}"
    in_pass = body.return_target_logprobs and vllm_engine.ask_in_pass_targets(engine, params, request_id)
    output = await vllm_engine.generate(engine, prompt_ids, params, request_id)
    completions = sorted(output.outputs, key=lambda c: c.index)
    temperatures = [schedule.temperatures(len(c.token_ids)) if schedule else [temperature] * len(c.token_ids)
                    for c in completions]
    targets: list[tuple[list[float | None] | None, str | None]] = [(None, None)] * len(completions)
    if body.return_target_logprobs:
        targets = await vllm_engine.completion_targets(engine, prompt_ids, completions, temperatures, request_id,
                                                       body.n, in_pass)
    return [
        Rollout(
            prompt_index=index, sample_index=c.index, prompt_token_ids=prompt_ids, token_ids=list(c.token_ids),
            text=c.text, finish_reason=c.finish_reason, behavior_logprobs=vllm_engine.completion_logprobs(c),
            temperatures=temps, target_logprobs=target, target_logprobs_source=source,
            weight_versions=vllm_engine.version_spans(c),
        )
        for c, temps, (target, source) in zip(completions, temperatures, targets)
    ]
