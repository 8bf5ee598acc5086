"""Matched compute: the baseline arms (dense, MoE, PKM) sized to the PEER cell, in the plan, the refusals and the
leaderboard (peerlab.arms, experiments/ablate.py --baseline ARMS --match)."""

from __future__ import annotations

import pytest
import torch

from peerlab.arms import ARMS, MATCHES, TOLERANCE, match_arm, plan_arms, quantity
from peerlab.config import ConfigError, config_from_dict, load_config, to_dict
from peerlab.model import build_model, count_parameters, parameter_formulas, training_flops_per_token
from peerlab.model.size import active_parameters
from peerlab.tune import NO_PEER, apply_to_config, search_space, setting_label
from tests.conftest import ROOT
from tests.test_tune import ablate_module

CONFIGS = {"guide": "configs/config.yaml", "demo": "configs/demo.yaml"}  # the guide's config; the embedded default's


def arm_config(cfg, setting: dict):
    """The whole config with an arm's setting applied, as the sweep resolves and validates each trial's."""
    return config_from_dict(apply_to_config(to_dict(cfg), setting), origin="test")


@pytest.mark.parametrize("match", MATCHES)
@pytest.mark.parametrize("arm", ARMS)
@pytest.mark.parametrize("which", CONFIGS)
def test_each_arm_matches_the_peer_cell_within_5_percent(which, arm, match):
    cfg = load_config(ROOT / CONFIGS[which])
    sized = match_arm(cfg, arm, match)
    got = arm_config(cfg, sized.setting)  # what the trial runs: validated, its ffn_type the arm's
    m, seq = got.model_config, got.dataset_config.max_seq_length
    assert (m.ffn_type or ("dense" if m.use_peer is False else "peer")) == arm
    assert setting_label(sized.setting) == (NO_PEER if arm == "dense" else arm)
    # the formulas themselves, not the module's own helper
    ours = {
        "flops": training_flops_per_token(m, seq),
        "params": sum(parameter_formulas(m).values()),
        "active": active_parameters(m)[1],
    }[match]
    peer = cfg.model_config
    ref = {
        "flops": training_flops_per_token(peer, seq),
        "params": sum(parameter_formulas(peer).values()),
        "active": active_parameters(peer)[1],
    }[match]
    assert abs(ours / ref - 1) <= TOLERANCE and sized.ratio == pytest.approx(ours / ref)
    assert (sized.flops_per_token, sized.params_total) == (
        training_flops_per_token(m, seq),
        sum(parameter_formulas(m).values()),
    )
    # only the arm's knob moved: the rest of the model is the PEER cell's
    assert m.hidden_size == peer.hidden_size and m.num_hidden_layers == peer.num_hidden_layers
    if arm == "moe":
        assert (m.moe_config.num_experts, m.moe_config.top_k) == (peer.moe_config.num_experts, peer.moe_config.top_k)
    if arm == "pkm":
        assert m.pkm_config.num_experts == m.pkm_config.product_key_dim[0] * m.pkm_config.product_key_dim[1]
    if match == "params":  # the built model (meta device: nothing allocated) holds the same count
        with torch.device("meta"):
            built = sum(count_parameters(build_model(m)).values())
            built_peer = sum(count_parameters(build_model(peer)).values())
        assert built == ours and built_peer == ref
        assert abs(built / built_peer - 1) <= TOLERANCE


def test_the_demo_arms_match_closely_and_the_pkm_takes_peers_key_search():
    cfg = load_config(ROOT / "configs" / "demo.yaml")
    sizes = {a: match_arm(cfg, a, "flops") for a in ARMS}
    assert sizes["dense"].setting == {"use_peer": False, "intermediate_size": sizes["dense"].size}
    assert sizes["moe"].setting == {"ffn_type": "moe", "moe_config.expert_size": sizes["moe"].size}
    # the demo's PKM reads heads x 2k value rows where PEER reads heads x k two-row experts: the same FLOPs
    assert sizes["pkm"].size == 2 * cfg.model_config.peer_config.num_experts_per_tok and sizes["pkm"].ratio == 1
    for s in sizes.values():
        assert abs(s.ratio - 1) < 0.01
    assert quantity(cfg.model_config, "flops", 256) == training_flops_per_token(cfg.model_config, 256)


def test_without_match_the_arms_run_as_written_and_the_old_baseline_is_unchanged():
    cfg = load_config(ROOT / "configs" / "demo.yaml")
    space = search_space(["peer_config.num_experts_per_tok=4,16"], baseline=True)
    assert space.settings()[-1] == {"use_peer": False} == space.settings(0, cfg)[-1]
    assert setting_label(space.settings()[-1]) == NO_PEER
    space = search_space(baseline="dense,moe,pkm")
    assert space.settings(0, cfg) == [{}, {"use_peer": False}, {"ffn_type": "moe"}, {"ffn_type": "pkm"}]
    info = plan_arms(cfg, ["dense"], None)
    assert info["arms"][1]["size"] == cfg.model_config.intermediate_size and info["match"] is None


def test_the_search_space_section_takes_arms_and_match(tmp_path):
    cfg = load_config(ROOT / "configs" / "demo.yaml")
    space = search_space(section={"baseline": ["dense", "moe"], "match": "active"}, origin="x.yaml: search_space")
    assert space.baseline == ["dense", "moe"] and space.match == "active"
    settings = space.settings(0, cfg)
    assert settings == [{}, match_arm(cfg, "dense", "active").setting, match_arm(cfg, "moe", "active").setting]
    assert space.to_dict()["match"] == "active"
    with pytest.raises(ConfigError, match=r"x.yaml: search_space.match: expected one of flops, params, active"):
        search_space(section={"baseline": True, "match": "watts"}, origin="x.yaml: search_space")
    with pytest.raises(ConfigError, match=r"x.yaml: search_space.baseline: unknown arm 'mlp'"):
        search_space(section={"baseline": ["mlp"]}, origin="x.yaml: search_space")


# --------------------------------------------------------------------------------------
# ablate.py: the plan, the dry run and the refusals (no Ray)
# --------------------------------------------------------------------------------------


def dry_run(extra: list[str], tmp_path, monkeypatch):
    import ray

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(ray, "init", no_ray)
    monkeypatch.chdir(ROOT)
    argv = ["--custom-datasets", "configs/datasets.yaml", "--set", f"train_config.output_dir={tmp_path}"]
    return ablate_module().main([*argv, *extra])


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--baseline", "dense,mlp"], "--baseline: unknown arm 'mlp'"),
        (["--baseline", "moe", "--set", "model_config.moe_config.top_k=9"], "model_config.moe_config.top_k"),
        (["--baseline", "--set", "model_config.ffn_type=mlp"], "model_config.ffn_type"),
        (["--match", "flops"], "--match flops: it sizes the --baseline arms"),
        (["--baseline", "--match", "watts"], "--match: expected one of flops, params, active"),
        (
            ["--baseline", "dense,pkm", "--match", "flops", "--set", "model_config.pkm_config.query_dim=256"],
            "the pkm arm cannot come within 5% of the PEER cell's training FLOPs per token",
        ),
        (
            ["--baseline", "moe", "--match", "params", "--set", "model_config.ffn_type=moe"],
            "arms are sized against the base config's PEER cell",
        ),
    ],
)
def test_bad_arms_fail_in_one_line_before_ray(extra, message, tmp_path, capsys, monkeypatch):
    with pytest.raises(SystemExit) as done:
        dry_run(["--dry-run", *extra], tmp_path, monkeypatch)
    out = capsys.readouterr()
    assert done.value.code == 2, out.err
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], out.err
    assert "Ray" not in out.out and not list(tmp_path.iterdir())
    if "cannot come within" in message:  # it names the knob and the nearest ratio
        assert "pkm_config.num_experts_per_tok = 1, gives 1.2" in lines[0]


def test_baseline_alone_is_still_the_dense_arm(tmp_path):
    ablate = ablate_module()
    argv = [
        "--custom-datasets",
        str(ROOT / "configs" / "datasets.yaml"),
        "--set",
        f"train_config.output_dir={tmp_path}",
    ]
    trials, info, _ = ablate.plan(ablate.arguments([*argv, "--baseline"]))
    dense = [t for t in trials if t.setting == NO_PEER]
    assert len(dense) == 3 and all(t.overrides == {"use_peer": False} for t in dense)
    assert {t.trial_id for t in dense} == {f"{m}_no_peer_s42" for m in ("prose_heavy", "code_heavy", "balanced")}
    assert all(t.config["model_config"]["intermediate_size"] == 512 for t in dense)  # the config's own width
    assert info["search_space"]["use_peer"] == [True, False] and info["arms"]["match"] is None


def test_a_dry_run_prints_each_arms_size_and_flops(tmp_path, capsys, monkeypatch):
    assert dry_run(["--dry-run", "--baseline", "dense,moe,pkm", "--match", "flops"], tmp_path, monkeypatch) == 0
    out = capsys.readouterr().out
    cfg = load_config(ROOT / "configs" / "demo.yaml")
    assert "sized to match the training FLOPs per token of the base config's PEER cell (after --set) within 5%" in out
    rows = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ") and len(line.split()) > 5}
    for arm in ARMS:
        s = match_arm(cfg, arm, "flops")
        assert f"{s.knob} = {s.size:,}" in rows[arm] and f"{s.flops_per_token:,}" in rows[arm]
        assert f"{s.params_total:,}" in rows[arm] and f"{s.ratio:.3f}" in rows[arm]
    peer = training_flops_per_token(cfg.model_config, cfg.dataset_config.max_seq_length)
    peers = [line.split() for line in out.splitlines() if line.startswith("  peer ")]
    assert peers[0][1:4] == ["the", "PEER", "cell"] and f"{peer:,}" in peers[0] and peers[0][-1] == "1.000"
    assert [p[1] for p in peers[1:]] == ["num_experts_per_tok=4", "num_experts_per_tok=16"]  # the grid's, beside
    for arm in ("no_peer", "moe", "pkm"):  # one setting per arm, crossed with the three mixes
        assert sum(f"_{arm}_s42 " in line for line in out.splitlines()) == 3
    assert not list(tmp_path.iterdir())


def test_the_trials_sized_arms_are_what_the_plan_says(tmp_path):
    ablate = ablate_module()
    argv = [
        "--custom-datasets",
        str(ROOT / "configs" / "datasets.yaml"),
        "--set",
        f"train_config.output_dir={tmp_path}",
    ]
    trials, info, _ = ablate.plan(
        ablate.arguments([*argv, "--baseline", "moe,pkm", "--match", "params", "--seeds", "2"])
    )
    cfg = load_config(ROOT / "configs" / "demo.yaml")
    moe = [t for t in trials if t.setting == "moe"]
    assert len(moe) == 6  # three mixes x two seeds
    size = match_arm(cfg, "moe", "params").size
    assert all(t.config["model_config"]["moe_config"]["expert_size"] == size for t in moe)
    pkm = next(t for t in trials if t.setting == "pkm").config["model_config"]["pkm_config"]
    assert pkm["product_key_dim"] == match_arm(cfg, "pkm", "params").size
    assert pkm["num_experts"] == pkm["product_key_dim"][0] * pkm["product_key_dim"][1]
    assert [r["arm"] for r in info["arms"]["arms"]][-2:] == ["moe", "pkm"]


# --------------------------------------------------------------------------------------
# The tables and the leaderboard
# --------------------------------------------------------------------------------------


def test_trials_table_and_leaderboard_show_flops_per_token_and_parameters(tmp_path):
    import pandas as pd
    from analysis import baseline_differences
    from analysis.report import write_report
    from peerlab.config import load_mixes
    from peerlab.tables import build_tables
    from peerlab.tune import plan_trials

    from tests.test_analysis import META, MIXES3, SETTINGS_K, make_trials, planted_best, write_sweep

    cfg = load_config(ROOT / "configs" / "demo.yaml")
    mixes = load_mixes(ROOT / "configs" / "datasets.yaml")
    trials = plan_trials(cfg, mixes, search_space(baseline="dense,moe", match="flops"), 1)
    rows = build_tables(trials, tmp_path / "sweep")["trials"].set_index("setting")  # no run folders: unfinished rows
    for setting in ("default", "no_peer", "moe"):
        m = arm_config(cfg, next(t.overrides for t in trials if t.setting == setting)).model_config
        assert rows.loc[setting, "flops_per_token"].iloc[0] == training_flops_per_token(m, 256)
        assert rows.loc[setting, "params_total"].iloc[0] == sum(parameter_formulas(m).values())
    assert rows["ffn_type"].groupby(level=0).first().to_dict() == {"default": "peer", "no_peer": "dense", "moe": "moe"}
    assert not rows.loc["moe", "peer/use_peer"].any()  # an MoE cell runs no PEER, whatever its config's use_peer says

    # each PEER cell against the dense arm of its mix; the MoE arm is ranked on the leaderboard, not counted as PEER
    settings = {"default": {}, "no_peer": {"peer/use_peer": False}, "moe": {"peer/use_peer": False}}
    arms = make_trials(
        MIXES3, settings, seeds=2, truth=lambda mix, w, setting, peer: 1.0 + 0.1 * (setting != "default")
    )
    base = baseline_differences(arms, "eval_bpb/mean", "min")
    assert len(base) == 3 and base["cell"].str.endswith("| default").all()

    table = make_trials(MIXES3, SETTINGS_K, seeds=2, truth=planted_best)
    table["flops_per_token"] = 1_234_567
    text = write_report(write_sweep(tmp_path / "synthetic", table, META), figures=False).read_text()
    board = text.split("## Leaderboard", 1)[1]
    header = next(line for line in board.splitlines() if line.startswith("|") and "rank" in line)
    columns = [c.strip() for c in header.strip("|").split("|")]
    assert columns[:7] == ["rank", "cell", "seeds", "stopped", "failed", "flops_per_token", "params_total"]
    first = next(line for line in board.splitlines() if line.startswith("|") and "num_experts_per_tok" in line)
    assert "1.235e+06" in first and "300000" in first  # the same over seeds: no interval
    saved = pd.read_csv(tmp_path / "synthetic" / "report" / "leaderboard.csv")
    assert (saved["flops_per_token"] == 1_234_567).all()


# --------------------------------------------------------------------------------------
# A real tiny sweep with the arms (Ray)
# --------------------------------------------------------------------------------------


def test_a_tiny_sweep_runs_every_arm_at_matched_flops(ray_cluster, demo_corpus, tmp_path, capsys):
    import pandas as pd

    from tests.test_tune import sweep_files, tiny_sets

    mixes, config = sweep_files(demo_corpus, tmp_path)
    pkm = ["num_experts=256", "product_key_dim=[16, 16]", "num_heads=2", "query_dim=16", "num_experts_per_tok=4"]
    sets = [x for s in pkm for x in ("--set", f"model_config.pkm_config.{s}")]
    argv = ["--custom-datasets", str(mixes), "--config", str(config), *tiny_sets(demo_corpus, tmp_path / "out"), *sets,
            "--mixes", "prose_mix", "--baseline", "dense,moe,pkm", "--match", "flops", "--name", "arms",
            "--max-concurrent", "2", "--metric", "eval_loss/mean", "--no-report"]  # fmt: skip
    assert ablate_module().main(argv) == 0
    assert "baseline arms sized to match the training FLOPs per token" in capsys.readouterr().out
    trials = pd.read_parquet(tmp_path / "out" / "arms" / "trials.parquet").set_index("setting")
    assert sorted(trials.index) == ["default", "moe", "no_peer", "pkm"] and (trials["status"] == "finished").all()
    assert trials["eval_loss/mean"].notna().all()
    ratio = trials["flops_per_token"] / trials.loc["default", "flops_per_token"]
    assert ((ratio - 1).abs() <= TOLERANCE).all(), ratio
    assert (
        trials.loc["no_peer", "params_total"] < trials.loc["default", "params_total"]
    )  # same FLOPs, far fewer weights
