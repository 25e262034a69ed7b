"""Truncated importance sampling (TIS) weights for rollouts sampled under an EAD schedule.

EAD samples token ``j`` at temperature ``tau_j``, so the behaviour policy ``pi_b`` is not
the policy being trained. A trainer corrects with the per-token ratio
``r_j = pi_old(y_j) / pi_b(y_j)``, i.e. ``log r_j = old_logprobs[j] - behavior_logprobs[j]``
(SPEC section 3, paper Appendix B), bounded so that its variance stays finite.

Settings and what they reproduce
--------------------------------
=======================  ==============================================  =========================================
``tis_weights(...)``     TRL ``GRPOConfig`` (checked against trl 1.16)   verl (``algorithm.rollout_is_*``)
=======================  ==============================================  =========================================
level="token",           ``vllm_importance_sampling_mode=                ``rollout_is_level="token"``,
mode="truncate"          "token_truncate"``                              ``rollout_is_mode="truncate"``
level="token",           ``"token_mask"``                                ``rollout_is_level="token"``,
mode="mask"                                                              ``rollout_is_mode="mask"``
level="sequence",        ``"sequence_truncate"``                         ``rollout_is_level="sequence"``,
mode="truncate"                                                          ``rollout_is_mode="truncate"``
level="sequence",        ``"sequence_mask"`` (TRL's default mode)        ``rollout_is_level="sequence"``,
mode="mask"                                                              ``rollout_is_mode="mask"``
level="geometric"        (none)                                          ``rollout_is_level="geometric"``
cap                      ``vllm_importance_sampling_clip_max`` (default  ``rollout_is_threshold``
                         3.0; called ``vllm_importance_sampling_cap``
                         before, now a deprecated alias)
lower                    ``vllm_importance_sampling_clip_min``           ``rollout_is_threshold_lower``
                         (default None)                                  (mask mode only; None means 1 / upper)
=======================  ==============================================  =========================================

TRL's ``vllm_importance_sampling_correction=True`` is "call this function and multiply
the per-token loss by ``weights``"; verl's ``rollout_is=True`` likewise (``False`` there
computes metrics only).

* **TRL**: identical results for every (level, mode, cap, lower) it supports: the same
  ``clamp(ratio, lower, cap)`` for truncation, the same inclusive ``[lower, cap]`` window
  for masking, ``lower=None`` means no lower bound, a NaN log-ratio counts as 0 (ratio 1).
  One difference: at padding positions TRL's token-level ratio is 1 (its loss mask
  removes them later); here padding weights are 0.
* **verl** (read from ``verl/trainer/ppo/mismatch_helper.py`` of volcengine/verl; verl is
  not installed here, so this was not run side by side; newer verl versions move these
  options under ``algorithm.rollout_corr``):
  - truncate mode in verl ignores the lower threshold; here ``lower`` is a floor clamp
    (TRL's meaning). Leave ``lower=None`` to reproduce verl's truncation.
  - mask mode in verl defaults the lower threshold to ``1 / threshold``; here the default
    is no lower bound. Pass ``lower=1 / cap`` to reproduce verl's default.
  - verl's mask mode keeps the raw ratio in its weights and rejects through the response
    mask, which also drops rejected tokens from the loss denominator; here rejected
    tokens get weight 0 (TRL's way). ``weights * mask`` is the same; only a token-mean
    loss normalisation differs, use ``weights > 0`` as the mask to reproduce verl's.
  - verl clamps log-ratios to [-20, 20] before ``exp``; this module clamps only from
    above (at 20, so no weight exceeds ``exp(20)`` ~ 4.9e8), which changes nothing for
    any cap below that, and below ``exp(-20)`` keeps the exact tiny ratio.
  - verl's ESS uses the ratios before truncation; here it uses the final weights.

Default ``cap=2.0``: SPEC section 3 gives typical caps of 1.5-5 (token level) and 2-10
(sequence level); 2.0 lies in both ranges, is the threshold of verl's documented
rollout-IS setup, and is the conservative end (lower variance) of the sequence range.
TRL's default is 3.0: pass ``cap=3.0`` to match it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from ._arrays import as_numpy, pad_ragged

__all__ = ["LOG_RATIO_MAX", "TISResult", "tis_weights"]

Level = Literal["token", "sequence", "geometric"]
Mode = Literal["truncate", "mask"]

# No weight exceeds exp(20) ~ 4.9e8 (verl's safety bound): larger ratios only arise with
# a cap above that, and a sequence sum of thousands of log-ratios must not overflow exp.
LOG_RATIO_MAX = 20.0


@dataclass(frozen=True)
class TISResult:
    """Weights and diagnostics of :func:`tis_weights`.

    ``weights`` has the input's (padded) shape, float64, 0 at padding. Statistics are
    0.0 when there are no valid tokens.

    * ``mean``: mean weight over valid tokens.
    * ``ess``: effective sample size as a fraction, ``(sum w)^2 / (N * sum w^2)`` over
      the ``N`` valid tokens; 1 when all weights are equal, ``1/N`` when one dominates,
      0 when all are 0.
    * ``clipped_fraction`` (truncate mode) / ``masked_fraction`` (mask mode): share of
      units whose ratio fell outside ``[lower, cap]``; the other one is 0. Units are
      valid tokens at token level and sequences (with at least one valid token) at
      sequence and geometric level.
    * ``ratio_mean``: mean of the untruncated ratios over the same units (each bounded
      by ``exp(LOG_RATIO_MAX)`` so that one runaway sequence cannot make it infinite).
    """

    weights: np.ndarray
    mask: np.ndarray
    mean: float
    ess: float
    clipped_fraction: float
    masked_fraction: float
    ratio_mean: float
    num_tokens: int
    num_sequences: int

    def metrics(self, prefix: str = "tis/") -> dict[str, float]:
        """The scalar statistics as a flat dict, ready for a logger."""
        names = ("mean", "ess", "clipped_fraction", "masked_fraction", "ratio_mean", "num_tokens", "num_sequences")
        return {prefix + name: float(getattr(self, name)) for name in names}


def tis_weights(
    behavior_logprobs: Any,
    old_logprobs: Any,
    mask: Any = None,
    *,
    level: Level = "token",
    mode: Mode = "truncate",
    cap: float | None = 2.0,
    lower: float | None = None,
) -> TISResult:
    """Importance weights ``pi_old / pi_b`` per token, truncated or masked to ``[lower, cap]``.

    Args:
        behavior_logprobs: ``log pi_b`` of each sampled token: a padded ``[R, L]`` (or
            ``[L]``) array, a torch tensor, or ragged lists of per-sequence lists (as in
            :class:`Rollout`), which are padded and masked here.
        old_logprobs: ``log pi_old`` of the same tokens, same shape (or same ragged
            lengths): the trainer's recomputed log-probs, or the engine's
            ``target_logprobs`` when the trainer trusts the engine.
        mask: True (or 1) on valid tokens, same shape; default all valid (for ragged
            input: every real element).
        level: ``"token"``: ``ratio_j = exp(log r_j)``. ``"sequence"``:
            ``ratio = exp(sum_j log r_j)`` over the sequence's valid tokens, the same for
            each of its tokens. ``"geometric"``: ``exp(mean_j log r_j)`` (verl's level).
        mode: ``"truncate"``: ``w = clip(ratio, lower, cap)``. ``"mask"``: ``w = ratio``
            when ``lower <= ratio <= cap``, else 0.
        cap: upper bound (``None``: none). Must be positive.
        lower: lower bound (``None``: none). In truncate mode it is a floor clamp, as in
            TRL; must satisfy ``0 <= lower < cap``.

    Everything is computed in float64, bounds are compared in log space (so a sequence
    whose log-ratio sum would overflow ``exp`` is still truncated to ``cap`` or masked
    exactly), and padding positions get weight 0. A NaN log-ratio on a valid token
    counts as 0 (ratio 1), as in TRL.
    """
    if level not in ("token", "sequence", "geometric"):
        raise ValueError(f"level must be 'token', 'sequence' or 'geometric', got {level!r}")
    if mode not in ("truncate", "mask"):
        raise ValueError(f"mode must be 'truncate' or 'mask', got {mode!r}")
    upper = math.inf if cap is None else float(cap)
    if not upper > 0:
        raise ValueError(f"cap must be positive (or None), got {cap!r}")
    if lower is not None and not (0.0 <= float(lower) < upper):
        raise ValueError(f"lower must satisfy 0 <= lower < cap, got lower={lower!r}, cap={cap!r}")
    log_cap = math.log(upper) if math.isfinite(upper) else math.inf
    log_lower = math.log(lower) if lower else -math.inf

    behavior, old, valid, squeeze = _prepare(behavior_logprobs, old_logprobs, mask)
    with np.errstate(invalid="ignore"):  # -inf - -inf is NaN, handled just below
        log_r = np.where(valid, old - behavior, 0.0)
    log_r[np.isnan(log_r)] = 0.0

    counts = valid.sum(axis=1)
    if level == "token":
        unit_log = log_r  # [R, L]
        unit_valid = valid
    else:
        unit_log = log_r.sum(axis=1)  # [R]; padding contributes 0
        if level == "geometric":
            unit_log = unit_log / np.maximum(counts, 1)
        unit_valid = counts > 0

    outside = (unit_log > log_cap) | (unit_log < log_lower)
    top = min(log_cap, LOG_RATIO_MAX)
    if mode == "truncate":
        unit_w = np.exp(np.clip(unit_log, min(log_lower, top), top))
    else:
        unit_w = np.where(outside, 0.0, np.exp(np.minimum(unit_log, LOG_RATIO_MAX)))

    weights = unit_w if level == "token" else np.broadcast_to(unit_w[:, None], valid.shape)
    weights = np.where(valid, weights, 0.0)

    num_tokens = int(valid.sum())
    units = int(unit_valid.sum())
    w_valid = weights[valid]
    sum_w, sum_w2 = float(w_valid.sum()), float(np.square(w_valid).sum())
    fraction_outside = float(outside[unit_valid].mean()) if units else 0.0
    result = TISResult(
        weights=weights[0] if squeeze else weights,
        mask=valid[0] if squeeze else valid,
        mean=sum_w / num_tokens if num_tokens else 0.0,
        ess=sum_w**2 / (num_tokens * sum_w2) if sum_w2 > 0 else 0.0,
        clipped_fraction=fraction_outside if mode == "truncate" else 0.0,
        masked_fraction=fraction_outside if mode == "mask" else 0.0,
        ratio_mean=float(np.exp(np.minimum(unit_log[unit_valid], LOG_RATIO_MAX)).mean()) if units else 0.0,
        num_tokens=num_tokens,
        num_sequences=int(valid.shape[0]),
    )
    return result


def _is_ragged(x: Any) -> bool:
    """A list/tuple of per-sequence rows (lists, tuples or 1-D arrays)."""
    return isinstance(x, (list, tuple)) and len(x) > 0 and all(isinstance(r, (list, tuple, np.ndarray)) for r in x)


def _prepare(behavior: Any, old: Any, mask: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
    """Both inputs as float64 ``[R, L]`` arrays plus a bool mask; ``squeeze`` for 1-D input."""
    ragged_mask = None
    if _is_ragged(behavior) or _is_ragged(old):
        if not (_is_ragged(behavior) and _is_ragged(old)):
            raise ValueError("give both log-prob inputs as ragged lists of rows, or both as padded arrays")
        _check_row_lengths(behavior, old)
        b, ragged_mask = pad_ragged(behavior, 0.0, np.float64)
        o, _ = pad_ragged(old, 0.0, np.float64)
    else:
        b = as_numpy(behavior).astype(np.float64)
        o = as_numpy(old).astype(np.float64)
    if b.shape != o.shape:
        raise ValueError(f"behavior_logprobs has shape {b.shape} but old_logprobs has {o.shape}")
    if b.ndim not in (1, 2):
        raise ValueError(f"log-probs must be [L] or [R, L], got shape {b.shape}")
    squeeze = b.ndim == 1
    if squeeze:
        b, o = b[None, :], o[None, :]
        if ragged_mask is not None:
            ragged_mask = ragged_mask[None, :]
    if mask is None:
        valid = np.ones(b.shape, dtype=bool) if ragged_mask is None else ragged_mask
    else:
        valid = as_numpy(mask).astype(bool)
        if squeeze and valid.ndim == 1:
            valid = valid[None, :]
        if valid.shape != b.shape:
            raise ValueError(f"mask has shape {valid.shape} but the log-probs have {b.shape}")
        if ragged_mask is not None:
            valid = valid & ragged_mask
    return b, o, valid, squeeze


def _check_row_lengths(behavior: Sequence[Any], old: Sequence[Any]) -> None:
    if len(behavior) != len(old):
        raise ValueError(f"{len(behavior)} behaviour rows but {len(old)} old rows")
    for i, (b, o) in enumerate(zip(behavior, old)):
        if len(b) != len(o):
            raise ValueError(f"row {i}: {len(b)} behaviour log-probs but {len(o)} old log-probs")
