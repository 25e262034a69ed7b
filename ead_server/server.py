"""ead-server's additions to vLLM's OpenAI app: middleware, rollouts and weight routes.

vLLM calls them through our endpoint plugin (``ead_server.vllm_adapter.serving``):
:func:`attach` while it builds the app, :func:`init_state` once the engine exists. Auth
follows vLLM's: ``--api-key`` guards ``/v1`` routes (vLLM's own middleware);
``--admin-key`` additionally guards the admin route, as a dependency.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from starlette.datastructures import State

from ead_server import __version__
from ead_server.checkpoints import check_compatible, resolve_under, stage_tied_head
from ead_server.errors import APIError
from ead_server.openai_middleware import REQUESTS, ScheduleMiddleware
from ead_server.protocol import ReloadRequest, Rollout, RolloutRequest, RolloutResponse, WeightsInfo
from ead_server.request_policy import PolicyError, check_temperature, resolve_schedule
from ead_server.schedule import ResolvedSchedule
from ead_server.vllm_adapter import engine as vllm_engine
from ead_server.weight_gate import WeightGate


@dataclass(frozen=True)
class ServerConfig:
    model_path: str
    admin_key: str | None = None
    weights_root: Path | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ServerConfig:
        """From ``ead-server serve``'s flags, or, under stock ``vllm serve`` (which lacks
        them), from ``$EAD_ADMIN_KEY`` and ``$EAD_WEIGHTS_ROOT``."""
        admin_key = getattr(args, "admin_key", None) or os.environ.get("EAD_ADMIN_KEY")
        root = getattr(args, "weights_root", None) or os.environ.get("EAD_WEIGHTS_ROOT")
        return cls(model_path=args.model, admin_key=admin_key, weights_root=Path(root) if root else None)


def attach(app: FastAPI) -> None:
    """Add our routes, error handler and middleware while vLLM builds its app.

    vLLM adds its own middleware (auth, CORS, ...) after this, each outside the ones
    before it, so ours is innermost: vLLM's auth answers unauthenticated requests first.
    Our ``/version`` replaces vLLM's (vLLM lets plugin routes win).
    """
    gate = WeightGate()
    app.state.ead_gate = gate
    app.add_middleware(ScheduleMiddleware, gate=gate)
    app.add_exception_handler(APIError, lambda _request, exc: exc.response())
    app.include_router(router)


def init_state(engine: Any, state: State, args: argparse.Namespace) -> None:
    """Give the routes the engine and the configuration, once the engine exists."""
    config = ServerConfig.from_args(args)
    state.ead_gate.path = config.model_path
    state.ead = _State(engine=engine, config=config, gate=state.ead_gate)


@dataclass
class _State:
    engine: Any
    config: ServerConfig
    gate: WeightGate


def _state(request: Request) -> _State:
    return request.app.state.ead


def _require_admin(request: Request) -> None:
    key = _state(request).config.admin_key
    if key is None:
        return
    given = request.headers.get("authorization", "")
    if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
        raise APIError(401, "admin route: send 'Authorization: Bearer <admin key>'")


router = APIRouter()


@router.get("/version")
async def version() -> dict[str, str]:
    return {"version": vllm_engine.vllm_version(), "ead_server": __version__}


@router.get("/v1/weights", response_model=WeightsInfo)
async def weights(state: _State = Depends(_state)) -> WeightsInfo:
    return WeightsInfo(weight_version=state.gate.version, path=state.gate.path)


@router.post("/v1/weights/reload", response_model=WeightsInfo, dependencies=[Depends(_require_admin)])
async def reload(body: ReloadRequest, state: _State = Depends(_state)) -> WeightsInfo:
    """Load a same-architecture safetensors checkpoint under ``--weights-root``.

    Requests in flight finish on the old weights; new ones wait and then run on the new
    ones. A checkpoint that fails the checks is refused before the engine sees it; one
    that fails inside the engine is answered 500 after the previous weights are loaded
    back.
    """
    root = state.config.weights_root
    if root is None:
        raise APIError(403, "weight reload is disabled: start the server with --weights-root DIR", "path")
    folder = resolve_under(root, body.path)
    table = check_compatible(folder, Path(state.config.model_path))
    async with state.gate.writing():  # one reload at a time, alone with the engine
        try:
            await _load(state.engine, folder, table)
        except Exception as exc:  # noqa: BLE001 - any engine failure: restore, then report
            previous = Path(state.gate.path or state.config.model_path)
            await _load(state.engine, previous, check_compatible(previous, Path(state.config.model_path)))
            raise APIError(500, f"reload failed inside the engine ({exc}); the previous weights "
                                f"(version {state.gate.version}) are serving again") from None
        state.gate.commit(str(folder))
    return WeightsInfo(weight_version=state.gate.version, path=state.gate.path)


async def _load(engine: Any, folder: Path, table: dict) -> None:
    staging = stage_tied_head(folder, table)
    try:
        await vllm_engine.reload_weights(engine, staging.name if staging else str(folder))
    finally:
        if staging:
            staging.cleanup()


@router.post("/v1/rollouts", response_model=RolloutResponse)
async def rollouts(body: RolloutRequest, state: _State = Depends(_state)) -> RolloutResponse:
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
                                             schedule=schedule) for seed in seeds]
    except PolicyError as exc:
        raise APIError(400, exc.message, exc.param) from None
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
    async with state.gate.reading() as weight_version:
        per_prompt = await asyncio.gather(*(
            _rollouts_for_prompt(state.engine, i, ids, p, schedule, temperature, body) for i, (ids, p) in
            enumerate(zip(prompt_ids, params))
        ))
    return RolloutResponse(weight_version=weight_version, temperature_schedule=schedule,
                           rollouts=[r for group in per_prompt for r in group])


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
    output = await vllm_engine.generate(engine, prompt_ids, params, request_id)
    completions = sorted(output.outputs, key=lambda c: c.index)
    targets: list[list[float] | None] = [None] * len(completions)
    if body.return_target_logprobs:
        targets = await asyncio.gather(*(
            vllm_engine.target_logprobs(engine, prompt_ids, list(c.token_ids), f"{request_id}-score-{c.index}")
            for c in completions
        ))
    return [
        Rollout(
            prompt_index=index, sample_index=c.index, prompt_token_ids=prompt_ids, token_ids=list(c.token_ids),
            text=c.text, finish_reason=c.finish_reason, behavior_logprobs=vllm_engine.completion_logprobs(c),
            temperatures=schedule.temperatures(len(c.token_ids)) if schedule else [temperature] * len(c.token_ids),
            target_logprobs=target,
        )
        for c, target in zip(completions, targets)
    ]
