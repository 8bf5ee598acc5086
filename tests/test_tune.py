"""Sweeps: the search space, the trial plan, bad input, and real tiny sweeps on Ray Tune (tables, failures, resume)."""

from __future__ import annotations

import importlib.util
import json
import math
import re
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import numpy as np
import pytest

from peerlab.config import ConfigError, config_from_dict, load_config, load_mixes, to_dict
from peerlab.data.corpus import DOMAINS
from peerlab.tracking import read_metrics
from peerlab.tune import Rungs, first_cut, plan_trials, search_space, setting_label
from tests.conftest import ROOT


def ablate_module():
    spec = importlib.util.spec_from_file_location("ablate", ROOT / "experiments" / "ablate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------------------
# The search space and the plan (no Ray)
# --------------------------------------------------------------------------------------


def test_grid_sample_and_baseline(tmp_path):
    space = search_space(["peer_config.num_experts_per_tok=8,16", "peer_start_layer=1,2"], baseline=True)
    settings = space.settings()
    assert len(settings) == 5 and settings[-1] == {"use_peer": False}
    assert {"peer_config.num_experts_per_tok": 16, "peer_start_layer": 2} in settings
    assert setting_label(settings[-1]) == "no_peer"

    file = tmp_path / "space.yaml"
    file.write_text(
        "search_space:\n  grid:\n    peer_config.batch_norm_query: [true, false]\n"
        "  sample:\n    peer_config.query_dim: [16, 32, 64]\n  num_samples: 2\n"
    )
    space = search_space(["model_config.peer_config.num_heads=2"], path=str(file))
    settings = space.settings(seed=3)
    assert all(s["peer_config.num_heads"] == 2 for s in settings)
    assert {s["peer_config.batch_norm_query"] for s in settings} == {True, False}
    assert all(s["peer_config.query_dim"] in (16, 32, 64) for s in settings)
    assert settings == space.settings(seed=3)  # samples are seeded


@pytest.mark.parametrize(
    "grid, message",
    [
        (["train_config.max_steps=10,20"], "cannot be swept"),  # training keys: only the listed hyperparameters
        (["peer_config.num_experts_per_tok"], "expected KEY=VALUE1,VALUE2"),
        (["peer_config.nope=1,2"], "cannot be swept"),
    ],
)
def test_bad_search_space(grid, message):
    with pytest.raises(ConfigError, match=message):
        search_space(grid)


def test_plan_resolves_every_trial(demo_corpus, tmp_path):
    base = load_config(ROOT / "configs" / "demo.yaml")
    mixes = load_mixes(ROOT / "configs" / "datasets.yaml")
    space = search_space(["peer_config.num_experts=1024,4096", "peer_config.num_experts_per_tok=4,8"], baseline=True)
    trials = plan_trials(base, mixes, space, seeds=2)
    assert len(trials) == 3 * 5 * 2 and len({t.trial_id for t in trials}) == len(trials)
    for trial in trials:
        cfg = config_from_dict(trial.config)
        peer = cfg.model_config.peer_config
        side = math.isqrt(peer.num_experts)
        assert peer.product_key_dim == [side, side]  # set to match the swept num_experts
        assert peer.num_experts in (
            (1024, 4096) if trial.setting != "no_peer" else (base.model_config.peer_config.num_experts,)
        )
        assert cfg.train_config.seed == trial.seed
        assert [d.weight for d in cfg.dataset_config.datasets] == [d.weight for d in mixes[trial.mix].datasets]
        assert [d.name for d in cfg.dataset_config.datasets] == [d.name for d in mixes[trial.mix].datasets]
    assert {t.seed for t in trials} == {42, 43}
    assert sum(t.setting == "no_peer" for t in trials) == 3 * 2
    # Run order: every mix of a setting in turn, settings in turn, then the next seed.
    assert [t.mix for t in trials[:3]] == list(mixes) and len({t.setting for t in trials[:3]}) == 1
    assert [t.seed for t in trials] == [42] * 15 + [43] * 15
    assert len({t.setting for t in trials[:15]}) == 5

    with pytest.raises(ConfigError, match="not a square"):
        plan_trials(base, mixes, search_space(["peer_config.num_experts=1000"]), seeds=1)
    with pytest.raises(ConfigError, match="trial prose_heavy_query_dim=7_s42"):  # odd query_dim fails validation
        plan_trials(base, mixes, search_space(["peer_config.query_dim=7"]), seeds=1)


def test_mixes_of_different_datasets_are_evaluated_on_the_same_ones(demo_corpus, tmp_path):
    """A mix that leaves a dataset out still evaluates on its held-out part (eval_datasets), so every trial's
    eval_bpb/mean is over the same text; a mix was scored on its own datasets only, and a prose-only mix
    'beat' a code and prose mix that was better on prose. The base config's own eval_datasets stay."""
    from peerlab.config import DataMix, DatasetEntry

    prose, code, docs = (DatasetEntry(n, str(demo_corpus / n), format="jsonl", text_field="text") for n in DOMAINS)
    mixes = {"codey": DataMix("codey", "codey", [code, prose]), "prosey": DataMix("prosey", "prosey", [prose])}
    base = to_dict(load_config(ROOT / "configs" / "demo.yaml"))
    base["dataset_config"]["datasets"] = [to_dict(prose)]  # (each trial's are its mix's)
    base["dataset_config"]["eval_datasets"] = [to_dict(docs)]
    trials = plan_trials(config_from_dict(base), mixes, search_space([]), seeds=1)
    evaluated = {}
    for trial in trials:
        d = config_from_dict(trial.config).dataset_config
        evaluated[trial.mix] = (sorted(x.name for x in d.datasets), sorted(x.name for x in d.eval_datasets))
    assert evaluated == {"codey": (["code", "prose"], ["docs"]), "prosey": (["prose"], ["code", "docs"])}
    base["dataset_config"]["eval_datasets"] = [to_dict(prose)]  # also trained on: refused by name
    with pytest.raises(ConfigError, match="eval_datasets.0.name: 'prose' is a training dataset"):
        config_from_dict(base)


def test_a_sweep_saved_before_eval_datasets_is_the_same_sweep(demo_corpus):
    """Its saved trials have no dataset_config.eval_datasets; today's plan of the same mixes has an empty one."""
    plan_key = ablate_module().plan_key
    base = load_config(ROOT / "configs" / "demo.yaml")
    trials = [asdict(t) for t in plan_trials(base, load_mixes(ROOT / "configs" / "datasets.yaml"), search_space([]), 1)]
    assert all(t["config"]["dataset_config"]["eval_datasets"] == [] for t in trials)  # the mixes share datasets
    saved = json.loads(json.dumps(trials))
    for t in saved:
        del t["config"]["dataset_config"]["eval_datasets"]
    assert plan_key(saved) == plan_key(trials)
    saved[0]["config"]["train_config"]["seed"] += 1
    assert plan_key(saved) != plan_key(trials)


def test_asha_first_cut_is_the_metrics_first_report():
    base = load_config(ROOT / "configs" / "demo.yaml", ["train_config.eval_steps=20", "train_config.logging_steps=5"])
    mixes = load_mixes(ROOT / "configs" / "datasets.yaml")
    configs = [t.config for t in plan_trials(base, mixes, search_space(["peer_config.num_experts_per_tok=4,16"]), 1)]
    assert first_cut(configs, "eval_bpb/mean", 120) == 20  # held-out metrics: every eval_steps
    assert first_cut(configs, "loss", 120) == 5  # the training loss: every logging_steps
    configs[1]["train_config"]["eval_steps"] = 40  # every trial must have reported before the first cut
    assert first_cut(configs, "eval_loss/mean", 120) == 40
    assert first_cut(configs, "eval_loss/mean", 30) == 7  # no report before the end: a quarter of the run


def test_rungs_recheck_stops_an_early_arrival_that_later_results_put_below_the_cut():
    rungs = Rungs(grace=10, max_t=121, rf=2)
    assert sorted(rungs.recorded) == [10, 20, 40, 80]  # Ray's milestones for these settings
    assert rungs.report("a", 10, -3.40)  # first at the rung: nothing to lose to (Ray: go on)
    assert rungs.report("b", 10, -3.37)  # better than a: go on
    # a reaches step 20 first, so Ray, which decides once on arrival, lets it go on; b's
    # result at step 10 now puts a in the bottom half there.
    assert not rungs.report("a", 20, -3.05)
    # a should not have passed rung 10, so its step-20 result leaves rung 20: b is first there.
    assert rungs.report("b", 20, -3.07) and "a" not in rungs.recorded[20]
    assert rungs.report("b", 30, -2.90)
    assert not rungs.report("c", 10, -3.45)  # a late arrival below the cut: stopped as Ray stops it


def test_rungs_decide_as_ray_one_trial_at_a_time_and_never_stop_the_best_trial():
    from ray.tune.schedulers import TrialScheduler
    from ray.tune.schedulers.async_hyperband import _Bracket

    class Named:  # what _Bracket reads of a Tune trial
        def __init__(self, trial_id):
            self.trial_id = trial_id

    rng = np.random.default_rng(0)
    for _ in range(50):
        n = int(rng.integers(3, 9))
        curves = {i: [rng.normal() * 0.05 - 1.0 / s + rng.normal() * 0.01 for s in range(1, 13)] for i in range(n)}
        best = int(rng.integers(n))
        curves[best] = [max(curves[i][k] for i in range(n)) + 0.01 for k in range(12)]  # ahead at every step

        # One trial at a time, each to its end or its stop: nothing lands at a rung after a trial's
        # own decision there, so the re-checks change nothing and the rungs decide as Ray does.
        ray_bracket, ours = _Bracket(10, 121, 2, 0), Rungs(10, 121, 2)
        for i in range(n):
            for s in range(1, 13):
                ray_goes = ray_bracket.on_result(Named(i), s * 10, curves[i][s - 1]) == TrialScheduler.CONTINUE
                assert ours.report(i, s * 10, curves[i][s - 1]) == ray_goes
                if not ray_goes:
                    break

        # Trials at once, each with its own start and speed: the best one always runs to the end.
        ours, going = Rungs(10, 121, 2), set(range(n))
        start, pace = rng.uniform(0, 60, size=n), rng.uniform(0.8, 1.2, size=n)
        for _, i, s in sorted((start[i] + s * 10 * pace[i], i, s) for i in range(n) for s in range(1, 13)):
            if i in going and not ours.report(i, s * 10, curves[i][s - 1]):
                going.discard(i)
        assert best in going and len(going) < n


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--mixes", "nope"], "no mix 'nope'"),
        (["--grid", "peer_config.num_experts=1000"], "not a square"),
        (["--grid", "hidden_size=64,128"], "cannot be swept"),
        (["--seeds", "0"], "--seeds must be >= 1"),
        (["--metric", "eval_bpb/cod"], "names an unknown dataset 'cod'"),
        (["--metric", "eval_acc/mean"], "not a metric the runs report"),
        (["--mix-search", "4", "--mix-bounds", "prose=0.6:1,code=0.6:1"], "--mix-bounds: no mix fits them"),
        (["--mix-search", "4", "--mix-prior", "nosuch"], "--mix-prior nosuch: expected uniform, tokens or the name"),
        (["--mix-search", "4", "--metric", "eval_bpb/code*0.5+eval_bpb/math*0.5"], "unknown dataset 'math'"),
        (["--mix-search", "4", "--max-repeats", "0.05"], "--max-repeats 0.05: no mix can meet it"),
        (["--mix-prior", "uniform"], "need --mix-search N"),
        (["--grid", "peer_config.num_experts=16777216"], "GiB"),  # 16.7 M experts per layer cannot fit here
        (["--gpus-per-trial", "0.25"], "--gpus-per-trial 0.25: this machine has no GPU"),
        (["--gpus-per-trial", "1.5"], "--gpus-per-trial 1.5: give a fraction of one GPU (0.25) or whole GPUs"),
        (["--cpus-per-trial", "-1"], "--cpus-per-trial -1: must be > 0"),
        (["--max-concurrent", "0"], "--max-concurrent 0: must be >= 1"),
        (["--scheduler", "asha", "--grace-steps", "-1"], "--grace-steps -1: must be >= 1"),
    ],
)
def test_bad_sweeps_fail_before_ray(extra, message, tmp_path, capsys, monkeypatch):
    # In this process (a subprocess each would spend most of its time importing): ray.init must not be reached.
    import ray

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(ray, "init", no_ray)
    monkeypatch.chdir(ROOT)
    argv = ["--custom-datasets", "configs/datasets.yaml", "--config", "configs/demo.yaml"]
    with pytest.raises(SystemExit) as done:
        ablate_module().main([*argv, "--set", f"train_config.output_dir={tmp_path}", *extra])
    out = capsys.readouterr()
    assert done.value.code == 2, out.err
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], out.err
    assert "Ray" not in out.out and not list(tmp_path.iterdir())  # nothing started, nothing written


def test_a_bad_sweep_from_the_command_line_exits_2_with_one_line(tmp_path):
    out = subprocess.run(
        [sys.executable, "experiments/ablate.py", "--custom-datasets", "configs/datasets.yaml",
         "--config", "configs/demo.yaml", "--set", f"train_config.output_dir={tmp_path}",
         "--mixes", "nope"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "--mixes: no mix 'nope'" in lines[0], out.stderr
    assert "Ray" not in out.stdout and not list(tmp_path.iterdir())


def test_the_cards_command_alone_plans_the_embedded_default_sweep():
    # configs/datasets.yaml names its base config and search space: the card's command needs no other flag,
    # and plans exactly the trials of the longer command line that ran the demo sweep before.
    ablate = ablate_module()
    mixes = str(ROOT / "configs" / "datasets.yaml")
    trials, info, _ = ablate.plan(ablate.arguments(["--custom-datasets", mixes]))
    old = [
        "--config",
        str(ROOT / "configs" / "demo.yaml"),
        "--search-space",
        str(ROOT / "configs" / "search-demo.yaml"),
    ]
    old_trials, _, _ = ablate.plan(ablate.arguments(["--custom-datasets", mixes, *old]))
    assert [asdict(t) for t in trials] == [asdict(t) for t in old_trials]
    assert len(trials) == 6 and {t.setting for t in trials} == {"num_experts_per_tok=4", "num_experts_per_tok=16"}
    assert {t.mix for t in trials} == {"prose_heavy", "code_heavy", "balanced"}
    assert trials[0].config["model_config"]["hidden_size"] == 128  # demo.yaml's model, not config.yaml's 768
    assert info["base_config"] == str(ROOT / "configs" / "demo.yaml") and info["base_config_from"] == mixes
    assert info["search_space_from"] == str(ROOT / "configs" / "search-demo.yaml")  # recorded in sweep.json


def test_readme_main_command_is_the_cards_command():
    first_block = (ROOT / "README.md").read_text().split("```bash\n", 1)[1].split("```", 1)[0].strip()
    assert first_block.startswith("python3 -m venv .venv && ")  # set-up, then the main job
    assert first_block.endswith(" && .venv/bin/python experiments/ablate.py --custom-datasets configs/datasets.yaml")


def test_command_line_overrides_the_mixes_files_base_config_and_search_space(tmp_path, capsys):
    ablate = ablate_module()
    mixes = tmp_path / "mixes.yaml"
    body = (ROOT / "configs" / "datasets.yaml").read_text().split("data_mixes:", 1)[1]
    head = f"base_config: {ROOT / 'configs' / 'demo.yaml'}\nsearch_space:\n  grid:\n    peer_config.num_experts_per_tok: [2, 8]\n"
    mixes.write_text(head + "data_mixes:" + body)
    trials, info, _ = ablate.plan(ablate.arguments(["--custom-datasets", str(mixes)]))
    assert {t.setting for t in trials} == {"num_experts_per_tok=2", "num_experts_per_tok=8"}  # inline section
    assert info["search_space_from"] == f"{mixes} (inline)"
    space = str(ROOT / "configs" / "search-demo.yaml")
    trials, info, _ = ablate.plan(ablate.arguments(["--custom-datasets", str(mixes), "--search-space", space]))
    assert {t.setting for t in trials} == {"num_experts_per_tok=4", "num_experts_per_tok=16"}
    config = str(ROOT / "configs" / "config.yaml")
    trials, info, _ = ablate.plan(ablate.arguments(["--custom-datasets", str(mixes), "--config", config]))
    assert trials[0].config["model_config"]["hidden_size"] == 768 and info["base_config_from"] == "--config"
    mixes.write_text(head.replace("peer_config.num_experts_per_tok", "hidden_size") + "data_mixes:" + body)
    with pytest.raises(SystemExit) as exit_:
        ablate.plan(ablate.arguments(["--custom-datasets", str(mixes)]))
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and f"{mixes}: search_space.grid" in err


# --------------------------------------------------------------------------------------
# Real sweeps on the session's Ray cluster
# --------------------------------------------------------------------------------------


def sweep_files(demo_corpus: Path, tmp_path: Path, broken: bool = False) -> tuple[Path, Path]:
    """A mixes file (two real mixes, plus one whose data breaks at run time) and a tiny config."""
    mix = "      - {{name: {n}, path: '{p}', format: jsonl, weight: {w}, text_field: text}}\n"
    text = "data_mixes:\n"
    for name, weights in (("prose_mix", (0.8, 0.1, 0.1)), ("code_mix", (0.1, 0.8, 0.1))):
        text += f"  {name}:\n    datasets:\n"
        text += "".join(mix.format(n=d, p=demo_corpus / d, w=w) for d, w in zip(DOMAINS, weights))
    if broken:
        # 101 tiny documents, then a record without its text: the checks before Ray read 100, training hits it.
        bad = tmp_path / "bad"
        bad.mkdir()
        rows = [{"text": f"note {i}"} for i in range(101)] + [{"title": "no text here"}]
        (bad / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        text += "  broken_mix:\n    datasets:\n"
        text += mix.format(n="prose", p=demo_corpus / "prose", w=0.5) + mix.format(n="notes", p=bad, w=0.5)
    mixes = tmp_path / "mixes.yaml"
    mixes.write_text(text)
    return mixes, ROOT / "configs" / "demo.yaml"


def tiny_sets(demo_corpus: Path, out: Path, steps: int = 6) -> list[str]:
    sets = [
        "model_config.hidden_size=32",
        "model_config.num_hidden_layers=2",
        "model_config.num_attention_heads=2",
        "model_config.intermediate_size=64",
        "model_config.peer_config.num_experts=256",
        "model_config.peer_config.product_key_dim=[16, 16]",
        "model_config.peer_config.num_heads=2",
        "model_config.peer_config.query_dim=16",
        "model_config.peer_config.log_freq=3",
        f"train_config.max_steps={steps}",
        "train_config.logging_steps=1",
        "train_config.save_steps=3",
        "train_config.eval_steps=3",
        "train_config.per_device_train_batch_size=2",
        "dataset_config.max_seq_length=32",
        f"dataset_config.tokenizer_name={demo_corpus / 'tokenizer'}",
        f"train_config.output_dir={out}",
    ]
    return [x for s in sets for x in ("--set", s)]


def test_tiny_sweep_tables_and_an_isolated_failure(ray_cluster, demo_corpus, tmp_path, capsys, caplog):
    mixes, config = sweep_files(demo_corpus, tmp_path, broken=True)
    ablate = ablate_module()
    argv = ["--custom-datasets", str(mixes), "--config", str(config), *tiny_sets(demo_corpus, tmp_path / "out"),
            "--grid", "peer_config.num_experts_per_tok=2,4", "--name", "tiny", "--max-concurrent", "2",
            "--metric", "eval_loss/mean", "--no-report"]  # fmt: skip
    assert ablate.main(argv) == 0
    printed = capsys.readouterr().out
    assert "Ray dashboard:" in printed and "done, " in printed and "best so far" in printed
    for trial_id in ("prose_mix_num_experts_per_tok=2_s42", "code_mix_num_experts_per_tok=4_s42"):
        for step in (3, 6):  # a line per trial per evaluation, as the results arrive
            assert re.search(rf"{re.escape(trial_id)} step {step}/6: eval_loss/mean \d+\.\d{{4}}", printed), printed
    assert "Reporting training result" not in printed and "TrainingReport" not in printed
    assert "Configuration for experiment" not in printed and "Traceback" not in printed  # Tune's own output ...
    assert not [r for r in caplog.records if r.name.startswith("ray.tune")]  # ... and its log go to tune.log
    assert "Trial task failed for trial broken_mix" in (tmp_path / "out" / "tiny" / ".ray" / "tune.log").read_text()
    sweep = tmp_path / "out" / "tiny"
    trials = pd.read_parquet(sweep / "trials.parquet")
    assert len(trials) == 6 and set(trials["mix"]) == {"prose_mix", "code_mix", "broken_mix"}
    good = trials[trials["mix"] != "broken_mix"]
    broken = trials[trials["mix"] == "broken_mix"]
    assert (good["status"] == "finished").all() and (broken["status"] == "failed").all()
    assert broken["error"].str.contains("text").all() and broken["error"].str.contains("notes").all()
    assert good["error"].isna().all()
    # The sweep retries lost trials (max_failures), not a trial's own error: the broken mix trained once
    assert (trials["attempts"] == 1).all() and "was lost" not in printed
    for trial_id in broken["trial_id"]:
        tries = [json.loads(x) for x in (sweep / "trials" / trial_id / "attempts.jsonl").read_text().splitlines()]
        assert [("node_id" in t, t.get("retried")) for t in tries] == [(True, None), (False, False)], tries
    assert (good["steps"] == 6).all() and (good["tokens"] == 6 * 2 * 33).all()
    assert good["final_loss"].notna().all() and good["eval_loss/mean"].notna().all()
    assert set(good["peer/num_experts_per_tok"]) == {2, 4}
    assert good["weight/code"].round(6).isin([0.1, 0.8]).all()
    assert (good["params_active"] < good["params_total"]).all() and (good["flops"] > 0).all()
    curves = pd.read_parquet(sweep / "curves.parquet")
    assert set(curves["trial_id"]) == set(good["trial_id"]) and len(curves) >= 4 * 6
    usage = pd.read_parquet(sweep / "usage.parquet")
    assert set(usage["trial_id"]) == set(good["trial_id"]) and set(usage["layer"]) == {1}
    row = usage.iloc[0]
    assert list(row["grid_shape"]) == [16, 16] and abs(sum(row["load_grid"]) / 256 - 1) < 1e-6
    by_source = pd.read_parquet(sweep / "usage_by_source.parquet")  # a row per trial, snapshot, layer and source
    src = by_source[by_source["kind"] == "source"]
    assert set(src["trial_id"]) == set(good["trial_id"]) and set(src["layer"]) == {1}
    per_snapshot = src.groupby(["trial_id", "step"])
    assert per_snapshot["source"].nunique().eq(3).all() and (per_snapshot["mass_share"].sum() - 1).abs().lt(1e-6).all()
    assert src["nmi"].dropna().between(0, 1).all() and (by_source["kind"] == "pair").any()  # NaN: one source only
    evals = pd.read_parquet(sweep / "evals.parquet")  # the end-of-run lm-eval tasks of every finished trial
    assert set(evals["trial_id"]) == set(good["trial_id"]) and evals["value"].notna().all()
    for trial_id in trials["trial_id"]:
        assert (sweep / "trials" / trial_id / "resolved_config.yaml").is_file()
    plan = json.loads((sweep / "sweep.json").read_text())
    assert plan["metric"] == "eval_loss/mean" and len(plan["trials"]) == 6

    # The same command again continues the sweep: finished trials stay as they are, failed ones run again.
    done = {p: p.stat().st_mtime_ns for p in sweep.glob("trials/*/done.json")}
    assert ablate.main(argv) == 0 and "holds this sweep" in capsys.readouterr().out
    assert len(done) == 4 and all(p.stat().st_mtime_ns == mtime for p, mtime in done.items())
    # Another sweep under the same name is refused, and nothing is touched.
    with pytest.raises(SystemExit) as exit_:
        ablate.main([*argv, "--seeds", "2"])
    assert exit_.value.code == 2 and "another sweep" in capsys.readouterr().err
    assert len(json.loads((sweep / "sweep.json").read_text())["trials"]) == 6


def test_a_sweep_says_when_its_trials_do_not_run_on_the_configs_workers(tmp_path, capsys, monkeypatch):
    """Trials run on --workers-per-trial (local mode by default); a config that asks for other workers hears so
    in the plan, and its trials run as the flag says; a config at the default hears nothing."""
    import ray

    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray was started"))
    monkeypatch.chdir(ROOT)
    argv = ["--custom-datasets", "configs/datasets.yaml", "--set", f"train_config.output_dir={tmp_path}", "--dry-run"]
    assert ablate_module().main([*argv, "--set", "train_config.num_workers=2"]) == 0
    out = capsys.readouterr().out
    assert "not on the config's train_config.num_workers = 2; pass --workers-per-trial 2 to keep it" in out, out
    assert ablate_module().main([*argv, "--set", "train_config.num_workers=2", "--workers-per-trial", "2"]) == 0
    assert ablate_module().main(argv) == 0
    assert "train_config.num_workers" not in capsys.readouterr().out


def test_resume_runs_only_the_unfinished_trials(ray_cluster, demo_corpus, tmp_path, capsys):
    mixes, config = sweep_files(demo_corpus, tmp_path)
    sets = tiny_sets(demo_corpus, tmp_path / "out", steps=12)
    argv = ["--custom-datasets", str(mixes), "--config", str(config), *sets,
            "--name", "resumed", "--max-concurrent", "1", "--metric", "eval_loss/mean", "--no-report"]  # fmt: skip
    address = ray_cluster.get_runtime_context().gcs_address
    sweep = tmp_path / "out" / "resumed"
    proc = subprocess.Popen(
        [sys.executable, "experiments/ablate.py", *argv, "--address", address],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.time() + 300
    while time.time() < deadline and not list(sweep.glob("trials/*/done.json")):
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)  # Ctrl-C: Tune ends the sweep; the running trial is cut short
    assert proc.wait(timeout=180) != 0
    finished = {p.parent.name: p.stat().st_mtime_ns for p in sweep.glob("trials/*/done.json")}
    assert len(finished) == 1  # of 2: the other was cut short

    assert ablate_module().main([*argv, "--resume"]) == 0
    trials = pd.read_parquet(sweep / "trials.parquet")
    assert (trials["status"] == "finished").all() and (trials["steps"] == 12).all()
    for trial_id, mtime in finished.items():  # not run again
        assert (sweep / "trials" / trial_id / "done.json").stat().st_mtime_ns == mtime
    curves = pd.read_parquet(sweep / "curves.parquet")
    steps = curves.dropna(subset=["loss"]).groupby("trial_id")["step"].agg(list)
    assert all(s == list(range(1, 13)) for s in steps)  # resumed runs continue to the end, no step missing

    # A trial stopped after its final checkpoint, before its done.json: resumed, it has no step left to
    # train, and still hands Tune (searchers, schedulers, the console) the metric its last step logged.
    trial_id = next(iter(finished))
    logged = [r for r in read_metrics(sweep / "trials" / trial_id) if "loss" in r][-1]
    (sweep / "trials" / trial_id / "done.json").unlink()
    capsys.readouterr()
    assert ablate_module().main([*argv, "--resume"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if f"{trial_id} done:" in x)
    assert f"eval_loss/mean {logged['eval_loss/mean']:.4f}" in line, line
    assert (sweep / "trials" / trial_id / "done.json").is_file()
    assert [r["step"] for r in read_metrics(sweep / "trials" / trial_id) if "loss" in r] == list(range(1, 13))


def test_asha_stops_some_trials(ray_cluster, demo_corpus, tmp_path):
    # The scheduler's real path: Tune results into RecordingASHA, peerlab.tune.Rungs deciding.
    mixes, config = sweep_files(demo_corpus, tmp_path)
    argv = ["--custom-datasets", str(mixes), "--config", str(config), *tiny_sets(demo_corpus, tmp_path, steps=12),
            "--grid", "peer_config.num_experts_per_tok=1,2,4,8", "--name", "asha", "--scheduler", "asha",
            "--metric", "eval_loss/mean", "--grace-steps", "3", "--max-concurrent", "2", "--no-report"]  # fmt: skip
    assert ablate_module().main(argv) == 0
    trials = pd.read_parquet(tmp_path / "asha" / "trials.parquet")
    assert (trials["status"] == "stopped").any() and (trials["status"] == "finished").any()
    for row in trials.itertuples():
        marker = tmp_path / "asha" / "trials" / row.trial_id / "stopped.json"
        if row.status == "stopped":  # stopped at a report of the metric, before its last step
            stop = json.loads(marker.read_text())
            assert stop["step"] in (3, 6, 9) and row.steps == stop["step"] and stop["eval_loss/mean"] > 0
        else:
            assert row.status == "finished" and row.steps == 12 and not marker.exists()


# --------------------------------------------------------------------------------------
# Ranges and Optuna
# --------------------------------------------------------------------------------------


def test_ranges_parse_draw_inside_and_are_refused_in_a_grid():
    from peerlab.tune import draw, parse_range

    space = search_space(
        sample=["peer_config.num_experts_per_tok=int:4:32", "train_config.learning_rate=loguniform:1e-4:3e-3"],
        num_samples=40,
    )
    settings = space.settings(seed=0)
    ks = [s["peer_config.num_experts_per_tok"] for s in settings]
    lrs = [s["train_config.learning_rate"] for s in settings]
    assert all(isinstance(k, int) and 4 <= k <= 32 for k in ks) and len(set(ks)) > 5
    assert all(1e-4 <= lr <= 3e-3 for lr in lrs)
    assert np.median(np.log10(lrs)) == pytest.approx(np.log10(np.sqrt(1e-4 * 3e-3)), abs=0.35)  # log-uniform
    assert parse_range("uniform:0:0.1") == ("uniform", 0.0, 0.1) and parse_range("4,8") is None
    rng = np.random.default_rng(0)
    assert {draw("int:1:2", rng) for _ in range(50)} == {1, 2}  # both ends included
    with pytest.raises(ConfigError, match="a range is sampled, not a grid"):
        search_space(grid=["peer_config.num_experts_per_tok=int:4:32"])
    with pytest.raises(ConfigError, match="LOW < HIGH"):
        search_space(sample=["peer_config.num_experts_per_tok=int:8:4"], num_samples=2)


def test_optuna_search_runs_sampled_peer_and_training_settings(ray_cluster, demo_corpus, tmp_path, capsys):
    """--search optuna: Ray Tune's OptunaSearch picks each trial's k and learning rate inside their ranges, and
    the trial's resolved config carries them."""
    import yaml

    mixes, config = sweep_files(demo_corpus, tmp_path)
    argv = ["--custom-datasets", str(mixes), "--config", str(config), *tiny_sets(demo_corpus, tmp_path / "out", steps=3),
            "--set", "eval_config.evals=[]", "--search", "optuna", "--num-samples", "2", "--mixes", "prose_mix",
            "--sample", "peer_config.num_experts_per_tok=int:2:6", "--sample", "train_config.learning_rate=loguniform:1e-4:3e-3",
            "--metric", "eval_bpb/code*0.5+eval_bpb/prose*0.5", "--name", "opt", "--no-report"]  # fmt: skip
    assert ablate_module().main(argv) == 0
    table = pd.read_parquet(tmp_path / "out" / "opt" / "trials.parquet")
    assert len(table) == 2 and (table["status"] == "finished").all()
    assert "eval_bpb/code*0.5+eval_bpb/prose*0.5" in table
    for trial_id in table["trial_id"]:
        resolved = yaml.safe_load((tmp_path / "out" / "opt" / "trials" / trial_id / "resolved_config.yaml").read_text())
        k = resolved["model_config"]["peer_config"]["num_experts_per_tok"]
        lr = resolved["train_config"]["learning_rate"]
        assert 2 <= k <= 6 and 1e-4 <= lr <= 3e-3 and f"num_experts_per_tok={k}" in trial_id
    assert "Optuna search (TPE)" in capsys.readouterr().out


def test_trials_sharing_a_gpu_are_sized_to_their_share(monkeypatch, capsys):
    """--gpus-per-trial 0.25 on a (described) 80 GiB card: 4 at once, the plan says so, and a trial bigger than its
    20 GiB share is refused in one line. The cap itself is applied on a GPU (tests/test_gpu.py)."""
    monkeypatch.chdir(ROOT)
    ablate = ablate_module()
    argv = ["--custom-datasets", "configs/datasets.yaml", "--config", "configs/demo.yaml", "--gpus-per-trial", "0.25"]
    args = ablate.arguments(argv)
    trials, _, _ = ablate.plan(args)
    gib = 2**30
    res = ablate.resources(args, trials * 8, cpus=16, gpus=1)
    assert res.gpus_per_trial == 0.25 and res.max_concurrent == 4
    need = ablate.check_fits(trials, res, memory_bytes=64 * gib, gpu_bytes=80 * gib)
    assert 0 < need < 20 * gib
    line = ablate.gpu_sharing(res, need, 80 * gib)
    assert line.startswith("GPU sharing: 4 trials per GPU, each capped at 20.0 GiB of its 80.0 GiB")
    assert f"by that count {int(80 * gib // need)} would fit" in line
    assert ablate.gpu_sharing(ablate.resources(ablate.arguments(argv[:4]), trials, 16, 1), need, 80 * gib) is None
    small_card = need * 3  # the trial needs a third of it: a quarter is too little
    with pytest.raises(ablate.UsageError):
        ablate.check_fits(trials, res, memory_bytes=64 * gib, gpu_bytes=small_card)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(r"--gpus-per-trial 0.25: a trial's memory cap is .* a larger", err[0]), err
