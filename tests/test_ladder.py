"""The scale ladder's rule and its statistics (no Ray): planted curves, hand-checked rankings, scipy as reference."""

from __future__ import annotations

import copy
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from peerlab.config import config_from_dict, load_config, to_dict
from peerlab.data.corpus import DOMAINS
from peerlab.ladder import (
    LadderError,
    cell_means,
    crossing,
    decision_accuracy,
    decision_accuracy_interval,
    fit_power_law,
    kendall_tau,
    ladder_options,
    ladder_sizes,
    parse_scales,
    promoted,
    scale_config,
)
from scipy import optimize, stats

from tests.test_tune import ablate_module

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
    one = decision_accuracy_interval({c: v[:1] for c, v in small.items()}, {c: v[:1] for c, v in large.items()})
    assert one[0] == pytest.approx(5 / 6) and math.isnan(one[1]) and math.isnan(one[2])  # one seed: no interval


def test_decision_accuracy_interval_resamples_seeds_across_cells():
    """A seed shifts every cell alike (its data order, its start): here each seed orders the cells as the large
    scale does, so every draw of seeds does too and the interval is [1, 1]. Cells resampled apart (the bug)
    mixed one cell's good seeds with another's bad ones: an interval from 0 to 1."""
    rng = np.random.default_rng(0)
    shift_small, shift_large = rng.normal(0, 0.1, 5), rng.normal(0, 0.1, 5)
    small = {c: list(0.02 * i + shift_small) for i, c in enumerate("abc")}  # a list: seeds 0 to 4
    large = {c: list(0.03 * i + shift_large) for i, c in enumerate("abc")}
    assert decision_accuracy_interval(small, large) == (1.0, 1.0, 1.0)
    # By hand, seeds named by id: small a = {7: 1, 9: 3} (mean 2, a tie with b's 2: half credit), large a < b.
    # Draws of seeds (7, 7): a 1 < b 2, agrees (1); (7, 9) or (9, 7): a 2 = b 2, a tie (0.5); (9, 9): b has
    # no value there, no pair (left out). So the interval spans 0.5 to 1.
    point, lo, hi = decision_accuracy_interval({"a": {7: 1.0, 9: 3.0}, "b": {7: 2.0}}, {"a": {7: 1.0}, "b": {7: 2.0}})
    assert (point, lo, hi) == (0.5, 0.5, 1.0)


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
    with pytest.raises(LadderError, match="max_steps"):  # before any size is counted
        parse_scales(["1", "2"], raw)


@pytest.mark.parametrize("scale", [0, -2, float("nan"), float("inf")])
def test_a_scale_must_be_a_positive_multiple(scale):
    raw = to_dict(load_config(ROOT / "configs" / "demo.yaml"))
    with pytest.raises(LadderError, match="> 0"):
        scale_config(raw, scale)


# --------------------------------------------------------------------------------------
# The sweep's ladder: options, presets, promotion (no Ray)
# --------------------------------------------------------------------------------------


def test_promotion_keeps_the_better_share_and_the_pinned():
    means = {"a": 3.0, "b": 1.0, "c": 2.0, "d": 4.0, "e": float("nan")}  # e failed: no metric
    assert promoted(means, 0.5, "min", set()) == ["b", "c"]  # ceil(0.5 x 4 measured) = 2
    assert promoted(means, 0.5, "max", set()) == ["a", "d"]
    assert promoted(means, 0.5, "min", {"d", "e"}) == ["b", "c", "d", "e"]  # pinned go up whatever their rank
    assert promoted(means, 0.3, "min", set()) == ["b", "c"]  # two at least: the next scale must rank something
    assert promoted(means, 0.6, "min", set()) == ["a", "b", "c"]  # ceil(2.4)
    assert promoted(means, 1.0, "min", set()) == ["a", "b", "c", "d"]
    assert promoted({"a": 1.0, "b": 1.0, "c": 0.5}, 0.34, "min", set()) == ["a", "c"]  # a tie goes by name


def test_promotion_ranks_a_scales_runs_that_did_not_fail():
    """A run that failed after an evaluation carries that value in trials.parquet; it is not its cell's result
    (the report leaves it out too), so the cell's mean is over its other runs, or none."""
    table = pd.DataFrame(
        {
            "cell": ["a", "a", "b", "c"],
            "status": ["finished", "failed", "stopped", "failed"],
            "eval_bpb/mean": [3.0, 1.0, 2.0, 0.5],
            "final_loss": [4.0, 4.5, 5.0, 1.0],
        }
    )
    means = cell_means(table, "eval_bpb/mean")
    assert means["a"] == 3.0 and means["b"] == 2.0 and math.isnan(means["c"])
    assert promoted(means, 0.5, "min", set()) == ["a", "b"]  # c's failed run does not win
    assert cell_means(table, "loss") == pytest.approx({"a": 4.0, "b": 5.0, "c": math.nan}, nan_ok=True)
    assert all(math.isnan(v) for v in cell_means(table, "lm_eval/x/acc").values())


@pytest.mark.parametrize(
    "section, flags, message",
    [
        ({}, {"scales": "1,2", "promote": 0.0}, "expected a share in (0, 1]"),
        ({"scales": [1, 2], "promote": 1.5}, {}, "expected a share in (0, 1]"),
        ({}, {"scales": "1,2", "target_flops": -1.0}, "expected FLOPs > 0"),
        ({}, {"promote": 0.5}, "need --ladder"),
        ({"scale": [1, 2]}, {}, "unknown key"),
    ],
)
def test_bad_ladder_options(section, flags, message):
    with pytest.raises(LadderError, match=re.escape(message)):
        ladder_options(section, flags)


def test_ladder_options_from_the_section_and_the_flags():
    opts = ladder_options({"scales": [1, 4], "promote": 1, "pin": "balanced"}, {"scales": "0.5,1,2", "pin": []})
    assert opts.scales == ["0.5", "1", "2"] and opts.promote == 1.0 and opts.pin == ["balanced"]
    assert ladder_options({}, {"scales": None, "pin": []}) is None


def test_presets_are_sizes_of_the_base_and_are_ordered_by_compute(tmp_path):
    base = to_dict(load_config(ROOT / "configs" / "mix-proxy.yaml"))
    big = copy.deepcopy(base)
    big["model_config"]["hidden_size"] = 96
    big["model_config"]["peer_config"].update(num_experts=256**2, product_key_dim=[256, 256])
    big["train_config"]["max_steps"] = 200
    (tmp_path / "big.yaml").write_text(yaml.safe_dump(big))
    scales = parse_scales([str(tmp_path / "big.yaml"), "0.5", "1"], base)
    assert [s.label for s, _ in scales] == ["x0.5", "x1", "big"]
    expected = ladder_sizes(scales[2][1])["flops"] / ladder_sizes(base)["flops"]
    assert scales[2][0].multiple == pytest.approx(expected) and expected > 2
    assert scales[2][1]["model_config"]["hidden_size"] == 96 and scales[2][1]["train_config"]["max_steps"] == 200
    assert scales[1][1] == base  # x1 is the base config itself

    other = copy.deepcopy(base)
    other["model_config"]["peer_config"]["num_experts_per_tok"] = 4  # not a size: another architecture
    (tmp_path / "other.yaml").write_text(yaml.safe_dump(other))
    with pytest.raises(LadderError, match=r"other.yaml: model_config.peer_config.num_experts_per_tok is 4"):
        parse_scales(["1", str(tmp_path / "other.yaml")], base)
    seq = copy.deepcopy(base)
    seq["dataset_config"]["max_seq_length"] = 256
    (tmp_path / "seq.yaml").write_text(yaml.safe_dump(seq))
    with pytest.raises(LadderError, match=r"dataset_config.max_seq_length is 256"):
        parse_scales(["1", str(tmp_path / "seq.yaml")], base)
    with pytest.raises(LadderError, match="neither a number"):
        parse_scales(["1", "configs/nope.yaml"], base)
    with pytest.raises(LadderError, match="the same compute"):
        parse_scales(["1", "1.0"], base)
    with pytest.raises(LadderError, match="two or more scales"):
        parse_scales(["2"], base)


# --------------------------------------------------------------------------------------
# The ladder in a sweep: bad input before Ray, the plan, and a real run on Ray Tune
# --------------------------------------------------------------------------------------


def test_a_dry_run_prints_every_scales_sizes(tmp_path, capsys, monkeypatch):
    import ray

    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray was started"))
    monkeypatch.chdir(ROOT)
    argv = ["--custom-datasets", "configs/datasets.yaml", "--config", "configs/mix-proxy.yaml",
            "--set", f"train_config.output_dir={tmp_path}", "--baseline", "--ladder", "4,1,2", "--dry-run"]  # fmt: skip
    assert ablate_module().main(argv) == 0
    out = capsys.readouterr().out
    base = to_dict(load_config(ROOT / "configs" / "mix-proxy.yaml"))
    base["train_config"]["num_workers"] = 0  # how a sweep's trials run here (local mode)
    for scale in (1, 2, 4):
        sizes = ladder_sizes(scale_config(base, scale))
        line = next(x for x in out.splitlines() if x.strip().startswith(f"x{scale} "))
        assert f"{sizes['params_total']:,}" in line and f"{sizes['params_active']:,}" in line, line
        assert f"{sizes['tokens']:,}" in line and f"{sizes['flops']:.3g}" in line, line
    assert "3 scales x 9 cells" in out and "no_peer" in out and not list(tmp_path.iterdir())


def test_bad_ladders_fail_before_ray(tmp_path, capsys, monkeypatch):
    import ray

    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray was started"))
    monkeypatch.chdir(ROOT)
    other = to_dict(load_config(ROOT / "configs" / "demo.yaml"))
    other["model_config"]["use_peer"] = False
    (tmp_path / "dense.yaml").write_text(yaml.safe_dump(other))
    argv = ["--custom-datasets", "configs/datasets.yaml", "--config", "configs/demo.yaml",
            "--set", f"train_config.output_dir={tmp_path / 'out'}"]  # fmt: skip
    cases = [
        (["--ladder", "0,1"], "--ladder 0"),
        (["--ladder", "1,-2"], "a scale is a multiple of the base config's compute, > 0"),
        (["--ladder", "1,1e9"], "GiB"),  # a model that does not fit this machine
        (["--ladder", f"1,{tmp_path / 'dense.yaml'}"], "model_config.use_peer is False"),
        (["--ladder", "1,2", "--mix-search", "4"], "run the --mix-search first"),
        (["--promote", "0.5"], "need --ladder"),
        (["--ladder", "1,2", "--pin", "nosuch"], "--pin nosuch: no cell, mix or setting"),
        (["--ladder", "1,2", "--pin", "nosuch.yaml"], "--pin nosuch.yaml: no such file"),
    ]
    for extra, message in cases:
        with pytest.raises(SystemExit) as done:
            ablate_module().main([*argv, *extra])
        err = capsys.readouterr().err
        assert done.value.code == 2, (extra, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (extra, err)
    assert not (tmp_path / "out").exists()


def test_a_ladder_promotes_the_better_cells_writes_its_table_and_resumes(ray_cluster, demo_corpus, tmp_path, capsys):
    from analysis.report import write_report
    from tests.test_tune import tiny_sets

    entry = "      - {{name: {n}, path: '{p}', format: jsonl, weight: {w}, text_field: text}}\n"

    def mixes_file(path: Path, mixes: dict) -> Path:
        text = "data_mixes:\n"
        for name, weights in mixes.items():
            text += f"  {name}:\n    datasets:\n"
            text += "".join(entry.format(n=d, p=demo_corpus / d, w=w) for d, w in zip(DOMAINS, weights))
        path.write_text(text)
        return path

    mixes = mixes_file(tmp_path / "mixes.yaml", {"prose_mix": (0.8, 0.1, 0.1), "code_mix": (0.1, 0.8, 0.1),
                                                 "docs_mix": (0.1, 0.1, 0.8)})  # fmt: skip
    pin = mixes_file(tmp_path / "recommended_mix.yaml", {"recommended": (0.5, 0.3, 0.2)})  # as a mix search writes
    argv = ["--custom-datasets", str(mixes), "--config", str(ROOT / "configs" / "demo.yaml"),
            *tiny_sets(demo_corpus, tmp_path / "out"), "--set", "eval_config.evals=[]",
            "--ladder", "1,2", "--pin", str(pin), "--name", "lad", "--max-concurrent", "2",
            "--metric", "eval_loss/mean", "--no-report"]  # fmt: skip
    ablate = ablate_module()
    assert ablate.main(argv) == 0
    printed = capsys.readouterr().out
    sweep = tmp_path / "out" / "lad"
    table = pd.read_parquet(sweep / "ladder.parquet")
    trials = pd.read_parquet(sweep / "trials.parquet")
    assert set(table["trial_id"]) == set(trials["trial_id"]) and (table["status"] == "finished").all()
    cells = {s: set(table.loc[table["scale"] == s, "cell"]) for s in ("x1", "x2")}
    assert len(cells["x1"]) == 4 and "recommended | default" in cells["x1"]
    means = table[table["scale"] == "x1"].set_index("cell")["eval_loss/mean"]
    best_two = set(means.sort_values().index[:2])  # the better half (2 of 4) and the pinned go up
    assert cells["x2"] == best_two | {"recommended | default"}, means
    assert "up to x2:" in printed and len(cells["x2"]) < 4
    for row in table.itertuples():  # the planned budget of the run that ran, from its own resolved config
        cfg = load_config(sweep / "trials" / row.trial_id / "resolved_config.yaml")
        assert row.tokens == cfg.train_config.max_steps * 2 * 32
        assert row.flops == pytest.approx(ladder_sizes(to_dict(cfg))["flops"])
        assert row.params_active < row.params_total
    for cell in cells["x2"]:  # each scale spends its multiple of the base's compute (within a step or two)
        flops = table[table["cell"] == cell].set_index("scale")["flops"]
        assert flops["x2"] / flops["x1"] == pytest.approx(2, rel=0.2)

    report = write_report(sweep, figures=False).read_text()
    assert "## Across scales" in report and "Kendall" in report and "needs 3 or more" in report

    # --resume: a lost run of the larger scale runs again, and nothing else does.
    done = {p: p.stat().st_mtime_ns for p in sweep.glob("trials/*/done.json")}
    lost = sweep / "trials" / table.loc[table["scale"] == "x2", "trial_id"].iloc[0]
    shutil.rmtree(lost)
    assert ablate.main([*argv, "--resume"]) == 0
    assert (lost / "done.json").is_file()
    assert all(p.stat().st_mtime_ns == m for p, m in done.items() if lost not in p.parents)
    again = pd.read_parquet(sweep / "ladder.parquet")
    assert sorted(again["trial_id"]) == sorted(table["trial_id"])


def test_a_run_stopped_early_is_not_a_point_of_its_scales_curve():
    """ASHA stops a run before its scale's compute: its FLOPs are a fourth value but not a fourth scale. The fit
    of three scales stays flagged, without an interval, and is fitted on the runs that reached their scale."""
    from analysis.scales import scale_fits

    curve = planted(2.0, 1.0, 0.5, c0=1e11)
    rows = [
        {"cell": "a", "scale": f"x{x}", "seed": seed, "flops": 1e11 * x, "status": "finished", "m": curve(1e11 * x)}
        for x in (1, 2, 4)
        for seed in (0, 1)
    ]
    rows[-1].update(status="stopped", flops=0.6 * 4e11, m=curve(4e11) + 0.3)  # stopped at 60%, worse
    fits, fitted = scale_fits(pd.DataFrame(rows), "m", target=1e13)
    row = fits.set_index("cell").loc["a"]
    assert row["scales"] == 3 and row["points"] == 5 and "fit the curve exactly" in row["note"]
    assert math.isnan(row["target lo"]) and math.isnan(row["target hi"])
    assert row["at target"] == pytest.approx(curve(1e13), rel=1e-3)  # the stopped run's value is not in it


def test_the_across_scales_report_recovers_planted_curves_and_their_crossing(tmp_path):
    # A ladder's folder as ablate.py writes it, from planted curves: cell a = 2.0 + 1.0 x^-0.5 and
    # b = 2.3 + 0.4 x^-0.5 (x = C / 1e11) cross at x = 4; b leads below it, a above. c stops after 2 scales.
    from analysis.report import write_report
    from tests.test_analysis import make_trials, write_sweep

    curves = {"a": (2.0, 1.0, 0.5), "b": (2.3, 0.4, 0.5), "c": (2.2, 0.7, 0.5)}
    mixes = {m: (0.5, 0.3, 0.2) for m in curves}
    base = make_trials(mixes, {"default": {}}, seeds=2, truth=lambda *a: 0.0)
    rng = np.random.default_rng(0)
    frames = []
    for i, x in enumerate([1, 2, 4, 8, 16]):
        part = base[base["mix"].isin(["a", "b"] if i >= 2 else list(curves))].copy()
        E, A, alpha = zip(*[curves[m] for m in part["mix"]])
        part["eval_bpb/mean"] = np.array(E) + np.array(A) * x ** -np.array(alpha) + rng.normal(0, 1e-4, len(part))
        part["flops"] = 1e11 * x
        part["trial_id"] = [f"x{x}_{t}" for t in part["trial_id"]]
        frames.append(part.assign(scale=f"x{x}", multiple=float(x)))
    trials = pd.concat(frames, ignore_index=True)
    meta = {"name": "planted", "metric": "eval_bpb/mean", "mode": "min", "seeds": 2,
            "ladder": {"promote": 0.5, "pin": [], "target_flops": 1e13}}  # fmt: skip
    folder = write_sweep(tmp_path / "lad", trials, meta)
    columns = ["trial_id", "cell", "mix", "setting", "scale", "multiple", "seed", "params_total", "params_active",
               "tokens", "flops", "status", "eval_bpb/mean"]  # fmt: skip
    trials[columns].to_parquet(folder / "ladder.parquet", index=False)

    text = write_report(folder, figures=False).read_text()
    report = folder / "report"
    fits = pd.read_csv(report / "ladder_fits.csv").set_index("cell")
    for cell in ("a", "b"):
        assert fits.loc[f"{cell} | default", "alpha"] == pytest.approx(0.5, abs=0.05)
        assert fits.loc[f"{cell} | default", "E"] == pytest.approx(curves[cell][0], abs=0.02)
        assert not isinstance(fits.loc[f"{cell} | default", "note"], str)  # 5 scales: a tested curve, no flag
        E, A, alpha = curves[cell]
        assert fits.loc[f"{cell} | default", "at target"] == pytest.approx(E + A * 100**-alpha, abs=0.01)
    assert "needs 3 or more" in fits.loc["c | default", "note"]
    cross = pd.read_csv(report / "ladder_crossings.csv")
    assert len(cross) == 1 and cross["cross at FLOPs"].iloc[0] == pytest.approx(4e11, rel=0.1)
    assert cross["lower before"].iloc[0] == "b | default" and cross["where"].iloc[0] == "within the scales run"
    agree = pd.read_csv(report / "ladder_agreement.csv").set_index("scale")
    assert agree.loc["x1", "decision_accuracy"] == 0 and agree.loc["x1", "cells"] == 2  # b led at x1, a at x16
    assert agree.loc["x8", "decision_accuracy"] == 1 and agree.loc["x8", "kendall_tau"] == 1
    assert "The winner changes with scale" in text and "## Across scales" in text
    assert "6 trials in 3 cells" in text  # the sections before it describe the smallest scale only
