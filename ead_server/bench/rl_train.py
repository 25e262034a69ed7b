"""One training run of ``ead-bench rl``: one arm (a temperature schedule) and one seed,
GRPO + TIS from the base weights for ``steps`` steps, with held-out evaluations, resumable
at its last finished step.

A step ``k`` (1-based; global step ``k - 1``, sent explicitly as ``step=`` so that the
decay of a step-aware schedule follows this run, not the server's weight version):

1. rollouts of ``prompts_per_step`` training problems x ``group_size`` samples under the
   arm's schedule, seeded from ``(seed, k - 1)`` only, so every arm of a seed draws the
   same problems with the same seeds (paired arms);
2. rewards (the benchmark's grading), GRPO advantages, one GRPO + TIS update
   (:func:`ead_server.bench.grpo.train`), the trainer-vs-engine log-prob check;
3. the checkpoint ``step-k`` is written and reloaded on every server;
4. every ``eval_every`` steps (and at the last): the held-out problems at the fixed
   evaluation schedule on the new weights, through the same servers;
5. the step's records are appended, then the trainer state (optimizer, RNG states, data
   position) is written, and the previous checkpoint removed.

A run killed anywhere restarts at the last step whose trainer state was written: records
past it are dropped and recomputed, identically (same seeds, same weights, same batch
shapes).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ead_client import EADClient, RolloutBatch, TemperatureSchedule
from ead_server.bench.datasets import Problem, prompt_messages
from ead_server.bench.grading import GradeCache, GradingPool, extract_answer, grade_pools
from ead_server.bench.grpo import (
    Stopwatch,
    Trainer,
    engine_difference,
    grade,
    group_advantages,
    save_checkpoint,
    train,
)
from ead_server.bench.metrics import majority_first_k, pass_at_k
from ead_server.bench.store import read_jsonl
from ead_server.schedule import ANNEALED_TYPES, ResolvedSchedule

__all__ = ["Arm", "RunSettings", "RunFailed", "eval_ks", "evaluate", "run_one", "rollout_digest"]


class RunFailed(RuntimeError):
    """A run that cannot go on (servers that do not serve the trainer's weights, ...)."""


@dataclass(frozen=True)
class Arm:
    name: str
    text: str  # as given on the command line
    spec: dict[str, Any]  # request form
    resolved: ResolvedSchedule

    @property
    def schedule(self) -> TemperatureSchedule:
        return TemperatureSchedule.model_validate(self.spec)

    @property
    def step_aware(self) -> bool:
        return self.resolved.type != "constant" and self.resolved.decay_schedule is not None


@dataclass
class RunSettings:
    """Everything a run depends on (the command's settings)."""

    model_dir: Path
    steps: int
    prompts_per_step: int
    group_size: int
    max_tokens: int
    lr: float
    weight_decay: float
    max_grad_norm: float
    micro_batch_size: int
    tis: dict[str, Any]  # train()'s tis_level, tis_mode, tis_cap, use_tis
    one_shot: bool
    eval_every: int
    eval_schedule: Arm
    eval_samples: int
    eval_max_tokens: int
    logprob_tol: float
    device: str
    share_prompt: bool
    train_problems: list[Problem]
    eval_problems: list[Problem]
    extra: dict[str, Any] = field(default_factory=dict)


def eval_ks(pool: int) -> list[int]:
    """k = 1, 2, 4, ... and the pool size."""
    ks = [1]
    while ks[-1] * 2 <= pool:
        ks.append(ks[-1] * 2)
    return ks if ks[-1] == pool else [*ks, pool]


def rollout_digest(batch: RolloutBatch) -> str:
    """A hash of every sampled token id, in order: equal digests, equal rollouts."""
    h = hashlib.sha256()
    for r in batch.rollouts:
        h.update(json.dumps(list(r.token_ids)).encode())
    return h.hexdigest()[:16]


def train_seed(seed: int, global_step: int, prompts_per_step: int) -> int:
    """The rollout seed of a training step: prompt i gets ``this + i`` (the client's rule);
    the seeds of different steps do not overlap. Independent of the arm: paired arms."""
    return (seed * 1_000_003 + global_step * prompts_per_step) % 2**31


def eval_seed(seed: int, step: int, num_problems: int) -> int:
    return (seed * 1_000_003 + 700_001 + step * num_problems) % 2**31


def step_problems(settings: RunSettings, seed: int, global_step: int) -> list[Problem]:
    """A seed's permutation of the training problems, ``prompts_per_step`` at a time (the
    data position is ``global_step * prompts_per_step``), wrapping around."""
    pool = settings.train_problems
    order = np.random.default_rng([seed, 20_251_005]).permutation(len(pool))
    start = global_step * settings.prompts_per_step
    return [pool[order[(start + i) % len(pool)]] for i in range(settings.prompts_per_step)]


def evaluate(client: EADClient, settings: RunSettings, seed: int, step: int, version: int, grader: GradingPool,
             cache: GradeCache, key: str) -> dict[str, Any]:
    """The held-out problems, ``eval_samples`` each, at the fixed evaluation schedule:
    Pass@k (unbiased estimator) and first-k Maj@k (math-verify classes), the benchmark's
    estimators, per problem and averaged."""
    problems = settings.eval_problems
    n = settings.eval_samples
    batch = client.rollouts(
        messages=[prompt_messages(p.question, one_shot=settings.one_shot) for p in problems], n=n,
        max_tokens=settings.eval_max_tokens, schedule=settings.eval_schedule.schedule,
        seed=eval_seed(seed, step, len(problems)),
    )
    _check_version(batch, version)
    texts = [r.text for r in batch.rollouts]
    answers = [extract_answer(t).answer for t in texts]
    pools_in = {(p.id, key): answers[i * n : (i + 1) * n] for i, p in enumerate(problems)}
    pools, _ = grade_pools({p.id: p.answer for p in problems}, pools_in, runner=grader, cache=cache)
    ks = eval_ks(n)
    correct = [pools[(p.id, key)].n_correct for p in problems]
    per_pass = {k: [pass_at_k(n, m, k) for m in correct] for k in ks}
    per_maj = {k: [float(majority_first_k(pools[(p.id, key)], k)) for p in problems] for k in ks}
    return {
        "step": step,
        "weight_version": version,
        "pass_at_k": {str(k): float(np.mean(v)) for k, v in per_pass.items()},
        "maj_first_k": {str(k): float(np.mean(v)) for k, v in per_maj.items()},
        "per_problem_correct": correct,
        "per_problem_maj_first_k": {str(k): v for k, v in per_maj.items()},
        "response_length_mean": float(batch.lengths().mean()),
        "finished_fraction": float(np.mean([r.finish_reason == "stop" for r in batch.rollouts])),
        "rollout_sha256": rollout_digest(batch),
    }


def _check_version(batch: RolloutBatch, version: int) -> None:
    versions, mask = batch.token_versions()
    seen = sorted(set(versions[mask].tolist()))
    if seen and seen != [version]:
        raise RunFailed(f"rollouts came from weight versions {seen}, expected {version}: another process reloaded "
                        "the server(s) during this run")


def schedule_fields(arm: Arm, global_step: int, lengths: np.ndarray) -> dict[str, Any]:
    """Where the answers sit against the schedule of this step: its warm-up, its decay
    ``d`` and the first token at ``tau_min`` (None for a constant or ``entropy`` schedule,
    which have neither; the entropy clock's end depends on each rollout: None)."""
    if arm.resolved.type not in ANNEALED_TYPES:
        return {"warmup": None, "decay": None, "anneal_end": None, "warmup_token_fraction": None,
                "annealed_token_fraction": None}
    spec = dict(arm.spec)
    if arm.step_aware:
        spec["decay_schedule"] = {**spec.get("decay_schedule", {}), "step": global_step}
    resolved = TemperatureSchedule.model_validate(spec).resolve()
    end = resolved.anneal_end()
    total = float(lengths.sum())
    warm = float(np.minimum(lengths, resolved.warmup).sum())
    annealed = None if end is None else float(np.clip(lengths - end, 0, None).sum()) / total if total else 0.0
    return {"warmup": resolved.warmup, "decay": resolved.decay, "anneal_end": end,
            "warmup_token_fraction": warm / total if total else 0.0, "annealed_token_fraction": annealed}


def ratio_stats(batch: RolloutBatch, old_rows: list[list[float]]) -> dict[str, float]:
    """The importance ratios ``pi_old / pi_b`` before truncation: tail and KL estimates.

    ``kl_k3`` / ``kl_k1``: the per-token estimators of ``KL(pi_b || pi_old)`` from tokens
    sampled by pi_b (docs/design.md, "Truncated importance sampling"), mean over tokens;
    the exact per-position KL from the trainer's logits is ``kl_behavior_target``."""
    log_r = np.concatenate([np.asarray(o, dtype=float) - np.asarray(r.behavior_logprobs, dtype=float)
                            for o, r in zip(old_rows, batch.rollouts)])
    lr = np.clip(log_r, -20, 20)
    ratio = np.exp(lr)
    return {
        "ratio_max": float(ratio.max()),
        "ratio_p99": float(np.quantile(ratio, 0.99)),
        "ratio_min": float(ratio.min()),
        "log_ratio_abs_max": float(np.abs(lr).max()),
        "kl_k1": float((-lr).mean()),
        "kl_k3": float((np.expm1(lr) - lr).mean()),
    }


def _rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def _atomic_json(path: Path, value: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(value, indent=1, allow_nan=False) + "\n")
    tmp.replace(path)


def _append(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as fh:
        fh.write(json.dumps(record, allow_nan=False) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def _truncate(path: Path, last_step: int) -> list[dict[str, Any]]:
    """Keep the records of steps ``<= last_step`` (those after the last trainer state are
    recomputed)."""
    records = [r for r in read_jsonl(path) if r["step"] <= last_step] if path.exists() else []
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r, allow_nan=False) + "\n" for r in records))
    tmp.replace(path)
    return records


def run_one(
    *,
    client: EADClient,
    settings: RunSettings,
    arm: Arm,
    seed: int,
    run_dir: Path,
    checkpoint_root: Path,
    base_path: Path,
    base_eval: Callable[[int], dict[str, Any]],
    grader: GradingPool,
    cache: GradeCache,
    progress: Any = None,
    log: Callable[[str], None] = print,
    stop_after: int | None = None,
) -> None:
    """Train (or resume) one arm x seed run into ``run_dir`` (``steps.jsonl``,
    ``evals.jsonl``, ``state.json`` + ``trainer-state.pt``); checkpoints go to
    ``checkpoint_root/step-K``, under the servers' weights root. ``base_eval(version)``
    gives the step-0 evaluation (shared by the arms of a seed). ``stop_after``: end after
    that step as if killed (tests)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    state_path = run_dir / "state.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {"step": 0}
    done = int(state["step"])
    steps_path, evals_path = run_dir / "steps.jsonl", run_dir / "evals.jsonl"
    _truncate(steps_path, done)
    evals = _truncate(evals_path, done)
    if progress is not None:
        progress.reset(total=settings.steps)
        progress.update(done)
    if done >= settings.steps:
        return

    set_seed = seed * 7919 + 17
    random.seed(set_seed)
    np.random.seed(set_seed % 2**32)
    torch.manual_seed(set_seed)
    start_dir = Path(state["checkpoint"]) if done else settings.model_dir
    trainer = Trainer.load(start_dir, lr=settings.lr, weight_decay=settings.weight_decay, device=settings.device,
                           share_prompt=settings.share_prompt)
    if done:
        saved = torch.load(run_dir / "trainer-state.pt", weights_only=False)
        trainer.optimizer.load_state_dict(saved["optimizer"])
        _set_rng_state(saved["rng"])
        if saved["data_position"] != done * settings.prompts_per_step:
            raise RunFailed(f"{run_dir}: the trainer state's data position {saved['data_position']} does not match "
                            f"step {done}")
        log(f"{arm.name} seed {seed}: resuming after step {done}")
    version = client.reload_weights(str(Path(state["checkpoint"]) if done else base_path))
    if done == 0 and not any(e["step"] == 0 for e in evals):
        record = {**base_eval(version), "weight_version": version}
        _append(evals_path, record)

    for k in range(done + 1, settings.steps + 1):
        g = k - 1
        clock = Stopwatch()
        problems = step_problems(settings, seed, g)
        batch = client.rollouts(
            messages=[prompt_messages(p.question, one_shot=settings.one_shot) for p in problems],
            n=settings.group_size, max_tokens=settings.max_tokens, schedule=arm.schedule,
            step=g if arm.step_aware or arm.resolved.type == "constant" else None,
            seed=train_seed(seed, g, settings.prompts_per_step), return_target_logprobs=True,
        )
        clock.lap("rollout")
        _check_version(batch, version)
        rewards = grade(batch, [p.answer for p in problems for _ in range(settings.group_size)], grader)
        advantages = group_advantages(rewards, settings.group_size)
        clock.lap("reward")
        result = train(trainer, batch, advantages, micro_batch_size=settings.micro_batch_size,
                       max_grad_norm=settings.max_grad_norm, **settings.tis)
        clock.lap("train")
        diffs = engine_difference(batch, result.old_rows, version)
        if settings.logprob_tol > 0 and diffs.size and not diffs.max() <= settings.logprob_tol:
            raise RunFailed(f"{arm.name} seed {seed} step {k}: the trainer's log-probs differ from the engine's "
                            f"target log-probs by up to {diffs.max():.3g} (> --logprob-tol {settings.logprob_tol}): "
                            "the server(s) do not serve the trainer's weights")
        path = save_checkpoint(trainer.model, trainer.tokenizer, checkpoint_root / f"step-{k}")
        clock.lap("save")
        new_version = client.reload_weights(str(path))
        if new_version != version + 1:
            raise RunFailed(f"after reloading {path} the servers report weight version {new_version}, expected "
                            f"{version + 1}: another process reloaded them during this run")
        clock.lap("reload")
        eval_record = None
        if k % settings.eval_every == 0 or k == settings.steps:
            eval_record = evaluate(client, settings, seed, k, new_version, grader, cache, f"{arm.name}|{seed}|{k}")
            clock.lap("eval")
        lengths = batch.lengths()
        temps, tmask = batch.temperatures()
        groups = rewards.reshape(-1, settings.group_size)
        record = {
            "step": k,
            "global_step": g,
            "rollout_weight_version": version,
            "weight_version": new_version,
            "problems": [p.id for p in problems],
            "rollout_sha256": rollout_digest(batch),
            "num_rollouts": len(batch.rollouts),
            "num_tokens": int(lengths.sum()),
            "reward_mean": float(rewards.mean()),
            "any_correct_fraction": float((groups.max(axis=1) > 0).mean()),
            "groups_with_signal_fraction": float((groups.std(axis=1) > 0).mean()),
            "response_length_mean": float(lengths.mean()),
            "response_length_max": int(lengths.max()),
            "finished_fraction": float(np.mean([r.finish_reason == "stop" for r in batch.rollouts])),
            **schedule_fields(arm, g, lengths),
            "temperature_mean": float(temps[tmask].mean()),
            "entropy_mean": result.entropy_mean,
            "behavior_entropy_mean": result.behavior_entropy_mean,
            "kl_behavior_target": result.kl_mean,
            **ratio_stats(batch, result.old_rows),
            **result.tis.metrics(prefix="tis_"),
            "truncated_or_masked_fraction": result.tis.clipped_fraction + result.tis.masked_fraction,
            "logprob_diff_max": float(diffs.max()) if diffs.size else 0.0,
            "loss": result.loss,
            "grad_norm": result.grad_norm,
        }
        # The records first, then the state: a kill in between recomputes this step.
        clock.lap("log")
        record["seconds"] = {name: round(v, 3) for name, v in clock.stop().items()}
        _append(steps_path, record)
        if eval_record is not None:
            _append(evals_path, eval_record)
        tmp = run_dir / "trainer-state.pt.tmp"
        torch.save({"optimizer": trainer.optimizer.state_dict(), "rng": _rng_state(),
                    "data_position": k * settings.prompts_per_step, "step": k}, tmp)
        tmp.replace(run_dir / "trainer-state.pt")
        _atomic_json(state_path, {"step": k, "checkpoint": str(path)})
        if k > 1:
            shutil.rmtree(checkpoint_root / f"step-{k - 1}", ignore_errors=True)
        version = new_version
        if progress is not None:
            progress.set_postfix(reward=f"{record['reward_mean']:.2f}", H=f"{record['entropy_mean']:.2f}",
                                 refresh=False)
            progress.update(1)
        log(f"[{arm.name} seed {seed} step {k}/{settings.steps}] reward {record['reward_mean']:.3f} "
            f"any-correct {record['any_correct_fraction']:.2f} len {record['response_length_mean']:.1f} "
            f"H {record['entropy_mean']:.3f} H_b {record['behavior_entropy_mean']:.3f} "
            f"KL {record['kl_behavior_target']:.4f} ratio max {record['ratio_max']:.2f} "
            f"clipped {record['truncated_or_masked_fraction']:.3f}"
            + (f" | eval Pass@1 {eval_record['pass_at_k']['1']:.3f}" if eval_record else "")
            + f" | {record['seconds']['total']:.1f}s")
        if stop_after is not None and k >= stop_after and k < settings.steps:
            raise KeyboardInterrupt  # a simulated kill (tests)
    del trainer


def base_eval_cached(path: Path, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """The step-0 evaluation of a seed, computed once and shared by its arms (every arm
    starts from the same weights and evaluates with the same seeds)."""
    if path.exists():
        return json.loads(path.read_text())
    record = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_json(path, record)
    return record


def seeds_list(seeds: Sequence[int]) -> list[int]:
    return list(dict.fromkeys(seeds))
