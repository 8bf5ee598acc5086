"""Training: exact resume, checkpoints, schedules, accumulation, precision paths, Ray Train runs, faults."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from peerlab.config import load_config, to_dict
from peerlab.data.corpus import DOMAINS
from peerlab.tracking import read_metrics, wandb_run_id
from peerlab.train import checkpoint as ckpt
from peerlab.train.optim import build_optimizer, build_scheduler
from peerlab.train.worker import TrainingError, train_loop
from tests.conftest import ROOT


def tiny(demo_corpus: Path, *extra: str, steps: int = 6):
    """The demo config, shrunk: a model of a few hundred thousand parameters on the demo corpus."""
    overrides = [
        "model_config.hidden_size=64",
        "model_config.num_hidden_layers=2",
        "model_config.peer_start_layer=1",
        "model_config.num_attention_heads=2",
        "model_config.intermediate_size=128",
        "model_config.peer_config.num_experts=1024",
        "model_config.peer_config.product_key_dim=[32, 32]",
        "model_config.peer_config.num_heads=2",
        "model_config.peer_config.query_dim=32",
        f"train_config.max_steps={steps}",
        "train_config.logging_steps=1",
        "train_config.save_steps=3",
        "train_config.eval_steps=3",
        "train_config.per_device_train_batch_size=2",
        "dataset_config.max_seq_length=64",
        "train_config.learning_rate=3e-3",
        f"dataset_config.tokenizer_name={demo_corpus / 'tokenizer'}",
        *[f"dataset_config.datasets.{i}.path={demo_corpus / d}" for i, d in enumerate(DOMAINS)],
        "eval_config.evals=[]",  # no lm-eval in these runs; tests/test_eval.py runs it in training
        "train_config.save_total_limit=3",  # the demo keeps 1; these tests read the step-3 checkpoint too
        *extra,
    ]
    return load_config(ROOT / "configs" / "demo.yaml", overrides)


def lm_eval_settings(demo_corpus: Path) -> list[str]:
    """Two offline lm-eval tasks on a few documents: the end-of-run evaluation, kept short."""
    return [
        "eval_config.evals=[peerlab_bpb_prose, peerlab_heldout_mc]",
        f"eval_config.evals_registry_path={ROOT / 'evals' / 'registry'}",
        f"eval_config.eval_data_dir={demo_corpus / 'evals'}",
        "eval_config.lm_eval_limit=3",
    ]


def run(cfg, run_dir: Path, **options) -> dict:
    return train_loop({"config": to_dict(cfg), "run_dir": str(run_dir), "data_engine": "local", **options})


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir) if "loss" in r]


def test_resume_continues_bit_for_bit(demo_corpus, tmp_path):
    """A resumed run's losses equal an uninterrupted run's, and so do its random states.

    Training draws no global randomness today, so the losses alone cannot show whether the
    Python, NumPy and torch generators were restored: the next checkpoint's states can.
    """
    import random

    import numpy as np

    cfg = tiny(demo_corpus, "train_config.gradient_accumulation_steps=2")
    run(cfg, tmp_path / "straight")
    straight = losses(tmp_path / "straight")
    assert len(straight) == 6 and straight[-1] < straight[0]
    middle = tmp_path / "straight" / "checkpoints" / "step-000003"
    resumed_cfg = tiny(
        demo_corpus, "train_config.gradient_accumulation_steps=2", f"train_config.resume_from_checkpoint={middle}"
    )
    random.seed(1), np.random.seed(1), torch.manual_seed(1)  # as a fresh process would: other states than the run's
    run(resumed_cfg, tmp_path / "resumed")
    assert losses(tmp_path / "resumed") == straight[3:]  # exactly equal floats
    want = ckpt.load(tmp_path / "straight" / "checkpoints" / "step-000006")
    got = ckpt.load(tmp_path / "resumed" / "checkpoints" / "step-000006")
    assert got.rng_plain == want.rng_plain  # Python's and NumPy's states
    assert got.rng_tensors.keys() == want.rng_tensors.keys()
    assert all(torch.equal(got.rng_tensors[k], want.rng_tensors[k]) for k in want.rng_tensors)  # torch's


def test_a_resume_trains_on_with_the_new_configs_rate_decay_and_schedule(demo_corpus, tmp_path):
    """Resumed with another learning rate, weight decay, schedule and max_steps, a run follows the new
    config from its first step on (the checkpoint's optimizer state brought back the old values, and its
    first step took the old schedule's rate): each step's lr is the new linear schedule's, in closed form."""
    run(tiny(demo_corpus, steps=4), tmp_path / "old")
    changed = [
        "train_config.learning_rate=1e-2",
        "train_config.weight_decay=0.2",
        "train_config.lr_scheduler_type=linear",
        "train_config.warmup_ratio=0",
        f"train_config.resume_from_checkpoint={tmp_path / 'old' / 'checkpoints' / 'step-000004'}",
    ]
    run(tiny(demo_corpus, *changed, steps=8), tmp_path / "new")
    lrs = {r["step"]: r["lr"] for r in read_metrics(tmp_path / "new") if "lr" in r}
    assert sorted(lrs) == [5, 6, 7, 8]
    for step, lr in lrs.items():  # step s trains at 1e-2 x (8 - (s - 1)) / 8, linear decay without warm-up
        assert lr == pytest.approx(1e-2 * (8 - (step - 1)) / 8, rel=1e-12), step
    groups = ckpt.load(tmp_path / "new" / "checkpoints" / "step-000008").optimizer["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.2, 0.0] and {g["initial_lr"] for g in groups} == {1e-2}


def test_rerunning_a_run_name_continues_it(demo_corpus, tmp_path):
    first = run(tiny(demo_corpus, steps=3), tmp_path / "r")
    again = run(tiny(demo_corpus, steps=3), tmp_path / "r")  # nothing left to do: it resumes at step 3 of 3
    assert [r["step"] for r in read_metrics(tmp_path / "r") if "loss" in r] == [1, 2, 3]
    assert again == first == read_metrics(tmp_path / "r")[-1]  # and hands back what its last step logged
    with open(tmp_path / "r" / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "lo')  # a line cut short by a crash
    assert run(tiny(demo_corpus, steps=3), tmp_path / "r") == first
    past = tiny(demo_corpus, f"train_config.resume_from_checkpoint={tmp_path / 'r'}", steps=2)
    with pytest.raises(TrainingError, match=r"step-000003 is at step 3, past this run's 2 steps: raise max_steps"):
        run(past, tmp_path / "shorter")


def test_a_run_stopped_after_its_final_checkpoint_runs_its_final_lm_eval_once(demo_corpus, tmp_path):
    """Stopped between its final checkpoint and its end-of-run lm-eval set (a Ctrl-C, a lost node), a run
    started again has no step to train: it runs that evaluation then, and only while it is missing."""
    from peerlab.tracking import read_evals

    cfg = tiny(demo_corpus, *lm_eval_settings(demo_corpus), steps=3)
    last = run(cfg, tmp_path / "e")
    rows = read_evals(tmp_path / "e")
    assert rows and {r["step"] for r in rows} == {3}
    (tmp_path / "e" / "evals.jsonl").unlink()  # as if stopped before the evaluation
    assert run(cfg, tmp_path / "e") == last
    again = read_evals(tmp_path / "e")
    assert [(r["task"], r["metric"], r["step"]) for r in again] == [(r["task"], r["metric"], r["step"]) for r in rows]
    assert [r["value"] for r in again] == pytest.approx([r["value"] for r in rows])  # the same model evaluated
    run(cfg, tmp_path / "e")  # evaluated already: not again
    assert len(read_evals(tmp_path / "e")) == len(rows)


def test_outputs_of_a_run(demo_corpus, tmp_path):
    last = run(tiny(demo_corpus), tmp_path / "o")
    records = read_metrics(tmp_path / "o")
    for key in ("step", "loss", "lr", "grad_norm", "tokens_per_s", *[f"tokens_seen/{d}" for d in DOMAINS]):
        assert key in records[0], key
    assert any("eval_loss/prose" in r for r in records)
    shares = [last[f"tokens_seen/{d}"] for d in DOMAINS]
    assert sum(shares) == 6 * 2 * 65  # every block counted once (blocks of max_seq_length + 1)
    folders = sorted(p.name for p in (tmp_path / "o" / "checkpoints").iterdir())
    assert folders == ["step-000003", "step-000006"]
    files = {p.name for p in (tmp_path / "o" / "checkpoints" / "step-000006").iterdir()}
    assert {"model.safetensors", "optimizer.pt", "scheduler.json", "data.json", "rng.json", "trainer.json"} <= files


def test_metrics_count_skipped_records_and_passes(demo_corpus, tmp_path):
    """skip_bad_records' count and each dataset's passes reach metrics.jsonl (they were only in data.json)."""
    rows = [json.loads(x) for x in (demo_corpus / "prose" / "train.jsonl").read_text().splitlines()[:40]]
    bad = tmp_path / "prose.jsonl"
    bad.write_text("".join(json.dumps(r if i % 4 else {"body": r["text"]}) + "\n" for i, r in enumerate(rows)))
    cfg = tiny(demo_corpus, f"dataset_config.datasets.0.path={bad}", "dataset_config.datasets.0.skip_bad_records=true")
    run(cfg, tmp_path / "s")
    last = read_metrics(tmp_path / "s")[-1]
    state = json.loads((tmp_path / "s" / "checkpoints" / "step-000006" / "data.json").read_text())["ranks"][0]
    for i, name in enumerate(DOMAINS):
        assert last[f"passes/{name}"] == state["sources"][i]["passes"]
    assert last["skipped/prose"] == state["sources"][0]["skipped"] > 0  # every fourth record has no text field
    assert "skipped/code" not in last


def test_evaluated_only_datasets_are_measured_and_never_trained_on(demo_corpus, tmp_path):
    """dataset_config.eval_datasets: held-out loss and bits per byte on a dataset the run does not train on,
    in the means over datasets too; no tokens of it are trained on."""
    cfg = tiny(demo_corpus, "train_config.eval_steps=6")
    d = cfg.dataset_config
    cfg = replace(cfg, dataset_config=replace(d, datasets=d.datasets[:2], eval_datasets=d.datasets[2:]))
    run(cfg, tmp_path / "e")
    last = read_metrics(tmp_path / "e")[-1]
    trained, evaluated = [x.name for x in d.datasets[:2]], d.datasets[2].name
    assert f"tokens_seen/{evaluated}" not in last and all(f"tokens_seen/{n}" in last for n in trained)
    values = [last[f"eval_bpb/{n}"] for n in [*trained, evaluated]]
    assert last["eval_bpb/mean"] == pytest.approx(sum(values) / 3)


def test_checkpoints_never_load_wrong(demo_corpus, tmp_path):
    run(tiny(demo_corpus), tmp_path / "c")
    folder = tmp_path / "c" / "checkpoints" / "step-000006"
    ckpt.load(folder)  # intact: loads
    (tmp_path / "c" / "checkpoints" / "step-000009.tmp").mkdir()  # a save that crashed midway
    assert ckpt.latest(tmp_path / "c" / "checkpoints") == folder
    damaged = folder / "optimizer.pt"
    damaged.write_bytes(damaged.read_bytes()[:-10])  # a file cut short
    with pytest.raises(ckpt.CheckpointError, match="optimizer.pt is missing or does not match"):
        ckpt.load(folder)
    assert ckpt.latest(tmp_path / "c" / "checkpoints") == tmp_path / "c" / "checkpoints" / "step-000003"


def test_non_finite_loss_stops_with_step_and_last_checkpoint(demo_corpus, tmp_path):
    cfg = tiny(demo_corpus, "train_config.learning_rate=1e30", "train_config.max_grad_norm=0", steps=8)
    with pytest.raises(TrainingError, match=r"the loss is nan at step \d+.*last good checkpoint"):
        run(cfg, tmp_path / "nan")


def test_a_step_the_fp16_scaler_skips_leaves_the_schedule_where_it_was(demo_corpus, tmp_path, monkeypatch):
    """Infinite gradients make fp16's GradScaler skip the optimizer step; the warm-up waits for it too (as in
    Hugging Face's Trainer), so the schedule counts the steps that changed the weights. The training loop runs
    twice on the same data: as it is, and with one gradient made infinite at step 2."""
    import peerlab.train.distributed as distributed

    cfg = tiny(demo_corpus, "train_config.fp16=true", "train_config.warmup_ratio=0.5", steps=6)
    run(cfg, tmp_path / "plain")
    plain = [r["lr"] for r in read_metrics(tmp_path / "plain") if "lr" in r]
    assert plain[0] < plain[1] < plain[2] < plain[3]  # warming up, and no step skipped by itself

    exchange, built, models, calls = distributed.exchange_rows, distributed.DataParallel.__init__, [], []

    def keep_model(self, model, *args, **kwargs):
        built(self, model, *args, **kwargs)
        models.append(model)

    def infinite_at_step_2(tables, world):  # after the backward pass of each step, before the scaler's unscale
        exchange(tables, world)
        calls.append(1)
        if len(calls) == 2:
            grad = next(
                p.grad for p in models[-1].parameters() if p.grad is not None and p.grad.layout == torch.strided
            )
            grad.view(-1)[0] = float("inf")

    monkeypatch.setattr(distributed.DataParallel, "__init__", keep_model)
    monkeypatch.setattr(distributed, "exchange_rows", infinite_at_step_2)
    run(cfg, tmp_path / "skipped")
    skipped = [r["lr"] for r in read_metrics(tmp_path / "skipped") if "lr" in r]
    assert skipped == [*plain[:2], *plain[1:5]]  # step 3 takes step 2's rate: the skipped step did not count


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant", "constant_with_warmup"])
def test_scheduler_shapes(kind, demo_corpus):
    cfg = tiny(demo_corpus, f"train_config.lr_scheduler_type={kind}", "train_config.warmup_ratio=0.2", steps=50)
    t = cfg.train_config
    model = torch.nn.Linear(2, 2)
    opt = build_optimizer(model, t)
    sched = build_scheduler(opt, t, 50)
    got = []
    for _ in range(50):
        got.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    warm, peak = 10, t.learning_rate
    for step, lr in enumerate(got):
        if kind == "constant":
            want = peak
        elif step < warm:
            want = peak * step / warm
        elif kind == "linear":
            want = peak * (50 - step) / (50 - warm)
        elif kind == "cosine":
            want = peak * 0.5 * (1 + math.cos(math.pi * (step - warm) / (50 - warm)))
        else:
            want = peak
        assert lr == pytest.approx(want, rel=1e-9, abs=1e-15), (kind, step)


def test_weight_decay_skips_one_dimensional_parameters(demo_corpus):
    from peerlab.model import build_model

    cfg = tiny(demo_corpus)
    model = build_model(cfg.model_config)
    decay, no_decay = build_optimizer(model, cfg.train_config).param_groups
    assert decay["weight_decay"] == cfg.train_config.weight_decay and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    assert any(p is model.layers[1].mlp.down for p in decay["params"])


def test_gradient_accumulation_equals_one_big_batch(demo_corpus, tmp_path):
    """4 micro-batches of 2 give the gradient of the mean loss over all 8 sequences.

    After AdamW's first step its moments are exactly (1 - b1) g and (1 - b2) g^2 of the gradient g
    it stepped with (no clipping here); g is computed independently, in one forward and backward of
    the same initial model on the same 8 blocks. (A step's weights would hardly show a wrong scale of
    g: Adam's update is nearly scale-free. BatchNorm's batch statistics differ between 4 x 2 and 8: off.)
    """
    from peerlab.data.mixture import DataMixture, DataOptions
    from peerlab.model import build_model

    cfg = tiny(
        demo_corpus,
        "model_config.peer_config.batch_norm_query=false",
        "train_config.per_device_train_batch_size=2",
        "train_config.gradient_accumulation_steps=4",
        "train_config.save_steps=1",
        "train_config.max_grad_norm=0",
        steps=1,
    )
    run(cfg, tmp_path / "acc")
    state = ckpt.load(tmp_path / "acc" / "checkpoints" / "step-000001").optimizer
    b1, b2 = state["param_groups"][0]["betas"]

    t, d = cfg.train_config, cfg.dataset_config
    torch.manual_seed(t.seed)  # the worker's initial weights
    model = build_model(cfg.model_config).train()
    opts = DataOptions(
        d.tokenizer_name, d.max_seq_length, seed=t.seed, heldout_fraction=d.heldout_fraction, engine="local"
    )
    with DataMixture(d.datasets, opts) as data:  # the blocks the run read, in its order
        ids = torch.cat([data.next_batch(2)[0] for _ in range(4)])  # (8, seq + 1)
    model(ids[:, :-1], labels=ids[:, 1:]).backward()  # the mean over all 8 sequences' tokens
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert set(state["state"]) == set(grads)
    for name, g in grads.items():
        scale = g.abs().max().item()
        torch.testing.assert_close(
            state["state"][name]["exp_avg"], (1 - b1) * g, rtol=1e-4, atol=1e-5 * scale, msg=name
        )
        torch.testing.assert_close(
            state["state"][name]["exp_avg_sq"], (1 - b2) * g * g, rtol=1e-4, atol=1e-5 * scale**2, msg=name
        )


@pytest.mark.parametrize("setting", ["train_config.bf16=true", "train_config.fp16=true", "model_config.use_peer=false"])
def test_precision_paths_and_dense_baseline_train(demo_corpus, tmp_path, setting):
    run(tiny(demo_corpus, setting, steps=3), tmp_path / "p")
    got = losses(tmp_path / "p")
    assert len(got) == 3 and all(math.isfinite(x) for x in got)


# Two of `tiny`'s linear layers made wide enough for Float8 to pay (torchao's tensorwise rule keeps a layer
# out when in_features <= 4096 and out_features <= 1024): layer 0's dense fc_in (2048 x 64), and layer 1's
# PEER router (2 heads x query_dim 1024 = 2048 x 64), which stays out because it picks the experts.
FLOAT8_WIDE = ["model_config.intermediate_size=2048", "model_config.peer_config.query_dim=1024"]


def test_float8_plan_of_the_reference_config():
    """Which layers of the guide's model Float8 converts (on the meta device: no memory)."""
    from torch import nn

    from peerlab.model import build_model
    from peerlab.train.precision import float8_plan

    cfg = load_config(ROOT / "configs" / "config.yaml").model_config
    with torch.device("meta"):
        model = build_model(cfg)
    plan = float8_plan(model)
    # At hidden 768: q_down 1536x768, q_up 2304x1536, kv_up 3072x512 and the dense layers' fc_in 3072x768 have
    # out_features > 1024 and convert; kv_down 576x768, o_proj 768x1536 and fc_out 768x3072 are too small.
    kinds = {i: ["attn.q_down", "attn.q_up", "attn.kv_up"] + (["mlp.fc_in"] if i < 2 else []) for i in range(12)}
    assert plan.converted == [f"layers.{i}.{kind}" for i in range(12) for kind in kinds[i]]
    for i in range(12):
        for kind in ("attn.kv_down", "attn.o_proj") + (("mlp.fc_out",) if i < 2 else ()):
            assert "too small" in plan.skipped[f"layers.{i}.{kind}"]
    for i in range(2, 12):  # each PEER router is as large as q_down (2048x768): out because it routes
        assert model.layers[i].mlp.query.weight.shape == (2048, 768)
        assert "router" in plan.skipped[f"layers.{i}.mlp.query"]
    assert plan.skipped["lm_head"] == "LM head"
    linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert sorted(plan.converted + list(plan.skipped)) == sorted(linear)


def test_float8_converts_its_plan_and_bf16_runs_the_rest(demo_corpus):
    """The guide's defaults (float8 true, fp16 and bf16 false): fp32 where Float8 is off, bf16 autocast where on."""
    from torch import nn
    from torchao.float8.float8_linear import Float8Linear

    from peerlab.model import build_model
    from peerlab.train.precision import apply_float8, autocast_dtype

    cfg = tiny(demo_corpus, *FLOAT8_WIDE)
    t, cpu = cfg.train_config, torch.device("cpu")
    assert (t.float8, t.fp16, t.bf16) == (True, False, False)
    off = apply_float8(build_model(cfg.model_config), t, cpu)  # no GPU: off, and nothing else changes
    assert not off.on and "no CUDA GPU" in off.off and off.converted == []
    assert autocast_dtype(t, off) is None
    model = build_model(cfg.model_config)
    plan = apply_float8(model, t, cpu, force=True)  # emulated on CPU
    assert plan.on and plan.converted == ["layers.0.mlp.fc_in"]
    assert "router" in plan.skipped["layers.1.mlp.query"] and plan.skipped["lm_head"] == "LM head"
    kinds = {n: type(m) for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert kinds == {n: Float8Linear if n in plan.converted else nn.Linear for n in kinds}
    assert autocast_dtype(t, plan) == "bf16"
    assert autocast_dtype(replace(t, fp16=True), plan) == "fp16"  # a config that sets fp16 keeps it


def test_float8_run_on_cpu_lists_its_layers_and_trains(demo_corpus, tmp_path):
    """torchao's Float8 training, emulated on CPU (forced: it is off without a capable GPU)."""
    run(tiny(demo_corpus, *FLOAT8_WIDE, steps=2), tmp_path / "f8", force_float8=True)
    info = json.loads((tmp_path / "f8" / "run_info.json").read_text())
    assert info["float8"] is True and info["autocast"] == "bf16"
    assert info["lm_loss"] == "peerlab"  # the chunked loss: liger-kernel's is for CUDA
    assert info["float8_layers"] == ["layers.0.mlp.fc_in"]
    assert info["float8_filter"] == "torchao's size rule" and info["float8_speedups"] == {}  # on CPU: no timing
    assert "router" in info["float8_skipped"]["layers.1.mlp.query"] and "lm_head" in info["float8_skipped"]
    got = losses(tmp_path / "f8")
    assert len(got) == 2 and all(math.isfinite(x) for x in got)


def test_float8_filter_converts_only_the_shapes_measured_faster():
    """With measured figures, a layer converts where Float8 was at least FLOAT8_MIN_SPEEDUP faster than bf16."""
    from peerlab.model import build_model
    from peerlab.train.precision import FLOAT8_MIN_SPEEDUP, float8_plan, float8_shapes

    with torch.device("meta"):
        model = build_model(load_config(ROOT / "configs" / "config.yaml").model_config)
    shapes = float8_shapes(model)  # routers and the LM head are never candidates
    assert (2048, 768) not in shapes and (50272, 768) not in shapes and (3072, 768) in shapes
    below = FLOAT8_MIN_SPEEDUP - 0.01
    speedups = {shape: (1.3, below, FLOAT8_MIN_SPEEDUP, 0.7)[i % 4] for i, shape in enumerate(shapes)}
    plan = float8_plan(model, speedups)
    by_role = float8_plan(model)  # the same role decisions whatever the figures
    linear = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert sorted(plan.converted + list(plan.skipped)) == sorted(linear)
    for name, module in linear.items():
        shape = tuple(module.weight.shape)
        if shape not in speedups:
            assert plan.skipped[name] == by_role.skipped[name]
        elif speedups[shape] >= FLOAT8_MIN_SPEEDUP:
            assert name in plan.converted
        else:
            assert f"measured {speedups[shape]:.3f}x bf16" in plan.skipped[name]
    assert {tuple(linear[n].weight.shape) for n in plan.converted} == {s for s in shapes if speedups[s] >= 1.05}


def test_float8_figures_are_taken_once_per_machine(tmp_path, monkeypatch):
    """measure_float8 times each (shape, tokens) once, keeps the figure in the cache folder, and reads it after."""
    from peerlab.train import precision

    monkeypatch.setenv("PEERLAB_CACHE_DIR", str(tmp_path))
    timed = []
    real = precision._speedup

    def counting(out_features, in_features, tokens, *rest):
        timed.append((out_features, in_features, tokens))
        return real(out_features, in_features, tokens, *rest)

    monkeypatch.setattr(precision, "_speedup", counting)
    cpu = torch.device("cpu")
    first = precision.measure_float8([(64, 32), (32, 64)], 16, cpu, compiled=False)
    assert sorted(timed) == [(32, 64, 16), (64, 32, 16)]
    assert set(first) == {(64, 32), (32, 64)} and all(math.isfinite(r) and r > 0 for r in first.values())
    assert all(r == round(r, 3) for r in first.values())  # what is kept is what decides
    path = tmp_path / "float8-speedups.json"
    kept = json.loads(path.read_text())
    assert len(kept) == 2 and all("|eager|16 tokens|" in key and "torchao" in key for key in kept)
    timed.clear()
    assert precision.measure_float8([(32, 64), (64, 32)], 16, cpu, compiled=False) == first and timed == []
    precision.measure_float8([(64, 32), (48, 32)], 16, cpu, compiled=False)  # one new shape
    assert timed == [(48, 32, 16)]
    timed.clear()
    precision.measure_float8([(64, 32)], 8, cpu, compiled=False)  # other tokens: another figure
    assert timed == [(64, 32, 8)] and len(json.loads(path.read_text())) == 4

    path.write_text('{"half a file')  # unreadable: measured again and rewritten
    timed.clear()
    assert set(precision.measure_float8([(64, 32)], 16, cpu, compiled=False)) == {(64, 32)} and len(timed) == 1
    assert len(json.loads(path.read_text())) == 1

    def broken(out_features, *rest):
        if out_features == 48:
            raise RuntimeError("no float8 kernel")
        return real(out_features, *rest)

    monkeypatch.setattr(precision, "_speedup", broken)  # one shape fails: it alone stays out, and is not kept
    got = precision.measure_float8([(48, 32), (32, 64)], 16, cpu, compiled=False)
    assert got[48, 32] == 0.0 and got[32, 64] > 0
    assert not any(key.endswith("|48x32") for key in json.loads(path.read_text()))

    blocked = tmp_path / "file"
    blocked.write_text("")
    monkeypatch.setenv("PEERLAB_CACHE_DIR", str(blocked / "cache"))  # cannot be created: measured, not kept
    assert precision.measure_float8([(32, 64)], 16, cpu, compiled=False)[32, 64] > 0


def test_float8_figures_wait_for_another_process_then_give_up(tmp_path, monkeypatch):
    """A process waits for another's measurement (the lock), and past LOCK_WAIT_S torchao's rule decides."""
    import fcntl

    from peerlab.config import TrainConfig
    from peerlab.model import build_model
    from peerlab.train import precision
    from tests.conftest import tiny_model_config

    monkeypatch.setenv("PEERLAB_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(precision, "LOCK_WAIT_S", 0.5)
    with open(tmp_path / "float8-speedups.lock", "a") as other:
        fcntl.flock(other, fcntl.LOCK_EX)  # another process measuring
        start = time.monotonic()
        with pytest.raises(TimeoutError, match="another process held it"):
            precision.measure_float8([(32, 64)], 16, torch.device("cpu"), compiled=False)
        assert time.monotonic() - start >= 0.5
        cfg = tiny_model_config(hidden_size=64, intermediate_size=2048)
        plan = precision.float8_filter(build_model(cfg), TrainConfig(), torch.device("cpu"), 16, False, "measured")
        assert plan.filter.startswith("torchao's size rule (measuring failed: TimeoutError")
        assert plan.converted == precision.float8_plan(build_model(cfg)).converted and plan.speedups == {}
    assert precision.measure_float8([(32, 64)], 16, torch.device("cpu"), compiled=False)[32, 64] > 0  # released


def test_float8_measured_on_cpu_converts_what_it_measured(demo_corpus, tmp_path, monkeypatch):
    """The measured filter end to end (Float8 emulated on CPU): figures in run_info, layers as they say."""
    from torch import nn
    from torchao.float8.float8_linear import Float8Linear

    from peerlab.model import build_model
    from peerlab.train import precision

    monkeypatch.setenv("PEERLAB_CACHE_DIR", str(tmp_path))
    cfg = tiny(demo_corpus, *FLOAT8_WIDE)
    model = build_model(cfg.model_config)
    cpu = torch.device("cpu")
    plan = precision.apply_float8(model, cfg.train_config, cpu, force=True, tokens=32, rule="measured")
    assert plan.filter.startswith("measured") and "32 tokens, eager" in plan.filter
    shapes = precision.float8_shapes(build_model(cfg.model_config))
    assert set(plan.speedups) == {f"{o}x{i}" for o, i in shapes}
    linear = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, Float8Linear))}
    for name in plan.converted:
        o, i = linear[name].weight.shape
        assert isinstance(linear[name], Float8Linear) and plan.speedups[f"{o}x{i}"] >= precision.FLOAT8_MIN_SPEEDUP
    for name, why in plan.skipped.items():
        assert not isinstance(linear[name], Float8Linear)
        if "measured" in why:
            o, i = linear[name].weight.shape
            assert plan.speedups[f"{o}x{i}"] < precision.FLOAT8_MIN_SPEEDUP
    info = precision.describe(cfg.train_config, plan)
    assert info["float8_filter"] == plan.filter and info["float8_speedups"] == plan.speedups

    def broken(*args, **kwargs):
        raise RuntimeError("no float8 kernel")

    monkeypatch.setattr(precision, "_speedup", broken)  # every shape fails: every candidate stays in bf16
    monkeypatch.setenv("PEERLAB_CACHE_DIR", str(tmp_path / "empty"))
    failed = precision.float8_filter(build_model(cfg.model_config), cfg.train_config, cpu, 32, False, "measured")
    assert failed.converted == [] and set(failed.speedups.values()) == {0.0}
    candidates = [name for name, _, why_not in precision._linear_layers(model) if not why_not]
    assert candidates and all("timing Float8 failed" in failed.skipped[name] for name in candidates)
    monkeypatch.setattr(precision, "measure_float8", broken)  # the measurement itself fails: torchao's rule
    fallback = precision.float8_filter(build_model(cfg.model_config), cfg.train_config, cpu, 32, False, "measured")
    assert fallback.filter.startswith("torchao's size rule (measuring failed: RuntimeError: no float8 kernel")
    assert fallback.converted == precision.float8_plan(build_model(cfg.model_config)).converted
    monkeypatch.setenv("PEERLAB_FLOAT8_FILTER", "fastest")
    with pytest.raises(ValueError, match="PEERLAB_FLOAT8_FILTER='fastest': use one of measured, torchao"):
        precision.float8_filter(model, cfg.train_config, cpu, 32, False, None)


def test_peerlab_switches_travel_to_the_workers(monkeypatch):
    """The PEERLAB_* variables of the driver go to every worker's environment (Ray's runtime_env)."""
    from peerlab.train.worker import environment

    monkeypatch.setenv("PEERLAB_FLOAT8_FILTER", "torchao")
    monkeypatch.setenv("PEERLAB_CACHE_DIR", "/tmp/peerlab-cache")
    monkeypatch.setenv("NOT_PEERLAB_SWITCH", "1")
    sent = environment()
    assert sent["PEERLAB_FLOAT8_FILTER"] == "torchao" and sent["PEERLAB_CACHE_DIR"] == "/tmp/peerlab-cache"
    assert "NOT_PEERLAB_SWITCH" not in sent
    # Ray Train's controller collects reports every 0.1 s (its 2 s default held every logged step up to 2 s),
    # unless the user set their own interval
    assert sent["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "0.1"
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "1.5")
    assert environment()["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "1.5"


def _float8_rank(cfg_dict: dict, out: str) -> None:
    """One rank of a process group: apply Float8's measured filter with a cache folder of its own."""
    import torch.distributed as dist

    from peerlab.config import config_from_dict
    from peerlab.model import build_model
    from peerlab.train.precision import apply_float8

    rank = dist.get_rank()
    os.environ["PEERLAB_CACHE_DIR"] = f"{out}/cache-{rank}"
    cfg = config_from_dict(cfg_dict)
    plan = apply_float8(
        build_model(cfg.model_config), cfg.train_config, torch.device("cpu"), True, 32, False, "measured"
    )
    Path(f"{out}/plan-{rank}.json").write_text(json.dumps([plan.converted, plan.skipped, plan.speedups]))


def test_float8_with_two_workers_every_rank_uses_rank_zeros_figures(demo_corpus, tmp_path):
    """Rank 0 measures; the other ranks convert the same layers from its figures (DDP needs the same model)."""
    in_two_processes(_float8_rank, to_dict(tiny(demo_corpus, *FLOAT8_WIDE)), str(tmp_path))
    plans = [json.loads((tmp_path / f"plan-{rank}.json").read_text()) for rank in range(2)]
    assert plans[0] == plans[1] and plans[0][2]  # the same layers, reasons and figures
    assert (tmp_path / "cache-0" / "float8-speedups.json").exists()
    assert not (tmp_path / "cache-1" / "float8-speedups.json").exists()  # rank 1 measured nothing


# --------------------------------------------------------------------------------------
# Ray Train
# --------------------------------------------------------------------------------------


def test_two_worker_run_end_to_end_survives_a_killed_worker(ray_cluster, demo_corpus, tmp_path):
    """2 Ray Train workers (DDP on gloo) with row-sparse expert updates and lm-eval at the end, the path users
    take; rank 1 of this run (its pid from run_info.json, not any Ray Train worker on the host) dies at step 3,
    and the run completes from its last checkpoint on a new worker group.

    (That the workers train as one process on the global batch: test_sparse_experts_on_two_workers.)
    """
    import pandas as pd
    import psutil

    from peerlab.tracking import read_evals
    from peerlab.train.launch import fit

    settings = ["train_config.num_workers=2", "train_config.sparse_experts=true", "train_config.save_steps=2"]
    cfg = tiny(demo_corpus, *settings, *lm_eval_settings(demo_corpus), steps=8)
    run_dir = tmp_path / "two"
    killed = []

    def killer():
        deadline = time.time() + 240
        while time.time() < deadline and not killed:
            if any(r.get("step", 0) >= 3 for r in read_metrics(run_dir)):
                pid = json.loads((run_dir / "run_info.json").read_text())["pids"][1]
                command = " ".join(psutil.Process(pid).cmdline())
                os.kill(pid, signal.SIGKILL)
                killed.append((pid, command))
            time.sleep(0.2)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    result = fit(cfg, run_dir, quiet=True)
    thread.join(timeout=5)
    assert killed, "rank 1 was not killed"
    pid, command = killed[0]
    assert "RayTrainWorker" in command  # the pid run_info.json gave is a Ray Train worker's
    assert result.error is None
    records = read_metrics(run_dir)
    logged = [r for r in records if "loss" in r]
    steps = [r["step"] for r in logged]
    assert steps[-1] == 8 and len(steps) > 8  # steps after the last checkpoint ran twice
    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["start_step"] >= 2 and info["start_step"] % 2 == 0  # the restarted attempt began at a checkpoint
    assert len(info["pids"]) == 2 and pid not in info["pids"]  # a new worker group
    assert (info["workers"], info["device"], info["backend"]) == (2, "cpu", "gloo")
    assert info["float8"] is False and "no CUDA GPU" in info["float8_off_reason"]  # the default asks for it
    evals = read_evals(run_dir)  # rank 0 evaluated once at the end while rank 1 waited
    assert {r["step"] for r in evals} == {8} and len({(r["task"], r["metric"]) for r in evals}) == len(evals)
    assert logged[-1]["loss"] < logged[0]["loss"]
    assert sum(logged[-1][f"tokens_seen/{d}"] for d in DOMAINS) == 8 * 2 * 2 * 65  # both workers' blocks, resumed
    state = json.loads((run_dir / "checkpoints" / "step-000008" / "data.json").read_text())
    assert len(state["ranks"]) == 2
    assert (run_dir / "resolved_config.yaml").is_file()
    usage = pd.read_parquet(run_dir / "usage.parquet")  # both workers' router mass, summed
    assert 8 in list(usage["step"]) and (usage["usage"] > 0).all()
    assert any("eval_loss/code" in r for r in records)


def test_wandb_run_ids_belong_to_the_run_folder_not_its_name(tmp_path):
    """Runs (or sweep trials) of the same name in two folders get two wandb runs; the same folder keeps its
    run (wandb resumes it); a folder deleted and used again gets a new one; a folder from before the id
    file, whose wandb/ holds a run under the bare name, keeps that name."""
    import shutil

    a_dir, b_dir = tmp_path / "sweep_a" / "trials" / "mix_k16_s42", tmp_path / "sweep_b" / "trials" / "mix_k16_s42"
    a, b = wandb_run_id(a_dir), wandb_run_id(b_dir)
    assert a != b and a.startswith("mix_k16_s42-") and b.startswith("mix_k16_s42-")
    assert wandb_run_id(a_dir) == a and (a_dir / "wandb_id").read_text().strip() == a
    shutil.rmtree(a_dir)
    assert wandb_run_id(a_dir) != a
    old = tmp_path / "old" / "demo"
    (old / "wandb" / "offline-run-20261101_120000-demo").mkdir(parents=True)
    assert wandb_run_id(old) == "demo"
    assert re.fullmatch(r"[A-Za-z0-9_.-]{1,57}", wandb_run_id(tmp_path / ("x|y=z " * 20)))


def test_wandb_offline_rank_zero_logs_and_checkpoints(demo_corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = tiny(demo_corpus, "wandb_config.project=peerlab-test", "wandb_config.log_model=all", steps=3)
    run(cfg, tmp_path / "wb")
    runs = list((tmp_path / "wb" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1  # rank 0's run only
    assert runs[0].name.endswith(f"-{(tmp_path / 'wb' / 'wandb_id').read_text().strip()}")  # the folder's own id
    path = next(runs[0].glob("run-*.wandb"))  # the offline run's record log
    keys = (b"grad_norm", b"tokens_seen/prose", b"eval_loss/prose", b"step-3", b"final")
    deadline = time.time() + 20  # wandb's writer (its own process) may still be flushing the offline file
    while not all(key in path.read_bytes() for key in keys) and time.time() < deadline:
        time.sleep(0.5)
    log = path.read_bytes()
    for key in keys:
        assert key in log, key  # metrics, held-out loss, and the final model artifact (log_model: all)


def test_wandb_keeps_rows_of_a_step_it_has_passed(demo_corpus, tmp_path, monkeypatch):
    """A resumed run logs steps (and a run resumed at its end its lm-eval set) that its wandb run has
    passed; logged at wandb's own step they were dropped. The training step is a value on every row."""
    from peerlab.tracking import MetricsLog, append_evals

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    metrics = MetricsLog(tmp_path, tiny(demo_corpus, "wandb_config.project=t"), enabled=True)
    metrics.write({"step": 4, "loss": 1.5})
    metrics.write({"step": 3, "late_loss": 2.5})
    append_evals(tmp_path, 2, [{"task": "late_task", "metric": "acc", "value": 0.5, "stderr": None}], metrics.wandb)
    metrics.close()
    path = next(next((tmp_path / "wandb").glob("offline-run-*")).glob("run-*.wandb"))
    keys = (b"late_loss", b"lm_eval/late_task/acc")
    deadline = time.time() + 20  # wandb's writer (its own process) may still be flushing the offline file
    while not all(key in path.read_bytes() for key in keys) and time.time() < deadline:
        time.sleep(0.5)
    for key in keys:
        assert key in path.read_bytes(), key


def test_progress_line_has_step_loss_rate_and_eta():
    from peerlab.tracking import format_progress

    line = format_progress(
        {"step": 30, "loss": 2.5, "tokens_per_s": 1234.5, "eta_s": 3725, "eval_loss/code": 3.25}, 100
    )
    assert line == "step 30/100  loss 2.5000  1,234 tokens/s  held-out code 3.250  ETA 01:02:05"
    # a held-out evaluation between logging steps: no loss, rate or ETA to show (not "loss nan  0 tokens/s")
    assert format_progress({"step": 25, "eval_loss/code": 3.25}, 100) == "step 25/100  held-out code 3.250"


def test_a_line_cut_short_by_a_crash_is_ended_and_left_out(demo_corpus, tmp_path):
    """A crash can cut metrics.jsonl's last line short. The run started again ends that line before it
    appends (its own lines stay whole), and the readers (the tables, a run resumed at its end, the driver's
    progress lines) leave the cut line out and read the rest."""
    from peerlab.tracking import Progress

    run(tiny(demo_corpus, steps=2), tmp_path / "c")
    before = read_metrics(tmp_path / "c")
    with open(tmp_path / "c" / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "lo')  # the crash
    progress = Progress(tmp_path / "c", total_steps=4)  # follows what is written from here on
    run(tiny(demo_corpus, steps=4), tmp_path / "c")  # resumes at step 2, logs steps 3 and 4
    after = read_metrics(tmp_path / "c")
    assert after[: len(before)] == before and [r["step"] for r in after[len(before) :] if "loss" in r] == [3, 4]
    assert [r["step"] for r in progress._new_records("metrics.jsonl") if "loss" in r] == [3, 4]


def test_expert_usage_is_written_every_log_freq(demo_corpus, tmp_path):
    import pandas as pd

    cfg = tiny(demo_corpus, "model_config.peer_config.log_freq=2", "model_config.num_hidden_layers=3", steps=7)
    run(cfg, tmp_path / "u")
    table = pd.read_parquet(tmp_path / "u" / "usage.parquet")
    # every snapshot covers log_freq steps: step 7's one-step stub is left out
    assert sorted(set(table["step"])) == [2, 4, 6] and sorted(set(table["layer"])) == [1, 2]
    for column in ("usage", "kl_uniform", "dead", "hot_count", "hot_ids", "experts"):
        assert column in table.columns
    assert ((table["usage"] > 0) & (table["usage"] <= 1)).all() and (table["experts"] == 1024).all()
    assert (table["kl_uniform"] >= 0).all() and ((table["usage"] + table["dead"] - 1).abs() < 1e-12).all()
    # By data source: a row per source (and per pair of sources) per snapshot and layer
    by_source = pd.read_parquet(tmp_path / "u" / "usage_by_source.parquet")
    src = by_source[by_source["kind"] == "source"]
    assert len(src) == 3 * 2 * len(DOMAINS) and set(src["source"]) == set(DOMAINS)
    assert len(by_source[by_source["kind"] == "pair"]) == 3 * 2 * len(DOMAINS) * (len(DOMAINS) - 1) // 2
    merged = src.merge(table, on=["step", "layer"], suffixes=("", "_layer"))
    assert (merged["usage"] <= merged["usage_layer"]).all() and (merged["nmi"].between(0, 1)).all()
    # each source's share of the routed mass is its share of the tokens trained on since the last snapshot
    seen = {r["step"]: r for r in read_metrics(tmp_path / "u") if "tokens_seen/prose" in r}
    for (step, layer), rows in src.groupby(["step", "layer"]):
        tokens = {d: seen[step][f"tokens_seen/{d}"] - seen[step - 2].get(f"tokens_seen/{d}", 0) if step > 2
                  else seen[step][f"tokens_seen/{d}"] for d in DOMAINS}  # fmt: skip
        for row in rows.itertuples():
            assert abs(row.mass_share - tokens[row.source] / sum(tokens.values())) < 1e-5, (step, layer, row.source)
    # A run shorter than log_freq has one snapshot, at its end.
    run(tiny(demo_corpus, "model_config.peer_config.log_freq=10", steps=3), tmp_path / "short")
    assert set(pd.read_parquet(tmp_path / "short" / "usage.parquet")["step"]) == {3}


def test_sparse_expert_gradients_equal_dense_ones():
    from tests.test_peer import make_peer

    dense = make_peer(16, 16, 4, 2, hidden=2).float().train()
    sparse = make_peer(16, 16, 4, 2, hidden=2).float().train()
    sparse.sparse_grad = True
    x = torch.randn(20, 16)
    dense(x).pow(2).sum().backward()
    sparse(x).pow(2).sum().backward()
    for name in ("down", "up"):
        g = getattr(sparse, name).grad
        assert g.is_sparse
        torch.testing.assert_close(g.to_dense(), getattr(dense, name).grad)
        assert g.coalesce().values().shape[0] < 512  # only retrieved rows are stored


def test_row_sparse_adamw_is_lazy_adamw():
    from peerlab.train.optim import RowSparseAdamW

    torch.manual_seed(0)
    table = torch.nn.Parameter(torch.randn(10, 3))
    reference = torch.nn.Parameter(table.detach().clone())
    lazy = RowSparseAdamW([table], lr=0.1, weight_decay=0.0)
    plain = torch.optim.AdamW([reference], lr=0.1, weight_decay=0.0)

    def grad(rows):
        values = torch.randn(len(rows), 3, generator=torch.Generator().manual_seed(len(rows)))
        return torch.sparse_coo_tensor(torch.tensor([rows]), values, (10, 3))

    table.grad, reference.grad = grad([1, 4, 7]), grad([1, 4, 7]).to_dense()
    lazy.step()
    plain.step()
    torch.testing.assert_close(table, reference)  # first step: the same update
    table.grad, reference.grad = grad([4, 9]), grad([4, 9]).to_dense()
    before = table.detach().clone()
    lazy.step()
    plain.step()
    assert torch.equal(table[[0, 1, 2, 3, 5, 6, 7, 8]], before[[0, 1, 2, 3, 5, 6, 7, 8]])  # untouched rows stay
    assert not torch.allclose(reference[[1, 7]], before[[1, 7]])  # AdamW moves them by momentum
    assert not torch.equal(table[[4, 9]], before[[4, 9]])
    assert set(lazy.state_dict()["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}  # AdamW's layout


@pytest.mark.parametrize("row_kernel", [True, False], ids=["one-pass kernel", "torch gather-scatter"])
def test_row_sparse_adamw_matches_float64_adamw_on_touched_rows(row_kernel, monkeypatch):
    """Both row paths against AdamW computed in float64 on the touched rows only, over several steps.

    Rows are touched by different steps (each row has its own history, bias-corrected with the
    table's step count), with weight decay and a width that is not a multiple of the vector size.
    """
    import shutil

    from peerlab.train import optim
    from peerlab.train.optim import RowSparseAdamW

    if row_kernel and shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler: the one-pass kernel cannot be built here")
    ran = []
    kernel = optim.row_adamw
    monkeypatch.setattr(optim, "row_adamw", lambda *a, **k: ran.append(kernel(*a, **k)) or ran[-1])
    rows_n, d, lr, (b1, b2), wd, eps = 3000, 37, 0.01, (0.9, 0.95), 0.1, 1e-8
    torch.manual_seed(0)
    table = torch.nn.Parameter(torch.randn(rows_n, d))
    w = table.detach().double().clone()
    m, v = torch.zeros_like(w), torch.zeros_like(w)
    opt = RowSparseAdamW([table], lr=lr, betas=(b1, b2), weight_decay=wd, eps=eps)
    opt.row_kernel = row_kernel
    for step in range(1, 5):
        rows = torch.randperm(rows_n)[: 1000 + 300 * step].sort().values
        g = torch.randn(len(rows), d)
        table.grad = torch.sparse_coo_tensor(rows.unsqueeze(0), g, (rows_n, d))
        opt.step()
        g = g.double()
        m[rows] = b1 * m[rows] + (1 - b1) * g
        v[rows] = b2 * v[rows] + (1 - b2) * g * g
        denom = (v[rows] / (1 - b2**step)).sqrt() + eps
        w[rows] = w[rows] * (1 - lr * wd) - lr / (1 - b1**step) * m[rows] / denom
        torch.testing.assert_close(table.detach().double(), w, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(opt.state[table]["exp_avg"].double(), m, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(opt.state[table]["exp_avg_sq"].double(), v, rtol=1e-5, atol=1e-7)
    assert ran == ([True] * 4 if row_kernel else [])  # the path named really ran


def test_training_with_sparse_experts_is_the_default(demo_corpus, tmp_path):
    from peerlab.train.optim import RowSparseAdamW, sparse_experts_on

    run(tiny(demo_corpus, steps=6), tmp_path / "sp")
    got = losses(tmp_path / "sp")
    assert len(got) == 6 and got[-1] < got[0]
    assert json.loads((tmp_path / "sp" / "run_info.json").read_text())["sparse_experts"] is True
    # null means on, except under FSDP (dense gradient shards only); an explicit false turns it off
    assert sparse_experts_on(tiny(demo_corpus).train_config)
    assert not sparse_experts_on(tiny(demo_corpus, "train_config.fsdp=true").train_config)
    off = tiny(demo_corpus, "train_config.sparse_experts=false").train_config
    assert not sparse_experts_on(off) and not isinstance(build_optimizer(torch.nn.Linear(2, 2), off), RowSparseAdamW)


def test_freed_memory_is_reused_without_new_page_faults():
    """After reuse_freed_memory(), a PEER layer's training steps take the pages earlier steps freed: almost no
    fresh zero-filled pages (minor faults) once warm, where glibc's default mmap/munmap of large blocks faults
    in tens of thousands every step, and the resident size settles near its peak. The heap may still grow once
    in a while when the touched rows' temporaries come out larger than any before (one growth of some 13,000
    pages at step 12 of 16 was seen on CI), so the warm steps are judged by their median and their sum, not by
    their largest."""
    import subprocess
    import sys

    probe = (
        "import resource, sys, torch\n"
        "from peerlab.config import PeerConfig\n"
        "from peerlab.model import PEER\n"
        "from peerlab.train.allocator import reuse_freed_memory\n"
        "from peerlab.train.optim import RowSparseAdamW\n"
        "took = reuse_freed_memory() if sys.argv[1] == 'reuse' else False\n"
        "torch.manual_seed(0)\n"
        "config = PeerConfig(num_experts=256 * 256, product_key_dim=[256, 256], num_heads=8, query_dim=64)\n"
        "layer = PEER(config, 256).train()\n"
        "layer.sparse_grad = True\n"
        "opt = RowSparseAdamW(layer.parameters(), lr=1e-3)\n"
        "faults, rss = [], []\n"
        "for step in range(16):\n"
        "    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "    layer(torch.randn(2048, 256)).pow(2).mean().backward()\n"
        "    opt.step()\n"
        "    opt.zero_grad(set_to_none=True)\n"
        "    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n"
        "    rss.append(int(open('/proc/self/statm').read().split()[1]))\n"
        "print(took, ' '.join(map(str, faults[4:])), rss[3], rss[-1], sep=',')\n"
    )
    runs = {}
    for mode in ("reuse", "default"):
        out = subprocess.run([sys.executable, "-c", probe, mode], capture_output=True, text=True, check=True)
        took, faults, rss_early, rss_late = out.stdout.strip().split(",")
        warm = sorted(int(f) for f in faults.split())  # the 12 steps after 4 of warm-up
        rss = (int(rss_early), int(rss_late))
        runs[mode] = {"took": took == "True", "median": warm[len(warm) // 2], "total": sum(warm), "rss": rss}
    reuse, default = runs["reuse"], runs["default"]
    assert reuse["took"], runs
    assert default["median"] > 5000, runs  # each step's large temporaries faulted in afresh
    assert reuse["median"] < default["median"] / 20, runs  # a typical warm step takes no fresh pages
    assert reuse["total"] < default["total"] / 8, runs  # at most an occasional heap growth, not one per step
    assert reuse["rss"][1] < 1.15 * reuse["rss"][0], runs  # settled: a growth or two (~5% each), no steady growth


def test_fsdp_on_two_cpu_workers_trains_and_resumes(ray_cluster, demo_corpus, tmp_path):
    from safetensors.torch import load_file

    from peerlab.train.launch import fit

    cfg = tiny(
        demo_corpus, "train_config.num_workers=2", "train_config.fsdp=true", *lm_eval_settings(demo_corpus), steps=4
    )
    assert fit(cfg, tmp_path / "fsdp", quiet=True).error is None
    from peerlab.tracking import read_evals

    evals = read_evals(tmp_path / "fsdp")  # both ranks ran the sharded forwards in step; rank 0 wrote once
    assert {r["step"] for r in evals} == {4} and len({(r["task"], r["metric"]) for r in evals}) == len(evals)
    assert all(math.isfinite(r["value"]) for r in evals)
    got = losses(tmp_path / "fsdp")
    assert len(got) == 4 and all(math.isfinite(x) for x in got)
    weights = load_file(tmp_path / "fsdp" / "checkpoints" / "step-000004" / "model.safetensors")
    assert weights["layers.1.mlp.down"].shape == (1024, 64)  # gathered whole, not a shard
    (tmp_path / "fsdp" / "evals.jsonl").unlink()  # as if stopped after its final checkpoint, before the lm-eval set
    again = fit(cfg, tmp_path / "fsdp", quiet=True)  # no step to train: both ranks run the missing evaluation
    assert again.error is None and again.return_value["step"] == 4 and again.return_value["loss"] == got[-1]
    assert [(r["task"], r["metric"]) for r in read_evals(tmp_path / "fsdp")] == [
        (r["task"], r["metric"]) for r in evals
    ]
    more = tiny(demo_corpus, "train_config.num_workers=2", "train_config.fsdp=true", steps=6)
    assert fit(more, tmp_path / "fsdp", quiet=True).error is None  # the same run name: continues at step 5
    assert [r["step"] for r in read_metrics(tmp_path / "fsdp") if "loss" in r] == [1, 2, 3, 4, 5, 6]


def test_sparse_experts_with_fsdp_is_refused_at_load_time(demo_corpus):
    from peerlab.config import ConfigError

    with pytest.raises(ConfigError, match=r"train_config\.sparse_experts.*does not combine with fsdp: true"):
        tiny(demo_corpus, "train_config.sparse_experts=true", "train_config.fsdp=true")


# --------------------------------------------------------------------------------------
# Workers agree: 2 processes (gloo, as Ray Train joins its CPU workers) against one process
# --------------------------------------------------------------------------------------

STEPS, ACCUMULATION, PER_WORKER = 2, 2, 2  # 2 optimizer steps of 2 micro-batches of 2 blocks per worker


def _member(fn, rank: int, world: int, port: int, args: tuple) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)  # two processes on a 2-core machine
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        fn(*args)
        dist.barrier()  # both ranks done with gloo before either tears it down (else: "terminate called", exit -6)
    finally:
        dist.destroy_process_group()


def in_two_processes(fn, *args, timeout: float = 300) -> None:
    """fn(*args) in 2 fresh processes joined by a gloo process group on 127.0.0.1; fails if one hangs or fails."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = torch.multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_member, args=(fn, rank, 2, port, args)) for rank in range(2)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(deadline - time.monotonic(), 0))
    hung = [rank for rank, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
    assert not hung, f"ranks {hung} were still running after {timeout} s (waiting in a collective?)"
    assert [p.exitcode for p in procs] == [0, 0]


def replica_steps(cfg_dict: dict, batches: torch.Tensor, out: str | None = None) -> dict:
    """STEPS optimizer steps through `DataParallel` on this rank's share of each global batch, in float64.

    batches: (steps, accumulation, global batch, T+1); rank r of W takes rows r*B/W .. (r+1)*B/W - 1
    of every micro-batch. Returns (rank 0 also saves to `out`) the losses and gradient norms, the
    gradients the optimizer was handed at each step, the weights after each step, and, where the
    model has BatchNorm, every rank's running statistics before and after `sync_buffers`.
    Float64, because AdamW's first step is lr * g / (|g| + eps): float32 rounding of a gradient
    near zero (summed in another order on 2 workers) can flip its sign, and the weight by 2 lr.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.tensor import DTensor

    from peerlab.config import config_from_dict
    from peerlab.model import build_model
    from peerlab.train.distributed import DataParallel, gather, sync_buffers, where_am_i
    from peerlab.train.optim import sparse_experts_on
    from peerlab.train.precision import autocast, grad_scaler

    cfg = config_from_dict(cfg_dict)
    t = cfg.train_config
    place = where_am_i()
    torch.manual_seed(t.seed)
    model = build_model(cfg.model_config).double()
    parallel = DataParallel(model, place, fsdp=t.fsdp, sparse_experts=sparse_experts_on(t))
    optimizer = build_optimizer(model, t)
    scaler, amp = grad_scaler(t, place.device), autocast(t, place.device)
    share = batches.shape[2] // place.world
    mine = batches[:, :, place.rank * share : (place.rank + 1) * share]
    full = StateDictOptions(full_state_dict=True, cpu_offload=place.world > 1)
    got: dict = {"loss": [], "norm": [], "grads": [], "weights": []}

    def keep_gradients(loss: float, norm: float) -> None:  # what the optimizer is about to apply
        grads = {}
        for name, p in model.named_parameters():
            g = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
            grads[name] = (g.to_dense() if g.is_sparse else g).clone()
        got["grads"].append(grads)

    for step in mine[: cfg.train_config.max_steps]:
        loss, norm = parallel.step(iter(step), optimizer, scaler, amp, t, keep_gradients)
        got["loss"].append(loss)
        got["norm"].append(norm)
        got["weights"].append({k: v.clone() for k, v in get_model_state_dict(model, options=full).items()})
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running_" in k}
    if stats:
        got["stats_before"] = gather(stats, place)
        sync_buffers(model, place.world)
        got["stats_after"] = gather({k: v for k, v in model.state_dict().items() if "running_" in k}, place)
    if out is not None and place.rank == 0:
        torch.save(got, out)
    return got


def replica_runs(runs: list[tuple[dict, str]], batches: torch.Tensor) -> None:
    for cfg_dict, out in runs:
        replica_steps(cfg_dict, batches, out)


@pytest.fixture(scope="module")
def replicas(demo_corpus, tmp_path_factory):
    """The same 2 steps on 2 workers (DDP, FSDP2, DDP with sparse_experts) and in one process.

    One global batch = 2 workers x 2 blocks, in 2 micro-batches; the blocks are held-out text
    of the demo corpus, fixed (independent of how the data stream shards documents). The one
    process takes the whole global batch in each micro-batch. BatchNorm off: in training it
    normalises with each worker's own batch statistics, which differ from the global batch's
    (its own run below checks the statistics' averaging). Weight decay off, so that the first
    AdamW step on a dense gradient leaves untouched rows where they are, as RowSparseAdamW does;
    clipping on (max_grad_norm below the norms), so the norm must be the averaged gradient's.
    """
    from peerlab.data.tokenizer import load_tokenizer
    from peerlab.eval.heldout import heldout_blocks

    common = [
        "dataset_config.max_seq_length=32",
        "model_config.peer_config.batch_norm_query=false",
        "train_config.weight_decay=0",
        "train_config.max_grad_norm=0.5",
        f"train_config.gradient_accumulation_steps={ACCUMULATION}",
        f"train_config.per_device_train_batch_size={PER_WORKER}",
    ]
    settings = {
        "dense": ["train_config.sparse_experts=false"],
        "fsdp": ["train_config.fsdp=true"],
        "sparse": ["train_config.sparse_experts=true"],
        "fsdp_bn": ["train_config.fsdp=true", "model_config.peer_config.batch_norm_query=true"],
        "ddp_bn": ["model_config.peer_config.batch_norm_query=true"],
        # The other feed-forward arms, under DDP and FSDP. The MoE balance loss is off: each worker computes it
        # on its own tokens (as each device does in DeepSeekMoE), which is not the global batch's loss.
        "moe": MOE_ARM,
        "moe_fsdp": [*MOE_ARM, "train_config.fsdp=true"],
        "pkm": PKM_ARM,
        "pkm_fsdp": [*PKM_ARM, "train_config.fsdp=true"],
    }
    cfgs = {name: to_dict(tiny(demo_corpus, *common, *extra, steps=STEPS)) for name, extra in settings.items()}
    cfgs["fsdp_bn"]["train_config"]["max_steps"] = 1  # (only its statistics are looked at)
    # A learning rate of 1e-300 (it must be > 0) leaves every float64 weight as it is (a step is far below one
    # unit in the last place), so each worker's statistics are those of its own blocks run in one process.
    cfgs["ddp_bn"]["train_config"]["learning_rate"] = 1e-300
    d = tiny(demo_corpus, *common).dataset_config
    blocks = torch.cat([b.ids for b in heldout_blocks(d, load_tokenizer(d.tokenizer_name), 8).values()])
    batches = blocks[: STEPS * ACCUMULATION * 2 * PER_WORKER].view(STEPS, ACCUMULATION, 2 * PER_WORKER, -1)
    folder = tmp_path_factory.mktemp("replicas")
    in_two_processes(replica_runs, [(cfg, str(folder / f"{name}.pt")) for name, cfg in cfgs.items()], batches)
    two = {name: torch.load(folder / f"{name}.pt") for name in cfgs}
    one = {name: replica_steps(cfgs[name], batches) for name in ("dense", "sparse", "moe", "pkm")}
    for rank in range(2):  # each worker's share of every micro-batch, alone in one process
        share = batches[:, :, rank * PER_WORKER : (rank + 1) * PER_WORKER]
        one[f"ddp_bn_rank{rank}"] = replica_steps(cfgs["ddp_bn"], share)
    return two, one


MOE_ARM = [
    "model_config.ffn_type=moe",
    "model_config.moe_config.num_experts=4",
    "model_config.moe_config.expert_size=32",
    "model_config.moe_config.balance_loss_weight=0",
]
PKM_ARM = [
    "model_config.ffn_type=pkm",
    "model_config.pkm_config.num_experts=1024",
    "model_config.pkm_config.product_key_dim=[32, 32]",
    "model_config.pkm_config.num_heads=2",
    "model_config.pkm_config.num_experts_per_tok=8",
    "model_config.pkm_config.query_dim=32",
    "model_config.pkm_config.batch_norm_query=false",
]


@pytest.mark.parametrize("arm", ["moe", "pkm"])
@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_moe_and_pkm_workers_train_as_one_process_on_the_global_batch(replicas, arm, fsdp):
    """The MoE and PKM arms on 2 workers (DDP, FSDP2) train as one process on the global batch."""
    two, one = replicas
    assert_same_training(two[f"{arm}_fsdp" if fsdp else arm], one[arm])


def assert_same_training(got: dict, want: dict) -> None:
    """Losses, gradient norms, the gradients each step applied and the weights after each step agree."""
    # float64 throughout: only the order of the sums differs
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-12)
    assert got["norm"] == pytest.approx(want["norm"], rel=1e-12)
    assert all(norm > 0.5 for norm in want["norm"])  # clipping was at work
    for step in range(STEPS):
        assert got["grads"][step].keys() == want["grads"][step].keys()
        # Whole tensors within 1e-10 relative (norm of the difference over norm of the reference); a lost
        # all-reduce or a wrong scale would be off by its whole size.
        for name, grad in want["grads"][step].items():
            assert_close_in_norm(got["grads"][step][name], grad, f"{name} {step}")
        for name, weight in want["weights"][step].items():
            assert_close_in_norm(got["weights"][step][name], weight, f"{name} {step}")


def assert_close_in_norm(got: torch.Tensor, want: torch.Tensor, what: str, rel: float = 1e-10) -> None:
    assert got.shape == want.shape, what
    gap = (got.to(torch.float64) - want.to(torch.float64)).norm().item()
    assert gap <= rel * max(want.to(torch.float64).norm().item(), 1e-12), f"{what}: {gap:.3g} apart"


def test_ddp_workers_train_as_one_process_on_the_global_batch(replicas):
    two, one = replicas
    assert_same_training(two["dense"], one["dense"])


def test_fsdp_workers_train_as_one_process_on_the_global_batch(replicas):
    two, one = replicas
    assert_same_training(two["fsdp"], one["dense"])


def test_sparse_experts_on_two_workers(replicas):
    """2 DDP workers with sparse_experts train as one process with sparse_experts on the global batch.

    The one-process run is the reference for both steps (same optimizer, same touched rows). The
    exchanged gradient also equals DDP's all-reduced dense gradient (first step, same weights),
    and with weight decay off the weights after that first step equal the dense run's: AdamW's
    first step moves no row whose gradient is zero. Later steps differ by design (RowSparseAdamW
    leaves untouched rows alone; AdamW moves them by momentum).
    """
    two, one = replicas
    assert_same_training(two["sparse"], one["sparse"])
    sparse, dense = two["sparse"], two["dense"]
    assert sparse["loss"][0] == pytest.approx(dense["loss"][0], rel=1e-7)
    for name, grad in dense["grads"][0].items():
        torch.testing.assert_close(sparse["grads"][0][name], grad, rtol=1e-6, atol=1e-9, msg=name)
    for name, weight in dense["weights"][0].items():
        torch.testing.assert_close(sparse["weights"][0][name], weight, rtol=1e-6, atol=1e-7, msg=name)
    touched = (sparse["grads"][0]["layers.1.mlp.down"] != 0).any(1)
    assert 0 < touched.sum() < len(touched)  # some expert rows were retrieved, not all


def test_fsdp_batchnorm_statistics_are_pooled_across_workers(replicas):
    """FSDP2 keeps buffers per worker: after training the ranks' running statistics differ; synced, both
    ranks hold the statistics of the workers' features together: the mean of the means, and the mean
    of the variances plus the variance of the means."""
    two, _ = replicas
    before, after = two["fsdp_bn"]["stats_before"], two["fsdp_bn"]["stats_after"]
    assert before[0].keys() == after[0].keys() and len(before[0]) == 2  # running_mean, running_var of 1 PEER layer
    for name in before[0]:
        assert not torch.allclose(before[0][name], before[1][name])  # the workers saw different batches
        assert torch.equal(after[0][name], after[1][name])
    (mean_key,) = [k for k in before[0] if k.endswith("running_mean")]
    var_key = mean_key.replace("running_mean", "running_var")
    means = torch.stack([before[r][mean_key].double() for r in range(2)])  # (ranks, features)
    variances = torch.stack([before[r][var_key].double() for r in range(2)])
    torch.testing.assert_close(after[0][mean_key].double(), means.mean(0))
    pooled = variances.mean(0) + means.var(0, unbiased=False)  # law of total variance over equal shares
    torch.testing.assert_close(after[0][var_key].double(), pooled)
    assert (pooled > variances.mean(0)).any()  # the means differ, so pooling differs from averaging


def test_ddp_batchnorm_statistics_are_each_workers_own_then_pooled(replicas):
    """Under DDP too, each worker's running statistics follow its own blocks over every step (the same as one
    process given only that worker's blocks), and synced they are pooled as under FSDP. DDP's default buffer
    broadcast put rank 0's statistics on every rank before each step, so rank 1's blocks were all but lost."""
    two, one = replicas
    before, after = two["ddp_bn"]["stats_before"], two["ddp_bn"]["stats_after"]
    assert len(before[0]) == 2  # running_mean and running_var of the PEER layer
    for rank in range(2):
        alone = one[f"ddp_bn_rank{rank}"]["stats_before"][0]
        for name, value in alone.items():
            torch.testing.assert_close(before[rank][name], value, rtol=1e-9, atol=1e-12, msg=f"rank {rank} {name}")
    for name in before[0]:
        if name.endswith("running_mean"):
            var = name.replace("running_mean", "running_var")
            means = torch.stack([before[r][name] for r in range(2)])
            variances = torch.stack([before[r][var] for r in range(2)])
            torch.testing.assert_close(after[1][name], means.mean(0))
            torch.testing.assert_close(after[1][var], variances.mean(0) + means.var(0, unbiased=False))


def exchange_member(out: str) -> None:
    """Rank r's sparse gradients on three tables (one it never touched), exchanged both ways."""
    import torch.distributed as dist

    from peerlab.train.distributed import exchange_rows

    rank = dist.get_rank()
    results = {}
    for dense_share in (0.0, float("inf")):  # 0: always the dense all-reduce; inf: always the all-gather of rows
        tables = [torch.nn.Parameter(torch.zeros(10, 3, dtype=torch.float64)) for _ in range(3)]
        for i, table in enumerate(tables):
            rows = sparse_rows(rank, i)
            if rows:
                values = torch.randn(len(rows), 3, dtype=torch.float64, generator=torch.Generator().manual_seed(rank))
                table.grad = torch.sparse_coo_tensor(torch.tensor([rows]), values, (10, 3))
        exchange_rows(tables, dist.get_world_size(), dense_share=dense_share)
        results[dense_share] = [(t.grad.is_sparse, t.grad.coalesce().indices()[0], t.grad.to_dense()) for t in tables]
    torch.save(results, Path(out, f"rank{rank}.pt"))


def sparse_rows(rank: int, table: int) -> list[int]:
    """The rows rank `rank` touched in table `table` (a repeated row, as several tokens give; none for rank 1 in
    table 2)."""
    return [[1, 4, 4, 7], [0, 1, 2, 3, 9], [5, 6]][table] if rank == 0 else [[4, 8], [3, 9], []][table]


def test_sparse_rows_exchanged_by_either_path_equal_the_mean_of_the_dense_gradients(tmp_path):
    """`exchange_rows`, through all-gathered rows and through the dense all-reduce: on both workers, each
    table's gradient is the mean of the workers' dense gradients, sparse over the rows any worker touched."""
    in_two_processes(exchange_member, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for i in range(3):
        want = torch.zeros(10, 3, dtype=torch.float64)
        for rank in range(2):
            rows = sparse_rows(rank, i)
            if rows:
                values = torch.randn(len(rows), 3, dtype=torch.float64, generator=torch.Generator().manual_seed(rank))
                want.index_add_(0, torch.tensor(rows), values)
        want /= 2
        union = sorted(set(sparse_rows(0, i)) | set(sparse_rows(1, i)))
        for results in ranks:
            for dense_share in results:
                is_sparse, rows, got = results[dense_share][i]
                assert is_sparse and rows.tolist() == union, (i, dense_share)
                torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


def loop_member(cfg_dict: dict, run_dir: str, out: str) -> None:
    import torch.distributed as dist

    last = train_loop({"config": cfg_dict, "run_dir": run_dir, "data_engine": "local"})
    Path(out, f"rank{dist.get_rank()}.json").write_text(json.dumps(last))


def test_fsdp_ranks_evaluate_the_same_model_and_generate_in_step(demo_corpus, tmp_path):
    """The training loop on 2 FSDP workers: every rank evaluates (each forward needs all shards).

    With BatchNorm's running statistics averaged before evaluations and saves, both ranks
    compute the same held-out losses, and a greedy generation task finishes (with statistics
    of their own, ranks can stop decoding after different steps and wait for each other forever).
    """
    from peerlab.tracking import read_evals

    cfg = tiny(
        demo_corpus,
        "train_config.fsdp=true",
        "eval_config.evals=[peerlab_heldout_gen]",
        f"eval_config.evals_registry_path={ROOT / 'evals' / 'registry'}",
        f"eval_config.eval_data_dir={demo_corpus / 'evals'}",
        "eval_config.lm_eval_limit=2",
        steps=2,
    )
    in_two_processes(loop_member, to_dict(cfg), str(tmp_path / "run"), str(tmp_path))
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    held = {k: v for k, v in rank0.items() if k.startswith(("eval_loss/", "eval_bpb/"))}
    assert len(held) >= 2 * len(DOMAINS)
    assert {k: rank1[k] for k in held} == held  # the same numbers on both ranks
    evals = read_evals(tmp_path / "run")
    assert {(r["step"], r["task"], r["metric"]) for r in evals} == {(2, "peerlab_heldout_gen", "exact_match")}


def test_epochs_over_non_streamed_data_count_one_pass(demo_corpus, tmp_path):
    from peerlab.train.launch import epoch_tokens, with_steps_per_epoch

    small = tmp_path / "small.jsonl"
    small.write_text("".join(json.dumps({"text": f"line {i} of a small dataset"}) + "\n" for i in range(200)))
    cfg = tiny(
        demo_corpus,
        "train_config.max_steps=null",
        "train_config.num_train_epochs=2",
        "dataset_config.datasets=[{name: small, path: '%s', streaming: false, text_field: text}]" % small,
        "dataset_config.heldout_fraction=0",
    )
    tokens = epoch_tokens(cfg)
    resolved = with_steps_per_epoch(cfg).train_config
    assert resolved.steps_per_epoch == -(-(tokens // 65) // 2)  # blocks of 65, 2 per step
    run(with_steps_per_epoch(cfg), tmp_path / "ep")
    assert len(losses(tmp_path / "ep")) == 2 * resolved.steps_per_epoch


def test_a_run_prefers_its_own_newer_checkpoints_over_resume_from_checkpoint(demo_corpus, tmp_path):
    run(tiny(demo_corpus), tmp_path / "a")
    start = f"train_config.resume_from_checkpoint={tmp_path / 'a' / 'checkpoints' / 'step-000003'}"
    run(tiny(demo_corpus, start), tmp_path / "b")  # steps 4..6 from a's step 3
    run(tiny(demo_corpus, start), tmp_path / "b")  # as after a restart: b's own step 6 wins, nothing is redone
    assert [r["step"] for r in read_metrics(tmp_path / "b") if "loss" in r] == [4, 5, 6]
