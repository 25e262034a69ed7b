"""The EAD logits processor: one class that both of vLLM's model runners accept.

vLLM has two processor interfaces (0.31 to 0.33 have both, 0.24 to 0.30 only V1, 0.34 only
V2), and both load every plugin of the ``vllm.logits_processors`` entry-point group:

* the V1 runner (CPU; GPU with ``VLLM_USE_V2_MODEL_RUNNER=0``) builds each plugin as
  ``cls(vllm_config, device, is_pin_memory)``, tells it about the batch through
  ``update_state(BatchUpdate)`` and calls ``apply(logits)``; rows are requests;
* Model Runner V2 (the GPU default) refuses any plugin that does not subclass its own
  base, builds it as ``cls(vllm_config, req_states)``, hands it each request's slot in
  ``add_request(slot, params)`` and calls ``apply(logits, ctx)``, where a row is not a
  request: ``ctx.expanded_idx_mapping[row]`` is its slot.

So the one class behind our entry point subclasses every base the installed vLLM has
(:mod:`.compat` finds them by feature checks) and picks its state from the constructor it
is given: :class:`_RowState` (V1) or :class:`_SlotState` (V2). The temperature math is in
the kernel (``ead_kernels``) in both cases.

**Entropy-driven schedules** need each row's entropy: the ``entropy`` type before its row
is scaled, the entropy clock after (to advance the sample's running sum, kept by
:mod:`.entropy_clock` across preemption and reloads). Both runners describe a step's rows
to one :class:`_StepPlan`, which takes the statistics with the scale (and records the
in-pass numbers); nothing is read back from the device.

**A default schedule for in-process engines.** ``$EAD_TEMPERATURE_SCHEDULE`` (a preset
name, JSON, or ``TYPE:key=value,...``) is applied to every request that brings no schedule
of its own, where the request contract's ``default_applies`` says so (temperature 1.0;
greedy and other temperatures untouched). It is read when the processor is built, logged
once, and refused at start where it cannot be exact (:func:`environment_default`,
:meth:`EADLogitsProcessor.__init__`). The opt-out of one request is its own schedule
``{"type": "constant", "tau": 1.0}``.

Where it sits in the sampler matters for what else a request may set:

* Both runners run it before their own temperature, min-p and top-k/top-p (in V1
  because it is not argmax-invariant, see :meth:`EADLogitsProcessor.is_argmax_invariant`),
  so min-p thresholds ``softmax(h / tau_t)`` on both, as it does an ordinary temperature.
* Additive penalties (presence, frequency) are the one difference: V2 applies them
  before the processor (``(h - p) / tau``), V1 after it (``h / tau - p``).
* With ``logprobs_mode=processed_logprobs`` the returned log-probs are taken after all of
  it, so they are the behaviour log-probs on both runners.
"""

from __future__ import annotations

import functools
import logging
import os
import weakref
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from vllm.exceptions import VLLMValidationError

from ead_kernels import (
    KIND_NONE, KINDS, NUM_PARAMS, PARAM_COLUMNS, apply_schedule_, apply_schedule_slots_, apply_schedule_with_stats_,
    schedule_temperatures, slot_positions,
)
from ead_kernels.target_stats import row_stats
from ead_server.errors import APIError
from ead_server.request_contract import (
    DEFAULT_SCHEDULE_ENV, SCHEDULE_KEY, TARGET_KEY, DefaultSchedule, check_temperature, default_applies,
    eligible_for_in_pass, resolve_schedule,
)
from ead_server.schedule import ResolvedSchedule
from ead_server.vllm_adapter.compat import BASES, V1, V2, runner_ignores_processors
from ead_server.vllm_adapter.entropy_clock import CLOCKS
from ead_server.vllm_adapter.targets import STORE

if TYPE_CHECKING:
    from vllm import SamplingParams
    from vllm.config import VllmConfig
    from vllm.v1.sample.logits_processor import BatchUpdate
    from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsContext, LogitsProcRequestState

__all__ = ["ENV_DEFAULT", "EADLogitsProcessor", "environment_default", "request_schedule"]

ENV_DEFAULT = DEFAULT_SCHEDULE_ENV
"""The environment variable of the in-process default schedule (the request contract's)."""

_GREEDY_EPS = 1e-5  # vLLM's _SAMPLING_EPS: rows below it are greedy
_PROCESSED_MODES = ("processed_logprobs", "processed_logits")

# A child of vLLM's logger, so the line appears in the engine's own log and format.
logger = logging.getLogger("vllm.ead_server.processor")


def request_schedule(params: SamplingParams) -> ResolvedSchedule | None:
    """The resolved schedule a request carries, or ``None``. Raises ``APIError`` (400)."""
    return resolve_schedule((params.extra_args or {}).get(SCHEDULE_KEY))


def environment_default() -> ResolvedSchedule | None:
    """The in-process default schedule, ``$EAD_TEMPERATURE_SCHEDULE``, or ``None`` when
    unset or empty. Raises ``ValueError`` naming the variable and the field for a bad
    schedule, and for ``"step": "weights"``, which has no in-process equivalent."""
    return _parse_default(os.environ.get(ENV_DEFAULT, "").strip())


@functools.lru_cache(maxsize=4)
def _parse_default(text: str) -> ResolvedSchedule | None:
    if not text:
        return None
    default = DefaultSchedule.from_text(text, where=ENV_DEFAULT)
    if default.follows_weights:
        raise ValueError(
            f'{ENV_DEFAULT}: decay_schedule.step "weights" takes the step from ead-server\'s weight version, which '
            f"an engine inside a trainer does not have (the trainer changes its weights without telling vLLM a "
            f"version); give the step as a number, or send the schedule with each request in "
            f"SamplingParams.extra_args[{SCHEDULE_KEY!r}]")
    return default.resolve(0)


def _applied_schedule(params: SamplingParams, default: ResolvedSchedule | None) -> ResolvedSchedule | None:
    """The schedule the processor applies: the request's own, else ``default`` where the
    request contract's ``default_applies``; none for greedy rows, which a schedule never
    changes (admission refuses that combination; this keeps the rows exact regardless)."""
    if params.temperature < _GREEDY_EPS:
        return None
    own = request_schedule(params)
    if own is not None:
        return own
    return default if default is not None and default_applies(params.temperature) else None


def _target_id(params: SamplingParams, schedule: ResolvedSchedule | None) -> str | None:
    """The id under which a scheduled row records in-pass target numbers, if it asks and
    the formula is exact for it (``ead_server.vllm_adapter.targets``)."""
    target = _sample_key(params)
    return target if target is not None and schedule is not None and eligible_for_in_pass(params) else None


def _kernel_row(schedule: ResolvedSchedule) -> tuple[int, list[float]]:
    params = schedule.kernel_params()
    return KINDS[schedule.type], [params[name] for name in PARAM_COLUMNS]


def _sample_key(params: SamplingParams) -> str | None:
    """The per-sample id an entropy clock is kept under across preemption (the request
    contract's id, whether or not the in-pass formula is exact for the request)."""
    key = (params.extra_args or {}).get(TARGET_KEY)
    return None if key is None else str(key)


def _device_index(values: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long).to(device, non_blocking=True)


class _StepPlan:
    """What one sampling step asks beyond the scale, worked out on the host from row
    numbers alone: rows whose entropy the schedule needs (``entropy`` type), rows on an
    entropy clock (their clock rows, positions, and whether the row samples and so
    advances the clock) and rows recording in-pass numbers (ids, positions)."""

    def __init__(self) -> None:
        self.entropy_rows: list[int] = []
        self.clock_rows: list[int] = []
        self.clock_states: list[int] = []
        self.clock_positions: list[int] = []
        self.clock_writes: list[int] = []  # indices into clock_rows of the rows that sample
        self.target_rows: list[int] = []
        self.target_ids: list[str] = []
        self.target_positions: list[int] = []

    def __bool__(self) -> bool:
        return bool(self.entropy_rows or self.clock_rows or self.target_rows)

    def run(self, logits: torch.Tensor, layout: tuple[Any, ...], temperatures: Any) -> torch.Tensor:
        """Scale ``logits`` with the entropies and clocks the rows need, advance the clocks
        and record the in-pass numbers; nothing is read back from the device.

        ``layout`` is the kernel's ``(positions, kinds, params, slots, prompt_len)``;
        ``temperatures(rows, entropy, clock)`` gives the float64 temperatures of some rows
        (what the kernel divided them by, before its float32 rounding). The ``entropy``
        type's rows need their entropy before their scale, so :func:`row_stats` reads them
        first; every other row's statistics come from the scale's own pass
        (``apply_schedule_with_stats_``: one read of the row on a GPU).
        """
        device, size = logits.device, logits.shape[0]
        stats = torch.zeros(size, 2, dtype=torch.float32, device=device)  # lse(h), H(h) of the rows as given
        entropy = None
        if self.entropy_rows:
            first = _device_index(self.entropy_rows, device)
            stats[first] = row_stats(logits, first)
            entropy = torch.zeros(size, dtype=torch.float32, device=device)
            entropy[first] = stats[first, 1]  # a NaN row's: the kernel takes it as 0
        clock = None
        if self.clock_rows:
            sums, state, at = CLOCKS.read(np.asarray(self.clock_states), np.asarray(self.clock_positions))
            clock = torch.zeros(size, dtype=torch.float64, device=device)
            clock[_device_index(self.clock_rows, device)] = sums
        pending = sorted({*self.clock_rows, *self.target_rows} - set(self.entropy_rows))
        during = _device_index(pending, device)
        targets = _device_index(self.target_rows, device) if self.target_rows else None
        raw, after = apply_schedule_with_stats_(logits, *layout, entropy=entropy, clock=clock, raw_rows=during,
                                                scaled_rows=targets)
        stats[during] = raw
        if self.clock_writes:
            chosen = [self.clock_rows[i] for i in self.clock_writes]
            advance = torch.nan_to_num(stats[_device_index(chosen, device), 1], nan=0.0)  # NaN: the clock stays
            picks = _device_index(self.clock_writes, device)
            CLOCKS.write(state[picks], at[picks], sums[picks], advance)
        if targets is not None:
            temps = temperatures(targets, stats[:, 1], clock)
            values = torch.cat([stats[targets].double(), after.double(), temps.unsqueeze(1)], 1)  # type: ignore[union-attr]
            STORE.record(self.target_ids, self.target_positions, values)
        return logits


class _HostTable:
    """A per-slot table in host memory: the CPU stand-in for vLLM's ``UvaBackedTensor``
    (which needs pinned memory), with the same ``np`` / ``gpu`` / ``copy_to_uva``."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        self.gpu = torch.zeros(shape, dtype=dtype)
        self.np = self.gpu.numpy()

    def copy_to_uva(self) -> torch.Tensor:
        return self.gpu


def _slot_table(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Any:
    """vLLM's own round-robin UVA buffers on a GPU, so that writes for step N+1 never race
    a kernel of step N still reading (async scheduling); plain host memory elsewhere."""
    if device.type == "cpu":
        return _HostTable(shape, dtype)
    from vllm.v1.worker.gpu.buffer_utils import UvaBackedTensor

    return UvaBackedTensor(shape, dtype=dtype)


class _SlotState:
    """V2: schedules per persistent request slot; ``t`` is computed on the device.

    Nothing per row happens in Python and nothing is read back from the device: the
    kernel maps rows to slots, and takes ``t = pos + 1 - prompt_len[slot]`` from the
    model runner's own buffers, which is right after preemption (``prompt_len``, not
    ``prefill_len``) and for the consecutive rows of one request under speculative
    decoding.
    """

    def __init__(self, req_states: LogitsProcRequestState, default: ResolvedSchedule | None) -> None:
        self.default = default
        device = torch.device(req_states.device)
        self.prompt_len = req_states.prompt_len
        self.prefill_len = req_states.prefill_len
        self.kinds = _slot_table((req_states.max_num_reqs,), torch.int32, device)
        self.params = _slot_table((req_states.max_num_reqs, NUM_PARAMS), torch.float64, device)
        self.active = np.zeros(req_states.max_num_reqs, dtype=bool)  # host-side skip check
        self.targets: dict[int, str] = {}  # slot -> in-pass target id
        self.entropic: set[int] = set()  # slots of the entropy type
        self.clocks: dict[int, int] = {}  # slot -> its entropy clock's row
        self.dirty = False

    def add_request(self, slot: int, params: SamplingParams) -> bool:
        schedule = _applied_schedule(params, self.default)
        # Slots are recycled: overwrite every field of the previous occupant.
        if schedule is None:
            self.kinds.np[slot] = KIND_NONE
        else:
            self.kinds.np[slot], self.params.np[slot] = _kernel_row(schedule)
        self.active[slot] = schedule is not None
        target = _target_id(params, schedule)
        if target is None:
            self.targets.pop(slot, None)
        else:
            self.targets[slot] = target
        self.entropic.discard(slot)
        if (previous := self.clocks.pop(slot, None)) is not None:
            CLOCKS.close(previous)
        if schedule is not None and schedule.type == "entropy":
            self.entropic.add(slot)
        if schedule is not None and schedule.clock == "entropy":
            generated = int(self.prefill_len.np[slot]) - int(self.prompt_len.np[slot])
            self.clocks[slot] = CLOCKS.open(_sample_key(params), generated, schedule.h_ref)
        self.dirty = True
        return schedule is not None

    def apply_staged_writes(self) -> None:
        if self.dirty:
            self.kinds.copy_to_uva()
            self.params.copy_to_uva()
            self.dirty = False

    def apply(self, logits: torch.Tensor, ctx: LogitsContext) -> torch.Tensor:
        if not self.active[ctx.idx_mapping_np].any():
            return logits
        slots, prompt_len, kinds, params = ctx.expanded_idx_mapping, self.prompt_len.gpu, self.kinds.gpu, self.params.gpu

        def temperatures(rows: torch.Tensor, entropy: torch.Tensor, clock: torch.Tensor | None) -> torch.Tensor:
            at = slots[rows].long()
            return schedule_temperatures(slot_positions(slots[rows], ctx.pos[rows], prompt_len), kinds[at], params[at],
                                         entropy=entropy[rows], clock=None if clock is None else clock[rows])

        plan = self._plan(ctx, logits.shape[0])
        if not plan:
            return apply_schedule_slots_(logits, slots, ctx.pos, prompt_len, kinds, params)
        return plan.run(logits, (ctx.pos, kinds, params, slots, prompt_len), temperatures)

    def _plan(self, ctx: LogitsContext, size: int) -> _StepPlan:
        """The step's entropy, clock and in-pass rows, from the host's copies alone.

        They need one row per request (no speculative decoding): then row i is request i,
        and its t is known on the host. Only a row that samples a new token records or
        advances its clock: one whose sequence has reached the request's (re)fill length.
        A shorter one is a chunk of a partial prefill, whose token is discarded -- after a
        ``keep`` reload or a preemption, a chunk over tokens already generated, whose
        numbers (from new weights) must not replace those of the step that sampled them.
        """
        plan = _StepPlan()
        if not (self.targets or self.entropic or self.clocks) or size != len(ctx.idx_mapping_np):
            return plan
        for row, slot in enumerate(ctx.idx_mapping_np.tolist()):
            seq_len = int(ctx.seq_lens_upper_bound_np[row])
            t = max(seq_len - int(self.prompt_len.np[slot]), 0)
            samples = seq_len >= int(self.prefill_len.np[slot])
            if slot in self.entropic:
                plan.entropy_rows.append(row)
            if slot in self.clocks:
                if samples:
                    plan.clock_writes.append(len(plan.clock_rows))
                plan.clock_rows.append(row), plan.clock_states.append(self.clocks[slot])
                plan.clock_positions.append(t)
            if slot in self.targets and samples:
                plan.target_rows.append(row), plan.target_ids.append(self.targets[slot])
                plan.target_positions.append(t)
        return plan


class _RowState:
    """V1: schedules per batch row, kept in step with ``BatchUpdate``s.

    Per-row parameters live in persistent CPU tensors updated only from ``BatchUpdate``
    (the pattern of vLLM's builtin ``MinPLogitsProcessor``) and are copied to the device
    only when the batch changes. Per step the host reads one integer per scheduled row,
    the length of its live output-token list, which is ``t`` even under chunked
    prefill, preemption and async scheduling (placeholders keep the length right).
    """

    def __init__(self, max_reqs: int, device: torch.device, is_pin_memory: bool,
                 default: ResolvedSchedule | None) -> None:
        self.default = default
        self.kinds_cpu = torch.zeros(max_reqs, dtype=torch.int32, pin_memory=is_pin_memory)
        self.params_cpu = torch.ones(max_reqs, NUM_PARAMS, dtype=torch.float64, pin_memory=is_pin_memory)
        self.positions_cpu = torch.zeros(max_reqs, dtype=torch.int32, pin_memory=is_pin_memory)
        self.kinds_np, self.params_np = self.kinds_cpu.numpy(), self.params_cpu.numpy()
        self.positions_np = self.positions_cpu.numpy()
        self.on_cpu = torch.device(device).type == "cpu"
        copy = (lambda t: t) if self.on_cpu else (lambda t: torch.zeros_like(t, device=device))
        self.kinds, self.params, self.positions = copy(self.kinds_cpu), copy(self.params_cpu), copy(self.positions_cpu)
        self.outputs: dict[int, list[int]] = {}  # row -> live output-token list, scheduled rows only
        self.targets: dict[int, str] = {}  # row -> in-pass target id
        self.entropic: dict[int, bool] = {}  # rows of the entropy type
        self.clocks: dict[int, int] = {}  # row -> its entropy clock's row

    def update(self, batch_update: BatchUpdate) -> None:
        for row in batch_update.removed:
            self._clear(row)
        for row, params, _, output_ids in batch_update.added:
            self._clear(row)
            schedule = _applied_schedule(params, self.default)
            if schedule is not None:
                self.kinds_np[row], self.params_np[row] = _kernel_row(schedule)
                self.outputs[row] = output_ids
                if (target := _target_id(params, schedule)) is not None:
                    self.targets[row] = target
                if schedule.type == "entropy":
                    self.entropic[row] = True
                if schedule.clock == "entropy":
                    self.clocks[row] = CLOCKS.open(_sample_key(params), len(output_ids), schedule.h_ref)
        for a, b, direction in batch_update.moved:
            self._move(a, b, swap=direction == V1.MoveDirectionality.SWAP)
        if self.outputs and not self.on_cpu:
            self.kinds.copy_(self.kinds_cpu, non_blocking=True)
            self.params.copy_(self.params_cpu, non_blocking=True)

    def _clear(self, row: int) -> None:
        self.kinds_np[row] = KIND_NONE
        self.outputs.pop(row, None)
        self.targets.pop(row, None)
        self.entropic.pop(row, None)
        if (clock := self.clocks.pop(row, None)) is not None:
            CLOCKS.close(clock)

    def _move(self, a: int, b: int, *, swap: bool) -> None:
        kinds, params = self.kinds_np, self.params_np
        if swap:
            kinds[[a, b]] = kinds[[b, a]]
            params[[a, b]] = params[[b, a]]
        else:  # a's request now lives in b; a is empty
            kinds[b], params[b], kinds[a] = kinds[a], params[a], KIND_NONE
        for by_row in (self.outputs, self.targets, self.entropic, self.clocks):
            at_a, at_b = by_row.pop(a, None), by_row.pop(b, None)
            if swap and at_b is not None:
                by_row[a] = at_b
            if at_a is not None:
                by_row[b] = at_a

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.outputs:
            return logits
        for row, output_ids in self.outputs.items():
            self.positions_np[row] = len(output_ids)
        size = logits.shape[0]
        positions = self.positions[:size]
        if not self.on_cpu:
            positions.copy_(self.positions_cpu[:size], non_blocking=True)

        kinds, params = self.kinds[:size], self.params[:size]

        def temperatures(rows: torch.Tensor, entropy: torch.Tensor, clock: torch.Tensor | None) -> torch.Tensor:
            return schedule_temperatures(positions[rows], kinds[rows], params[rows], entropy=entropy[rows],
                                         clock=None if clock is None else clock[rows])

        plan = self._plan(size)
        if not plan:
            return apply_schedule_(logits, positions, kinds, params)
        return plan.run(logits, (positions, kinds, params, None, None), temperatures)

    def _plan(self, size: int) -> _StepPlan:
        """The step's entropy, clock and in-pass rows. Every row writes: V1 samples each
        scheduled row at ``t = len(outputs)``, and a partial prefill's row (whose token is
        discarded) is followed by the row that samples the same ``t``, whose write wins."""
        plan = _StepPlan()
        for row in sorted(row for row in {*self.targets, *self.entropic, *self.clocks} if row < size):
            t = int(self.positions_np[row])
            if row in self.entropic:
                plan.entropy_rows.append(row)
            if row in self.clocks:
                plan.clock_writes.append(len(plan.clock_rows))
                plan.clock_rows.append(row), plan.clock_states.append(self.clocks[row]), plan.clock_positions.append(t)
            if row in self.targets:
                plan.target_rows.append(row), plan.target_ids.append(self.targets[row]), plan.target_positions.append(t)
        return plan


class EADLogitsProcessor(*BASES):
    """Divides each scheduled row's logits by its position-dependent temperature.

    Accepted by the loader of every runner the installed vLLM has (see the module
    docstring); pass it explicitly (``LLM(logits_processors=[EADLogitsProcessor])``) or
    let the installed entry point load it.
    """

    # One live instance per engine: the entry point and an explicit ``logits_processors``
    # argument both instantiate the class, and scaling twice would square the schedule.
    _live: dict[int, weakref.ref[EADLogitsProcessor]] = {}

    def __init__(
        self, vllm_config: VllmConfig, device: torch.device | LogitsProcRequestState | None = None,
        is_pin_memory: bool = False, req_states: LogitsProcRequestState | None = None,
    ) -> None:
        """V1 calls ``(vllm_config, device, is_pin_memory)``, V2 ``(vllm_config, req_states)``
        (positionally: the second argument tells the runner).

        With ``$EAD_TEMPERATURE_SCHEDULE`` set, the engine does not start (``ValueError``)
        unless the default can be applied exactly: a valid schedule, no ``"step":
        "weights"``, and a processed ``logprobs_mode``, so that the log-probs a trainer's
        importance sampling compares against include the schedule. Unset, nothing is
        checked: stock ``vllm serve`` defaults to raw log-probs, and the entry point loads
        the processor into every engine of the environment.
        """
        first = self._live.get(id(vllm_config))
        self._duplicate = first is not None and (inst := first()) is not None and inst._config is vllm_config
        self._config = vllm_config
        if not self._duplicate:
            self._live[id(vllm_config)] = weakref.ref(self)
        default = environment_default()
        if default is not None:
            _check_logprobs_mode(vllm_config)
            if not self._duplicate:
                logger.info("EAD: default temperature schedule from $%s, applied to every sampling request at "
                            "temperature 1.0 that brings no schedule of its own (greedy and other temperatures "
                            "untouched): %s", ENV_DEFAULT, default.wire)
        self._slots: _SlotState | None = None
        self._rows: _RowState | None = None
        if V2 is not None and isinstance(device, V2.LogitsProcRequestState):
            req_states, device = device, None
        max_reqs = req_states.max_num_reqs if req_states is not None else vllm_config.scheduler_config.max_num_seqs
        where = torch.device(req_states.device if req_states is not None else device or "cpu")
        if not self._duplicate:
            CLOCKS.configure(where, vllm_config.model_config.max_model_len, max_reqs)
        if req_states is not None:
            self._slots = _SlotState(req_states, default)
        else:
            self._rows = _RowState(max_reqs, where, is_pin_memory, default)

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        """Refuse a bad schedule when the request arrives, not inside the engine loop.

        vLLM calls this at admission for ``LLM(...)`` and for every server route, so it
        applies the request contract (``ead_server.request_contract``): a schedule wants
        ``temperature`` 1 (greedy included is refused). Stock ``vllm serve`` answers the
        error as a 400 naming the field.

        A schedule is never silently dropped: where the model runner calls no custom
        processor (:func:`~ead_server.vllm_adapter.compat.runner_ignores_processors`), a
        request with a schedule, or one the environment default applies to, is refused
        with the reason.
        """
        try:
            own = request_schedule(sampling_params)
            if own is not None:
                check_temperature(sampling_params.temperature)
        except APIError as exc:  # the one translation into vLLM's error type
            raise VLLMValidationError(exc.message, parameter=exc.param) from None
        try:
            default = environment_default()
        except ValueError as exc:
            raise VLLMValidationError(str(exc), parameter=ENV_DEFAULT) from None
        defaulted = own is None and default is not None and default_applies(sampling_params.temperature)
        if (own is not None or defaulted) and (why := runner_ignores_processors()) is not None:
            where = SCHEDULE_KEY if own is not None else ENV_DEFAULT
            raise VLLMValidationError(f"{where}: refused, {why}", parameter=where)

    def is_argmax_invariant(self) -> bool:
        """Dividing by a positive temperature never changes the argmax, but V1 runs
        argmax-invariant processors after min-p; declaring False runs this one before,
        as Model Runner V2 does, so min-p sees the scheduled temperature on both."""
        return False

    # -- V1 runner
    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if self._rows is not None and batch_update is not None and not self._duplicate:
            self._rows.update(batch_update)

    # -- V2 runner
    def add_request(self, req_idx: int, sampling_params: SamplingParams) -> bool:
        if self._slots is None or self._duplicate:
            return False
        return self._slots.add_request(req_idx, sampling_params)

    def apply_staged_writes(self) -> None:
        if self._slots is not None and not self._duplicate:
            self._slots.apply_staged_writes()

    # -- both
    def apply(self, logits: torch.Tensor, ctx: LogitsContext | None = None) -> torch.Tensor:
        if self._duplicate:
            return logits
        if ctx is not None and self._slots is not None:
            return self._slots.apply(logits, ctx)
        assert self._rows is not None, "V2 runner called apply() without a LogitsContext"
        return self._rows.apply(logits)


def _check_logprobs_mode(vllm_config: Any) -> None:
    """Refuse to start with the environment default unless log-probs are processed."""
    mode = getattr(getattr(vllm_config, "model_config", None), "logprobs_mode", None)
    if mode is not None and mode not in _PROCESSED_MODES:
        raise ValueError(
            f"{ENV_DEFAULT} is set, but this engine returns {mode}: the log-probs a trainer's importance sampling "
            f"compares against would not include the schedule. Start the engine with "
            f"logprobs_mode='processed_logprobs' (TRL and verl do by default), or unset {ENV_DEFAULT}")
