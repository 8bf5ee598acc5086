"""The scale ladder's rule and its statistics (no Ray): planted curves, hand-checked rankings, scipy as reference."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from peerlab.config import config_from_dict, load_config, to_dict
from peerlab.ladder import (
    LadderError,
    crossing,
    decision_accuracy,
    decision_accuracy_interval,
    fit_power_law,
    kendall_tau,
    ladder_sizes,
    scale_config,
)
from scipy import optimize, stats

ROOT = Path(__file__).resolve().parents[1]


def planted(E, A, alpha, c0=1e12):
    return lambda c: E + A * (np.asarray(c, float) / c0) ** -alpha


def test_planted_power_laws_recover_their_exponents_and_their_crossing():
    # Two cells: a starts better and saturates higher (the small-scale winner that loses at scale).
    a, b = planted(3.0, 0.8, 0.5), planted(2.6, 1.5, 0.35)
    truth = optimize.brentq(lambda lc: float(a(math.exp(lc)) - b(math.exp(lc))), math.log(1e12), math.log(1e16))
    flops = 1e12 * 2.0 ** np.arange(8)  # 8 scales, 1x to 128x
    rng = np.random.default_rng(0)
    fits = {}
    for name, f, alpha in (("a", a, 0.5), ("b", b, 0.35)):
        x = np.repeat(flops, 3)  # 3 seeds a scale
        y = f(x) + rng.normal(0, 0.002, len(x))
        fits[name] = fit_power_law(x, y)
        assert fits[name].enough and abs(fits[name].alpha - alpha) < 0.05
    found = crossing(fits["a"], fits["b"], flops[0], flops[-1])
    assert found is not None and abs(math.log(found) - truth) < math.log(1.25)  # within 25% of the compute
    # Curves that never cross in the range: no crossing.
    assert crossing(fits["a"], fit_power_law(flops, a(flops) - 0.5), flops[0], flops[-1]) is None


def test_the_extrapolation_interval_covers_the_planted_curve():
    # 95% intervals 8x past the largest of 5 scales (3 seeds each), over 20 draws of the noise: a residual
    # bootstrap of a nonlinear fit covers a little under its level (about 0.9 measured), never far under.
    b = planted(2.6, 1.5, 0.35)
    flops = 1e12 * 2.0 ** np.arange(5)
    target, hits = flops[-1] * 8, 0
    for draw in range(20):
        x = np.repeat(flops, 3)
        y = b(x) + np.random.default_rng(draw).normal(0, 0.005, len(x))
        lo, hi = fit_power_law(x, y, bootstrap=100, seed=draw).interval(target)
        hits += lo <= float(b(target)) <= hi
        assert hi - lo < 0.2
    assert hits >= 16


def test_a_power_law_on_three_computes_is_flagged():
    flops = np.array([1e12, 4e12, 1.6e13])
    fit = fit_power_law(flops, planted(3.0, 1.0, 0.4)(flops))
    assert not fit.enough and fit.n == 3
    with pytest.raises(ValueError, match="3 or more distinct computes"):
        fit_power_law([1e12, 1e12, 2e12], [3.0, 3.1, 2.9])


def test_decision_accuracy_on_a_hand_checked_example():
    large = {"a": 1.0, "b": 3.0, "c": 2.0, "d": 4.0}
    small = {"a": 1.0, "b": 2.0, "c": 3.0, "d": 4.0}
    # Pairs: ab, ac, ad agree; bc disagrees (small puts b below c, large above); bd, cd agree: 5 of 6.
    assert decision_accuracy(small, large) == pytest.approx(5 / 6)
    # A tie at the small scale counts a half; a tie at the large scale is left out.
    assert decision_accuracy({**small, "c": 2.0}, large) == pytest.approx(5.5 / 6)
    assert decision_accuracy(small, {**large, "c": 3.0}) == pytest.approx(5 / 5)
    # Mode does not matter: the order of every pair is what counts.
    assert decision_accuracy({k: -v for k, v in small.items()}, {k: -v for k, v in large.items()}) == pytest.approx(
        5 / 6
    )


def test_decision_accuracy_interval_over_seeds():
    large = {"a": [1.0, 1.0], "b": [3.0, 3.0], "c": [2.0, 2.0], "d": [4.0, 4.0]}
    small = {"a": [1.0, 1.0], "b": [2.0, 2.0], "c": [3.0, 3.0], "d": [4.0, 4.0]}
    assert decision_accuracy_interval(small, large) == pytest.approx((5 / 6, 5 / 6, 5 / 6))  # no seed noise
    noisy = {"a": [1.0, 1.6], "b": [2.0, 2.2], "c": [3.0, 1.2], "d": [4.0, 4.1]}
    point, lo, hi = decision_accuracy_interval(noisy, large, bootstrap=400)
    means = {c: float(np.mean(v)) for c, v in large.items()}
    assert point == pytest.approx(decision_accuracy({c: np.mean(v) for c, v in noisy.items()}, means))
    assert lo < point <= hi or lo <= point < hi


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kendall_tau_is_scipys_tau_b(seed):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 5, 12).astype(float)  # ties on purpose
    y = x + rng.integers(-2, 3, 12)
    assert kendall_tau(x, y) == pytest.approx(stats.kendalltau(x, y, variant="b").statistic)


@pytest.mark.parametrize("config", ["demo.yaml", "mix-proxy.yaml", "config.yaml"])
def test_the_rule_spends_the_scale_and_grows_the_model(config):
    steps = ["train_config.max_steps=1000", "train_config.num_train_epochs=null"] if config == "config.yaml" else []
    raw = to_dict(load_config(ROOT / "configs" / config, steps))
    base = ladder_sizes(raw)
    assert scale_config(raw, 1) == raw
    previous = None
    for scale in (0.25, 4, 16):
        grown = scale_config(raw, scale)
        cfg = config_from_dict(grown)  # a valid config: product keys, even query sizes, PEER layers
        sizes = ladder_sizes(grown)
        per_step = sizes["flops"] / grown["train_config"]["max_steps"]
        assert abs(sizes["flops"] - scale * base["flops"]) <= 0.5 * per_step * 1.0001  # within half a step
        p = cfg.model_config.peer_config
        assert p.num_experts == p.product_key_dim[0] * p.product_key_dim[1] and p.query_dim % 2 == 0
        if previous is not None:
            assert sizes["params_active"] > previous["params_active"] and sizes["tokens"] > previous["tokens"]
        previous = sizes
    assert config_from_dict(scale_config(raw, 4)).model_config.hidden_size > raw["model_config"]["hidden_size"]


def test_a_ladder_needs_a_step_count():
    raw = to_dict(load_config(ROOT / "configs" / "config.yaml"))  # trains by epochs: max_steps null
    with pytest.raises(LadderError, match="max_steps"):
        scale_config(raw, 4)


@pytest.mark.parametrize("scale", [0, -2, float("nan"), float("inf")])
def test_a_scale_must_be_a_positive_multiple(scale):
    raw = to_dict(load_config(ROOT / "configs" / "demo.yaml"))
    with pytest.raises(LadderError, match="> 0"):
        scale_config(raw, scale)
