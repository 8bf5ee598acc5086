"""The mixture search (peerlab.mixsearch): its constraints, its fits, and the searcher inside a user's own Tuner."""

from __future__ import annotations

import json

import numpy as np
import pytest
from peerlab.config import ConfigError
from peerlab.mixsearch import Constraints, MixSearch, constraints, fit, metric_value, parse_bounds, parse_metric, tv


def test_projection_lands_in_the_box_simplex_and_matches_a_direct_quadratic_programme():
    """The projection is the closest feasible mix: checked against scipy's SLSQP on the same problem."""
    from scipy.optimize import minimize

    cons = Constraints(["a", "b", "c", "d"], np.array([0.1, 0.0, 0.2, 0.0]), np.array([0.5, 0.3, 1.0, 0.25]))
    rng = np.random.default_rng(0)
    for v in rng.normal(0.25, 0.4, size=(20, 4)):
        w = cons.project(v)
        assert cons.feasible(w)
        ref = minimize(
            lambda x, v=v: ((x - v) ** 2).sum(),
            np.full(4, 0.25),
            bounds=list(zip(cons.lo, cons.hi)),
            constraints=[{"type": "eq", "fun": lambda x: x.sum() - 1}],
            method="SLSQP",
            options={"ftol": 1e-12},
        ).x
        np.testing.assert_allclose(w, ref, atol=1e-5)


def test_repetition_limit_caps_each_domain_at_its_passes():
    """w_i * budget <= R * tokens_i: a small source cannot take a large share."""
    cons = constraints(["big", "small"], max_repeats=2, tokens={"big": 1e6, "small": 1e4}, budget_tokens=1e5)
    assert cons.hi[1] == pytest.approx(0.2)  # 2 passes of 10k tokens = 20k of a 100k budget
    with pytest.raises(ConfigError, match="--max-repeats 1: no mix can meet it"):
        constraints(["a", "b"], max_repeats=1, tokens={"a": 10, "b": 10}, budget_tokens=100)


@pytest.mark.parametrize(
    "bounds, message",
    [
        ({"a": (0.6, 1.0), "b": (0.6, 1.0)}, "no mix fits them"),
        ({"a": (0.0, 0.2), "b": (0.0, 0.2)}, "no mix fits them"),
        ({"z": (0.0, 0.5)}, "no dataset of that name"),
        ({"a": (0.7, 0.2)}, "expected 0 <= lo <= hi <= 1"),
    ],
)
def test_infeasible_bounds_are_one_line_errors(bounds, message):
    with pytest.raises(ConfigError, match=message) as err:
        constraints(["a", "b"], bounds)
    assert "\n" not in str(err.value)


def test_metric_expressions_and_bounds_parse():
    assert parse_metric("eval_bpb/code*0.5+eval_bpb/prose*0.5") == {"eval_bpb/code": 0.5, "eval_bpb/prose": 0.5}
    assert parse_metric("eval_loss/mean") == {"eval_loss/mean": 1.0}
    assert metric_value({"eval_bpb/code": 2.0, "eval_bpb/prose": 4.0}, "eval_bpb/code*0.25+eval_bpb/prose*0.75") == 3.5
    assert metric_value({"eval_bpb/code": 2.0}, "eval_bpb/code*0.5+eval_bpb/prose*0.5") is None
    assert parse_bounds("prose=0.1:0.6, code=0:0.5") == {"prose": (0.1, 0.6), "code": (0.0, 0.5)}
    with pytest.raises(ConfigError, match="expected name=lo:hi"):
        parse_bounds("prose=0.1")


def test_fit_ranks_a_quadratic_response_and_chooses_by_cross_validated_spearman():
    """On a noisy quadratic over the simplex the chosen model's leave-one-out Spearman is high, and its
    optimum is near the true one (checked directly, not against the fit's own output)."""
    from scipy.stats import spearmanr

    rng = np.random.default_rng(1)
    best = np.array([0.55, 0.3, 0.15])
    w = rng.dirichlet(np.ones(3), size=24)
    y = 2 * ((w - best) ** 2).sum(1) + 0.005 * rng.standard_normal(24)
    result = fit(w, np.ones(24), y)
    chosen = result.scores[result.chosen]
    top = max(s["spearman"] for s in result.scores.values())
    assert chosen["spearman"] >= top - 0.05  # the best Spearman, or within the tie margin of it with less error
    assert chosen["spearman"] > 0.8
    grid = rng.dirichlet(np.ones(3), size=4000)
    assert spearmanr(result.predict(grid), 2 * ((grid - best) ** 2).sum(1)).statistic > 0.9
    assert tv(grid[np.argmin(result.predict(grid))], best) < 0.1


def test_early_stopped_proxies_enter_with_their_step():
    """A proxy stopped at a quarter of the run reads higher; the covariate takes that out of the mix effect."""
    rng = np.random.default_rng(2)
    w = rng.dirichlet(np.ones(3), size=30)
    steps = np.where(np.arange(30) % 3 == 0, 25.0, 100.0)
    truth = ((w - np.array([0.2, 0.5, 0.3])) ** 2).sum(1)
    y = truth + 0.5 * np.log(100.0 / steps) + 0.002 * rng.standard_normal(30)
    result = fit(w, steps, y, full_steps=100)
    np.testing.assert_allclose(result.predict(w), truth, atol=0.05)


def _run_search(ray_cluster, domains, optimum, tmp_path, noise=0.01, samples=32, seed=0):
    from ray import tune

    def response(config):
        w = np.array([config["mix"][d] for d in domains])
        rng = np.random.default_rng(config["seed"] * 1000 + int(1e6 * w[0]))
        tune.report({"loss": float(3 * ((w - optimum) ** 2).sum() + noise * rng.standard_normal())})

    searcher = MixSearch(domains=domains, metric="loss", mode="min", seed=seed)
    tuner = tune.Tuner(
        tune.with_resources(response, {"cpu": 0.125}),  # a round's trials at once: each is a few microseconds
        tune_config=tune.TuneConfig(search_alg=searcher, num_samples=samples, reuse_actors=True),
        run_config=tune.RunConfig(storage_path=str(tmp_path / "ray"), verbose=0),
    )
    results = tuner.fit()
    return searcher, results


@pytest.mark.parametrize(
    "optimum",
    [np.array([0.6, 0.3, 0.1]), np.array([0.4, 0.25, 0.15, 0.12, 0.08])],
    ids=["3 domains", "5 domains"],
)
def test_user_tuner_finds_an_off_centre_optimum_within_32_evaluations(ray_cluster, optimum, tmp_path):
    domains = [f"d{i}" for i in range(len(optimum))]
    searcher, results = _run_search(ray_cluster, domains, optimum, tmp_path)
    assert len(results) <= 32
    assert all(set(r.config["mix"]) == set(domains) for r in results)
    rec = searcher.recommendation()
    weights = np.array([rec["weights"][d] for d in domains])
    assert weights.sum() == pytest.approx(1.0)
    assert tv(weights, optimum) < 0.1, (weights, optimum)
    assert rec["validated"]["n"] == 3 and rec["best_tried"]["validated"]["n"] == 3
    assert rec["verdict"].endswith("noise") or rec["verdict"] == "the recommended mix is the best tried mix"


def test_bad_prior_and_domains_are_refused():
    with pytest.raises(ConfigError, match="not a domain"):
        MixSearch(domains=["a", "b"], metric="loss", mode="min", prior={"c": 1.0})
    with pytest.raises(ConfigError, match="at least two domains"):
        MixSearch(domains=["a"], metric="loss", mode="min")


# --------------------------------------------------------------------------------------
# The mixture search of a sweep: experiments/ablate.py --mix-search N
# --------------------------------------------------------------------------------------


def test_searcher_state_resumes_running_trials_under_their_ids(tmp_path):
    """A searcher stopped mid-round comes back from its state file: the trials that were running run again under
    the same ids (their run folders continue), finished ones are kept, and the search goes on to the same end."""
    state = tmp_path / "state.json"

    def drive(searcher, stop_after=None):
        """Ask for every trial the searcher has, then report them one by one; `stop_after` reports: stop there."""
        done = 0
        while True:
            asked = []
            while (config := searcher.suggest(f"t{len(searcher.by_trial)}")) not in (None, "FINISHED"):
                asked.append((f"t{len(searcher.by_trial) - 1}", config))
            if not asked:
                return
            for trial_id, config in asked:
                if stop_after is not None and done >= stop_after:
                    return
                w = np.array([config["mix"][d] for d in searcher.domains])
                searcher.on_trial_complete(trial_id, {"loss": float(((w - [0.5, 0.3, 0.2]) ** 2).sum())})
                done += 1

    first = MixSearch(domains=["a", "b", "c"], metric="loss", mode="min", num_mixes=6, state_path=state)
    drive(first, stop_after=4)
    running = [p["id"] for p in first.proposals if p["status"] == "running"]
    finished = [p["id"] for p in first.proposals if p["status"] == "finished"]
    assert running and len(finished) == 4
    again = MixSearch(domains=["a", "b", "c"], metric="loss", mode="min", num_mixes=6, state_path=state)
    assert [p["id"] for p in again.proposals if p["status"] == "finished"] == finished
    resumed = again.suggest("new")
    assert resumed["mix_id"] == running[0]
    again.on_trial_complete("new", {"loss": 1.0})
    drive(again)
    assert again.round == again.rounds + 1 and all(p["status"] == "finished" for p in again.proposals)
    assert again.recommendation()["validated"]["n"] == 3


def test_mix_search_sweep_end_to_end(ray_cluster, demo_corpus, tmp_path, capsys):
    """ablate.py --mix-search on the demo corpus, tiny: rounds, validation, the four output files, the report,
    and the same command again finds the search finished and loses nothing."""
    import pandas as pd
    import yaml

    from tests.test_tune import ablate_module, sweep_files, tiny_sets

    mixes, config = sweep_files(demo_corpus, tmp_path)
    argv = ["--custom-datasets", str(mixes), "--config", str(config), *tiny_sets(demo_corpus, tmp_path / "out", steps=3),
            "--mix-search", "2", "--mix-rounds", "2", "--validate-seeds", "1", "--mix-prior", "uniform", "--mixes", "prose_mix",
            "--set", "eval_config.evals=[]",
            "--mix-bounds", "code=0.05:0.9", "--metric", "eval_bpb/code*0.5+eval_bpb/prose*0.5", "--name", "mix",
            "--max-concurrent", "2"]  # fmt: skip
    ablate = ablate_module()
    assert ablate.main(argv) == 0
    printed = capsys.readouterr().out
    assert "mixture search over prose, code, docs" in printed and "recommended mix:" in printed
    sweep = tmp_path / "out" / "mix"
    table = pd.read_parquet(sweep / "mix_search.parquet")
    kinds = table["kind"].value_counts()
    assert (kinds["anchor"], kinds["proxy"]) == (1, 4)  # the file's mix; 2 drawn in round 1, 2 fitted in round 2
    arms = set(table[table["kind"] == "validation"]["label"])
    assert (
        {"val_recommended", "val_prior"} <= arms <= {"val_recommended", "val_prior", "val_best_tried", "val_best_named"}
    )
    assert kinds["validation"] == len(arms)  # one seed each
    assert (table["status"] == "finished").all()
    for _, row in table.iterrows():  # the metric is the weighted sum of the trial's own held-out numbers
        expected = 0.5 * row["value/eval_bpb/code"] + 0.5 * row["value/eval_bpb/prose"]
        assert row["metric"] == pytest.approx(expected)
        config_file = sweep / "trials" / row["trial_id"] / "resolved_config.yaml"
        datasets = yaml.safe_load(config_file.read_text())["dataset_config"]["datasets"]
        weights = {d["name"]: d["weight"] for d in datasets}
        for d in ("prose", "code", "docs"):
            assert weights[d] == pytest.approx(row[f"weight/{d}"], abs=1e-9)
        assert 0.05 - 1e-9 <= weights["code"] <= 0.9 + 1e-9 and min(weights.values()) >= 0.01 - 1e-9
    rec = json.loads((sweep / "recommendation.json").read_text())
    validated = table[table["label"] == "val_recommended"]["metric"]
    assert rec["validated"]["mean"] == pytest.approx(validated.mean()) and rec["validated"]["n"] == 1
    assert rec["verdict"] in ("not enough seeds to compare", "the recommended mix is the best tried mix")
    assert "spearman" in json.dumps(json.loads((sweep / "mix_fit.json").read_text()))
    trials = pd.read_parquet(sweep / "trials.parquet")
    assert set(trials["trial_id"]) == set(table["trial_id"])
    recommended = yaml.safe_load((sweep / "recommended_mix.yaml").read_text())["data_mixes"]["recommended"]
    assert {d["name"]: d["weight"] for d in recommended["datasets"]} == pytest.approx(rec["weights"], abs=1e-6)
    assert "Mixture search" in (sweep / "report" / "report.md").read_text()
    # The same command again: the search is over; nothing runs again and the results stay.
    assert ablate.main(argv) == 0
    assert "holds this mixture search: continuing it" in capsys.readouterr().out
    again = pd.read_parquet(sweep / "mix_search.parquet")
    pd.testing.assert_frame_equal(again, table)


def test_mix_search_with_asha_fits_stopped_proxies_and_never_stops_validation(ray_cluster, demo_corpus, tmp_path):
    """--mix-search with --scheduler asha: a proxy ASHA stops enters the fit at the step it reached (status
    "stopped", its metric from that step); the validation round always runs to the end."""
    import pandas as pd

    from tests.test_tune import ablate_module, sweep_files, tiny_sets

    mixes, config = sweep_files(demo_corpus, tmp_path)
    argv = ["--custom-datasets", str(mixes), "--config", str(config), *tiny_sets(demo_corpus, tmp_path / "out", steps=6),
            "--mix-search", "4", "--mix-rounds", "2", "--validate-seeds", "1", "--mix-prior", "uniform",
            "--set", "eval_config.evals=[]", "--scheduler", "asha", "--grace-steps", "3",
            "--metric", "eval_loss/mean", "--name", "mixasha", "--max-concurrent", "2", "--no-report"]  # fmt: skip
    assert ablate_module().main(argv) == 0
    sweep = tmp_path / "out" / "mixasha"
    table = pd.read_parquet(sweep / "mix_search.parquet")
    assert set(table["status"]) <= {"finished", "stopped"} and table["metric"].notna().all()
    for row in table.itertuples():
        marker = sweep / "trials" / row.trial_id / "stopped.json"
        if row.status == "stopped":  # stopped at its first report: it counts with the step it reached
            assert row.kind != "validation" and row.step == 3 and marker.is_file()
            assert json.loads(marker.read_text())["eval_loss/mean"] == pytest.approx(row.metric)
        else:
            assert row.step == 6 and not marker.exists()
    assert (table[table["kind"] == "validation"]["status"] == "finished").all()
    fits = json.loads((sweep / "mix_fit.json").read_text())["fits"]
    measured = table[table["kind"] != "validation"]
    for fit in fits:  # each fit learns from every proxy of the rounds before it, stopped ones included
        assert fit["n"] == (measured["round"] < fit["round"]).sum()


def test_mix_search_interrupted_by_ctrl_c_resumes_and_loses_nothing(ray_cluster, demo_corpus, tmp_path):
    """Ctrl-C in the middle of a mixture search, then the same command with --resume: the proxies that ended
    are not run again, the search goes on from its saved state to its validation round and its outputs."""
    import signal
    import subprocess
    import sys
    import time

    import pandas as pd

    from tests.conftest import ROOT
    from tests.test_tune import ablate_module, sweep_files, tiny_sets

    mixes, config = sweep_files(demo_corpus, tmp_path)
    argv = ["--custom-datasets", str(mixes), "--config", str(config), *tiny_sets(demo_corpus, tmp_path / "out", steps=6),
            "--mix-search", "3", "--mix-rounds", "2", "--validate-seeds", "1", "--mix-prior", "uniform",
            "--set", "eval_config.evals=[]", "--metric", "eval_loss/mean", "--name", "mixcut",
            "--max-concurrent", "1", "--no-report"]  # fmt: skip
    sweep = tmp_path / "out" / "mixcut"
    address = ray_cluster.get_runtime_context().gcs_address
    proc = subprocess.Popen(
        [sys.executable, "experiments/ablate.py", *argv, "--address", address],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.time() + 300
    # Ctrl-C once the first trial has ended: most of the search (2 more proxies, the validation) is still to come
    while time.time() < deadline and len(list(sweep.glob("trials/*/done.json"))) < 1:
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=180) != 0
    finished = {p.parent.name: p.stat().st_mtime_ns for p in sweep.glob("trials/*/done.json")}
    assert len(finished) >= 1 and not (sweep / "recommendation.json").exists()

    assert ablate_module().main([*argv, "--resume"]) == 0
    table = pd.read_parquet(sweep / "mix_search.parquet")
    assert (table["status"] == "finished").all() and table["metric"].notna().all()
    assert set(table["kind"]) == {"anchor", "proxy", "validation"} and len(set(table["trial_id"])) == len(table)
    for trial_id, mtime in finished.items():  # ended before Ctrl-C: kept, not run again
        assert trial_id in set(table["trial_id"])
        assert (sweep / "trials" / trial_id / "done.json").stat().st_mtime_ns == mtime
    assert json.loads((sweep / "recommendation.json").read_text())["weights"]
