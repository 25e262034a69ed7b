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
from ead_server import request_contract as contract
from ead_server.app_state import AppState, ServerConfig, get_state
from ead_server.chat_messages import check_conversation
from ead_server.errors import APIError
from ead_server.guard import Guard, TrustedClients, api_keys_from_args
from ead_server.limits import Limits
from ead_server.limits import router as limits_router
from ead_server.openai_middleware import REQUESTS, ScheduleMiddleware
from ead_server.openapi_schema import document_schedule
from ead_server.protocol import Rollout, RolloutRequest, RolloutResponse
from ead_server.vllm_adapter import engine as vllm_engine
from ead_server.vllm_adapter.targets import ENTROPY, ENTROPY_TAU, TAU
from ead_server.vllm_adapter.targets import recorded_column as column
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
    # Raises (the server does not start) for a bad allowlist or one beside trusted forwarded
    # headers; under stock `vllm serve` it comes from $EAD_TRUSTED_CLIENT_NETWORKS.
    TrustedClients.from_args(args).install(app)
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
    count = len(body.prompts or body.messages or [])
    seeds = body.seed if isinstance(body.seed, list) else [None if body.seed is None else body.seed + i
                                                           for i in range(count)]
    # The checks /v1/completions makes, in its order: the contract's, then vLLM's.
    request = contract.read_request([(contract.SCHEDULE_KEY, body.temperature_schedule)], body.temperature,
                                    state.default_schedule())
    engine_numbers = contract.engine_numbers_needed(request, {"top_p": body.top_p, "top_k": body.top_k}, state.engine,
                                                    entropy=body.return_entropy)
    in_pass = engine_numbers or (body.return_target_logprobs and contract.wants_in_pass(request, state.engine))
    base = contract.new_target_id() if in_pass else None
    target_ids = [contract.prompt_target_id(base, i) if base else None for i in range(count)]
    params = [vllm_engine.rollout_params(request, n=body.n, max_tokens=body.max_tokens, stop=body.stop, seed=seed,
                                         top_p=body.top_p, top_k=body.top_k, ignore_eos=body.ignore_eos,
                                         target_id=target_id) for seed, target_id in zip(seeds, target_ids)]
    for i, conversation in enumerate(body.messages or ()):
        check_conversation(conversation, f"messages[{i}]")
    REQUESTS.labels("rollouts", request.schedule.type if request.schedule else "none").inc()
    tokenizer = state.engine.get_tokenizer()
    prompts = body.prompts if body.prompts is not None else body.messages
    prompt_ids = [_prompt_ids(tokenizer, p, chat=body.messages is not None) for p in prompts]
    context = vllm_engine.context_length(state.engine)
    for ids in prompt_ids:
        if len(ids) + body.max_tokens > context:
            raise APIError(400, f"this model's context is {context} tokens; a prompt of {len(ids)} tokens leaves "
                                f"room for {context - len(ids)} new tokens, not max_tokens={body.max_tokens}",
                           "max_tokens")
    async with state.gate.reading() as lease_version:
        per_prompt = await asyncio.gather(*(
            _rollouts_for_prompt(state.engine, i, ids, p, request, body, target_id)
            for i, (ids, p, target_id) in enumerate(zip(prompt_ids, params, target_ids))
        ))
    rollouts = [r for group in per_prompt for r in group]
    return RolloutResponse(
        weight_version=contract.response_version((r.weight_versions[0].version for r in rollouts if r.weight_versions),
                                                 lease_version),
        temperature_schedule=request.schedule, rollouts=rollouts)


def _prompt_ids(tokenizer: Any, prompt: Any, *, chat: bool) -> list[int]:
    if chat:
        text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        return tokenizer.encode(text, add_special_tokens=False)
    if isinstance(prompt, str):
        return tokenizer.encode(prompt)
    return list(prompt)


async def _rollouts_for_prompt(
    engine: Any, index: int, prompt_ids: list[int], params: Any, request: contract.Request, body: RolloutRequest,
    target_id: str | None,
) -> list[Rollout]:
    request_id = f"rollout-{uuid.uuid4().hex}"
    output = await vllm_engine.generate(engine, prompt_ids, params, request_id)
    completions = sorted(output.outputs, key=lambda c: c.index)
    recorded = await vllm_engine.recorded_numbers(engine, target_id, body.n, [c.index for c in completions])
    temperatures = [request.temperatures(len(c.token_ids), engine=column(found, TAU, len(c.token_ids)))
                    for c, found in zip(completions, recorded)]
    targets: list[tuple[list[float | None] | None, str | None]] = [(None, None)] * len(completions)
    if body.return_target_logprobs:
        targets = await vllm_engine.completion_targets(engine, prompt_ids, completions, temperatures, request_id,
                                                       recorded)
    return [
        Rollout(
            prompt_index=index, sample_index=c.index, prompt_token_ids=prompt_ids, token_ids=list(c.token_ids),
            text=c.text, finish_reason=c.finish_reason, behavior_logprobs=vllm_engine.completion_logprobs(c),
            temperatures=temps, target_logprobs=target, target_logprobs_source=source,
            entropies=column(found, ENTROPY, len(c.token_ids)) if body.return_entropy else None,
            behavior_entropies=column(found, ENTROPY_TAU, len(c.token_ids)) if body.return_entropy else None,
            weight_versions=vllm_engine.version_spans(c),
        )
        for c, temps, (target, source), found in zip(completions, temperatures, targets, recorded)
    ]
