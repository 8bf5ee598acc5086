"""analysis/: tables and the report on synthetic sweep folders with a planted answer (no Ray)."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from analysis import (
    baseline_differences,
    curves,
    differences,
    eval_curves,
    heldout_curves,
    factor_effects,
    hot_turnover,
    leaderboard,
    load_grids,
    load_histograms,
    load_sweep,
    noise_floor,
    pairwise,
    recommend_mix,
    usage_summary,
)
from analysis.compare import compare_pair
from analysis.report import write_report

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ["web", "code", "books"]
PEER_DEFAULTS = {
    "peer/num_experts": 64,
    "peer/num_experts_per_tok": 8,
    "peer/num_heads": 4,
    "peer/query_dim": 16,
    "peer/batch_norm_query": True,
    "peer/expert_hidden_size": 1,
    "peer/product_key_dim": "8x8",
    "peer/peer_start_layer": 1,
    "peer/use_peer": True,
}


def make_trials(mixes: dict, settings: dict, seeds: int, truth, noise: float = 0.01, rng_seed: int = 0) -> pd.DataFrame:
    """One row per (mix, setting, seed) in the schema of trials.parquet; eval_bpb/mean = truth + seed shift + noise."""
    rng = np.random.default_rng(rng_seed)
    seed_shift = rng.normal(0, noise, seeds)  # shared by every cell of a seed: what pairing removes
    rows = []
    for (mix, weights), (setting, peer), seed in itertools.product(mixes.items(), settings.items(), range(seeds)):
        true = truth(mix, np.array(weights, dtype=float), setting, peer)
        bpb = {d: true + 0.05 * i + seed_shift[seed] + rng.normal(0, noise) for i, d in enumerate(DATASETS)}
        tokens = 50 * 8 * 64
        active = 100_000
        rows.append(
            {
                "trial_id": f"t{len(rows):03d}",
                "cell": f"{mix} | {setting}",
                "mix": mix,
                "setting": setting,
                "seed": seed,
                **{f"weight/{d}": w for d, w in zip(DATASETS, weights)},
                **PEER_DEFAULTS,
                **peer,
                "status": "finished",
                "error": None,
                "final_loss": 0.69 * np.mean(list(bpb.values())) * 4,
                **{f"eval_loss/{d}": v * 2.8 for d, v in bpb.items()},
                **{f"eval_bpb/{d}": v for d, v in bpb.items()},
                "eval_bpb/mean": np.mean(list(bpb.values())),
                "lm_eval/demo_continuation/acc": 0.9 - 0.3 * np.mean(list(bpb.values())) + rng.normal(0, noise),
                "tokens": tokens,
                "steps": 50,
                "wall_s": 12.0 + rng.random(),
                "params_total": 300_000,
                "params_active": active,
                "flops": 6.0 * active * tokens,
                "config_path": f"trials/t{len(rows):03d}/x.yaml",
            }
        )
    return pd.DataFrame(rows)


def fail(trials: pd.DataFrame, index: int, error: str = "RuntimeError: CUDA out of memory") -> pd.DataFrame:
    metric_cols = [c for c in trials.columns if c.startswith(("eval_", "lm_eval/")) or c == "final_loss"]
    trials.loc[index, metric_cols] = np.nan
    trials.loc[index, ["status", "error"]] = ["failed", error]
    return trials


def write_usage_by_source(path: Path, peer: pd.DataFrame, rng) -> None:
    """usage_by_source.parquet of the PEER trials (layers 1 and 2, steps 25 and 50), summarised by the training
    code itself from (S, N) tables where source s reaches each expert with probability min(1, 0.2 + weight_s)."""
    import torch

    from peerlab.train.usage import summarise_sources

    rows = []
    for _, trial in peer.iterrows():
        weights = trial[[f"weight/{d}" for d in DATASETS]].to_numpy(dtype=float)
        for step, layer in itertools.product([25, 50], [1, 2]):
            reach = rng.random((len(DATASETS), 64)) < np.minimum(1, 0.2 + weights[:, None])
            mass = torch.tensor(rng.gamma(2.0, size=(len(DATASETS), 64)) * reach * weights[:, None])
            for row in summarise_sources(mass, DATASETS):
                rows.append({"trial_id": trial["trial_id"], "step": step, "layer": layer, "experts": 64, **row})
    pd.DataFrame(rows).to_parquet(path / "usage_by_source.parquet", index=False)


def write_sweep(path: Path, trials: pd.DataFrame, meta: dict | None = None, grids: bool = True) -> Path:
    """A sweep folder as experiments/ablate.py writes it: trials, curves, usage, evals (and sweep.json)."""
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    trials.to_parquet(path / "trials.parquet", index=False)
    if meta is not None:
        (path / "sweep.json").write_text(json.dumps(meta))
    ok = trials[trials["status"] != "failed"]
    steps = np.arange(0, 51, 5)
    curve = ok[["trial_id", "final_loss", *[f"eval_bpb/{d}" for d in DATASETS]]].merge(
        pd.DataFrame({"step": steps}), how="cross"
    )
    decay = np.exp(-curve["step"] / 15)
    curve["loss"] = curve["final_loss"] + 3 * decay + rng.normal(0, 0.02, len(curve))
    curve["lr"], curve["grad_norm"], curve["tokens_per_s"] = 3e-4, 1.0, 2000.0
    is_eval = curve["step"] % 25 == 0
    for d in DATASETS:
        curve[f"eval_bpb/{d}"] = (curve[f"eval_bpb/{d}"] + decay).where(is_eval)
        curve[f"eval_loss/{d}"] = curve[f"eval_bpb/{d}"] * 2.8
        curve[f"tokens_seen/{d}"] = curve["step"] * 100
    curve.drop(columns="final_loss").to_parquet(path / "curves.parquet", index=False)

    peer = ok[ok["peer/use_peer"].astype(bool)]
    snaps = (
        peer[["trial_id", "peer/num_experts_per_tok"]]
        .merge(pd.DataFrame({"step": [25, 50]}), how="cross")
        .merge(pd.DataFrame({"layer": [1, 2]}), how="cross")
    )
    rows = []
    for snap in snaps.itertuples(index=False):  # synthetic data only: one load vector per snapshot
        n = 64
        load = rng.gamma(shape=snap[1] / 4, size=n) * (rng.random(n) > 0.1)
        z = load / load.sum()
        used = z > 0
        hot = np.nonzero(z > 2 / n)[0]
        counts, edges = np.histogram(z * n, bins=64)
        row = {
            "trial_id": snap.trial_id,
            "step": snap.step,
            "layer": snap.layer,
            "experts": n,
            "usage": used.mean(),
            "kl_uniform": np.log(n) + (z[used] * np.log(z[used])).sum(),
            "dead": 1 - used.mean(),
            "hot_count": len(hot),
            "hot_ids": hot.tolist(),
            "max_share_x_n": z.max() * n,
        }
        if grids:
            row.update(
                grid_shape=[8, 8],
                load_grid=(z * n).tolist(),
                load_hist_counts=counts.tolist(),
                load_hist_edges=edges.tolist(),
            )
        rows.append(row)
    pd.DataFrame(rows).to_parquet(path / "usage.parquet", index=False)
    if grids:  # by data source (planted: a source reaches a share of the experts that grows with its weight)
        write_usage_by_source(path, peer, rng)
    evals = ok[["trial_id", "lm_eval/demo_continuation/acc"]].rename(columns={"lm_eval/demo_continuation/acc": "value"})
    evals = pd.concat([evals.assign(step=50), evals.assign(step=25, value=evals["value"] - 0.1)])
    evals.assign(task="demo_continuation", metric="acc", stderr=0.01).to_parquet(path / "evals.parquet", index=False)
    return path


MIXES3 = {"web_heavy": (0.6, 0.2, 0.2), "balanced": (1 / 3, 1 / 3, 1 / 3), "code_heavy": (0.2, 0.6, 0.2)}
SETTINGS_K = {
    "num_experts_per_tok=8": {"peer/num_experts_per_tok": 8},
    "num_experts_per_tok=16": {"peer/num_experts_per_tok": 16},
}
META = {
    "name": "synthetic",
    "metric": "eval_bpb/mean",
    "mode": "min",
    "mixes": {name: dict(zip(DATASETS, w)) for name, w in MIXES3.items()},
    "seeds": 3,
    "search_space": {"peer/num_experts_per_tok": [8, 16]},
}


def planted_best(mix, w, setting, peer):
    """1.0 everywhere, a spread of 0.02 per mix, and one planted best cell 0.1 lower."""
    base = 1.0 + 0.02 * (list(MIXES3).index(mix) if mix in MIXES3 else 3 + w[0])
    return base - 0.1 * (mix == "balanced" and setting == "num_experts_per_tok=16")


def test_planted_best_cell_ranks_first_and_is_significant():
    trials = make_trials(MIXES3, SETTINGS_K, seeds=3, truth=planted_best)
    board = leaderboard(trials, "eval_bpb/mean", "min")
    assert board["cell"].iloc[0] == "balanced | num_experts_per_tok=16"
    assert board["rank"].iloc[0] == 1 and board["seeds"].eq(3).all()
    best = board.iloc[0]
    assert best["eval_bpb/mean lo"] < best["eval_bpb/mean"] < best["eval_bpb/mean hi"]
    assert {"final_loss", "eval_bpb/web", "lm_eval/demo_continuation/acc", "tokens", "flops"} <= set(board.columns)
    diff = differences(trials, "eval_bpb/mean", "min")
    assert (diff["reference"] == board["cell"].iloc[0]).all() and len(diff) == 5
    assert diff["test"].eq("paired t").all() and diff["significant"].all() and (diff["diff"] > 0.05).all()
    noise = noise_floor(trials).set_index("metric")
    assert 0.003 < noise.loc["eval_bpb/mean", "sd"] < 0.03  # planted per-dataset noise 0.01, averaged over 3
    # an early-stopped (ASHA) trial still counts, and is counted as stopped
    trials.loc[trials["cell"] == "code_heavy | num_experts_per_tok=8", "status"] = ["stopped", "finished", "finished"]
    board = leaderboard(trials, "eval_bpb/mean", "min").set_index("cell")
    assert board.loc["code_heavy | num_experts_per_tok=8", ["seeds", "stopped", "failed"]].tolist() == [3, 1, 0]
    # lm-eval accuracy is higher-is-better: ranking on it also puts the planted cell first
    assert leaderboard(trials, "lm_eval/demo_continuation/acc", "max")["cell"].iloc[0] == best["cell"]
    with pytest.raises(ValueError, match="no cell"):
        differences(trials, "eval_bpb/mean", "min", reference="nope | none")


def test_planted_no_effect_factor_is_not_significant():
    settings = {
        f"num_experts_per_tok={k},num_heads={h}": {"peer/num_experts_per_tok": k, "peer/num_heads": h}
        for k, h in itertools.product((8, 16), (4, 8))
    }

    def truth(mix, w, setting, peer):  # num_heads has no effect; num_experts_per_tok=16 is 0.05 better
        return 1.0 + 0.03 * list(MIXES3).index(mix) - 0.05 * (peer["peer/num_experts_per_tok"] == 16)

    trials = make_trials(MIXES3, settings, seeds=4, truth=truth, rng_seed=3)
    effects = factor_effects(trials, ["eval_bpb/mean"])
    p = effects.drop_duplicates("factor").set_index("factor")["p"]
    assert set(p.index) == {*(f"weight/{d}" for d in DATASETS), "peer/num_experts_per_tok", "peer/num_heads"}
    assert p["peer/num_heads"] > 0.05 and p["peer/num_experts_per_tok"] < 0.001
    heads = effects[effects["factor"] == "peer/num_heads"]
    assert list(heads["level"]) == ["4", "8"] and heads["n"].eq(24).all()
    # the seed-paired test of two cells that differ only in num_heads: false positives at about the nominal 5%
    pair = ["balanced | num_experts_per_tok=16,num_heads=8", "balanced | num_experts_per_tok=16,num_heads=4"]
    null_p = [
        compare_pair(*[t[t["cell"] == c] for c in pair], "eval_bpb/mean")["p"]
        for t in (make_trials(MIXES3, settings, 4, truth, rng_seed=r) for r in range(60))
    ]
    assert np.mean(np.array(null_p) < 0.05) <= 0.1
    diff = differences(trials, "eval_bpb/mean", "min", reference=pair[1]).set_index("cell")
    assert diff.loc["balanced | num_experts_per_tok=8,num_heads=4", "significant"]


def test_one_key_at_a_time_is_not_confounded():
    """Settings vary one PEER key around a default: num_heads=8 is worse, num_experts_per_tok has no effect.
    Averaging over all trials would blame k=8 for the num_heads=8 arm; the effect is read at the default."""
    settings = {
        "default": {},
        "num_experts_per_tok=16": {"peer/num_experts_per_tok": 16},
        "num_heads=8": {"peer/num_heads": 8},
        "no_peer": {"peer/use_peer": False},
    }

    def truth(mix, w, setting, peer):
        return 1.0 + 0.1 * (peer.get("peer/num_heads") == 8) + 0.2 * (setting == "no_peer")

    trials = make_trials(MIXES3, settings, seeds=3, truth=truth, rng_seed=5)
    effects = factor_effects(trials, ["eval_bpb/mean"])
    p = effects.drop_duplicates("factor").set_index("factor")["p"]
    assert p["peer/num_experts_per_tok"] > 0.05 and p["peer/num_heads"] < 0.001 and p["peer/use_peer"] < 0.001
    base = baseline_differences(trials, "eval_bpb/mean", "min")
    assert len(base) == 9 and base["better"].all() and base["reference"].str.endswith("| no_peer").all()
    assert (base["cell"].str.split(" | ").str[0] == base["reference"].str.split(" | ").str[0]).all()  # same mix
    pairs = pairwise(trials, "eval_bpb/mean", "min")
    assert len(pairs) == 12 * 11 // 2 and not (pairs["diff"] < 0).any()  # the better-ranked cell is the reference
    k = effects[effects["factor"] == "peer/num_experts_per_tok"]
    assert k["n"].eq(9).all()  # default and k=16 arms: 3 mixes x 3 seeds each; no num_heads=8 or no_peer trials


def test_keys_that_move_together_are_one_factor():
    """Sweeping num_experts sets product_key_dim with it. The two keys are one factor, so the sweep is a full
    grid of (num_experts, k) and every trial reads each key's effect (left as a "one key at a time" sweep,
    only the trials at the most common product_key_dim were read: one level, no p)."""
    settings = {
        f"num_experts={n},num_experts_per_tok={k}": {
            "peer/num_experts": n,
            "peer/product_key_dim": f"{int(n**0.5)}x{int(n**0.5)}",
            "peer/num_experts_per_tok": k,
        }
        for n, k in itertools.product((64, 256), (8, 16))
    }

    def truth(mix, w, setting, peer):  # 256 experts are 0.1 better; k has no effect
        return 1.0 - 0.1 * (peer["peer/num_experts"] == 256)

    trials = make_trials(MIXES3, settings, seeds=2, truth=truth, rng_seed=7)
    effects = factor_effects(trials, ["eval_bpb/mean"])
    for key in ("peer/num_experts", "peer/product_key_dim"):
        rows = effects[effects["factor"] == key]
        assert len(rows) == 2 and rows["n"].eq(12).all(), rows
        groups = [g["eval_bpb/mean"] for _, g in trials.groupby(key)]
        assert rows["p"].iloc[0] == pytest.approx(stats.f_oneway(*groups).pvalue)  # scipy's ANOVA on all trials
    k = effects[effects["factor"] == "peer/num_experts_per_tok"]
    assert k["n"].eq(12).all() and k["p"].iloc[0] > 0.05


def test_a_dataset_some_mixes_leave_out_is_a_factor_at_weight_zero(tmp_path):
    """A trial's row names only its own mix's datasets, so sweeps written before the table said 0 have NaN where a
    mix leaves a dataset out: read as weight 0, the dataset's factor is there (its p equals scipy's ANOVA)."""
    mixes = {"all": [0.4, 0.3, 0.3], "no_books": [0.6, 0.4, 0.0], "books_light": [0.5, 0.4, 0.1]}

    def truth(mix, w, setting, peer):  # leaving books out costs 0.1
        return 1.0 + 0.1 * (w[2] == 0)

    trials = make_trials(mixes, {"default": {}}, seeds=3, truth=truth, rng_seed=5)
    trials.loc[trials["mix"] == "no_books", "weight/books"] = np.nan
    sweep = load_sweep(write_sweep(tmp_path / "sweep", trials))
    assert (sweep.trials.loc[sweep.trials["mix"] == "no_books", "weight/books"] == 0).all()
    books = factor_effects(sweep.trials, ["eval_bpb/mean"]).query("factor == 'weight/books'")
    assert list(books["level"]) == ["0", "0.1", "0.3"] and books["n"].eq(3).all()
    groups = [g["eval_bpb/mean"] for _, g in trials.assign(b=trials["weight/books"].fillna(0)).groupby("b")]
    assert books["p"].iloc[0] == pytest.approx(stats.f_oneway(*groups).pvalue, rel=1e-9)


def test_summary_reads_the_paired_difference_in_its_direction(tmp_path):
    """The best cell on its mean over all seeds may lose to the next on the seeds both have (one of its seeds
    failed in the other cell): the summary says so instead of calling it a real lead."""
    trials = make_trials({"a": (0.6, 0.2, 0.2), "c": (0.2, 0.6, 0.2)}, {"s": {}}, seeds=3, truth=lambda *_: 1.0)
    values = {("a", 0): 2.0, ("a", 1): 2.0, ("a", 2): 1.5, ("c", 0): 1.9, ("c", 1): 1.91, ("c", 2): np.nan}
    trials["eval_bpb/mean"] = [values[(m, s)] for m, s in zip(trials["mix"], trials["seed"])]
    board = leaderboard(trials, "eval_bpb/mean", "min")
    assert board["cell"].iloc[0] == "a | s" and board.set_index("cell")["seeds"].to_dict() == {"a | s": 3, "c | s": 2}
    runner = differences(trials, "eval_bpb/mean", "min").iloc[0]
    check = stats.ttest_rel([1.9, 1.91], [2.0, 2.0])
    assert runner["diff"] == pytest.approx(-0.095) and runner["p"] == pytest.approx(check.pvalue) and runner["better"]
    text = write_report(write_sweep(tmp_path / "s", trials, META), figures=False).read_text()
    assert "a real lead" not in text and "0.095 ahead on the 2 seeds both cells have" in text
    assert "beats the best cell on those seeds, significantly" in text and "0 of 1 other cells" in text


def test_report_ranks_on_the_training_loss_as_the_sweep_names_it(tmp_path):
    """`--metric loss` (the training loss, a metric ablate.py offers) is trials.parquet's final_loss."""
    trials = make_trials(MIXES3, SETTINGS_K, 2, planted_best)
    write_sweep(tmp_path, trials, {**META, "metric": "loss"})
    text = write_report(tmp_path, figures=False).read_text()
    best = trials.groupby("cell")["final_loss"].mean().idxmin()
    assert "Ranked on final_loss" in text and f"Best cell: **{best}**" in text
    assert "Ranked on final_loss" in write_report(tmp_path, metric="loss", figures=False).read_text()


OPTIMUM = np.array([0.5, 0.3, 0.2])


def planted_quadratic(mix, w, setting, peer):
    return 1.0 + 2.0 * float(((w - OPTIMUM) ** 2).sum())


def simplex_mixes(n: int, seed: int = 0) -> dict:
    w = np.random.default_rng(seed).dirichlet(np.ones(3), n)
    return {f"mix{i}": tuple(row) for i, row in enumerate(w)}


def test_surrogate_recovers_planted_optimum_mix():
    trials = make_trials(simplex_mixes(14), {"default": {}}, seeds=2, truth=planted_quadratic, noise=0.002)
    rec = recommend_mix(trials, "eval_bpb/mean", "min")
    best = rec[rec["kind"] == "recommended"][[f"weight/{d}" for d in DATASETS]].to_numpy()[0]
    assert np.abs(best - OPTIMUM).max() <= 0.1
    assert rec.attrs["trusted"] and rec.attrs["loo_spearman"] > 0.8 and rec.attrs["mixes"] == 14
    assert rec["kind"].eq("tried").sum() == 14 and np.isclose(best.sum(), 1)
    assert rec.attrs["distance_to_tried"] < 0.25 and "extrapolation" not in rec.attrs["note"]
    # a dataset that no mix used is left at weight 0, not extrapolated to
    trials["weight/unused"] = 0.0
    rec = recommend_mix(trials, "eval_bpb/mean", "min")
    assert rec.loc[rec["kind"] == "recommended", "weight/unused"].eq(0).all() and rec.attrs["params"] == 6


def test_surrogate_says_when_too_few_mixes():
    trials = make_trials(simplex_mixes(5), {"default": {}}, seeds=2, truth=planted_quadratic, noise=0.002)
    rec = recommend_mix(trials, "eval_bpb/mean", "min")
    assert not rec.attrs["trusted"] and "too few mixes" in rec.attrs["note"]
    one = recommend_mix(make_trials(dict(list(MIXES3.items())[:2]), {"default": {}}, 2, planted_best), "eval_bpb/mean")
    assert "cannot fit" in one.attrs["note"] and not (one["kind"] == "recommended").any()


def test_usage_tables(tmp_path):
    trials = make_trials(MIXES3, {**SETTINGS_K, "no_peer": {"peer/use_peer": False}}, seeds=2, truth=planted_best)
    sweep = load_sweep(write_sweep(tmp_path / "s", trials, META))
    summary = usage_summary(sweep.usage, sweep.cells)
    assert set(summary["setting"]) == set(SETTINGS_K) and len(summary) == 2 * 3 * 2  # settings x mixes x layers
    assert summary["seeds"].eq(2).all() and summary["usage"].between(0, 1).all()
    grids = load_grids(sweep.usage, sweep.cells)
    assert len(grids) == 4 and all(g.shape == (8, 8) for g in grids["grid"])
    hists = load_histograms(sweep.usage, sweep.cells)
    assert hists.groupby(["setting", "layer"])["count"].sum().eq(64 * 6).all()  # 64 experts x 6 trials each
    loss = curves(sweep.curves, sweep.cells, "loss")
    assert loss["n"].eq(2).all() and len(loss) == 9 * 11 and (loss["lo"] < loss["mean"]).all()
    held = heldout_curves(sweep.curves, sweep.cells)
    assert set(held["metric"]) == {f"eval_bpb/{d}" for d in DATASETS} and set(held["step"]) == {0, 25, 50}
    lm = eval_curves(sweep.evals, sweep.cells)
    assert set(lm["metric"]) == {"lm_eval/demo_continuation/acc"} and set(lm["step"]) == {25, 50}
    kept = hot_turnover(sweep.usage, sweep.cells)
    assert kept["step"].eq(50).all() and kept["hot_kept"].between(0, 1).all()


def test_usage_by_source_tables_find_the_planted_weight_effect(tmp_path):
    """A source reaches more experts the more weight it has in the mix: the report's tables say so."""
    from analysis.sources import pair_overlaps, source_by_cell, source_heatmaps, weight_effects

    trials = make_trials(MIXES3, {**SETTINGS_K, "no_peer": {"peer/use_peer": False}}, seeds=2, truth=planted_best)
    sweep = load_sweep(write_sweep(tmp_path / "s", trials, META))
    by_cell = source_by_cell(sweep.usage_by_source, sweep.usage, sweep.trials)
    assert len(by_cell) == 2 * 3 * 3 and by_cell["seeds"].eq(2).all()  # settings x mixes x sources
    assert np.allclose(by_cell.groupby("cell")["mass_share"].sum(), 1) and by_cell["nmi"].between(0, 1).all()
    web = by_cell[(by_cell["mix"] == "web_heavy") & (by_cell["source"] == "web")]
    assert np.allclose(web["weight"], 0.6)
    effects = weight_effects(by_cell).set_index(["setting", "source"])
    for setting in SETTINGS_K:
        for source in ("web", "code"):  # three weights each: more weight, fewer dead experts and more mass
            assert effects.loc[(setting, source), "rho_dead"] == -1 and effects.loc[(setting, source), "mixes"] == 3
            assert effects.loc[(setting, source), "rho_mass_share"] == 1
        assert np.isnan(effects.loc[(setting, "books"), "rho_dead"])  # only two weights (0.2, 1/3)
    ids = sweep.trials.loc[sweep.trials["cell"] == "balanced | num_experts_per_tok=16", "trial_id"].tolist()
    heat = source_heatmaps(sweep.usage_by_source, ids)
    assert list(heat["layer"]) == [1, 2] and all(g.shape == (3, 64) for g in heat["grid"])
    assert heat["sources"].map(list).eq([DATASETS] * 2).all() and heat["trials"].eq(2).all()
    pairs = pair_overlaps(sweep.usage_by_source, sweep.trials)
    assert len(pairs) == 2 * 2 * 3 and pairs["overlap"].between(0, 1).all() and pairs["jaccard"].between(0, 1).all()


def test_hot_turnover_on_planted_hot_ids():
    from analysis.dynamics import hot_turnover

    usage = pd.DataFrame(
        {
            "trial_id": ["a", "a", "a", "b", "b", "b"],
            "layer": [1] * 6,
            "step": [0, 10, 20, 0, 10, 20],
            "hot_ids": [[1, 2, 3, 4], [1, 2, 5, 6], [1, 2, 5, 6], [7, 8], [9, 10], [9, 10]],
        }
    )
    cells = pd.DataFrame({"trial_id": ["a", "b"], "cell": ["m | k=4", "m | k=4"], "setting": ["k=4", "k=4"]})
    kept = hot_turnover(usage, cells).set_index("step")["hot_kept"]
    # a keeps half its hot ids at step 10 and all at 20; b none at 10 and all at 20: means over the two trials
    assert kept.to_dict() == {10: 0.25, 20: 1.0}


def test_report_with_failed_trial_and_single_seed(tmp_path):
    trials = fail(make_trials(MIXES3, SETTINGS_K, seeds=1, truth=planted_best), 2)
    path = write_sweep(tmp_path / "single", trials, meta=None, grids=False)  # no sweep.json, old usage format
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run(
        [sys.executable, str(ROOT / "analysis" / "report.py"), str(path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    md = Path(run.stdout.strip().splitlines()[-1])
    assert md == path / "report" / "report.md" and (path / "report" / "report.html").is_file()
    text = md.read_text()
    assert "Best cell: **balanced | num_experts_per_tok=16**" in text
    assert "Failed trials" in text and "CUDA out of memory" in text and trials.loc[2, "trial_id"] in text
    assert "single seed" in text and "intervals and tests are omitted" in text
    assert "older format" in text
    board = pd.read_csv(path / "report" / "leaderboard.csv")
    assert board.loc[board["failed"] == 1, "seeds"].eq(0).all() and board["eval_bpb/mean lo"].isna().all()
    assert board["cell"].nunique() == 6


def test_report_on_a_minimal_folder(tmp_path):
    """Only the key columns and final_loss, no sweep.json, curves, usage or evals: ranked on final_loss."""
    trials = make_trials(MIXES3, {"default": {}}, 2, planted_best)[["trial_id", "cell", "seed", "final_loss"]]
    trials.to_parquet(tmp_path / "trials.parquet")
    out = tmp_path / "elsewhere"
    run = subprocess.run(
        [sys.executable, str(ROOT / "analysis" / "report.py"), str(tmp_path), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    text = (out / "report.md").read_text()
    assert "Ranked on final_loss" in text and "Best cell: **web_heavy | default**" in text
    assert (
        "No curves.parquet" in text
        and "No usage.parquet" in text
        and "No usage_by_source.parquet rows" in text
        and "cannot fit" in text
    )
    # every trial failed: still a report, with the failures and no winner
    trials = make_trials(MIXES3, SETTINGS_K, 1, planted_best)
    for i in trials.index:
        fail(trials, i, error=f"Traceback (most recent call last):\n  File x.py\nValueError: trial {i}\n")
    write_sweep(tmp_path / "all_failed", trials, META)
    text = write_report(tmp_path / "all_failed", figures=False).read_text()
    assert "there is no winner" in text and "6 of 6 trials failed" in text and "trial 5" in text


def test_report_cli_errors(tmp_path, capsys):
    # The command line's main() in this process (test_report_with_failed_trial_and_single_seed runs the script).
    from analysis.report import main

    assert main([str(tmp_path)]) == 2 and "no trials.parquet" in capsys.readouterr().err
    write_sweep(tmp_path, make_trials(MIXES3, SETTINGS_K, 2, planted_best), META)
    with pytest.raises(ValueError, match="not a column"):
        write_report(tmp_path, metric="nope")
    # another metric than the sweep's: its own direction (accuracy: higher is better), or --mode
    text = write_report(tmp_path, metric="lm_eval/demo_continuation/acc", figures=False).read_text()
    assert "Best cell: **balanced | num_experts_per_tok=16**" in text and "(higher is better)" in text
    assert main([str(tmp_path), "--metric", "final_loss", "--mode", "max", "--no-plots"]) == 0
    assert "(higher is better)" in Path(capsys.readouterr().out.strip()).read_text()


MIX_OPTIMUM = {"web": 0.5, "code": 0.3, "books": 0.2}


def run_mix_search(domains: list[str], optimum: list[float], fail=(), stop_after: int | None = None, **kwargs):
    """Drive peerlab.mixsearch.MixSearch as Tune would, without Ray: take trials until it waits, report each, repeat.

    The response is loss = 1 + 3 ||w - optimum||^2 + noise, and eval_bpb/<domain> falls with the domain's share.
    `fail`: mix ids reported as errors. `stop_after`: report only that many trials of round 1 and stop there
    (the rest stay running: a search cut short)."""
    from peerlab.mixsearch import MixSearch

    search = MixSearch(domains, metric="loss", mode="min", seed=0, **kwargs)
    rng = np.random.default_rng(0)
    n = 0
    while True:
        batch = []
        while isinstance(config := search.suggest(f"trial{n}"), dict):
            batch.append((f"trial{n}", config))
            n += 1
        if not batch:
            return search
        for trial, config in batch[:stop_after]:
            if config["mix_id"] in fail:
                search.on_trial_complete(trial, error=True)
                continue
            w = np.array([config["mix"][d] for d in domains])
            loss = 1 + 3 * float(((w - optimum) ** 2).sum()) + 0.003 * rng.standard_normal()
            bpb = {f"eval_bpb/{d}": 1.5 - 0.5 * w[i] + 0.003 * rng.standard_normal() for i, d in enumerate(domains)}
            search.on_trial_complete(trial, {"loss": loss, **bpb, "step": 100})
        if stop_after is not None:
            return search


def mix_sweep(path: Path, search) -> Path:
    """A minimal sweep folder (the key columns and final_loss, as in test_report_on_a_minimal_folder: few
    figures of its own) with the mixture search's files written into it."""
    from peerlab.mixsearch import write_outputs

    path.mkdir(parents=True)
    trials = make_trials(MIXES3, {"default": {}}, 2, planted_best)[["trial_id", "cell", "seed", "final_loss"]]
    trials.to_parquet(path / "trials.parquet", index=False)
    datasets = {d: {"name": d, "path": f"data/{d}"} for d in search.domains}
    write_outputs(search, path, datasets)
    return path


@pytest.fixture(scope="module")
def mix3_sweep(tmp_path_factory) -> Path:
    """A 3-domain search: 6 proxies in round 1 (one fails), a fitted round 2, 2 validation seeds per arm."""
    search = run_mix_search(
        DATASETS, list(MIX_OPTIMUM.values()), fail={"r1_03_s0"}, num_mixes=6, rounds=2, validate_seeds=2
    )
    return mix_sweep(tmp_path_factory.mktemp("mix") / "sweep", search)


def test_ternary_transform_puts_corners_and_centre_in_place():
    from analysis.plots import ternary

    xy = ternary([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1], [2, 2, 0]])
    np.testing.assert_allclose(xy, [[0, 0], [1, 0], [0.5, np.sqrt(3) / 2], [0.5, np.sqrt(3) / 6], [0.5, 0]], atol=1e-12)


def test_report_mixture_search_three_domains(mix3_sweep):
    """The section's tables against the search's own files, read back independently with pandas and scipy."""
    from scipy.stats import t as student

    md = write_report(mix3_sweep)
    out, text = md.parent, md.read_text()
    table = pd.read_parquet(mix3_sweep / "mix_search.parquet")
    rec = json.loads((mix3_sweep / "recommendation.json").read_text())
    fits = json.loads((mix3_sweep / "mix_fit.json").read_text())
    assert "## Mixture search" in text and "### Predicted against measured" in text and "### Fit quality" in text
    assert (out / "mix_simplex.png").is_file() and (out / "mix_fit.png").is_file()
    assert not (out / "mix_weights_bars.png").exists()
    assert (table["status"] == "failed").sum() == 1  # the failed proxy is in the file and the report still runs
    mix = ", ".join(f"{d} {rec['weights'][d]:.2f}" for d in DATASETS)
    assert f"Mixture search: recommended mix **{mix}**" in text and rec["verdict"] in text

    # validation arms: mean and 95% t-interval over the finished seeds of each arm
    arms = pd.read_csv(out / "mix_validation.csv").set_index("arm")
    val = table[(table["kind"] == "validation") & (table["status"] == "finished")]
    assert len(val) == 6
    for arm, label in {"recommended": "val_recommended", "best tried": "val_best_tried", "prior": "val_prior"}.items():
        x = val.loc[val["label"] == label, "metric"].to_numpy()
        half = student.ppf(0.975, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x))
        assert arms.loc[arm, "seeds"] == len(x) == 2
        np.testing.assert_allclose(
            arms.loc[arm, ["mean", "lo", "hi"]].to_numpy(float), [x.mean(), x.mean() - half, x.mean() + half]
        )
    np.testing.assert_allclose(arms.loc["recommended", "mean"], rec["validated"]["mean"])
    np.testing.assert_allclose(
        arms.loc["recommended", ["predicted lo", "predicted hi"]].to_numpy(float),
        [rec["predicted"]["lo"], rec["predicted"]["hi"]],
    )

    # every fit of mix_fit.json, and every model it tried, with its scores
    fit_table = pd.read_csv(out / "mix_fits.csv")
    assert list(fit_table["fit"]) == [f"for round {f['round']}" for f in fits["fits"]] + ["final"]
    for (_, row), f in zip(fit_table.iterrows(), fits["fits"] + [fits["final"]]):
        assert row["chosen"] == f["chosen"] and row["n"] == f["n"] and len(f["scores"]) == 3
        for model, score in f["scores"].items():
            np.testing.assert_allclose(
                row[[f"{model} spearman", f"{model} rmse"]].to_numpy(float), [score["spearman"], score["rmse"]]
            )

    # per-domain trade-offs: the validation arms' means of every value/ column
    trade = pd.read_csv(out / "mix_tradeoffs.csv").set_index("metric")
    values = [c for c in table.columns if c.startswith("value/")]
    assert sorted(trade.index) == sorted(c.split("/", 1)[1] for c in values)
    for c in values:
        rec_mean = val.loc[val["label"] == "val_recommended", c].mean()
        best_mean = val.loc[val["label"] == "val_best_tried", c].mean()
        np.testing.assert_allclose(
            trade.loc[c.split("/", 1)[1], ["recommended", "recommended - best tried"]].to_numpy(float),
            [rec_mean, rec_mean - best_mean],
        )

    html = md.with_name("report.html").read_text()
    assert html.count("<img") == len(list(out.glob("*.png")))
    # --no-plots: the same section, tables and text only
    quiet = write_report(mix3_sweep, out=mix3_sweep / "quiet", figures=False)
    assert "## Mixture search" in quiet.read_text() and not list(quiet.parent.glob("*.png"))


def test_report_mixture_search_five_domains_draws_bars(tmp_path):
    """Five domains: bars, not a ternary plot; with no validation round the trade-offs come from the nearest proxies."""
    domains = ["web", "code", "books", "math", "wiki"]
    search = run_mix_search(domains, [0.3, 0.25, 0.2, 0.15, 0.1], num_mixes=6, rounds=1, validate_seeds=0)
    md = write_report(mix_sweep(tmp_path / "sweep", search))
    out, text = md.parent, md.read_text()
    assert (out / "mix_weights_bars.png").is_file() and not (out / "mix_simplex.png").exists()
    weights = pd.read_csv(out / "mix_weights.csv")
    assert list(weights["mix"][:3]) == ["recommended", "best tried", "prior"] and len(weights) == 6
    np.testing.assert_allclose(weights[domains].sum(axis=1), 1)
    rec = json.loads((out.parent / "recommendation.json").read_text())
    np.testing.assert_allclose(
        weights.loc[1, domains].to_numpy(float), [rec["best_tried"]["weights"][d] for d in domains]
    )
    assert "not validated" in text and "nearest its mix" in text
    # no validation round: the best tried arm is read off its own proxy run (distance 0)
    trade = pd.read_csv(out / "mix_tradeoffs.csv").set_index("metric")
    table = pd.read_parquet(out.parent / "mix_search.parquet").set_index("id")
    own = table.loc[rec["best_tried"]["id"], [f"value/{k}" for k in trade.index]].to_numpy(float)
    assert len(trade) == 1 + len(domains) and np.allclose(trade["best tried"], own)  # loss and eval_bpb/<domain>


def test_report_mixture_search_without_recommendation(tmp_path):
    """A two-domain search cut short in round 1: two results, one failure, the rest running; no recommendation.json."""
    search = run_mix_search(["web", "code"], [0.7, 0.3], fail={"r1_02_s0"}, stop_after=3, num_mixes=6)
    path = mix_sweep(tmp_path / "sweep", search)
    assert not (path / "recommendation.json").exists()
    md = write_report(path)
    text = md.read_text()
    assert "## Mixture search" in text and "No recommendation.json yet" in text
    assert "Mixture search: 2 of 6 proxies measured, no recommendation yet" in text
    assert "No fit yet" in text and "No fitted values yet" in text
    assert (md.parent / "mix_weights_bars.png").is_file()
    table = pd.read_parquet(path / "mix_search.parquet")
    assert table["status"].value_counts().to_dict() == {"running": 3, "finished": 2, "failed": 1}
    weights = pd.read_csv(md.parent / "mix_weights.csv").set_index("mix")
    best = table.loc[table["metric"].idxmin()]  # before a recommendation, the best measured proxy
    assert weights.index[0] == "best tried" and weights.loc["best tried", "measured"] == best["metric"]


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing: .ci/run installs it")
        pytest.skip("chromium not installed (apt-get install -y chromium)")
    return found


def test_html_report_opens_in_headless_chromium(tmp_path):
    settings = {**SETTINGS_K, "no_peer": {"peer/use_peer": False}}
    trials = fail(make_trials({**MIXES3, **simplex_mixes(6, 1)}, settings, seeds=3, truth=planted_best), 5)
    path = write_sweep(tmp_path / "sweep", trials, META)
    md = write_report(path)
    page = md.with_name("report.html")
    html = page.read_text()
    assert html.count("<img") >= 8 and "data:image/png;base64," in html and 'src="' + "data" in html
    assert "report.png" not in html  # self-contained: no file references
    made = {p.name for p in md.parent.glob("*.png")}
    assert {
        "leaderboard.png",
        "differences.png",
        "compute.png",
        "loss_curves.png",
        "heldout_curves.png",
        "lm_eval_curves.png",
        "usage_over_time.png",
        "load_histogram.png",
        "load_grid.png",
        "source_heatmap.png",
        "source_mix.png",
        "surrogate.png",
    } <= made
    assert html.count("<img") == len(made)
    # only the planted cell beats its dense arm
    assert "PEER against the dense arm: 1 of 18 PEER cells beat no_peer" in md.read_text()
    assert "Against the dense baseline" in html and (md.parent / "pairwise.csv").is_file()
    assert "num_experts_per_tok: 8, 16" in html and "code_heavy" in (md.parent / "mixes.csv").read_text()
    shot = tmp_path / "screenshot.png"
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--enable-logging=stderr",
        "--v=0",
    ]
    base = [chromium(), *flags, f"--user-data-dir={tmp_path / 'profile'}"]
    run = subprocess.run(
        [*base, f"--screenshot={shot}", "--window-size=1280,2400", page.as_uri()],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert shot.is_file() and shot.stat().st_size > 20_000, run.stderr[-2000:]
    dom = subprocess.run([*base, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=90)
    assert 'data-images="' in dom.stdout and " loaded, 0 broken" in dom.stdout, dom.stderr[-2000:]
    console = [line for line in (run.stderr + dom.stderr).splitlines() if "CONSOLE" in line]
    assert console == [], console
    if os.environ.get("REPORT_SHOT"):  # keep the screenshot for a look: REPORT_SHOT=/tmp/shot.png
        shutil.copy(shot, os.environ["REPORT_SHOT"])
