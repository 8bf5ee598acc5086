"""The typed configuration tree, loaded strictly from YAML.

One dataclass per section of the user's specification (`shared/spec/configuration-guide.md`),
nested like the YAML. `load_config(path, overrides)` is the only way a run gets a config:
it reads the file with a safe loader (duplicate keys are errors), applies `--set`-style
overrides, converts every value to its declared type, and checks every range and every
combination of keys. Anything wrong raises `ConfigError` with a one-line message that names
the file, the key path and, where it is obvious, the fix.

`load_mixes(path)` does the same for the `data_mixes:` file of ablations (`configs/datasets.yaml`);
`load_mixes_file(path)` also gives the base config and search space such a file may name.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import string
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from peerlab.storage import SCHEMES, scheme


class ConfigError(ValueError):
    """A config that cannot be used; the message is one line naming file, key and reason."""

    def __init__(self, message: str):
        super().__init__(message.replace("\r", "\\r").replace("\n", "\\n"))  # one line, whatever the keys hold


# --------------------------------------------------------------------------------------
# The tree. Defaults are the specification's values; keys the spec leaves optional are None.
# --------------------------------------------------------------------------------------


@dataclass
class PeerConfig:
    num_experts: int = 1048576  # N, the number of experts (product of product_key_dim)
    num_experts_per_tok: int = 16  # k: experts retrieved per token and per head
    num_heads: int = 8  # retrieval heads; each has its own query, all share the experts
    expert_hidden_size: int = 1  # 1: single-neuron experts, as in the paper
    product_key_dim: list[int] = field(default_factory=lambda: [1024, 1024])  # sizes of the two sub-key sets
    query_dim: int = 256  # query size per head; each half is scored against one sub-key set
    batch_norm_query: bool = True  # normalise the query (BatchNorm, as in the paper; see model/peer.py)
    log_expert_usage: bool = True  # track expert usage
    log_freq: int = 1000  # steps between usage logs
    usage_threshold: float = 5.0  # an expert used this many times the uniform share is "hot"


@dataclass
class MoEConfig:
    """ffn_type moe: token-choice top-k mixture of GELU MLP experts (DeepSeekMoE; see model/moe.py)."""

    num_experts: int = 8  # routed experts
    top_k: int = 2  # routed experts per token
    expert_size: int = 768  # hidden width of each expert (routed and shared)
    num_shared_experts: int = 1  # always-on experts of the same size
    balance_loss_weight: float = 0.01  # alpha of the expert-level balance loss; 0: off


@dataclass
class PKMConfig:
    """ffn_type pkm: a product-key memory (Lample et al. 2019; see model/pkm.py); PEER's search, own values."""

    num_experts: int = 65536  # memory size N: value rows (product of product_key_dim)
    num_experts_per_tok: int = 32  # k: memory rows read per token and per head
    num_heads: int = 4  # memory heads; each has its own query and sub-keys, all share the values
    product_key_dim: list[int] = field(default_factory=lambda: [256, 256])  # sizes of the two sub-key sets
    query_dim: int = 256  # query size per head; each half is scored against one sub-key set
    batch_norm_query: bool = True  # BatchNorm on the query, as in the paper


FFN_TYPES = ("peer", "dense", "moe", "pkm")


@dataclass
class MLAConfig:
    q_lora_rank: Optional[int] = 1536  # rank of the query's low-rank path; null or 0: direct projection
    kv_lora_rank: int = 512  # size of the shared key/value latent (what the cache stores)
    qk_rope_head_dim: int = 64  # rotary part of each query/key head (one rotary key shared by all heads)
    v_head_dim: int = 128  # value size per head
    qk_nope_head_dim: int = 128  # non-rotary part of each query/key head
    rope_theta: float = 10000.0  # RoPE base


@dataclass
class ModelConfig:
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072  # dense MLP width (layers before peer_start_layer, or all with ffn_type dense)
    vocab_size: int = 50272
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-5
    use_peer: Optional[bool] = None  # null: from ffn_type; false is ffn_type dense, true is ffn_type peer
    peer_start_layer: int = 2  # 0-based index of the first PEER (or MoE, PKM) layer
    ffn_type: Optional[str] = None  # peer, dense, moe or pkm from peer_start_layer on; null: from use_peer (peer)
    peer_config: PeerConfig = field(default_factory=PeerConfig)
    moe_config: MoEConfig = field(default_factory=MoEConfig)
    pkm_config: PKMConfig = field(default_factory=PKMConfig)
    mla_config: MLAConfig = field(default_factory=MLAConfig)


LR_SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")
LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass
class TrainConfig:
    output_dir: str = "./output"
    per_device_train_batch_size: int = 16
    per_device_eval_batch_size: int = 16
    gradient_accumulation_steps: int = 4
    learning_rate: float = 5e-5
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    max_steps: Optional[int] = None  # set exactly one of max_steps and num_train_epochs
    num_train_epochs: Optional[int] = None
    steps_per_epoch: Optional[int] = None  # required with num_train_epochs on streaming data
    lr_scheduler_type: str = "cosine"
    warmup_ratio: float = 0.1
    log_level: str = "info"
    logging_steps: int = 100
    save_steps: int = 1000
    eval_steps: int = 2000
    seed: int = 42
    fp16: bool = False  # the spec's example says true, but its note says false with Float8 (the default)
    bf16: bool = False
    tf32: bool = False
    resume_from_checkpoint: Optional[str] = None
    # --- peerlab's own keys (not in the guide) ---
    float8: bool = True  # torchao Float8 training where the GPU supports it (compute capability 8.9+)
    num_workers: int = 1  # Ray Train workers; 0 runs the loop in the driver's process (Train's local mode)
    use_gpu: Optional[bool] = None  # null: GPUs when the cluster has one per worker
    max_failures: int = 2  # worker-group restarts Ray Train may make before the run fails
    save_total_limit: int = 2  # checkpoints kept in <run>/checkpoints (oldest removed first)
    sparse_experts: Optional[bool] = None  # row-sparse PEER table gradients + lazy AdamW; null: on unless fsdp
    fsdp: bool = False  # shard parameters, gradients and optimizer state across workers (FSDP2 fully_shard)
    compile: bool | Literal["auto"] = "auto"  # torch.compile each transformer block; auto: on CUDA only


DATA_FORMATS = ("json", "jsonl", "csv", "text", "parquet")


@dataclass
class DatasetEntry:
    name: str
    path: str  # Hugging Face dataset name or local path (file or folder)
    subset: Optional[str] = None  # hub config name (e.g. "en" for c4)
    format: Optional[str] = None  # local files: json, jsonl, csv, text or parquet
    split: str = "train"
    streaming: bool = True
    weight: float = 1.0  # share of training tokens, normalised over the list
    text_field: Optional[str] = None  # set exactly one of text_field and text_template
    text_template: Optional[str] = None  # e.g. "Q: {question}\nA: {answer}"; plain field names only
    text_unit: str = "line"  # format text: one document per "line" or per "file"
    skip_bad_records: bool = False  # false: a record without its text is an error; true: skipped and counted


TEXT_UNITS = ("line", "file")


@dataclass
class DatasetConfig:
    datasets: list[DatasetEntry] = field(default_factory=list)
    tokenizer_name: str = "gpt2"
    max_seq_length: int = 2048
    heldout_fraction: float = 0.01  # share of documents held out where a dataset has no held-out split
    # peerlab's own key (README, "The config"): datasets whose held-out part is evaluated, never trained on;
    # a sweep gives each trial the datasets of the other mixes, so every mix is measured on the same text
    eval_datasets: list[DatasetEntry] = field(default_factory=list)


@dataclass
class EvalConfig:
    evals_registry_path: str = "./evals/registry"
    evals: list[str] = field(default_factory=lambda: ["hellaswag", "mmlu", "truthfulqa", "gsm8k", "humaneval"])
    eval_batch_size: int = 16
    # peerlab's own keys (README, "The config"):
    lm_eval_steps: Optional[int] = None  # also run the lm-eval set every this many steps; null: at the end only
    lm_eval_limit: Optional[int] = None  # at most this many documents per task; null: all
    eval_data_dir: Optional[str] = None  # the registry tasks' data folder; null: the one the task YAML names
    confirm_run_unsafe_code: bool = False  # run code-executing tasks (humaneval), as lm-eval requires


WANDB_LOG_MODEL = ("checkpoints", "all")


@dataclass
class WandbConfig:
    project: str = "llm-research"
    entity: Optional[str] = None
    name: Optional[str] = None
    log_model: Optional[str] = "checkpoints"  # "checkpoints", "all" or null


@dataclass
class Config:
    model_config: ModelConfig = field(default_factory=ModelConfig)
    train_config: TrainConfig = field(default_factory=TrainConfig)
    dataset_config: DatasetConfig = field(default_factory=DatasetConfig)
    eval_config: EvalConfig = field(default_factory=EvalConfig)
    wandb_config: Optional[WandbConfig] = None  # null or absent: wandb is off


@dataclass
class DataMix:
    """One named mix of `datasets.yaml`: the key under `data_mixes:` and its datasets."""

    key: str
    name: str
    datasets: list[DatasetEntry]


# --------------------------------------------------------------------------------------
# YAML: safe loading, duplicate keys refused.
# --------------------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a mapping with the same key twice (plain YAML keeps the last)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    loader.flatten_mapping(node)  # YAML merge keys (<<: *defaults) as SafeLoader does them
    mapping = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if not isinstance(key, (str, int, float, bool)) and key is not None:
            raise yaml.constructor.ConstructorError(
                None, None, f"a key must be a plain name, got {key!r}", key_node.start_mark
            )
        if key in mapping:
            raise yaml.constructor.ConstructorError(
                None, None, f"key '{key}' appears twice in one mapping", key_node.start_mark
            )
        mapping[key] = loader.construct_object(value_node, deep=deep)
    return mapping


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def read_yaml(path: str | Path) -> Any:
    """Parse a YAML file safely; every failure is a one-line ConfigError naming the file."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read ({err.strerror})") from None
    try:
        return yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{path}: invalid YAML{where}: {problem}") from None


# --------------------------------------------------------------------------------------
# Raw dict -> typed dataclasses
# --------------------------------------------------------------------------------------


class _Source:
    """Where values came from, for error messages: the file, and which keys --set changed."""

    def __init__(self, file: str | Path, overridden: set[str] = frozenset()):
        self.file = str(file)
        self.overridden = set(overridden)

    def error(self, path: str, message: str) -> ConfigError:
        from_set = any(key == path or key.startswith(path + ".") for key in self.overridden)
        origin = " (from --set)" if from_set else ""
        return ConfigError(f"{self.file}: {path}{origin}: {message}")


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """Optional[X] -> (X, True); X -> (X, False)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _type_name(tp: Any, plural: bool = False) -> str:
    if typing.get_origin(tp) is Literal:
        return " or ".join(f'"{a}"' for a in typing.get_args(tp))
    if typing.get_origin(tp) in (typing.Union, types.UnionType):  # e.g. true, false or "auto"
        names = [n for a in typing.get_args(tp) for n in (["true", "false"] if a is bool else [_type_name(a)])]
        return ", ".join(names[:-1]) + " or " + names[-1]
    if plural:
        return {int: "integers", float: "numbers", bool: "booleans", str: "strings"}.get(tp, "mappings")
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    if typing.get_origin(tp) is list:
        return f"a list of {_type_name(typing.get_args(tp)[0], plural=True)}"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[tp]


def _convert(value: Any, tp: Any, path: str, src: _Source) -> Any:
    tp, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise src.error(path, f"must not be null; expected {_type_name(tp)}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise src.error(path, f"expected a mapping of keys, got {value!r}")
        return _build(tp, value, path, src)
    if typing.get_origin(tp) is list:
        if not isinstance(value, list):
            raise src.error(path, f"expected {_type_name(tp)}, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_convert(v, item_tp, f"{path}.{i}", src) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads 1e-5 (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None and math.isfinite(number):
            return number
        if number is not None:
            raise src.error(path, f"must be a finite number, got {value!r}")
    elif tp is str:
        if isinstance(value, str):
            return value
    elif typing.get_origin(tp) is Literal:
        if any(type(value) is type(a) and value == a for a in typing.get_args(tp)):
            return value
    elif typing.get_origin(tp) in (typing.Union, types.UnionType):  # the first type that takes the value
        for option in typing.get_args(tp):
            try:
                return _convert(value, option, path, src)
            except ConfigError:
                pass
    raise src.error(path, f"expected {_type_name(tp)}, got {value!r}")


def _suggest(key: str, valid: list[str] | tuple[str, ...]) -> str | None:
    """The valid key the user most likely meant: a close spelling, initials (lr), or a part of it."""
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    if close:
        return close[0]
    for name in valid:
        if "".join(word[:1] for word in name.split("_")) == key.lower():
            return name
    parts = [name for name in valid if len(key) >= 3 and key.lower() in name]
    return parts[0] if len(parts) == 1 else None


def _unknown_key(path: str, key: Any, valid: list[str], src: _Source) -> ConfigError:
    guess = _suggest(str(key), valid)
    hint = f"did you mean '{guess}'?" if guess else f"valid keys: {', '.join(valid)}"
    return src.error(f"{path}.{key}" if path else str(key), f"unknown key; {hint}")


def _build(cls: type, raw: dict, path: str, src: _Source) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            raise _unknown_key(path, key, list(fields), src)
    kwargs = {}
    for name, f in fields.items():
        sub = f"{path}.{name}" if path else name
        if name in raw:
            kwargs[name] = _convert(raw[name], hints[name], sub, src)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise src.error(sub, "is required")
    return cls(**kwargs)


# --------------------------------------------------------------------------------------
# Overrides: "train_config.learning_rate=3e-4"
# --------------------------------------------------------------------------------------


def _field_type(cls: Any, name: str) -> Any:
    return typing.get_type_hints(cls)[name]


def apply_override(raw: dict, override: str, src: _Source) -> str:
    """Set one `dotted.key=value` in the raw YAML dict (value parsed as YAML); return the key path.

    The path is checked against the typed tree, so a typo fails here with a suggestion.
    List items are addressed by index: `dataset_config.datasets.0.weight=0.5`.
    """
    if "=" not in override:
        raise ConfigError(f"--set {override}: expected key=value, e.g. train_config.learning_rate=3e-4")
    key, text = override.split("=", 1)
    key = key.strip()
    src.overridden.add(key)
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    parts = key.split(".")
    node, tp = raw, Config
    for i, part in enumerate(parts):
        here = ".".join(parts[:i])
        last = i == len(parts) - 1
        tp, _ = _unwrap_optional(tp)
        if dataclasses.is_dataclass(tp):
            names = [f.name for f in dataclasses.fields(tp)]
            if part not in names:
                raise _unknown_key(here, part, names, src)
            if not isinstance(node, dict):
                raise src.error(here, f"is {node!r} in the file, not a mapping, so --set cannot reach {key}")
            tp = _field_type(tp, part)
            if last:
                node[part] = value
            else:
                if node.get(part) is None:  # absent or null: the section starts empty
                    node[part] = {}
                node = node[part]
        elif typing.get_origin(tp) is list:
            if not part.isdigit() or not isinstance(node, list) or int(part) >= len(node):
                size = len(node) if isinstance(node, list) else 0
                raise src.error(key, f"'{part}' is not an index of {here} (it has {size} items)")
            tp = typing.get_args(tp)[0]
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
        else:
            raise src.error(key, f"{here} is a single value, not a section")
    return key


# --------------------------------------------------------------------------------------
# Checks of ranges and combinations
# --------------------------------------------------------------------------------------


def _positive(obj: Any, path: str, names: list[str], src: _Source, allow_zero: bool = False) -> None:
    for name in names:
        value = getattr(obj, name)
        if value is None:
            continue
        if value < 0 or (value == 0 and not allow_zero):
            bound = ">= 0" if allow_zero else "> 0"
            raise src.error(f"{path}.{name}", f"must be {bound}, got {value}")


def _one_of(value: Any, choices: tuple, key: str, src: _Source) -> None:
    if value not in choices:
        guess = _suggest(str(value), choices)
        hint = f"; did you mean '{guess}'?" if guess else ""
        raise src.error(key, f"must be one of {', '.join(choices)}, got {value!r}{hint}")


def template_fields(template: str) -> list[str]:
    """The field names of a text_template; only plain names such as `{instruction}` are allowed."""
    names = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as err:
        raise ValueError(f"is not a valid template ({err}); write braces as {{{{ and }}}}") from None
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if not name.isidentifier():
            raise ValueError(
                f"field '{{{name}}}' is not a plain field name; attribute and index access are not allowed"
            )
        if spec or conversion:
            raise ValueError(f"field '{{{name}}}' has a format spec or conversion; use plain '{{{name}}}'")
        names.append(name)
    if not names:
        raise ValueError("uses no field, so every document would be the same text; name a field like {text}")
    return names


def check_dataset_entry(entry: DatasetEntry, path: str, src: _Source) -> None:
    if not entry.name.strip():
        raise src.error(f"{path}.name", "must not be empty")
    if not entry.path.strip():
        raise src.error(f"{path}.path", "must not be empty")
    if not entry.weight > 0:
        raise src.error(f"{path}.weight", f"must be > 0, got {entry.weight}")
    if entry.format is not None:
        _one_of(entry.format, DATA_FORMATS, f"{path}.format", src)
    _one_of(entry.text_unit, TEXT_UNITS, f"{path}.text_unit", src)
    if (entry.text_field is None) == (entry.text_template is None):
        which = "neither is set" if entry.text_field is None else "both are set"
        plain = entry.format == "text" or entry.path.rstrip("/").endswith((".txt", ".txt.gz"))
        hint = "; a text file's documents are its field 'text': text_field: text" if plain and which[0] == "n" else ""
        raise src.error(path, f"set exactly one of text_field and text_template ({which}{hint})")
    if entry.text_template is not None:
        try:
            template_fields(entry.text_template)
        except ValueError as err:
            raise src.error(f"{path}.text_template", str(err)) from None
    if entry.text_field is not None and not entry.text_field.strip():
        raise src.error(f"{path}.text_field", "must not be empty")
    from peerlab.data.sources import NOT_TRAINING_SPLITS, is_local, split_refusal  # (it imports this module)

    if entry.split.lower() in NOT_TRAINING_SPLITS and is_local(entry):
        raise src.error(f"{path}.split", split_refusal(entry.split))


def check_datasets(entries: list[DatasetEntry], path: str, src: _Source) -> None:
    seen: dict[str, int] = {}
    for i, entry in enumerate(entries):
        check_dataset_entry(entry, f"{path}.{i}", src)
        if entry.name in seen:
            raise src.error(
                f"{path}.{i}.name",
                f"'{entry.name}' is already the name of {path}.{seen[entry.name]}; names must be unique",
            )
        seen[entry.name] = i


def check_training_duration(train: TrainConfig, datasets: list[DatasetEntry], src: _Source) -> None:
    """Exactly one of max_steps / num_train_epochs; epochs over streaming data need steps_per_epoch."""
    if (train.max_steps is None) == (train.num_train_epochs is None):
        which = "neither is set" if train.max_steps is None else "both are set"
        raise src.error(
            "train_config", f"set exactly one of max_steps and num_train_epochs ({which}); a null value unsets one"
        )
    if train.num_train_epochs is not None and train.steps_per_epoch is None:
        streaming = [d.name for d in datasets if d.streaming]
        if streaming:
            raise src.error(
                "train_config.num_train_epochs",
                f"epochs over streaming dataset '{streaming[0]}' need train_config.steps_per_epoch (or use max_steps)",
            )


def check_product_keys(p: PeerConfig | PKMConfig, pk: str, src: _Source) -> None:
    """product_key_dim, num_experts, num_experts_per_tok and query_dim of a product-key section agree."""
    if len(p.product_key_dim) != 2:
        raise src.error(f"{pk}.product_key_dim", f"needs two sizes (one per sub-key set), got {p.product_key_dim}")
    n1, n2 = p.product_key_dim
    if n1 <= 0 or n2 <= 0:
        raise src.error(f"{pk}.product_key_dim", f"sizes must be > 0, got {p.product_key_dim}")
    if n1 * n2 != p.num_experts:
        root = math.isqrt(p.num_experts)
        fix = f"[{root}, {root}]" if root * root == p.num_experts else "two sizes whose product is num_experts"
        raise src.error(
            f"{pk}.product_key_dim",
            f"{n1} x {n2} = {n1 * n2} differs from num_experts = {p.num_experts}; use {fix}",
        )
    if p.num_experts_per_tok > min(n1, n2):
        raise src.error(
            f"{pk}.num_experts_per_tok",
            f"{p.num_experts_per_tok} is larger than the sub-key set of {min(n1, n2)} keys it is chosen from",
        )
    if p.query_dim % 2:
        raise src.error(f"{pk}.query_dim", f"must be even (it is split in two halves), got {p.query_dim}")


def ffn_type(m: ModelConfig) -> str:
    """The feed-forward arm from peer_start_layer on: ffn_type, or from use_peer where it is null."""
    if m.ffn_type is not None:
        return m.ffn_type
    return "dense" if m.use_peer is False else "peer"


def check_arms(m: ModelConfig, src: _Source) -> None:
    """ffn_type and use_peer agree, and the MoE and PKM sections are usable.

    use_peer false is ffn_type dense, so it refuses any other ffn_type. use_peer true (the
    spec's default, written in every reference config) lets ffn_type choose among the arms
    that replace the dense MLP from peer_start_layer on, and refuses only ffn_type dense.
    A null use_peer becomes whether that arm is not dense; ffn_type stays as written (null:
    from use_peer), so a resolved config still takes a `use_peer` override.
    """
    if m.ffn_type is not None:
        _one_of(m.ffn_type, FFN_TYPES, "model_config.ffn_type", src)
        if m.use_peer is not None and m.use_peer == (m.ffn_type == "dense"):
            raise src.error(
                "model_config.use_peer",
                f"{str(m.use_peer).lower()} contradicts model_config.ffn_type = {m.ffn_type} "
                "(use_peer false is ffn_type dense); drop one of them",
            )
    if m.use_peer is None:
        m.use_peer = ffn_type(m) != "dense"
    e = m.moe_config
    _positive(e, "model_config.moe_config", ["num_experts", "top_k", "expert_size"], src)
    _positive(e, "model_config.moe_config", ["num_shared_experts", "balance_loss_weight"], src, allow_zero=True)
    if e.top_k > e.num_experts:
        raise src.error("model_config.moe_config.top_k", f"{e.top_k} is more than num_experts = {e.num_experts}")
    k = m.pkm_config
    _positive(k, "model_config.pkm_config", ["num_experts", "num_experts_per_tok", "num_heads", "query_dim"], src)
    check_product_keys(k, "model_config.pkm_config", src)


def check_config(cfg: Config, src: _Source) -> None:
    """Every range and combination check of a whole config."""
    m, p, a = cfg.model_config, cfg.model_config.peer_config, cfg.model_config.mla_config
    _positive(
        m,
        "model_config",
        [
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "vocab_size",
            "max_position_embeddings",
            "initializer_range",
            "layer_norm_eps",
        ],
        src,
    )
    _positive(
        p,
        "model_config.peer_config",
        [
            "num_experts",
            "num_experts_per_tok",
            "num_heads",
            "expert_hidden_size",
            "query_dim",
            "log_freq",
            "usage_threshold",
        ],
        src,
    )
    _positive(a, "model_config.mla_config", ["kv_lora_rank", "qk_rope_head_dim", "v_head_dim", "rope_theta"], src)
    _positive(a, "model_config.mla_config", ["q_lora_rank", "qk_nope_head_dim"], src, allow_zero=True)

    check_product_keys(p, "model_config.peer_config", src)
    check_arms(m, src)
    if not 0 <= m.peer_start_layer < m.num_hidden_layers:
        raise src.error(
            "model_config.peer_start_layer",
            f"{m.peer_start_layer} is outside the layers 0..{m.num_hidden_layers - 1}",
        )

    # MLA
    if a.qk_rope_head_dim % 2:
        raise src.error(
            "model_config.mla_config.qk_rope_head_dim",
            f"must be even (RoPE rotates pairs of dimensions), got {a.qk_rope_head_dim}",
        )
    if a.q_lora_rank == 0:
        a.q_lora_rank = None  # spec: null or 0 means a direct query projection

    # Training
    t = cfg.train_config
    _positive(
        t,
        "train_config",
        [
            "per_device_train_batch_size",
            "per_device_eval_batch_size",
            "gradient_accumulation_steps",
            "learning_rate",
            "max_steps",
            "num_train_epochs",
            "steps_per_epoch",
            "logging_steps",
            "save_steps",
            "eval_steps",
        ],
        src,
    )
    _positive(
        t,
        "train_config",
        ["weight_decay", "max_grad_norm", "seed", "num_workers", "max_failures"],
        src,
        allow_zero=True,
    )
    _positive(t, "train_config", ["save_total_limit"], src)
    if t.seed >= 2**32:
        raise src.error("train_config.seed", f"must be below 2**32 (what torch and numpy seeds accept), got {t.seed}")
    if not 0 <= t.warmup_ratio < 1:
        raise src.error("train_config.warmup_ratio", f"must be in [0, 1), got {t.warmup_ratio}")
    _one_of(t.lr_scheduler_type, LR_SCHEDULERS, "train_config.lr_scheduler_type", src)
    _one_of(t.log_level, LOG_LEVELS, "train_config.log_level", src)
    if t.fp16 and t.bf16:
        raise src.error("train_config", "fp16 and bf16 are both true; choose one (or neither, for float32/Float8)")
    if t.sparse_experts is True and t.fsdp:
        raise src.error(
            "train_config.sparse_experts",
            "does not combine with fsdp: true (FSDP shards dense gradients only); set one of them false",
        )
    if not t.output_dir.strip():
        raise src.error("train_config.output_dir", "must not be empty")
    for key in ("output_dir", "resume_from_checkpoint"):  # a path, or a URI a file system handles (peerlab.storage)
        uri = getattr(t, key)
        if uri and scheme(uri) is not None and scheme(uri) not in SCHEMES:
            raise src.error(
                f"train_config.{key}",
                f"{uri}: no file system handles {scheme(uri)}:// (use s3://, gs://, file:// or a path)",
            )

    # Data
    d = cfg.dataset_config
    if not d.datasets:
        raise src.error("dataset_config.datasets", "needs at least one dataset")
    check_datasets(d.datasets, "dataset_config.datasets", src)
    check_datasets(d.eval_datasets, "dataset_config.eval_datasets", src)
    trained = {e.name for e in d.datasets}
    for i, entry in enumerate(d.eval_datasets):
        if entry.name in trained:
            raise src.error(
                f"dataset_config.eval_datasets.{i}.name",
                f"'{entry.name}' is a training dataset, whose held-out part is evaluated already; rename or drop it",
            )
    _positive(d, "dataset_config", ["max_seq_length"], src)
    if d.max_seq_length > m.max_position_embeddings:
        raise src.error(
            "dataset_config.max_seq_length",
            f"{d.max_seq_length} is longer than model_config.max_position_embeddings = {m.max_position_embeddings}",
        )
    if not 0 <= d.heldout_fraction <= 0.5:
        raise src.error("dataset_config.heldout_fraction", f"must be in [0, 0.5], got {d.heldout_fraction}")
    if not d.tokenizer_name.strip():
        raise src.error("dataset_config.tokenizer_name", "must not be empty")
    check_training_duration(t, d.datasets, src)

    # Eval and wandb
    _positive(cfg.eval_config, "eval_config", ["eval_batch_size", "lm_eval_steps", "lm_eval_limit"], src)
    names = cfg.eval_config.evals
    for i, name in enumerate(names):
        if not name.strip():
            raise src.error(f"eval_config.evals.{i}", "must not be empty")
        if name in names[:i]:
            raise src.error(f"eval_config.evals.{i}", f"'{name}' is listed twice")
    if cfg.wandb_config is not None:
        if cfg.wandb_config.log_model is not None:
            _one_of(cfg.wandb_config.log_model, WANDB_LOG_MODEL, "wandb_config.log_model", src)
        if not cfg.wandb_config.project.strip():
            raise src.error("wandb_config.project", "must not be empty")


# --------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read, override, type and validate a config file; raise ConfigError on anything wrong.

    >>> cfg = load_config("configs/demo.yaml", ["train_config.learning_rate=3e-4"])
    """
    raw = read_yaml(path)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (model_config, train_config, ...) at the top")
    src = _Source(path)
    for override in overrides:
        apply_override(raw, override, src)
    if raw.get("wandb_config") is False:
        raw["wandb_config"] = None
    cfg = _build(Config, raw, "", src)
    check_config(cfg, src)
    return cfg


def config_from_dict(raw: dict, origin: str = "<resolved config>") -> Config:
    """A config from plain data (a resolved config passed to workers, or read back from a run)."""
    src = _Source(origin)
    cfg = _build(Config, raw, "", src)
    check_config(cfg, src)
    return cfg


MIXES_KEYS = ["data_mixes", "base_config", "search_space"]


@dataclass
class MixesFile:
    """A `data_mixes:` file: its mixes, and the base config and sweep search space it may name.

    `base_config` is a config file; `search_space` a file with a `search_space:` section, or
    that section itself (a mapping of grid, sample, num_samples, baseline). File names are
    relative to the mixes file. Both are defaults the command line overrides (--config,
    --search-space).
    """

    path: Path
    mixes: dict[str, DataMix]
    base_config: Path | None = None
    search_space: Path | dict | None = None


def load_mixes_file(path: str | Path) -> MixesFile:
    """Read a `data_mixes:` file; each mix is checked like dataset_config.datasets."""
    raw = read_yaml(path)
    src = _Source(path)
    if not isinstance(raw, dict) or "data_mixes" not in raw:
        raise ConfigError(f"{path}: expected a top-level 'data_mixes:' mapping of named mixes")
    extra = [k for k in raw if k not in MIXES_KEYS]
    if extra:
        raise _unknown_key("", extra[0], MIXES_KEYS, src)
    mixes_raw = raw["data_mixes"]
    if not isinstance(mixes_raw, dict) or not mixes_raw:
        raise src.error("data_mixes", "expected a mapping of one or more named mixes")
    mixes: dict[str, DataMix] = {}
    by_name: dict[str, str] = {}
    for key, body in mixes_raw.items():
        mpath = f"data_mixes.{key}"
        if not isinstance(body, dict):
            raise src.error(mpath, "expected a mapping with 'name' and 'datasets'")
        for k in body:
            if k not in ("name", "datasets"):
                raise _unknown_key(mpath, k, ["name", "datasets"], src)
        name = _convert(body.get("name", str(key)), str, f"{mpath}.name", src)
        datasets = _convert(body.get("datasets"), list[DatasetEntry], f"{mpath}.datasets", src)
        if not datasets:
            raise src.error(f"{mpath}.datasets", "needs at least one dataset")
        check_datasets(datasets, f"{mpath}.datasets", src)
        if name in by_name:
            raise src.error(f"{mpath}.name", f"mix name '{name}' is already used by data_mixes.{by_name[name]}")
        by_name[name] = str(key)
        mixes[str(key)] = DataMix(key=str(key), name=name, datasets=datasets)
    base = _named_file(raw.get("base_config"), "base_config", "a config file", src)
    space = raw.get("search_space")
    if not isinstance(space, dict):
        space = _named_file(space, "search_space", "a search space file, or a mapping of grid, sample, ...", src)
    return MixesFile(Path(path), mixes, base, space)


def _named_file(value: Any, key: str, what: str, src: _Source) -> Path | None:
    """A file named in a mixes file, relative to that file; it must exist."""
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise src.error(key, f"expected {what}, got {value!r}")
    named = Path(value).expanduser()
    named = named if named.is_absolute() else Path(src.file).parent / named
    if not named.is_file():
        raise src.error(key, f"no file {named} (the name is relative to this file)")
    return named


def load_mixes(path: str | Path) -> dict[str, DataMix]:
    """The mixes of a `data_mixes:` file (`load_mixes_file` also gives its base config and search space)."""
    return load_mixes_file(path).mixes


def to_dict(cfg: Any) -> Any:
    """The config as plain YAML-ready data (what is written next to every run)."""
    return dataclasses.asdict(cfg) if cfg is not None else None


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None)
