"""The RL trainers' own control and generation routes, as thin aliases over our code.

Each trainer drives its inference servers through routes of its own. Served here, so that
the trainer needs configuration only (``docs/trainers.md``):

* **prime-rl** (client in its ``src/prime_rl/utils/client.py``): ``POST /update_weights
  {"weight_dir"}``, told apart by its body from vLLM's own ``/update_weights
  {"update_info"}`` (the NCCL transfer TRL drives), which still answers as vLLM's; and
  ``GET /liveness``, its probe. Its ``/pause?mode=keep&clear_cache=false`` and ``/resume``
  are vLLM's own.
* **AReaL 1.0.4**, vLLM backend (``areal/engine/vllm_remote.py``):
  ``/areal_update_weights {"model_path"}``, ``/areal_pause_generation``,
  ``/areal_continue_generation``, answering as AReaL's server does (``{"success",
  "message"}``, ``areal/engine/vllm_ext/areal_vllm_server.py``).
* **SGLang's native API**, the subset slime and AReaL's SGLang backend send:
  ``POST /generate {input_ids, sampling_params, return_logprob}`` answered in SGLang's
  shape (``text``, ``output_ids``, ``meta_info`` with ``output_token_logprobs``,
  ``finish_reason``, ``weight_version``), and ``/pause_generation``,
  ``/continue_generation``, ``/flush_cache``, which slime calls around a disk update
  (``/update_weights_from_disk`` and ``/get_weight_version`` are in :mod:`ead_server.weights`).

The rules of every alias: admin-guarded (``/generate`` and ``/liveness`` aside), paths
confined under ``--weights-root``, every weight change through
:func:`ead_server.weights.change_weights` (a new version, the prefix cache reset), and a
pause the trainer holds left to the trainer (``change_weights``' docstring).
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any, Literal

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ead_server import request_contract as contract
from ead_server.app_state import AppState, get_state, require_admin
from ead_server.errors import APIError
from ead_server.guard import parsed_body
from ead_server.vllm_adapter import engine as vllm_engine
from ead_server.vllm_adapter.targets import TAU, Recorded, recorded_column
from ead_server.weights import _version, change_weights, transfer_open

__all__ = ["attach", "admin", "router"]

router = APIRouter()
admin = APIRouter(dependencies=[Depends(require_admin)])

LIVENESS_TIMEOUT_S = 10.0
"""How long ``/liveness`` waits for the engine core to answer (prime-rl's default is 10 s)."""


def attach(app: FastAPI) -> None:
    """After vLLM's RL router: our ``/update_weights`` replaces vLLM's (and calls it)."""
    app.include_router(router)
    app.include_router(admin)


# --------------------------------------------------------------------------- prime-rl


@admin.post("/update_weights")
async def update_weights(request: Request, state: AppState = Depends(get_state)) -> Any:
    """Two protocols on one path, told apart by the body: prime-rl's ``{"weight_dir"}``
    loads a checkpoint folder under ``--weights-root`` (mode ``keep`` unless the trainer
    holds a pause, as prime-rl does); vLLM's ``{"update_info"}`` is vLLM's own handler
    (the NCCL transfer, then ``/finish_weight_update``)."""
    body = parsed_body(request.scope)
    if not isinstance(body, dict):
        raise APIError(400, "the body must be a JSON object: prime-rl's {\"weight_dir\": DIR} or vLLM's "
                            "{\"update_info\": {...}}")
    if "weight_dir" in body and "update_info" in body:
        raise APIError(400, "give weight_dir (a checkpoint folder) or update_info (vLLM's weight transfer), not "
                            "both", "weight_dir")
    if "weight_dir" in body:
        folder = body["weight_dir"]
        if not isinstance(folder, str) or not folder:
            raise APIError(400, "weight_dir must be a checkpoint folder under --weights-root (null is prime-rl's "
                                "NCCL broadcast, which this server does not serve)", "weight_dir")
        info = await change_weights(state, folder, "keep", None)
        return {"status": "ok", "weight_version": info.weight_version, "label": info.label}
    update_info = body.get("update_info")
    if not isinstance(update_info, (dict, list)):
        raise APIError(400, "update_info must be an object or a list of objects (vLLM's weight transfer); for a "
                            "checkpoint folder send {\"weight_dir\": DIR}", "update_info")
    if not transfer_open(request):
        raise APIError(409, "no weight transfer in progress: call /start_weight_update first (vLLM's worker "
                            "fails without it and takes the engine down)", "update_info")
    return await vllm_engine.rl_update_weights()(request, update_info=update_info)


@router.get("/liveness")
async def liveness(state: AppState = Depends(get_state)) -> JSONResponse:
    """prime-rl's probe: the engine core answers a request within 10 s (503 otherwise)."""
    try:
        await asyncio.wait_for(state.engine.is_paused(), timeout=LIVENESS_TIMEOUT_S)
    except (asyncio.TimeoutError, Exception):  # noqa: BLE001 - a dead engine fails the probe, whatever it raised
        return JSONResponse({"status": "engine_unresponsive"}, status_code=503)
    return JSONResponse({"status": "ok"})


# --------------------------------------------------------------------------- AReaL


class ArealUpdateWeights(BaseModel):
    """AReaL 1.0.4's ``UpdateWeightsRequest`` (``areal/engine/vllm_ext/areal_vllm_server.py``)."""

    model_config = ConfigDict(extra="forbid")

    model_path: str
    load_format: str | None = "auto"
    abort_all_requests: bool = False


def _areal(message: str, state: AppState) -> dict[str, Any]:
    return {"success": True, "message": message, **_version(state)}


@admin.post("/areal_update_weights")
async def areal_update_weights(body: ArealUpdateWeights, state: AppState = Depends(get_state)) -> dict[str, Any]:
    """AReaL's disk update: ``model_path`` under ``--weights-root``; ``abort_all_requests``
    is mode ``abort``, else ``wait`` (a pause AReaL holds is left to it)."""
    if body.load_format not in (None, "auto", "safetensors"):
        raise APIError(400, f"load_format {body.load_format!r}: only safetensors checkpoints load here", "load_format")
    info = await change_weights(state, body.model_path, "abort" if body.abort_all_requests else "wait", None)
    return _areal(f"weights loaded: version {info.weight_version}", state)


@admin.post("/areal_pause_generation")
async def areal_pause_generation(state: AppState = Depends(get_state)) -> dict[str, Any]:
    """As AReaL's server: abort every request (AReaL resubmits them) and pause."""
    await vllm_engine.pause(state.engine, "abort")
    return _areal("Generation paused and all requests aborted", state)


@admin.post("/areal_continue_generation")
async def areal_continue_generation(state: AppState = Depends(get_state)) -> dict[str, Any]:
    await vllm_engine.resume(state.engine)
    return _areal("Generation continued", state)


# --------------------------------------------------------------------------- SGLang


class SGLangPause(BaseModel):
    """SGLang's ``PauseGenerationReqInput``: ``abort`` ends requests in flight; ``retract``
    and ``in_place`` keep them (``in_place`` with their KV, which a weight change here
    then drops: they prefill again under the new weights)."""

    model_config = ConfigDict(extra="ignore")

    mode: Literal["abort", "retract", "in_place"] = "abort"


@admin.post("/pause_generation")
async def sglang_pause_generation(body: SGLangPause | None = None,
                                  state: AppState = Depends(get_state)) -> dict[str, Any]:
    mode = body.mode if body else "abort"
    await state.engine.pause_generation(mode="abort" if mode == "abort" else "keep", clear_cache=mode != "in_place")
    return {"message": "Generation paused successfully.", **_version(state)}


@admin.post("/continue_generation")
async def sglang_continue_generation(state: AppState = Depends(get_state)) -> dict[str, Any]:
    await vllm_engine.resume(state.engine)
    return {"message": "Generation continued successfully.", **_version(state)}


@admin.api_route("/flush_cache", methods=["GET", "POST"])
async def sglang_flush_cache(state: AppState = Depends(get_state)) -> PlainTextResponse:
    """SGLang's cache flush (slime calls it after pausing, before a weight update): the
    prefix cache is dropped, and running requests prefill again."""
    await vllm_engine.reset_cache(state.engine)
    return PlainTextResponse("Cache flushed.\n")


class SGLangSamplingParams(BaseModel):
    """The part of SGLang's ``SamplingParams`` (``python/sglang/srt/sampling/sampling_params.py``)
    that slime and AReaL's SGLang backend send, each mapped to vLLM's equivalent. A
    schedule comes in ``custom_params.temperature_schedule`` (SGLang's pass-through for
    custom logit processors); without one the server-wide default applies, by the
    request contract's rule."""

    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int | None = Field(128, description="SGLang's default is 128")
    min_new_tokens: int = 0
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = Field(None, description="-1 (SGLang's 'disabled') or >= 1")
    min_p: float | None = None
    repetition_penalty: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False
    n: int = 1
    sampling_seed: int | None = None
    custom_params: dict[str, Any] | None = None
    # Constrained decoding is not offered here: refused unless unset.
    json_schema: None = None
    regex: None = None
    ebnf: None = None


class SGLangGenerate(BaseModel):
    """SGLang's ``GenerateReqInput`` for one prompt given as token ids (or text), the
    subset slime (``slime/rollout/sglang_rollout.py``) and AReaL's SGLang backend
    (``areal/engine/sglang_remote.py``) send. Fields they send at their neutral values
    (``image_data: null``, ``stream: false``) are accepted; others are refused."""

    model_config = ConfigDict(extra="forbid")

    input_ids: list[int] | None = None
    text: str | None = None
    sampling_params: SGLangSamplingParams = Field(default_factory=SGLangSamplingParams)
    return_logprob: bool = False
    logprob_start_len: int | None = None
    top_logprobs_num: Literal[0, None] = None
    return_text_in_logprobs: bool = False
    stream: Literal[False] = False
    image_data: Literal[None] = None
    lora_path: Literal[None] = None
    return_routed_experts: Literal[False] = False
    rid: str | None = None

    @model_validator(mode="after")
    def _one_prompt(self) -> SGLangGenerate:
        if (self.input_ids is None) == (self.text is None):
            raise ValueError("give exactly one of 'input_ids' (one prompt's token ids) and 'text'")
        if self.input_ids is not None and not self.input_ids:
            raise ValueError("input_ids is empty")
        return self


@router.post("/generate")
async def sglang_generate(body: SGLangGenerate, state: AppState = Depends(get_state)) -> Any:
    """SGLang's native generation, one prompt (``n`` samples: a list of ``n`` answers, as
    SGLang gives them), with the request contract's schedule rules."""
    sp = body.sampling_params
    field = _sglang_field(contract.SCHEDULE_KEY)
    request = contract.read_request([(field, (sp.custom_params or {}).get(contract.SCHEDULE_KEY))], sp.temperature,
                                    state.default_schedule())
    tokenizer = state.engine.get_tokenizer()
    prompt_ids = list(body.input_ids) if body.input_ids is not None else tokenizer.encode(body.text)
    max_tokens = sp.max_new_tokens if sp.max_new_tokens is not None else 128
    context = vllm_engine.context_length(state.engine)
    if len(prompt_ids) + max_tokens > context:
        raise APIError(400, f"this model's context is {context} tokens; a prompt of {len(prompt_ids)} tokens leaves "
                            f"room for {context - len(prompt_ids)} new tokens, not max_new_tokens={max_tokens}",
                       "sampling_params.max_new_tokens")
    given = _given(sp)
    recorded = contract.engine_numbers_needed(request, {**given, "min_tokens": sp.min_new_tokens}, state.engine,
                                              param_name=_sglang_field)
    target_id = contract.new_target_id() if recorded else None
    params = _sampling_params(sp, request, given, max_tokens, target_id)
    rid = body.rid or f"sglang-{uuid.uuid4().hex}"
    async with state.gate.reading() as lease_version:
        output = await vllm_engine.generate(state.engine, prompt_ids, params, rid)
    completions = sorted(output.outputs, key=lambda c: c.index)
    found = await vllm_engine.recorded_numbers(state.engine, target_id, sp.n, [c.index for c in completions])
    answers = [_answer(c, request, body, state, rid, len(prompt_ids), lease_version, numbers)
               for c, numbers in zip(completions, found)]
    return answers[0] if sp.n == 1 else answers


_SGLANG_NAMES = {"max_tokens": "max_new_tokens", "min_tokens": "min_new_tokens", "seed": "sampling_seed",
                 contract.SCHEDULE_KEY: f"custom_params.{contract.SCHEDULE_KEY}"}
"""SGLang's names of the ``SamplingParams`` fields it names otherwise."""


def _sglang_field(param: str) -> str:
    """A refusal's ``param``, named as SGLang's request names it."""
    return f"sampling_params.{_SGLANG_NAMES.get(param, param)}"


def _given(sp: SGLangSamplingParams) -> dict[str, Any]:
    """The truncation and penalty settings an SGLang request set, named as vLLM's."""
    names = ("top_p", "top_k", "min_p", "repetition_penalty", "frequency_penalty", "presence_penalty")
    given = {name: getattr(sp, name) for name in names}
    if given["top_k"] == -1:
        given["top_k"] = 0  # SGLang's "disabled" is vLLM's 0
    return given


def _sampling_params(sp: SGLangSamplingParams, request: contract.Request, given: dict[str, Any], max_tokens: int,
                     target_id: str | None) -> Any:
    """vLLM's ``SamplingParams`` for an SGLang request (``given``: :func:`_given`), under the
    contract's rules (in-pass numbers recorded under ``target_id``); vLLM's refusals are
    400s naming the SGLang field."""
    extra = {k: v for k, v in (sp.custom_params or {}).items() if k != contract.SCHEDULE_KEY}
    return vllm_engine.sampling_params(
        request, given, extra=extra, target_id=target_id, param_name=_sglang_field,
        n=sp.n, max_tokens=max_tokens, min_tokens=sp.min_new_tokens, stop=sp.stop, stop_token_ids=sp.stop_token_ids,
        ignore_eos=sp.ignore_eos, skip_special_tokens=sp.skip_special_tokens,
        spaces_between_special_tokens=sp.spaces_between_special_tokens, include_stop_str_in_output=sp.no_stop_trim,
        seed=sp.sampling_seed)


def _answer(c: Any, request: contract.Request, body: SGLangGenerate, state: AppState, rid: str, prompt_tokens: int,
            lease_version: int, recorded: Recorded | None) -> dict[str, Any]:
    """One sample in SGLang's shape, with ours beside SGLang's fields in ``meta_info``:
    ``temperatures`` (per token; an entropy-driven schedule's from the engine's
    ``recorded`` numbers), ``temperature_schedule`` (the echo, or null) and
    ``weight_versions`` (the spans); SGLang's ``weight_version`` keeps its string."""
    token_ids = list(c.token_ids)
    spans = vllm_engine.version_spans(c)
    version = contract.response_version([spans[0]["version"]] if spans else [], lease_version)
    label = next((s.get("label") for s in spans or () if s["version"] == version), None)
    meta: dict[str, Any] = {
        "id": rid if body.sampling_params.n == 1 else f"{rid}-{c.index}",
        "finish_reason": _finish_reason(c, len(token_ids)),
        "prompt_tokens": prompt_tokens, "completion_tokens": len(token_ids), "cached_tokens": 0,
        "weight_version": label or str(version),
        "weight_versions": spans,
        "temperature_schedule": request.echo,
        "temperatures": request.temperatures(len(token_ids), engine=recorded_column(recorded, TAU, len(token_ids))),
    }
    if body.return_logprob:
        texts = [state.engine.get_tokenizer().decode([t]) for t in token_ids] if body.return_text_in_logprobs \
            else [None] * len(token_ids)
        meta["output_token_logprobs"] = [[lp, t, text] for lp, t, text in
                                         zip(vllm_engine.completion_logprobs(c), token_ids, texts)]
    return {"text": c.text, "output_ids": token_ids, "meta_info": meta}


def _finish_reason(c: Any, length: int) -> dict[str, Any]:
    """vLLM's ``finish_reason`` / ``stop_reason`` in SGLang's form."""
    if c.finish_reason == "length":
        return {"type": "length", "length": length}
    if c.finish_reason == "abort":
        return {"type": "abort", "message": "aborted (a weight change in mode abort, or a pause)"}
    return {"type": "stop", "matched": c.stop_reason if c.stop_reason is not None else
            (c.token_ids[-1] if c.token_ids else None)}
