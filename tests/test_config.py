"""The config: every shipped file loads, overrides work, and malformed configs fail in one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from peerlab.config import Config, ConfigError, DatasetEntry, dump_config, load_config, load_mixes, load_mixes_file
from tests.conftest import ROOT

CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def test_configs_folder_is_not_empty():
    names = {p.name for p in CONFIGS}
    assert {"config.yaml", "datasets.yaml", "demo.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_file_loads(path):
    raw = yaml.safe_load(path.read_text())
    if "data_mixes" in raw:
        mixes = load_mixes(path)
        assert mixes and all(m.datasets for m in mixes.values())
        named = load_mixes_file(path)  # the base config it names loads too
        assert named.base_config is None or isinstance(load_config(named.base_config), Config)
    elif "search_space" in raw:  # a sweep's PEER search space (experiments/ablate.py --search-space)
        from peerlab.tune import search_space

        space = search_space(path=str(path))
        base = load_config(ROOT / "configs" / "demo.yaml") if space.match else None  # arms sized to the demo's PEER
        assert space.settings(base=base)
    else:
        cfg = load_config(path)
        assert isinstance(cfg, Config)
        again = yaml.safe_load(dump_config(cfg))  # the resolved config is plain YAML ...
        assert again["model_config"]["hidden_size"] == cfg.model_config.hidden_size


def test_reference_config_holds_the_spec_values():
    cfg = load_config(ROOT / "configs" / "config.yaml")
    m, p, a, t = cfg.model_config, cfg.model_config.peer_config, cfg.model_config.mla_config, cfg.train_config
    assert (m.hidden_size, m.num_hidden_layers, m.num_attention_heads, m.intermediate_size) == (768, 12, 12, 3072)
    assert (m.vocab_size, m.max_position_embeddings, m.initializer_range, m.layer_norm_eps) == (50272, 2048, 0.02, 1e-5)
    assert (m.use_peer, m.peer_start_layer) == (True, 2)
    assert (p.num_experts, p.num_experts_per_tok, p.num_heads, p.expert_hidden_size) == (1048576, 16, 8, 1)
    assert (p.product_key_dim, p.query_dim, p.batch_norm_query) == ([1024, 1024], 256, True)
    assert (p.log_expert_usage, p.log_freq, p.usage_threshold) == (True, 1000, 5.0)
    assert (a.q_lora_rank, a.kv_lora_rank, a.qk_rope_head_dim, a.v_head_dim, a.qk_nope_head_dim) == (
        1536,
        512,
        64,
        128,
        128,
    )
    assert a.rope_theta == 10000.0
    assert (t.learning_rate, t.weight_decay, t.max_grad_norm, t.gradient_accumulation_steps) == (5e-5, 0.01, 1.0, 4)
    assert (t.num_train_epochs, t.steps_per_epoch, t.max_steps) == (3, 10000, None)
    assert (t.lr_scheduler_type, t.warmup_ratio, t.logging_steps, t.save_steps, t.eval_steps) == (
        "cosine",
        0.1,
        100,
        1000,
        2000,
    )
    assert (t.seed, t.fp16, t.bf16, t.tf32, t.resume_from_checkpoint) == (42, True, False, False, None)
    d = cfg.dataset_config
    assert [x.name for x in d.datasets] == ["pile-uncopyrighted", "c4"]
    assert [x.weight for x in d.datasets] == [0.7, 0.2] and d.datasets[1].subset == "en"
    assert (d.tokenizer_name, d.max_seq_length) == ("gpt2", 2048)
    assert cfg.eval_config.evals == ["hellaswag", "mmlu", "truthfulqa", "gsm8k", "humaneval"]
    assert cfg.eval_config.eval_batch_size == 16 and cfg.eval_config.evals_registry_path == "./evals/registry"
    assert cfg.wandb_config.project == "llm-research" and cfg.wandb_config.log_model == "checkpoints"


def test_scientific_notation_strings_become_floats(tmp_path):
    path = write(tmp_path, base_raw())
    assert "1e-3" in path.read_text()  # YAML 1.1 reads this as a string ...
    cfg = load_config(path, ["train_config.weight_decay=5e-5", "model_config.layer_norm_eps=1e-6"])
    assert cfg.train_config.learning_rate == 1e-3  # ... and the config makes it a float
    assert cfg.train_config.weight_decay == 5e-5 and cfg.model_config.layer_norm_eps == 1e-6


def test_overrides_set_nested_keys_list_items_and_null(tmp_path):
    path = write(tmp_path, base_raw())
    cfg = load_config(
        path,
        [
            "train_config.learning_rate=3e-4",
            "model_config.peer_config.product_key_dim=[16, 16]",
            "model_config.peer_config.num_experts=256",
            "dataset_config.datasets.1.weight=2.5",
            "model_config.mla_config.q_lora_rank=null",
            "wandb_config.project=sweeps",
            "train_config.max_steps=null",
            "train_config.num_train_epochs=2",
            "train_config.steps_per_epoch=10",
        ],
    )
    assert cfg.train_config.learning_rate == 3e-4
    assert cfg.model_config.peer_config.product_key_dim == [16, 16]
    assert cfg.dataset_config.datasets[1].weight == 2.5
    assert cfg.model_config.mla_config.q_lora_rank is None
    assert cfg.wandb_config.project == "sweeps"
    assert (cfg.train_config.max_steps, cfg.train_config.num_train_epochs) == (None, 2)


def test_q_lora_rank_zero_means_direct_projection(tmp_path):
    cfg = load_config(write(tmp_path, base_raw()), ["model_config.mla_config.q_lora_rank=0"])
    assert cfg.model_config.mla_config.q_lora_rank is None


def test_defaults_fill_missing_keys(tmp_path):
    raw = base_raw()
    del raw["model_config"]["mla_config"]["rope_theta"]
    del raw["eval_config"]
    del raw["wandb_config"]
    cfg = load_config(write(tmp_path, raw))
    assert cfg.model_config.mla_config.rope_theta == 10000.0
    assert cfg.eval_config.eval_batch_size == 16 and cfg.wandb_config is None


# --------------------------------------------------------------------------------------
# Malformed configs: each gives one line that names the file and the key path.
# --------------------------------------------------------------------------------------


def base_raw() -> dict:
    return yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())


def write(tmp_path: Path, raw, name="config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(raw if isinstance(raw, str) else yaml.safe_dump(raw, sort_keys=False).replace("'1e-3'", "1e-3"))
    return path


def setter(path: str, value):
    def change(raw):
        node = raw
        keys = path.split(".")
        for key in keys[:-1]:
            node = node[int(key)] if isinstance(node, list) else node[key]
        if isinstance(node, list):
            node[int(keys[-1])] = value
        else:
            node[keys[-1]] = value

    return change


def deleter(path: str):
    def change(raw):
        node = raw
        keys = path.split(".")
        for key in keys[:-1]:
            node = node[int(key)] if isinstance(node, list) else node[key]
        del node[keys[-1]]

    return change


def both(*changes):
    def change(raw):
        for c in changes:
            c(raw)

    return change


MALFORMED = [
    # (id, change to the demo config, text the error must contain)
    (
        "unknown key",
        setter("model_config.hiden_size", 64),
        "model_config.hiden_size: unknown key; did you mean 'hidden_size'?",
    ),
    ("unknown nested key", setter("model_config.peer_config.num_expert", 4), "did you mean 'num_experts'?"),
    ("unknown section", setter("trainer_config", {}), "did you mean 'train_config'?"),
    ("unknown dataset key", setter("dataset_config.datasets.0.txt_field", "a"), "dataset_config.datasets.0.txt_field"),
    ("string for int", setter("model_config.hidden_size", "big"), "model_config.hidden_size: expected an integer"),
    (
        "float for int",
        setter("model_config.num_hidden_layers", 2.5),
        "model_config.num_hidden_layers: expected an integer",
    ),
    ("bool for int", setter("train_config.save_steps", True), "train_config.save_steps: expected an integer"),
    ("word for float", setter("train_config.learning_rate", "fast"), "train_config.learning_rate: expected a number"),
    ("string for bool", setter("model_config.use_peer", "maybe"), "model_config.use_peer: expected true or false"),
    ("scalar for section", setter("model_config.peer_config", 5), "model_config.peer_config: expected a mapping"),
    ("scalar for list", setter("model_config.peer_config.product_key_dim", 256), "product_key_dim: expected a list"),
    ("null required", setter("model_config.hidden_size", None), "model_config.hidden_size: must not be null"),
    ("negative size", setter("model_config.hidden_size", -8), "model_config.hidden_size: must be > 0"),
    ("zero heads", setter("model_config.num_attention_heads", 0), "model_config.num_attention_heads: must be > 0"),
    ("product key mismatch", setter("model_config.peer_config.num_experts", 1000), "differs from num_experts = 1000"),
    ("three sub-key sets", setter("model_config.peer_config.product_key_dim", [16, 16, 256]), "needs two sizes"),
    (
        "k larger than sub-keys",
        both(
            setter("model_config.peer_config.num_experts", 1024),
            setter("model_config.peer_config.product_key_dim", [4, 256]),
        ),
        "num_experts_per_tok: 8 is larger than the sub-key set of 4",
    ),
    ("odd query dim", setter("model_config.peer_config.query_dim", 63), "query_dim: must be even"),
    (
        "peer start outside",
        setter("model_config.peer_start_layer", 4),
        "peer_start_layer: 4 is outside the layers 0..3",
    ),
    ("peer start negative", setter("model_config.peer_start_layer", -1), "peer_start_layer: -1 is outside"),
    ("odd rope dim", setter("model_config.mla_config.qk_rope_head_dim", 15), "qk_rope_head_dim: must be even"),
    ("zero kv rank", setter("model_config.mla_config.kv_lora_rank", 0), "kv_lora_rank: must be > 0"),
    (
        "fp16 and bf16",
        both(setter("train_config.fp16", True), setter("train_config.bf16", True)),
        "fp16 and bf16 are both true",
    ),
    (
        "both durations",
        setter("train_config.num_train_epochs", 2),
        "set exactly one of max_steps and num_train_epochs (both are set)",
    ),
    ("no duration", deleter("train_config.max_steps"), "(neither is set)"),
    (
        "epochs on streaming",
        both(deleter("train_config.max_steps"), setter("train_config.num_train_epochs", 1)),
        "need train_config.steps_per_epoch",
    ),
    (
        "text field and template",
        setter("dataset_config.datasets.0.text_template", "{text}"),
        "set exactly one of text_field and text_template (both are set)",
    ),
    ("neither text field nor template", deleter("dataset_config.datasets.0.text_field"), "(neither is set)"),
    (
        "a text file without its field",
        both(deleter("dataset_config.datasets.0.text_field"), setter("dataset_config.datasets.0.format", "text")),
        "(neither is set; a text file's documents are its field 'text': text_field: text)",
    ),
    ("zero weight", setter("dataset_config.datasets.1.weight", 0), "dataset_config.datasets.1.weight: must be > 0"),
    ("negative weight", setter("dataset_config.datasets.0.weight", -0.5), "must be > 0"),
    (
        "duplicate dataset name",
        setter("dataset_config.datasets.1.name", "prose"),
        "'prose' is already the name of dataset_config.datasets.0",
    ),
    ("no datasets", setter("dataset_config.datasets", []), "dataset_config.datasets: needs at least one dataset"),
    (
        "bad format",
        setter("dataset_config.datasets.0.format", "xml"),
        "format: must be one of json, jsonl, csv, text, parquet",
    ),
    (
        "template attribute access",
        both(
            deleter("dataset_config.datasets.0.text_field"),
            setter("dataset_config.datasets.0.text_template", "{x.__class__}"),
        ),
        "not a plain field name",
    ),
    (
        "template index access",
        both(
            deleter("dataset_config.datasets.0.text_field"), setter("dataset_config.datasets.0.text_template", "{x[0]}")
        ),
        "not a plain field name",
    ),
    (
        "template without field",
        both(
            deleter("dataset_config.datasets.0.text_field"), setter("dataset_config.datasets.0.text_template", "hello")
        ),
        "uses no field",
    ),
    (
        "template unbalanced brace",
        both(
            deleter("dataset_config.datasets.0.text_field"), setter("dataset_config.datasets.0.text_template", "{text")
        ),
        "not a valid template",
    ),
    ("scheduler typo", setter("train_config.lr_scheduler_type", "cosin"), "did you mean 'cosine'?"),
    ("log level", setter("train_config.log_level", "verbose"), "train_config.log_level: must be one of"),
    ("warmup ratio", setter("train_config.warmup_ratio", 1.5), "warmup_ratio: must be in [0, 1)"),
    (
        "sequence longer than positions",
        setter("dataset_config.max_seq_length", 4096),
        "longer than model_config.max_position_embeddings",
    ),
    ("eval batch", setter("eval_config.eval_batch_size", 0), "eval_config.eval_batch_size: must be > 0"),
    ("eval listed twice", setter("eval_config.evals", ["hellaswag", "hellaswag"]), "'hellaswag' is listed twice"),
    (
        "wandb log_model",
        setter("wandb_config", {"project": "p", "log_model": "sometimes"}),
        "wandb_config.log_model: must be one of",
    ),
    ("negative weight decay", setter("train_config.weight_decay", -0.1), "weight_decay: must be >= 0"),
    (
        "zero accumulation",
        setter("train_config.gradient_accumulation_steps", 0),
        "gradient_accumulation_steps: must be > 0",
    ),
    (
        "infinite learning rate",
        setter("train_config.learning_rate", "inf"),
        "train_config.learning_rate: must be a finite number",
    ),
    (
        "nan weight",
        setter("dataset_config.datasets.0.weight", float("nan")),
        "datasets.0.weight: must be a finite number",
    ),
    (
        "inf init range",
        setter("model_config.initializer_range", float("inf")),
        "initializer_range: must be a finite number",
    ),
    ("seed too large", setter("train_config.seed", 2**70), "train_config.seed: must be below 2**32"),
    ("newline in key", setter("model_config.a\nb", 1), "model_config.a\\nb: unknown key"),
]


@pytest.mark.parametrize("change,expected", [(c, e) for _, c, e in MALFORMED], ids=[i for i, _, _ in MALFORMED])
def test_malformed_config_gives_one_line_error(tmp_path, change, expected):
    raw = base_raw()
    change(raw)
    path = write(tmp_path, raw, name="bad.yaml")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    assert expected in message


def test_there_are_at_least_30_malformed_cases():
    assert len(MALFORMED) >= 30


@pytest.mark.parametrize(
    "text,expected",
    [
        ("model_config:\n  hidden_size: 64\n  hidden_size: 32\n", "key 'hidden_size' appears twice"),
        ("model_config: [1, 2\n", "invalid YAML (line"),
        ("- just\n- a list\n", "expected a mapping of sections"),
        ("model_config: !!python/object:os.system {}\n", "invalid YAML"),
        ("model_config:\n  ? [a, b]\n  : 1\n", "a key must be a plain name"),
    ],
)
def test_unreadable_yaml_gives_one_line_error(tmp_path, text, expected):
    path = write(tmp_path, text, name="broken.yaml")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value) and expected in str(err.value)


def test_yaml_merge_keys_work(tmp_path):
    text = write(tmp_path, base_raw()).read_text().replace("    num_heads: 4\n", "")
    assert "num_heads" not in text
    path = write(tmp_path, text.replace("  peer_config:\n", "  peer_config:\n    <<: {num_heads: 2}\n"))
    assert load_config(path).model_config.peer_config.num_heads == 2


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    "override,expected",
    [
        ("train_config.lr=1e-4", "train_config.lr (from --set): unknown key; did you mean 'learning_rate'?"),
        ("train_config.learning_rate", "expected key=value"),
        ("dataset_config.datasets.7.weight=1", "is not an index"),
        ("train_config.seed.x=1", "is a single value"),
        ("train_config.learning_rate=abc", "train_config.learning_rate (from --set): expected a number"),
        ("eval_config.eval_batch_size=3", "eval_config (from --set): is [1] in the file, not a mapping"),
        ("dataset_config.datasets.0.weight=1", "dataset_config.datasets.0 (from --set): is 'oops' in the file"),
    ],
)
def test_bad_overrides(tmp_path, override, expected):
    raw = base_raw()
    if override.startswith("eval_config"):
        raw["eval_config"] = [1]
    if override.startswith("dataset_config.datasets.0"):
        raw["dataset_config"]["datasets"] = ["oops"]
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, raw), [override])
    assert expected in str(err.value) and "\n" not in str(err.value)


# --------------------------------------------------------------------------------------
# datasets.yaml (named mixes)
# --------------------------------------------------------------------------------------


def mix(name, *entries):
    return {"name": name, "datasets": list(entries)}


ENTRY = {"name": "a", "path": "/data/a.jsonl", "format": "json", "split": "train", "weight": 1.0, "text_field": "text"}


def test_mixes_load_with_keys_and_names(tmp_path):
    raw = {"data_mixes": {"m1": mix("first", ENTRY), "m2": mix("second", ENTRY, {**ENTRY, "name": "b"})}}
    mixes = load_mixes(write(tmp_path, raw, "mixes.yaml"))
    assert list(mixes) == ["m1", "m2"] and mixes["m1"].name == "first"
    assert isinstance(mixes["m2"].datasets[1], DatasetEntry) and mixes["m2"].datasets[1].name == "b"


@pytest.mark.parametrize(
    "raw,expected",
    [
        (
            {"data_mixes": {"m1": mix("same", ENTRY), "m2": mix("same", ENTRY)}},
            "mix name 'same' is already used by data_mixes.m1",
        ),
        ({"data_mixes": {"m1": mix("m1", {**ENTRY, "weight": 0})}}, "data_mixes.m1.datasets.0.weight: must be > 0"),
        ({"data_mixes": {"m1": mix("m1", ENTRY, ENTRY)}}, "'a' is already the name of data_mixes.m1.datasets.0"),
        ({"data_mixes": {"m1": {"name": "m1", "datasets": [], "extra": 1}}}, "data_mixes.m1.extra: unknown key"),
        ({"data_mixes": {"m1": mix("m1")}}, "data_mixes.m1.datasets: needs at least one dataset"),
        ({"mixes": {}}, "expected a top-level 'data_mixes:'"),
        ({"data_mixes": {"m1": mix("m1", {**ENTRY, "text_template": "{a}"})}}, "set exactly one of text_field"),
    ],
)
def test_bad_mixes(tmp_path, raw, expected):
    with pytest.raises(ConfigError) as err:
        load_mixes(write(tmp_path, raw, "mixes.yaml"))
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_mixes_file_names_its_base_config_and_search_space(tmp_path):
    (tmp_path / "base.yaml").write_text("model_config: {}\n")
    (tmp_path / "space.yaml").write_text("search_space:\n  grid:\n    peer_config.num_experts_per_tok: [4, 16]\n")
    sub = tmp_path / "sub"
    sub.mkdir()
    raw = {"base_config": "../base.yaml", "search_space": "../space.yaml", "data_mixes": {"m1": mix("m1", ENTRY)}}
    named = load_mixes_file(write(sub, raw, "mixes.yaml"))  # names are relative to the mixes file, not the cwd
    assert named.base_config == sub / "../base.yaml" and named.search_space == sub / "../space.yaml"
    assert list(named.mixes) == ["m1"]
    inline = {"grid": {"peer_config.num_experts_per_tok": [4, 16]}, "baseline": True}
    named = load_mixes_file(write(tmp_path, {"search_space": inline, "data_mixes": {"m1": mix("m1", ENTRY)}}, "m.yaml"))
    assert named.search_space == inline and named.base_config is None
    assert load_mixes_file(write(tmp_path, {"data_mixes": {"m1": mix("m1", ENTRY)}}, "m.yaml")).search_space is None


@pytest.mark.parametrize(
    "extra,expected",
    [
        ({"base_confg": "base.yaml"}, "base_confg: unknown key; did you mean 'base_config'?"),
        ({"base_config": "missing.yaml"}, "base_config: no file"),
        ({"base_config": 3}, "base_config: expected a config file"),
        ({"search_space": "nowhere.yaml"}, "search_space: no file"),
        ({"search_space": ["grid"]}, "search_space: expected a search space file, or a mapping"),
    ],
)
def test_bad_base_config_or_search_space_in_mixes(tmp_path, extra, expected):
    with pytest.raises(ConfigError) as err:
        load_mixes_file(write(tmp_path, {**extra, "data_mixes": {"m1": mix("m1", ENTRY)}}, "mixes.yaml"))
    assert expected in str(err.value) and "mixes.yaml" in str(err.value) and "\n" not in str(err.value)


def test_mix_name_twice_as_yaml_key(tmp_path):
    text = "data_mixes:\n  m1:\n    name: m1\n    datasets: []\n  m1:\n    name: m1\n    datasets: []\n"
    with pytest.raises(ConfigError, match="key 'm1' appears twice"):
        load_mixes(write(tmp_path, text, "mixes.yaml"))


# --------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------


def run_train(*args):
    return subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "train.py"), *args], capture_output=True, text=True, cwd=ROOT
    )


def test_dry_run_prints_config_sizes_and_memory():
    out = run_train("--config", "configs/config.yaml", "--dry-run", "--workers", "8")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "hidden_size: 768" in text
    assert "16,106,127,360" in text  # PEER experts: 10 layers x 2 x 1,048,576 x 768
    for part in ("embeddings", "attention", "dense MLP", "PEER experts", "PEER keys and query"):
        assert part in text
    assert "AdamW state" in text and "FSDP over 8 workers" in text


@pytest.mark.parametrize(
    "text,args",
    [
        ("model_config:\n  ? [a, b]\n  : 1\n", []),
        ("eval_config: [1]\n", ["--set", "eval_config.eval_batch_size=3"]),
        ("train_config:\n  learning_rate: .nan\n", []),
        ("", []),
    ],
)
def test_broken_files_exit_2_with_one_line(tmp_path, text, args):
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    out = run_train("--config", str(path), *args, "--dry-run")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.count("\n") == 1 and str(path) in out.stderr


def test_dry_run_with_override_and_bad_config():
    ok = run_train("--config", "configs/demo.yaml", "--set", "model_config.num_hidden_layers=2", "--dry-run")
    assert ok.returncode == 0 and "num_hidden_layers: 2" in ok.stdout
    bad = run_train("--config", "configs/demo.yaml", "--set", "model_config.peer_start_layer=9", "--dry-run")
    assert bad.returncode == 2
    assert bad.stdout == "" and "Traceback" not in bad.stderr
    assert bad.stderr.count("\n") == 1 and "peer_start_layer" in bad.stderr and "demo.yaml" in bad.stderr
