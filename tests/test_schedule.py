"""The schedule module: values worked out by hand, properties, presets and validation."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ead_server.schedule import (
    PRESETS,
    ScheduleError,
    TemperatureSchedule,
    effective_decay,
    parse_schedule,
    spec_from_text,
)

# (spec, t, temperature), each worked out from docs/design.md's formulas by hand.
TABLE = [
    ({"type": "ead"}, 0, 1.0),  # warm-up: c = 10
    ({"type": "ead"}, 9, 1.0),
    ({"type": "ead"}, 10, 1 + 1.2 - math.exp(10 / 25)),  # 0.708175...
    ({"type": "ead"}, 18, 1 + 1.2 - math.exp(18 / 25)),  # 0.145563...
    ({"type": "ead"}, 19, 0.1),  # exp(0.76) = 2.138 > 2.1: clamped to tau_min
    ({"type": "ead", "warmup": 0}, 0, 1.2),  # starts at tau_max: exp(0) = 1
    ({"preset": "released-code"}, 10, 1 + 1.2 - math.exp(10 / 500)),  # k = 20: 1.179798...
    ({"preset": "released-code"}, 370, 1 + 1.2 - math.exp(370 / 500)),  # 0.104...
    ({"preset": "released-code"}, 372, 0.1),
    ({"type": "reverse"}, 5, 1.0),
    ({"type": "reverse"}, 10, 1.2),  # 0.1 + exp(0.4) = 1.5918 > 1.2: clamped
    ({"type": "reverse", "tau_max": 3.0}, 10, 0.1 + math.exp(0.4)),
    ({"type": "constant", "tau": 0.7}, 0, 0.7),
    ({"type": "constant", "tau": 0.7}, 5000, 0.7),
    ({"type": "ead", "decay": 10}, 20, 0.1),  # 2.2 - exp(2) < 0.1
    ({"type": "ead", "decay_schedule": {"step": 3}}, 12, 2.2 - math.exp(12 / 40)),  # d = 25 + 5 * 3
    ({"type": "ead", "decay_schedule": {"step": 10**6}}, 12, 2.2 - math.exp(12 / 40000)),  # d = d_max
    ({"type": "ead"}, 10**9, 0.1),  # exp overflows: still tau_min
    ({"type": "reverse"}, 10**9, 1.2),
]


@pytest.mark.parametrize(("spec", "t", "want"), TABLE)
def test_hand_computed_values(spec, t, want):
    assert parse_schedule(spec).temperature(t) == pytest.approx(want, rel=1e-12)


def test_presets_and_resolution():
    assert PRESETS["paper"]["time_scale"] == 1.0 and PRESETS["released-code"]["time_scale"] == 20.0
    paper = parse_schedule({"preset": "paper"})
    assert parse_schedule({"type": "ead"}).model_dump() == {**paper.model_dump(), "preset": None}
    assert paper.model_dump() == {
        "type": "ead", "preset": "paper", "tau_max": 1.2, "tau_min": 0.1, "tau": 1.0, "warmup": 10,
        "time_scale": 1.0, "decay": 25.0, "decay_schedule": {"d0": 25.0, "alpha": 5.0, "d_max": 40000.0, "step": 0},
        "clock": "tokens", "h_max": PRESETS["paper"]["h_max"], "exponent": 1.0, "h_ref": PRESETS["paper"]["h_ref"],
    }
    fixed = parse_schedule({"preset": "released-code", "decay": 3, "tau_min": 0.8})
    assert (fixed.decay, fixed.decay_schedule, fixed.time_scale, fixed.tau_min) == (3.0, None, 20.0, 0.8)
    stepped = parse_schedule({"decay_schedule": {"d0": 10, "alpha": 2, "step": 7}})
    assert stepped.decay == 24.0 and stepped.decay_schedule.d_max == 40000.0
    # The request form of a resolved schedule resolves to itself (the engine receives it).
    for spec in ({"preset": "paper"}, {"decay": 3}, {"type": "constant", "tau": 0.5}):
        resolved = parse_schedule(spec)
        assert parse_schedule(resolved.as_request()) == resolved
        assert parse_schedule(json.dumps(resolved.as_request())) == resolved


BAD = [
    ({"tau_max": float("nan")}, "tau_max"),
    ({"tau_min": float("inf")}, "tau_min"),
    ({"tau": -1}, "tau"),
    ({"tau_max": 0}, "tau_max"),
    ({"tau_min": 1.5, "tau_max": 1.4}, "tau_min"),
    ({"decay": 0}, "decay"),
    ({"decay": 1, "decay_schedule": {"step": 1}}, "decay"),
    ({"decay_schedule": {"d0": -1}}, "decay_schedule.d0"),
    ({"decay_schedule": {"alpha": -1}}, "decay_schedule.alpha"),
    ({"decay_schedule": {"step": -2}}, "decay_schedule.step"),
    ({"decay_schedule": {"d0": 50, "d_max": 30}}, "decay_schedule.d_max"),
    ({"warmup": -1}, "warmup"),
    ({"warmup": 1.5}, "warmup"),
    ({"time_scale": 0}, "time_scale"),
    ({"type": "linear"}, "type"),
    ({"preset": "mine"}, "preset"),
    ({"tau": "1"}, "tau"),
    ({"tau": True}, "tau"),
    ({"extra": 1}, "extra"),
]


@pytest.mark.parametrize(("spec", "param"), BAD)
def test_invalid_values_name_the_field(spec, param):
    with pytest.raises(ScheduleError) as err:
        parse_schedule(spec)
    assert err.value.param == param and err.value.message


def test_invalid_containers():
    for value in ("{oops", "[1, 2]", 3):
        with pytest.raises(ScheduleError):
            parse_schedule(value)


finite = st.floats(min_value=0.05, max_value=5.0)
schedules = st.builds(
    lambda kind, a, b, c, k, d: TemperatureSchedule(
        type=kind, tau_max=max(a, b), tau_min=min(a, b), warmup=c, time_scale=k, decay=d
    ),
    st.sampled_from(["ead", "reverse"]), finite, finite, st.integers(0, 50), st.sampled_from([1.0, 20.0]),
    st.floats(min_value=0.1, max_value=1000.0),
)


@settings(max_examples=300, deadline=None)
@given(schedules, st.integers(0, 5000))
def test_bounds_and_warmup(spec, t):
    s = spec.resolve()
    temp = s.temperature(t)
    if t < s.warmup:
        assert temp == 1.0
    else:
        # (1 + tau_max) - exp(0) rounds to within one ulp of 1 of tau_max, as in the
        # released code; the kernel computes it in the same order.
        assert s.tau_min <= temp <= s.tau_max + 2.3e-16


@settings(max_examples=300, deadline=None)
@given(schedules, st.integers(0, 3000), st.integers(1, 500))
def test_monotone_after_warmup(spec, t, dt):
    s = spec.resolve()
    t = max(t, s.warmup)
    before, after = s.temperature(t), s.temperature(t + dt)
    assert after <= before if s.type == "ead" else after >= before


@settings(max_examples=200, deadline=None)
@given(finite, finite, st.floats(min_value=0.5, max_value=100.0), st.integers(0, 2000))
def test_time_scale_k_stretches_time(a, b, d, t):
    """k = 20 at step 20 t gives what k = 1 gives at t: released code = paper, 20x slower."""
    spec = {"type": "ead", "tau_max": max(a, b), "tau_min": min(a, b), "warmup": 0, "decay": d}
    paper = parse_schedule({**spec, "time_scale": 1})
    released = parse_schedule({**spec, "time_scale": 20})
    assert released.temperature(20 * t) == pytest.approx(paper.temperature(t), rel=1e-9, abs=1e-12)


@settings(max_examples=300, deadline=None)
@given(st.floats(0.1, 100.0), st.floats(0.0, 50.0), st.floats(0.1, 1e5), st.integers(0, 10**6))
def test_step_aware_decay(d0, alpha, d_max, step):
    d_max = max(d_max, d0)
    d = effective_decay(d0, alpha, d_max, step)
    assert d0 <= d <= d_max
    assert d == min(d0 + alpha * step, d_max)
    assert effective_decay(d0, alpha, d_max, step + 1) >= d
    resolved = parse_schedule({"decay_schedule": {"d0": d0, "alpha": alpha, "d_max": d_max, "step": step}})
    assert resolved.decay == d


def _anneal_end_by_steps(resolved, horizon: int = 200_000):
    """The definition, token by token: the first t >= warmup at the final temperature."""
    final = resolved.tau_min if resolved.type == "ead" else resolved.tau_max
    return next((t for t in range(resolved.warmup, horizon) if resolved.temperature(t) == final), None)


@settings(max_examples=300, deadline=None)
@given(kind=st.sampled_from(["ead", "reverse"]), tau_max=st.floats(0.05, 3.0), tau_min_frac=st.floats(0.0, 1.0),
       warmup=st.integers(0, 60), k=st.sampled_from([1.0, 20.0]), d=st.floats(0.1, 60.0))
def test_anneal_end_closed_form_agrees_with_stepping(kind, tau_max, tau_min_frac, warmup, k, d):
    tau_min = max(tau_max * tau_min_frac, 1e-3)
    resolved = parse_schedule({"type": kind, "tau_max": tau_max, "tau_min": min(tau_min, tau_max),
                               "warmup": warmup, "time_scale": k, "decay": d})
    assert resolved.anneal_end() == _anneal_end_by_steps(resolved)


def test_anneal_end_of_the_presets():
    ead = parse_schedule({"type": "ead", "preset": "paper", "decay": 25})
    t = ead.anneal_end()
    assert t is not None and ead.temperature(t) == ead.tau_min and ead.temperature(t - 1) > ead.tau_min
    assert t == math.ceil(25 * math.log(1 + 1.2 - 0.1))  # 19: "about 18 tokens" (docs/design.md)
    assert parse_schedule({"preset": "released-code", "decay": 25}).anneal_end() == 371
    assert parse_schedule({"type": "constant", "tau": 1.0}).anneal_end() is None


def test_kernel_params_are_named_like_the_kernel_columns():
    pytest.importorskip("torch")
    from ead_kernels import PARAM_COLUMNS

    resolved = parse_schedule({"type": "reverse", "warmup": 4, "time_scale": 20, "decay": 3})
    params = resolved.kernel_params()
    assert tuple(params) == PARAM_COLUMNS
    assert params["scale"] == 60.0 and params["warmup"] == 4.0


def test_the_json_form_is_parsed_once_and_the_cache_is_bounded():
    from ead_server import schedule as S

    text = json.dumps({"type": "ead", "decay_schedule": {"step": 123456}})
    assert parse_schedule(text) is parse_schedule(text)  # one frozen object, shared
    with pytest.raises(ScheduleError):
        parse_schedule('{"type": "nope"}')
    info = S._parse_json.cache_info()
    assert info.maxsize is not None and info.maxsize <= 10_000
    for step in range(info.maxsize + 10):  # a long training run: one new string per step
        parse_schedule(json.dumps({"decay_schedule": {"step": step}}))
    assert S._parse_json.cache_info().currsize == info.maxsize


def test_schedules_written_as_text():
    """One syntax for the serve flag, the environment variable and the benchmarks' arms."""
    assert spec_from_text("paper") == {"preset": "paper"}
    assert spec_from_text(' {"type": "constant", "tau": 0.6} ') == {"type": "constant", "tau": 0.6}
    assert spec_from_text("constant:0.6") == spec_from_text("constant:tau=0.6") == {"type": "constant", "tau": 0.6}
    assert spec_from_text("ead:preset=released-code,tau_min=0.8,decay_schedule.step=100") == {
        "type": "ead", "preset": "released-code", "tau_min": 0.8, "decay_schedule": {"step": 100}}
    assert parse_schedule(spec_from_text("reverse")).type == "reverse"
    for bad, field in (("ead:tau_min", ""), ("ead:decay=1,decay=2", "decay"), ("{not json", ""), ("[1]", "type"),
                       ("ead:decay=1,decay.x=2", "decay.x")):
        with pytest.raises(ScheduleError) as err:
            parse_schedule(spec_from_text(bad))
        assert err.value.param == field, bad


# ------------------------------------------------------------------ entropy-driven schedules


@pytest.mark.parametrize(("entropy", "want"), [
    (0.0, 0.1), (1.5, 0.1 + 1.1 * 0.5), (3.0, 1.2), (50.0, 1.2), (float("inf"), 1.2),
    (-1e-7, 0.1), (float("nan"), 0.1),  # rounding below 0 and a NaN row: the coldest, never NaN
])
def test_the_entropy_type_by_hand(entropy, want):
    schedule = parse_schedule({"type": "entropy", "h_max": 3.0})
    assert schedule.entropy_driven and schedule.anneal_end() is None
    assert schedule.temperature(7, entropy=entropy) == pytest.approx(want, rel=1e-12)


def test_the_entropy_type_exponent_bends_the_curve():
    linear, square = (parse_schedule({"type": "entropy", "h_max": 4.0, "exponent": e}) for e in (1, 2))
    assert square.temperature(0, entropy=2.0) == pytest.approx(0.1 + 1.1 * 0.25)
    assert square.temperature(0, entropy=2.0) < linear.temperature(0, entropy=2.0)


def test_the_entropy_clock_runs_on_accumulated_entropy():
    tokens = parse_schedule({"type": "ead", "warmup": 2, "decay": 10})
    clocked = parse_schedule({"type": "ead", "warmup": 2, "decay": 10, "clock": "entropy", "h_ref": 2.0})
    assert clocked.entropy_driven and not tokens.entropy_driven and clocked.anneal_end() is None
    assert clocked.temperature(1, clock=100.0) == 1.0  # the warm-up still counts tokens
    # t tokens at exactly h_ref each: the token clock's temperature.
    for t in (2, 5, 9, 30):
        assert clocked.temperature(t, clock=2.0 * t) == tokens.temperature(t)
    # Forced tokens (H = 0) do not advance the anneal; forks advance it faster.
    assert clocked.temperature(9, clock=0.0) == pytest.approx(1.2)
    assert clocked.temperature(5, clock=14.0) < tokens.temperature(5)
    assert clocked.temperature(9, clock=1e12) == 0.1  # exp overflows: the clamp decides


def test_entropy_driven_temperatures_are_not_recomputed_on_the_host():
    with pytest.raises(ValueError, match="engine"):
        parse_schedule({"type": "entropy"}).temperatures(3)


@pytest.mark.parametrize(("spec", "param"), [
    ({"type": "entropy", "h_max": 0}, "h_max"),
    ({"type": "entropy", "exponent": -1}, "exponent"),
    ({"type": "entropy", "h_max": "3"}, "h_max"),
    ({"type": "ead", "clock": "wall"}, "clock"),
    ({"type": "ead", "clock": "entropy", "h_ref": float("inf")}, "h_ref"),
    ({"type": "reverse", "clock": "entropy"}, "clock"),
    ({"type": "constant", "clock": "entropy"}, "clock"),
])
def test_entropy_fields_are_checked_naming_the_field(spec, param):
    with pytest.raises(ScheduleError) as info:
        parse_schedule(spec)
    assert info.value.param == param


def test_entropy_schedules_written_as_text_round_trip():
    clocked = parse_schedule(spec_from_text("ead:clock=entropy,h_ref=1.2"))
    assert (clocked.clock, clocked.h_ref) == ("entropy", 1.2)
    dyn = parse_schedule(spec_from_text("entropy:h_max=2.5,exponent=0.5"))
    assert (dyn.type, dyn.h_max, dyn.exponent) == ("entropy", 2.5, 0.5)
    for schedule in (clocked, dyn):
        assert parse_schedule(schedule.wire) == schedule
    assert clocked.kernel_params()["h_ref"] == 1.2
    assert parse_schedule({"type": "ead"}).kernel_params()["h_ref"] == 0.0  # the token clock
