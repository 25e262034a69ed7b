#!/usr/bin/env python
"""Per-token entropy of the embedded default model, to choose ``h_max`` and ``h_ref``.

Two entropy-aware schedules need a scale for the entropy ``H_t`` (nats) of
``softmax(logits_t)`` at temperature 1 over the full vocabulary (49152 tokens,
``log V`` = 10.80):

* ``entropy`` (llama.cpp's dynamic temperature):
  ``tau_t = tau_min + (tau_max - tau_min) * min(1, H_t / h_max) ** exponent``
  (defaults ``tau_min`` 0.1, ``tau_max`` 1.2, ``exponent`` 1). llama.cpp divides by
  ``log`` of the candidates left after top-k 40 (``log 40`` = 3.69); with ``log V`` almost
  every token of this model would sit near ``tau_min``.
* ``ead`` with ``"clock": "entropy"``: the token count ``t`` of
  ``tau = max(1 + tau_max - exp(t_eff / (k d)), tau_min)`` becomes
  ``t_eff = sum_{i<t} H_i / h_ref``.

This script samples one completion per built-in benchmark problem, with the prompt
``ead-bench majority`` sends by default (the chat API, one-shot example on, difficulty
1, problem seed = ``--seed``), at temperature 1 with no top-k / top-p, and records
``H_t`` of every generated token (up to and including the end-of-turn token).

How the suggested defaults are chosen:

* ``h_ref`` = the mean ``H_t`` (2 significant digits). Then ``E[t_eff] = t`` on these
  prompts: on average the entropy clock runs at the token clock's pace, so ``decay`` /
  ``k d`` keep their meaning, and confident (low-entropy) stretches advance it less.
* ``h_max`` = the p90 of ``H_t`` (2 significant digits; ``--h-max-percentile``). The
  distribution is very skewed (most tokens are nearly forced, a tail is spread over
  many candidates), so a scale near ``log V`` or near the top of the tail leaves almost
  every token near ``tau_min``, while the median as scale puts half the tokens at
  ``tau_max``. With ``h_max`` at p90, 90% of the tokens get a temperature below
  ``tau_max`` in proportion to their entropy, and only the most uncertain 10% (where
  the model is genuinely choosing between many continuations) are clamped to
  ``tau_max``; the median and mean tokens land at the temperatures printed at the end.
  p95 / p99 would push the typical token further toward ``tau_min``, i.e. closer to
  greedy decoding; the printed table gives the numbers for any other choice.

Usage (CPU: about 100 s for the defaults on 2 shared cores, mostly the 256 sampling steps)::

    nice -n 10 .venv/bin/python scripts/measure_entropy.py --out docs/data/entropy-measure.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LogitsProcessor

from ead_server.bench.datasets import DEFAULT_DIFFICULTY, builtin_problems, prompt_messages
from ead_server.default_model import prepare_default_model

BUCKETS = [(0, 15), (16, 63), (64, 127), (128, 255), (256, None)]
PERCENTILES = [50, 75, 90, 95, 99]
LONG = 128  # completions at least this long get their own position table
FORCED = 0.1  # nats: below this a token is "forced" (top token has p > ~0.98)
TAU_MIN, TAU_MAX, EXPONENT = 0.1, 1.2, 1.0  # the entropy schedule's defaults


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of softmax(logits) over the last axis, in float64; 0 * log 0 = 0."""
    logp = torch.log_softmax(logits.double(), dim=-1)
    p = logp.exp()
    return -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(-1)


class EntropyRecorder(LogitsProcessor):
    """Records H_t of the scores it is given and returns them unchanged.

    With the neutral generation config below (temperature 1, top_k 0, top_p 1, no
    penalties) transformers adds no processor of its own, so these are the raw logits;
    ``main`` checks the first step against a plain forward pass.
    """

    def __init__(self) -> None:
        self.steps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.steps.append(entropy(scores))
        return scores


def sig2(x: float) -> float:
    """``x`` rounded to 2 significant digits."""
    return float(f"{x:.2g}")


def tau_entropy(h: float, h_max: float) -> float:
    return TAU_MIN + (TAU_MAX - TAU_MIN) * min(1.0, h / h_max) ** EXPONENT


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--problems", type=int, default=32, help="built-in problems, one completion each")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0, help="problem set seed (as ead-bench --seed) and torch seed")
    ap.add_argument("--difficulty", type=int, default=DEFAULT_DIFFICULTY)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=1.0,
                    help="sampling temperature (H_t is always measured at T=1 on the raw logits)")
    ap.add_argument("--h-max-percentile", type=float, default=90.0)
    ap.add_argument("--model", type=Path, default=None, help="model folder (default: the embedded model)")
    ap.add_argument("--out", type=Path, default=None, help="write the statistics as JSON here")
    args = ap.parse_args()

    started = time.monotonic()
    folder = args.model or prepare_default_model()
    tok = AutoTokenizer.from_pretrained(folder)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    vocab = model.config.vocab_size
    eos = tok.eos_token_id

    problems = builtin_problems(args.problems, difficulty=args.difficulty, seed=args.seed)
    # Exactly what the server tokenizes for a chat request (ead_server/server.py).
    prompts = [tok.apply_chat_template(prompt_messages(p.question), tokenize=False, add_generation_prompt=True)
               for p in problems]

    gen_cfg = GenerationConfig(
        do_sample=True, temperature=args.temperature, top_k=0, top_p=1.0, max_new_tokens=args.max_tokens,
        eos_token_id=eos, pad_token_id=tok.pad_token_id, use_cache=True,
    )
    torch.manual_seed(args.seed)
    per_seq: list[np.ndarray] = []
    n_eos = 0
    for b in range(0, len(prompts), args.batch_size):
        enc = tok(prompts[b:b + args.batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
        rec = EntropyRecorder()
        with torch.inference_mode():
            out = model.generate(**enc, generation_config=gen_cfg, logits_processor=[rec])
            if b == 0:  # the recorder sees raw logits: compare step 0 with a plain forward pass
                ref = entropy(model(**enc).logits[:, -1, :])
                assert torch.allclose(ref, rec.steps[0], atol=1e-4), (ref, rec.steps[0])
        gen = out[:, enc.input_ids.shape[1]:]
        hs = torch.stack(rec.steps, dim=1).numpy()  # [batch, steps]
        for row, ids in enumerate(gen.tolist()):
            n = ids.index(eos) + 1 if eos in ids else len(ids)  # the end-of-turn token counts
            n_eos += eos in ids
            per_seq.append(hs[row, :n])
        print(f"batch {b // args.batch_size + 1}: {len(gen)} completions, {gen.shape[1]} steps, "
              f"{time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)

    h = np.concatenate(per_seq)
    pos = np.concatenate([np.arange(len(s)) for s in per_seq])
    pct = {p: float(np.percentile(h, p)) for p in PERCENTILES}
    stats = {
        "tokens": int(h.size), "completions": len(per_seq),
        "ended_with_eos": n_eos,
        "mean": float(h.mean()), **{f"p{p}": v for p, v in pct.items()}, "max": float(h.max()),
        "log_v": math.log(vocab), "forced_fraction": float((h < FORCED).mean()),
    }
    buckets = {}
    for lo, hi in BUCKETS:
        sel = (pos >= lo) & ((pos <= hi) if hi is not None else True)
        if sel.any():
            buckets[f"{lo}-{hi if hi is not None else ''}"] = {"tokens": int(sel.sum()), "mean": float(h[sel].mean())}
    # The buckets above mix completions: only the long ones reach the late buckets. The same
    # buckets within the completions that reach position LONG separate the trend from that.
    long_seqs = [s for s in per_seq if len(s) >= LONG]
    buckets_long = {}
    for lo, hi in BUCKETS:
        vals = [s[lo:(hi + 1 if hi is not None else None)] for s in long_seqs]
        vals = np.concatenate(vals) if vals else np.array([])
        if vals.size:
            buckets_long[f"{lo}-{hi if hi is not None else ''}"] = {"tokens": int(vals.size), "mean": float(vals.mean())}

    h_ref = sig2(stats["mean"])
    h_max = sig2(float(np.percentile(h, args.h_max_percentile)))
    below = float((h < h_max).mean())

    print(f"\nmodel {folder.name if hasattr(folder, 'name') else folder}, {len(problems)} built-in problems "
          f"(difficulty {args.difficulty}, seed {args.seed}), chat prompts, sampled at T={args.temperature}, "
          f"max {args.max_tokens} tokens")
    print(f"completions {stats['completions']} ({stats['ended_with_eos']} ended with <|im_end|>), "
          f"tokens {stats['tokens']}")
    print("\nH_t (nats, T=1, full vocabulary)")
    rows = [("mean", stats["mean"])] + [(("median" if p == 50 else f"p{p}"), pct[p]) for p in PERCENTILES] + [
        ("max", stats["max"]), ("log V", stats["log_v"]), ("log 40", math.log(40))]
    for name, v in rows:
        print(f"  {name:<8} {v:7.3f}")
    print(f"  H < {FORCED} (forced): {100 * stats['forced_fraction']:.1f}% of tokens")
    print("\nmean H_t by position")
    for name, b in buckets.items():
        print(f"  {name:<8} {b['mean']:7.3f}   ({b['tokens']} tokens)")
    if buckets_long:
        print(f"  within the {len(long_seqs)} completions of >= {LONG} tokens:")
        for name, b in buckets_long.items():
            print(f"  {name:<8} {b['mean']:7.3f}   ({b['tokens']} tokens)")
    print("\nsuggested defaults")
    print(f"  h_ref = {h_ref}   (mean H_t: E[t_eff] = t, the entropy clock runs at the token clock's pace)")
    print(f"  h_max = {h_max}   (p{args.h_max_percentile:g} of H_t: {100 * below:.1f}% of tokens below it)")
    print(f"  entropy schedule (tau_min {TAU_MIN}, tau_max {TAU_MAX}, exponent {EXPONENT:g}) with h_max = {h_max}:")
    for name, v in (("median", pct[50]), ("mean", stats["mean"]), ("p75", pct[75])):
        print(f"    {name:<6} token (H = {v:.3f}): tau = {tau_entropy(v, h_max):.3f}")
    print(f"    for comparison, median token with h_max = log 40: tau = {tau_entropy(pct[50], math.log(40)):.3f}, "
          f"with log V: {tau_entropy(pct[50], stats['log_v']):.3f}")
    wall = time.monotonic() - started
    print(f"\nwall time {wall:.0f} s")

    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "stats": stats, "by_position": buckets, "by_position_long": buckets_long,
            "suggested": {"h_ref": h_ref, "h_max": h_max, "h_max_percentile": args.h_max_percentile,
                          "tau_median": tau_entropy(pct[50], h_max), "tau_mean": tau_entropy(stats["mean"], h_max)},
            "wall_s": round(wall, 1),
        }, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
