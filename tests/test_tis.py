"""Truncated importance sampling weights (SPEC section 3): hand-computed cases, stats,
input forms, overflow, and properties."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ead_client import TISResult, tis_weights
from ead_client.tis import LOG_RATIO_MAX

E = math.exp

# Two ragged sequences. log r = old - behavior:
#   A: [-0.5 - -1.0, -2.5 - -2.0, -0.5 - -0.5] = [ 0.5, -0.5, 0.0]  -> sum 0.0, mean 0.0
#   B: [-1.0 - -3.0, -1.2 - -1.0]             = [ 2.0, -0.2]       -> sum 1.8, mean 0.9
BEHAVIOR = [[-1.0, -2.0, -0.5], [-3.0, -1.0]]
OLD = [[-0.5, -2.5, -0.5], [-1.0, -1.2]]
# Token ratios: A = [1.6487213, 0.6065307, 1.0], B = [7.3890561, 0.8187308]
RA = [E(0.5), E(-0.5), 1.0]
RB = [E(2.0), E(-0.2)]
MASK = np.array([[True, True, True], [True, True, False]])


def padded(rows_a: list[float], rows_b: list[float]) -> np.ndarray:
    return np.array([rows_a, rows_b + [0.0]])


def check(result: TISResult, expected: np.ndarray) -> None:
    np.testing.assert_allclose(result.weights, expected, rtol=1e-12, atol=0)
    assert result.weights.dtype == np.float64
    assert result.weights[1, 2] == 0.0  # padding


# -- every level x mode, with and without lower --------------------------------------------------

@pytest.mark.parametrize(
    "kwargs, expected, clipped, masked",
    [
        # token truncate, cap 2: B's 7.389 -> 2
        (dict(level="token", mode="truncate", cap=2.0), padded(RA, [2.0, E(-0.2)]), 1 / 5, 0.0),
        # ... and lower 0.7 floors A's 0.6065 -> 0.7
        (
            dict(level="token", mode="truncate", cap=2.0, lower=0.7),
            padded([E(0.5), 0.7, 1.0], [2.0, E(-0.2)]), 2 / 5, 0.0,
        ),
        # token mask, cap 2: B's 7.389 -> 0
        (dict(level="token", mode="mask", cap=2.0), padded(RA, [0.0, E(-0.2)]), 0.0, 1 / 5),
        # ... and lower 0.7 drops A's 0.6065 too
        (dict(level="token", mode="mask", cap=2.0, lower=0.7), padded([E(0.5), 0.0, 1.0], [0.0, E(-0.2)]), 0.0, 2 / 5),
        # sequence truncate, cap 2: A = exp(0) = 1, B = exp(1.8) = 6.0496 -> 2
        (dict(level="sequence", mode="truncate", cap=2.0), padded([1.0] * 3, [2.0, 2.0]), 1 / 2, 0.0),
        # ... lower 1.5 lifts A to 1.5
        (dict(level="sequence", mode="truncate", cap=2.0, lower=1.5), padded([1.5] * 3, [2.0, 2.0]), 2 / 2, 0.0),
        # sequence mask, cap 2: B dropped
        (dict(level="sequence", mode="mask", cap=2.0), padded([1.0] * 3, [0.0, 0.0]), 0.0, 1 / 2),
        # sequence mask, cap 10, lower 1.5: A (1.0) dropped, B (6.0496) kept
        (dict(level="sequence", mode="mask", cap=10.0, lower=1.5), padded([0.0] * 3, [E(1.8)] * 2), 0.0, 1 / 2),
        # geometric: A = exp(0) = 1, B = exp(0.9) = 2.4596 -> 2
        (dict(level="geometric", mode="truncate", cap=2.0), padded([1.0] * 3, [2.0, 2.0]), 1 / 2, 0.0),
        (dict(level="geometric", mode="mask", cap=3.0, lower=1.1), padded([0.0] * 3, [E(0.9)] * 2), 0.0, 1 / 2),
    ],
)
def test_hand_computed(kwargs: dict, expected: np.ndarray, clipped: float, masked: float) -> None:
    result = tis_weights(BEHAVIOR, OLD, **kwargs)
    check(result, expected)
    assert result.clipped_fraction == pytest.approx(clipped)
    assert result.masked_fraction == pytest.approx(masked)
    np.testing.assert_array_equal(result.mask, MASK)
    assert result.num_tokens == 5 and result.num_sequences == 2


def test_stats_token_truncate() -> None:
    r = tis_weights(BEHAVIOR, OLD, level="token", mode="truncate", cap=2.0)
    w = np.array([E(0.5), E(-0.5), 1.0, 2.0, E(-0.2)])  # the 5 valid weights
    assert r.mean == pytest.approx(w.sum() / 5)  # 6.0740 / 5 = 1.2148
    assert r.ess == pytest.approx(w.sum() ** 2 / (5 * (w**2).sum()))
    assert r.ratio_mean == pytest.approx((E(0.5) + E(-0.5) + 1.0 + E(2.0) + E(-0.2)) / 5)  # untruncated
    assert r.metrics()["tis/num_tokens"] == 5.0


def test_stats_sequence_level_count_sequences() -> None:
    r = tis_weights(BEHAVIOR, OLD, level="sequence", mode="mask", cap=2.0)
    # Weights 1,1,1 (A) and 0,0 (B): mean over the 5 tokens, ess over the 5 tokens.
    assert r.mean == pytest.approx(3 / 5)
    assert r.ess == pytest.approx(9 / (5 * 3))
    assert r.masked_fraction == pytest.approx(1 / 2)  # per sequence
    assert r.ratio_mean == pytest.approx((1.0 + E(1.8)) / 2)  # per sequence


def test_ratio_exactly_at_bounds_is_kept() -> None:
    # log r = log 2 exactly: inclusive window [lower, cap], as TRL and verl.
    r = tis_weights([[-math.log(2.0)]], [[0.0]], level="token", mode="mask", cap=2.0)
    assert r.weights[0, 0] == pytest.approx(2.0) and r.masked_fraction == 0.0
    r = tis_weights([[0.0]], [[-math.log(2.0)]], level="token", mode="mask", cap=2.0, lower=0.5)
    assert r.weights[0, 0] == pytest.approx(0.5) and r.masked_fraction == 0.0


# -- overflow and non-finite values ------------------------------------------------------------------

def test_sequence_sum_that_would_overflow_exp() -> None:
    # 1000 tokens with log r = +1 each: exp(1000) overflows float64; -1000 underflows.
    behavior = np.full((2, 1000), -2.0)
    old = np.stack([np.full(1000, -1.0), np.full(1000, -3.0)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow / invalid-value warnings
        trunc = tis_weights(behavior, old, level="sequence", mode="truncate", cap=2.0, lower=0.5)
        mask = tis_weights(behavior, old, level="sequence", mode="mask", cap=2.0, lower=0.5)
        mask_no_lower = tis_weights(behavior, old, level="sequence", mode="mask", cap=2.0)
        uncapped = tis_weights(behavior, old, level="sequence", mode="truncate", cap=None)
    np.testing.assert_array_equal(trunc.weights[0], 2.0)  # truncated to cap
    np.testing.assert_array_equal(trunc.weights[1], 0.5)  # floored at lower
    np.testing.assert_array_equal(mask.weights, 0.0)  # both outside [0.5, 2]
    assert mask.masked_fraction == 1.0
    # Without a lower bound exp(-1000) is inside the window: kept, with weight 0.0.
    np.testing.assert_array_equal(mask_no_lower.weights, 0.0)
    assert mask_no_lower.masked_fraction == 0.5
    assert np.isfinite(trunc.ratio_mean) and trunc.ratio_mean == pytest.approx(E(LOG_RATIO_MAX) / 2)
    assert uncapped.weights[0, 0] == pytest.approx(E(LOG_RATIO_MAX))  # safety bound, not inf
    assert uncapped.weights[1, 0] == 0.0  # exp(-1000) underflows to 0: exact enough


def test_infinite_and_nan_logprobs() -> None:
    behavior = [[-1.0, -1.0, -math.inf]]
    old = [[-math.inf, math.nan, -math.inf]]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = tis_weights(behavior, old, cap=2.0)
    # old = -inf: ratio 0; NaN and -inf - -inf: log r counts as 0 (ratio 1), as in TRL.
    np.testing.assert_array_equal(r.weights, [[0.0, 1.0, 1.0]])


def test_padding_is_ignored_whatever_it_holds() -> None:
    behavior = padded(BEHAVIOR[0], BEHAVIOR[1])
    old = padded(OLD[0], OLD[1])
    behavior[1, 2], old[1, 2] = math.nan, 1e300  # garbage in the padding slot
    for level in ("token", "sequence", "geometric"):
        a = tis_weights(behavior, old, MASK, level=level, cap=2.0)
        b = tis_weights(BEHAVIOR, OLD, level=level, cap=2.0)
        np.testing.assert_array_equal(a.weights, b.weights)
        assert a.ratio_mean == b.ratio_mean and a.ess == b.ess


def test_empty_rows_and_no_valid_tokens() -> None:
    r = tis_weights([[-1.0], []], [[-1.0], []], level="sequence", mode="mask", cap=2.0)
    np.testing.assert_array_equal(r.weights, [[1.0], [0.0]])
    assert r.masked_fraction == 0.0 and r.num_tokens == 1
    r = tis_weights(np.zeros((2, 3)), np.zeros((2, 3)), np.zeros((2, 3), dtype=bool))
    assert (r.mean, r.ess, r.clipped_fraction, r.ratio_mean, r.num_tokens) == (0.0, 0.0, 0.0, 0.0, 0)


# -- input forms -----------------------------------------------------------------------------------------

def test_ragged_lists_equal_padded_arrays() -> None:
    for level in ("token", "sequence", "geometric"):
        for mode in ("truncate", "mask"):
            a = tis_weights(BEHAVIOR, OLD, level=level, mode=mode, cap=2.0, lower=0.7)
            b = tis_weights(padded(*BEHAVIOR), padded(*OLD), MASK, level=level, mode=mode, cap=2.0, lower=0.7)
            np.testing.assert_array_equal(a.weights, b.weights)
            assert a.metrics() == b.metrics()


def test_one_dimensional_input_keeps_its_shape() -> None:
    r = tis_weights(BEHAVIOR[0], OLD[0], cap=2.0)
    assert r.weights.shape == (3,)
    np.testing.assert_allclose(r.weights, RA)


def test_torch_tensors_are_accepted() -> None:
    torch = pytest.importorskip("torch")
    behavior = torch.tensor(padded(*BEHAVIOR), requires_grad=True)
    old = torch.tensor(padded(*OLD)).to(torch.bfloat16)
    r = tis_weights(behavior, old, torch.tensor(MASK), cap=2.0)
    expected = tis_weights(padded(*BEHAVIOR), old.float().numpy(), MASK, cap=2.0)
    assert isinstance(r.weights, np.ndarray)
    np.testing.assert_array_equal(r.weights, expected.weights)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="shape"):
        tis_weights(np.zeros((2, 3)), np.zeros((2, 4)))
    with pytest.raises(ValueError, match="row 1"):
        tis_weights(BEHAVIOR, [[0.0, 0.0, 0.0], [0.0]])
    with pytest.raises(ValueError, match="both"):
        tis_weights(BEHAVIOR, padded(*OLD))
    with pytest.raises(ValueError, match="level"):
        tis_weights(BEHAVIOR, OLD, level="tokens")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="mode"):
        tis_weights(BEHAVIOR, OLD, mode="clip")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="lower"):
        tis_weights(BEHAVIOR, OLD, cap=2.0, lower=2.0)
    with pytest.raises(ValueError, match="cap"):
        tis_weights(BEHAVIOR, OLD, cap=0.0)
    with pytest.raises(ValueError, match="mask"):
        tis_weights(padded(*BEHAVIOR), padded(*OLD), np.ones((2, 2), dtype=bool))


# -- agreement with TRL --------------------------------------------------------------------------------

def _trl_reference(behavior: np.ndarray, old: np.ndarray, mask: np.ndarray, trl_mode: str, clip_max, clip_min):
    """TRL 1.16 GRPOTrainer's formula (ratio space, no log clipping), written in numpy."""
    diff = np.nan_to_num((old - behavior) * mask, nan=0.0)
    if trl_mode.startswith("sequence"):
        diff = diff.sum(axis=-1, keepdims=True)
    with np.errstate(over="ignore"):
        ratio = np.exp(diff)
    lo = clip_min if clip_min is not None else -np.inf
    hi = clip_max if clip_max is not None else np.inf
    if trl_mode.endswith("truncate"):
        ratio = np.clip(ratio, lo, hi)
    else:
        ratio = np.where((ratio < lo) | (ratio > hi), 0.0, ratio)
    return np.broadcast_to(ratio, behavior.shape) * mask  # we zero padding; TRL's loss mask does


logprob = st.floats(-30.0, 0.0, allow_nan=False)


@settings(max_examples=200, deadline=None)
@given(
    rows=st.lists(st.lists(st.tuples(logprob, logprob), min_size=0, max_size=12), min_size=1, max_size=5),
    trl_mode=st.sampled_from(["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"]),
    clip_max=st.sampled_from([1.5, 2.0, 3.0, 10.0]),
    clip_min=st.sampled_from([None, 0.1, 0.5]),
)
def test_matches_trl_formula(rows, trl_mode, clip_max, clip_min) -> None:
    behavior = [[b for b, _ in r] for r in rows]
    old = [[o for _, o in r] for r in rows]
    level, mode = trl_mode.split("_")
    ours = tis_weights(behavior, old, level=level, mode=mode, cap=clip_max, lower=clip_min)
    width = max(len(r) for r in rows)
    pad = lambda xs: np.array([x + [0.0] * (width - len(x)) for x in xs]).reshape(len(xs), width)  # noqa: E731
    ref = _trl_reference(pad(behavior), pad(old), ours.mask.astype(float), trl_mode, clip_max, clip_min)
    np.testing.assert_allclose(ours.weights, ref, rtol=1e-12, atol=1e-300)


def test_trl_names_and_defaults_we_document() -> None:
    """The TRL options the docs map to; fails if TRL renames them (docs need updating)."""
    import dataclasses

    grpo_config = pytest.importorskip("trl.trainer.grpo_config")
    fields = {f.name: f for f in dataclasses.fields(grpo_config.GRPOConfig)}
    assert fields["vllm_importance_sampling_clip_max"].default == 3.0
    assert fields["vllm_importance_sampling_clip_min"].default is None
    assert fields["vllm_importance_sampling_mode"].default == "sequence_mask"
    assert "vllm_importance_sampling_correction" in fields and "vllm_importance_sampling_cap" in fields
    for name in ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask"):
        assert name in fields["vllm_importance_sampling_mode"].metadata["help"]


# -- properties -------------------------------------------------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(
    rows=st.lists(st.lists(st.tuples(logprob, logprob), max_size=40), min_size=1, max_size=6),
    level=st.sampled_from(["token", "sequence", "geometric"]),
    mode=st.sampled_from(["truncate", "mask"]),
    cap=st.floats(1.0, 10.0),
    lower=st.one_of(st.none(), st.floats(0.0, 0.99)),
)
def test_properties(rows, level, mode, cap, lower) -> None:
    behavior = [[b for b, _ in r] for r in rows]
    old = [[o for _, o in r] for r in rows]
    r = tis_weights(behavior, old, level=level, mode=mode, cap=cap, lower=lower)
    w, valid = r.weights, r.mask
    assert np.all(w >= 0) and np.all(w <= cap * (1 + 1e-12))
    assert np.all(w[~valid] == 0)
    assert 0.0 <= r.ess <= 1.0 + 1e-12
    assert 0.0 <= r.clipped_fraction <= 1.0 and 0.0 <= r.masked_fraction <= 1.0
    if mode == "truncate" and lower:
        assert np.all(w[valid] >= lower * (1 - 1e-12))
    if level != "token":  # one weight per sequence
        for i in range(w.shape[0]):
            assert len(set(w[i][valid[i]].tolist())) <= 1
