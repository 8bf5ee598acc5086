"""Export to the Hugging Face format: the exported folder against peerlab's own model, with and without peerlab.

Each arm (PEER, dense, MoE, PKM) is a tiny model over the demo tokenizer, saved as a run
folder by peerlab's own checkpoint.save, exported, and loaded back through transformers'
Auto classes: the logits, greedy generation and lm-eval's `hf` model must agree with peerlab.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peerlab.data.tokenizer import load_tokenizer
from peerlab.export import ExportError, export_checkpoint
from peerlab.model import build_model
from peerlab.train import checkpoint as ckpt
from peerlab.train.launch import write_resolved_config

from tests.conftest import ROOT
from tests.test_train import tiny

REGISTRY = ROOT / "evals" / "registry"
ARMS = {
    "peer": [],
    # Experts of two neurons, no query BatchNorm, a direct query projection in MLA, and sub-key sets large
    # enough that peerlab searches them by groups (its ties must fall the same way in the export).
    "peer_wide": [
        "model_config.peer_config.expert_hidden_size=2",
        "model_config.peer_config.batch_norm_query=false",
        "model_config.mla_config.q_lora_rank=0",
        "model_config.peer_config.num_experts=16384",
        "model_config.peer_config.product_key_dim=[128, 128]",
        "model_config.peer_config.num_experts_per_tok=8",
    ],
    "dense": ["model_config.use_peer=false"],
    "moe": [
        "model_config.ffn_type=moe",
        "model_config.moe_config.num_experts=4",
        "model_config.moe_config.top_k=2",
        "model_config.moe_config.expert_size=32",
    ],
    "pkm": [
        "model_config.ffn_type=pkm",
        "model_config.pkm_config.num_experts=256",
        "model_config.pkm_config.product_key_dim=[16, 16]",
        "model_config.pkm_config.num_experts_per_tok=4",
        "model_config.pkm_config.num_heads=2",
        "model_config.pkm_config.query_dim=16",
    ],
}
STEP = 5


def save_run(run_dir: Path, cfg, seed: int = 0) -> torch.nn.Module:
    """A run folder as training leaves it: resolved_config.yaml, a checkpoint, metrics.jsonl and evals.jsonl.

    The weights are the model's initial ones, except the BatchNorm statistics, set away from
    0 and 1 so that the export must carry them.
    """
    torch.manual_seed(seed)
    model = build_model(cfg.model_config)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm1d):
            module.running_mean.normal_(0, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.normal_(0, 0.1)
    write_resolved_config(cfg, run_dir)
    ckpt.save(run_dir / "checkpoints" / f"step-{STEP:06d}", model.state_dict(), {}, {}, {}, {"step": STEP})
    records = [
        {"step": STEP, "loss": 9.1, "tokens_seen/prose": 640, "tokens_seen/code": 320, "tokens_seen/docs": 320},
        {"step": STEP, "eval_bpb/prose": 3.25, "eval_bpb/code": 3.5, "eval_bpb/mean": 3.375},
    ]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    evals = [{"step": STEP, "task": "peerlab_heldout_mc", "metric": "acc", "value": 0.375, "stderr": 0.125}]
    (run_dir / "evals.jsonl").write_text("".join(json.dumps(r) + "\n" for r in evals))
    return model.eval()


@pytest.fixture(scope="module")
def tokenizer(demo_corpus):
    return load_tokenizer(str(demo_corpus / "tokenizer"))


@pytest.fixture(scope="module")
def prompts(demo_corpus) -> list[str]:
    rows = [json.loads(line) for line in (demo_corpus / "evals" / "bpb_prose.jsonl").read_text().splitlines()]
    return [r["text"][:n] for r, n in zip(rows, (120, 60, 90))]


@pytest.fixture(scope="module")
def exported(demo_corpus, tmp_path_factory) -> dict:
    """arm -> (run folder, export folder, peerlab model in eval mode)."""
    base = tmp_path_factory.mktemp("export")
    out = {}
    for arm, overrides in ARMS.items():
        run_dir = base / f"run-{arm}"
        model = save_run(run_dir, tiny(demo_corpus, *overrides))
        out[arm] = (run_dir, export_checkpoint(run_dir, base / f"hf-{arm}"), model)
    return out


def load_exported(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=True)


def ids_of(tokenizer, texts: list[str]) -> torch.Tensor:
    """The texts' tokens as one batch, cut to the shortest."""
    rows = [tokenizer(t)["input_ids"] for t in texts]
    n = min(len(r) for r in rows)
    return torch.tensor([r[:n] for r in rows])


# --------------------------------------------------------------------------------------
# The round trip
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("arm", list(ARMS))
def test_exported_logits_equal_peerlabs(exported, tokenizer, prompts, arm):
    _, folder, model = exported[arm]
    hf = load_exported(folder)
    assert not hf.training and hf.dtype == torch.float32
    assert type(hf).__module__.startswith("transformers_modules")  # the folder's own modeling file
    ids = ids_of(tokenizer, prompts)  # (3, T)
    with torch.no_grad():
        want = model(ids)
        got = hf(ids).logits
        assert torch.allclose(got, want, atol=1e-5, rtol=0), (got - want).abs().max()
        # The same weights, name for name (peerlab's under `model.`, the LM head as it is).
        theirs = hf.state_dict()
        for name, value in model.state_dict().items():
            key = name if name.startswith("lm_head.") else f"model.{name}"
            assert torch.equal(theirs[key], value), name
        # The latent cache: the prompt, then one token at a time, gives the logits of the whole sequence.
        out = hf(ids[:, :-3], use_cache=True)
        cache = out.cache if hasattr(out, "cache") else out.past_key_values  # transformers 5.2x, earlier
        steps = [out.logits[:, -1]]
        for t in range(ids.shape[1] - 3, ids.shape[1]):
            out = hf(ids[:, t : t + 1], cache=cache, use_cache=True)
            steps.append(out.logits[:, -1])
        assert cache.get_seq_length() == ids.shape[1]
        assert cache.layers[0].keys.shape[-1] == model.config.mla_config.kv_lora_rank  # latents, not expanded keys
        assert torch.allclose(torch.stack(steps[1:], 1), want[:, -3:], atol=1e-5, rtol=0)


def test_a_bfloat16_checkpoint_exports_as_bfloat16_with_peerlabs_logits(exported, tokenizer, prompts, tmp_path):
    import shutil

    run_dir, _, model = exported["pkm"]
    run16 = tmp_path / "run16"
    shutil.copytree(run_dir, run16)
    model16 = copy.deepcopy(model).to(torch.bfloat16)
    ckpt.save(run16 / "checkpoints" / f"step-{STEP:06d}", model16.state_dict(), {}, {}, {}, {"step": STEP})
    folder = export_checkpoint(run16, tmp_path / "hf16")
    assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"
    hf = load_exported(folder)
    assert hf.dtype == torch.bfloat16
    ids = ids_of(tokenizer, prompts)
    with torch.no_grad():
        # Rounded scores tie often in bfloat16: the export breaks ties as peerlab's search does.
        assert (hf(ids).logits.float() - model16(ids).float()).abs().max() <= 1e-2


def test_a_new_model_from_the_config_starts_as_peerlabs_does(exported):
    """from_config (no weights): every parameter drawn as peerlab draws it, none left uninitialised."""
    from transformers import AutoConfig, AutoModelForCausalLM

    _, folder, model = exported["peer"]
    config = AutoConfig.from_pretrained(str(folder), trust_remote_code=True)
    fresh = AutoModelForCausalLM.from_config(config, trust_remote_code=True).state_dict()
    torch.manual_seed(1)
    reference = build_model(model.config).state_dict()
    for name, want in reference.items():
        got = fresh[name if name.startswith("lm_head.") else f"model.{name}"].double()
        want = want.double()
        assert torch.isfinite(got).all(), name
        if want.numel() == 1:  # BatchNorm's num_batches_tracked
            assert torch.equal(got, want), name
            continue
        assert abs(got.mean() - want.mean()) <= 0.1 * want.std().item() + 0.01, name
        assert abs(got.std() - want.std()) <= 0.1 * want.std().item() + 1e-6, name


def test_greedy_generate_gives_peerlabs_tokens(exported, tokenizer, prompts):
    _, folder, model = exported["peer"]
    hf = load_exported(folder)
    eos = tokenizer.eos_token_id
    ids = ids_of(tokenizer, prompts[:2])
    want = model.generate(ids, max_new_tokens=12, use_cache=False, eos_token_id=eos)
    got = hf.generate(ids, max_new_tokens=12, do_sample=False)
    assert got.tolist() == want.tolist()
    # Prompts of different lengths, left-padded as transformers pads for generation: each row
    # is generated as peerlab generates it alone.
    tokenizer = load_tokenizer(str(folder))
    tokenizer.pad_token, tokenizer.padding_side = tokenizer.eos_token, "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    got = hf.generate(**batch, max_new_tokens=8, do_sample=False)
    width = batch["input_ids"].shape[1]
    for row, text in enumerate(prompts):
        alone = torch.tensor([tokenizer(text)["input_ids"]])
        new = model.generate(alone, max_new_tokens=8, use_cache=False, eos_token_id=eos)[0, alone.shape[1] :]
        assert got[row, width : width + len(new)].tolist() == new.tolist(), row


BLOCKER = r"""
import importlib.abc, json, sys

class NoPeerlab(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "peerlab" or name.startswith("peerlab."):
            raise ImportError(f"{name}: peerlab is not installed here")

sys.meta_path.insert(0, NoPeerlab())
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

folder, text, result = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained(folder)
ids = tokenizer(text, return_tensors="pt").input_ids
with torch.no_grad():
    logits = model(ids).logits
generated = model.generate(ids, max_new_tokens=6, do_sample=False)
assert not [m for m in sys.modules if m == "peerlab" or m.startswith("peerlab.")]
torch.save({"ids": ids, "logits": logits, "generated": generated}, result)
"""


def test_the_folder_loads_and_generates_where_peerlab_is_not_installed(exported, prompts, tmp_path):
    _, folder, model = exported["peer"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    done = subprocess.run(
        [sys.executable, "-c", BLOCKER, str(folder), prompts[0], str(tmp_path / "result.pt")],
        check=False,
        cwd=tmp_path,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = torch.load(tmp_path / "result.pt")
    ids = result["ids"]
    with torch.no_grad():
        assert torch.allclose(result["logits"], model(ids), atol=1e-5, rtol=0)
    eos = load_tokenizer(str(folder)).eos_token_id
    assert result["generated"].tolist() == model.generate(ids, 6, use_cache=False, eos_token_id=eos).tolist()


def test_sharded_weights_load_the_same(exported, tokenizer, prompts, tmp_path):
    run_dir, _, model = exported["peer"]
    folder = export_checkpoint(run_dir, tmp_path / "sharded", max_shard_size="500KB")
    shards = sorted(p.name for p in folder.glob("model-*.safetensors"))
    assert len(shards) > 2 and (folder / "model.safetensors.index.json").is_file()
    ids = ids_of(tokenizer, prompts)
    with torch.no_grad():
        assert torch.allclose(load_exported(folder)(ids).logits, model(ids), atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------
# lm-eval: its `hf` model on the folder against peerlab's adapter on the checkpoint
# --------------------------------------------------------------------------------------


def test_lm_evals_hf_model_scores_the_folder_as_peerlabs_adapter_scores_the_checkpoint(exported, demo_corpus):
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from peerlab.eval.lm import PeerlabLM

    run_dir, folder, _ = exported["peer"]
    manager = TaskManager(
        include_path=str(REGISTRY), include_defaults=False, metadata={"peerlab_eval_data": str(demo_corpus / "evals")}
    )
    tasks = ["peerlab_heldout_mc", "peerlab_bpb_prose"]
    results = {}
    for name, lm in (
        ("peerlab", PeerlabLM(checkpoint=str(run_dir), batch_size=4)),
        ("hf", HFLM(pretrained=str(folder), trust_remote_code=True, batch_size=4, max_length=64, device="cpu")),
    ):
        out = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=8, bootstrap_iters=0)
        results[name] = out["results"]
    ours, theirs = results["peerlab"], results["hf"]
    for metric in ("acc,none", "acc_norm,none"):
        assert theirs["peerlab_heldout_mc"][metric] == ours["peerlab_heldout_mc"][metric], metric
    bpb = ours["peerlab_bpb_prose"]["bits_per_byte,none"]
    assert math.isfinite(bpb) and theirs["peerlab_bpb_prose"]["bits_per_byte,none"] == pytest.approx(bpb, rel=1e-6)


def test_lm_evals_hf_model_generates_peerlabs_text(exported, demo_corpus):
    """generate_until through transformers' generate, prompts of different lengths left-padded in one batch."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from peerlab.eval.lm import PeerlabLM

    run_dir, folder, _ = exported["peer"]
    rows = [json.loads(line) for line in (demo_corpus / "evals" / "bpb_prose.jsonl").read_text().splitlines()]
    args = [(r["text"][: 80 + 13 * i], {"until": ["\n\n"], "max_gen_toks": 10}) for i, r in enumerate(rows[:6])]
    requests = [Instance(request_type="generate_until", doc={}, arguments=a, idx=i) for i, a in enumerate(args)]
    want = PeerlabLM(checkpoint=str(run_dir), batch_size=1).generate_until(requests)
    hf = HFLM(pretrained=str(folder), trust_remote_code=True, batch_size=4, max_length=64, device="cpu")
    assert hf.generate_until(requests) == want


# --------------------------------------------------------------------------------------
# The model card, the command line, bad input
# --------------------------------------------------------------------------------------


def test_fine_tuning_with_transformers_trainer_is_the_same_step_under_gradient_accumulation(
    exported, tokenizer, prompts, tmp_path
):
    """transformers' Trainer hands a model that takes **kwargs the step's label count (`num_items_in_batch`) and
    leaves the division to it: one step over 4 sequences is the same as 1 x 4, 2 x 2 or 4 x 1 micro-batches.
    The loss with the count is the summed cross-entropy over it (float64, directly)."""
    from transformers import Trainer, TrainingArguments

    _, folder, _ = exported["dense"]
    ids = ids_of(tokenizer, prompts + [p[::-1] for p in prompts[:1]])  # (4, T)
    model = load_exported(folder).double()
    logits = model(ids).logits[:, :-1]
    want = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum") / 50
    torch.testing.assert_close(model(ids, labels=ids, num_items_in_batch=50).loss, want, rtol=1e-12, atol=0)

    rows = [{"input_ids": row, "labels": row} for row in ids]
    after = []
    for accumulation in (1, 2, 4):
        model = load_exported(folder)
        args = TrainingArguments(
            output_dir=str(tmp_path / f"ga{accumulation}"),
            per_device_train_batch_size=4 // accumulation,
            gradient_accumulation_steps=accumulation,
            max_steps=1,
            learning_rate=1.0,
            optim="sgd",
            lr_scheduler_type="constant",
            max_grad_norm=0.0,
            report_to=[],
            save_strategy="no",
            use_cpu=True,
            seed=0,
        )
        Trainer(model=model, args=args, train_dataset=rows).train()
        after.append(model.lm_head.weight.detach().clone())
    torch.testing.assert_close(after[1], after[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(after[2], after[0], rtol=1e-5, atol=1e-6)


def test_the_folder_holds_config_code_tokenizer_and_a_model_card_from_the_run(exported):
    _, folder, model = exported["moe"]
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "peerlab" and config["ffn_type"] == "moe"
    assert config["auto_map"] == {
        "AutoConfig": "configuration_peerlab.PeerlabConfig",
        "AutoModelForCausalLM": "modeling_peerlab.PeerlabForCausalLM",
    }
    m = model.config
    assert config["moe_config"]["num_experts"] == m.moe_config.num_experts == 4
    assert config["mla_config"]["kv_lora_rank"] == m.mla_config.kv_lora_rank
    package = ROOT / "platform" / "peerlab" / "export"
    for name in ("configuration_peerlab.py", "modeling_peerlab.py"):
        assert (folder / name).read_bytes() == (package / name).read_bytes()
        assert not re.search(r"^\s*(from|import)\s+peerlab\b", (folder / name).read_text(), re.MULTILINE), name
    assert (folder / "tokenizer.json").is_file()
    card = (folder / "README.md").read_text()
    for line in (
        "mixture of experts from layer 1 on",
        "are used per token, trained with peerlab",
        "- steps: 5 of 6; tokens: 1,280",
        "| prose | 3.2500 |",
        "| mean | 3.3750 |",
        "| peerlab_heldout_mc | acc | 0.3750 | 0.1250 |",
        "ffn_type: moe",
    ):
        assert line in card, line
    assert "| prose | `" in card and "| 0.400 | 640 |" in card  # the data mix: weight share and tokens seen
    # The parameters are the model's, not its BatchNorm statistics (the PEER arm has them).
    _, folder, model = exported["peer"]
    assert f"model of {sum(p.numel() for p in model.parameters()):,} parameters" in (folder / "README.md").read_text()


def export_main(argv: list[str]) -> int:
    sys.path.insert(0, str(ROOT / "experiments"))
    import export

    return export.main(argv)


def refused(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        export_main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err  # one line
    return err


def test_bad_input_is_refused_in_one_line(exported, demo_corpus, tmp_path, capsys):
    import shutil

    import yaml

    run_dir, _, _ = exported["dense"]
    (tmp_path / "empty").mkdir()
    assert "neither a checkpoint folder" in refused(
        capsys, ["--checkpoint", str(tmp_path / "empty"), "--out", str(tmp_path / "a")]
    )
    assert "does not exist" in refused(capsys, ["--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "a")])
    for size in ("lots", "2 gigabytes"):
        assert "give a size like 2GB" in refused(
            capsys, ["--checkpoint", str(run_dir), "--out", str(tmp_path / "a"), "--max-shard-size", size]
        )
    assert not (tmp_path / "a").exists()
    # An output folder that is not empty: refused, replaced with --overwrite.
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    assert "--overwrite" in refused(capsys, ["--checkpoint", str(run_dir), "--out", str(taken)])
    assert (taken / "notes.txt").read_text() == "mine"
    assert export_main(["--checkpoint", str(run_dir), "--out", str(taken), "--overwrite"]) == 0
    assert not (taken / "notes.txt").exists() and (taken / "config.json").is_file()
    capsys.readouterr()  # the export's own progress lines
    # Never over the run itself, another of its checkpoints, or the tokenizer folder it reads.
    assert "choose another --out" in refused(
        capsys, ["--checkpoint", str(run_dir), "--out", str(run_dir), "--overwrite"]
    )
    older = run_dir / "checkpoints" / "step-000001"
    older.mkdir()
    (older / "model.safetensors").write_text("an older checkpoint")
    assert "in the run's checkpoints folder" in refused(
        capsys, ["--checkpoint", str(run_dir / "checkpoints" / f"step-{STEP:06d}"), "--out", str(older), "--overwrite"]
    )
    assert (older / "model.safetensors").read_text() == "an older checkpoint"
    shutil.rmtree(older)
    own = tmp_path / "own-tokenizer"
    shutil.copytree(Path(tiny(demo_corpus).dataset_config.tokenizer_name), own)
    assert "choose another --out" in refused(
        capsys, ["--checkpoint", str(run_dir), "--out", str(own), "--tokenizer", str(own), "--overwrite"]
    )
    assert (own / "tokenizer.json").is_file()
    # A checkpoint whose weights do not match its manifest.
    damaged = tmp_path / "damaged"
    shutil.copytree(run_dir, damaged)
    weights = damaged / "checkpoints" / f"step-{STEP:06d}" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    err = refused(capsys, ["--checkpoint", str(weights.parent), "--out", str(tmp_path / "b")])
    assert "model.safetensors is missing or does not match" in err
    assert not (tmp_path / "b").exists()
    # A run without its resolved config.
    shutil.copyfile(run_dir / "checkpoints" / f"step-{STEP:06d}" / "model.safetensors", weights)
    (damaged / "resolved_config.yaml").unlink()
    with pytest.raises(ExportError, match="no resolved_config.yaml"):
        export_checkpoint(damaged, tmp_path / "c")
    # A resolved config that describes another model than the checkpoint's.
    raw = yaml.safe_load((run_dir / "resolved_config.yaml").read_text())
    raw["model_config"]["intermediate_size"] += 32
    (damaged / "resolved_config.yaml").write_text(yaml.safe_dump(raw))
    err = refused(capsys, ["--checkpoint", str(damaged), "--out", str(tmp_path / "c")])
    assert "the weights do not fit the run's model_config" in err and "fc_in.weight" in err
    assert not (tmp_path / "c").exists() and not (tmp_path / "c.export-tmp").exists()


def test_a_tokenizer_that_is_not_at_hand_is_refused_and_can_be_named(
    exported, demo_corpus, tmp_path, capsys, monkeypatch
):
    import shutil

    import yaml

    run_dir, _, _ = exported["dense"]
    moved = tmp_path / "moved"
    shutil.copytree(run_dir, moved)
    raw = yaml.safe_load((moved / "resolved_config.yaml").read_text())
    raw["dataset_config"]["tokenizer_name"] = "./data/demo/tokenizer"  # relative to where the run was started
    (moved / "resolved_config.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)  # where no data/demo/tokenizer is
    argv = ["--checkpoint", str(moved), "--out", str(tmp_path / "out")]
    assert "--tokenizer" in refused(capsys, argv)
    assert export_main([*argv, "--tokenizer", str(demo_corpus / "tokenizer")]) == 0
    assert (tmp_path / "out" / "tokenizer.json").is_file()


def test_a_sweep_exports_its_best_cells_newest_checkpoint(demo_corpus, tmp_path, capsys):
    import pandas as pd

    sweep = tmp_path / "sweep"
    # Cell A holds the best single trial (0.40) but the worse mean (0.65); cell B wins on its mean (0.55).
    # B's best trial (b0) left no checkpoint, so B's other trial (b1) is exported.
    trials = pd.DataFrame(
        {
            "trial_id": ["a0", "a1", "b0", "b1"],
            "cell": ["A", "A", "B", "B"],
            "mix": ["m", "m", "m", "m"],
            "setting": ["a", "a", "b", "b"],
            "seed": [0, 1, 0, 1],
            "status": ["finished"] * 4,
            "eval_bpb/mean": [0.40, 0.90, 0.50, 0.60],
        }
    )
    sweep.mkdir()
    trials.to_parquet(sweep / "trials.parquet")
    (sweep / "sweep.json").write_text(json.dumps({"name": "sweep", "metric": "eval_bpb/mean", "mode": "min"}))
    cfg = tiny(demo_corpus)
    for i, trial_id in enumerate(["a0", "a1", "b1"]):
        save_run(sweep / "trials" / trial_id, cfg, seed=i)
    (sweep / "trials" / "b0").mkdir()
    assert export_main(["--sweep", str(sweep), "--out", str(tmp_path / "best")]) == 0
    out = capsys.readouterr().out
    assert "best cell of sweep on eval_bpb/mean (min): B" in out and "trial b1" in out
    assert f"\n# b1 (step {STEP})\n" in (tmp_path / "best" / "README.md").read_text()
    # Ranked the other way, cell A wins and its best trial is a1.
    assert export_main(["--sweep", str(sweep), "--out", str(tmp_path / "worst"), "--mode", "max"]) == 0
    assert "trial a1" in capsys.readouterr().out
    assert "no trials.parquet" in refused(capsys, ["--sweep", str(tmp_path), "--out", str(tmp_path / "x")])
