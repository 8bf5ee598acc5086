"""Ablation sweeps on Ray Tune: the search space, the trial plan, the trainable, the trial records.

A sweep is the product  mixes x PEER settings x seeds. Each trial is one training run
(`peerlab.train.launch.fit`: Ray Train's TorchTrainer) inside a Tune function trainable,
the pattern Ray 2.60 supports (FACTS.md). Its run folder is `<sweep>/trials/<trial id>/`
with the outputs of any run (resolved_config.yaml, metrics.jsonl, usage.parquet,
evals.jsonl, checkpoints/), plus one marker that says how it ended:

    done.json     the run finished (written by the trial itself)
    stopped.json  the scheduler (ASHA) stopped it early (written by the driver)
    error.json    it failed; the error's last line (written by the driver)
    none          it never ran, or the sweep was interrupted while it ran

`--resume` runs every trial without done.json or stopped.json again; an interrupted trial
continues from its newest checkpoint (a run continues by itself from its own folder).
Trial ids are stable names, `<mix>_<setting>_s<seed>`, so a resumed sweep finds its trials.

Search-space keys are `model_config` keys of the PEER part: `peer_config.<key>` (any key
of peer_config), `peer_start_layer` and `use_peer`. Setting `num_experts` alone sets
`product_key_dim` to [sqrt N, sqrt N]; setting `product_key_dim` alone sets `num_experts`.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from peerlab import storage
from peerlab.arms import ARMS, arm_setting, check_match, match_arm, parse_arms
from peerlab.config import Config, ConfigError, DataMix, PeerConfig, config_from_dict, to_dict

PEER_KEYS = {f"peer_config.{k}" for k in PeerConfig.__dataclass_fields__} | {"peer_start_layer", "use_peer"}
TRAIN_KEYS = {  # training hyperparameters a search may sample too (an Optuna search over the learning rate)
    f"train_config.{k}"
    for k in ("learning_rate", "weight_decay", "warmup_ratio", "max_grad_norm", "per_device_train_batch_size",
              "gradient_accumulation_steps")
}  # fmt: skip
RANGE_KINDS = ("int", "uniform", "loguniform")  # --sample KEY=int:4:32 | uniform:0:0.1 | loguniform:1e-4:3e-3
SECTION_KEYS = ("grid", "sample", "num_samples", "baseline", "match", "mix_search", "ladder")
NO_PEER = "no_peer"


@dataclass
class SearchSpace:
    """The PEER part of a sweep: a grid, random samples, and optional baseline arms (peerlab.arms)."""

    grid: dict[str, list] = field(default_factory=dict)  # every combination is a setting
    # num_samples seeded random picks, crossed with the grid: from a list, or a range 'int:4:32' (RANGE_KINDS)
    sample: dict[str, list | str] = field(default_factory=dict)
    num_samples: int = 0
    baseline: list[str] | bool = field(default_factory=list)  # arms (dense, moe, pkm), one setting each; True: dense
    match: str | None = None  # size the arms to the PEER cell's flops, params or active (peerlab.arms.match_arm)
    mix_search: dict = field(default_factory=dict)  # the section's mix_search: keys (peerlab.mixsearch.options)
    ladder: dict = field(default_factory=dict)  # the section's ladder: keys (peerlab.ladder.ladder_options)

    def __post_init__(self):
        self.baseline = parse_arms(self.baseline)

    def settings(self, seed: int = 0, base: Config | None = None) -> list[dict]:
        """The PEER settings: {model_config key: value}; {} is the base config's own setting. The baseline
        arms come last, sized against `base` (the PEER cell) when `match` is set."""
        import numpy as np

        grid_keys = list(self.grid)
        points = [dict(zip(grid_keys, values)) for values in itertools.product(*(self.grid[k] for k in grid_keys))]
        if self.sample and self.num_samples > 0:
            rng = np.random.default_rng(seed)
            picks = []
            for _ in range(self.num_samples):
                pick = {k: draw(v, rng) for k, v in self.sample.items()}
                if pick not in picks:
                    picks.append(pick)
            points = [{**p, **q} for p in points for q in picks]
        for arm in self.baseline:
            if self.match and base is None:
                raise ValueError("SearchSpace.settings: --match sizes the arms against the base config; pass it")
            points.append(match_arm(base, arm, self.match).setting if base is not None else arm_setting(None, arm))
        return points

    def to_dict(self) -> dict:
        out = {"grid": self.grid, "sample": self.sample, "num_samples": self.num_samples, "baseline": self.baseline}
        return (
            out
            | ({"match": self.match} if self.match else {})
            | ({"mix_search": self.mix_search} if self.mix_search else {})
            | ({"ladder": self.ladder} if self.ladder else {})
        )


def _key(key: str, origin: str) -> str:
    key = key.strip().removeprefix("model_config.")
    if key not in PEER_KEYS | TRAIN_KEYS:
        known = ", ".join(sorted(PEER_KEYS | TRAIN_KEYS))
        raise ConfigError(
            f"{origin}: '{key}' cannot be swept; the search space takes the PEER and training keys: {known}"
        )
    return key


def parse_range(text: str) -> tuple[str, float, float] | None:
    """'int:4:32' -> ('int', 4, 32); 'loguniform:1e-4:3e-3' -> ('loguniform', 0.0001, 0.003); None if not a range."""
    kind, _, rest = str(text).strip().partition(":")
    if kind not in RANGE_KINDS:
        return None
    lo, colon, hi = rest.partition(":")
    try:
        a, b = (int(lo), int(hi)) if kind == "int" else (float(lo), float(hi))
    except ValueError:
        raise ValueError(f"expected {kind}:LOW:HIGH, got '{text}'") from None
    if not colon or a >= b or (kind == "loguniform" and a <= 0):
        raise ValueError(f"expected {kind}:LOW:HIGH with LOW < HIGH{' and LOW > 0' if kind == 'loguniform' else ''}")
    return kind, a, b


def draw(values: list | str, rng) -> object:
    """One seeded random pick: an element of a list, or a value of a range (int: both ends included)."""
    spec = parse_range(values) if isinstance(values, str) else None
    if spec is None:
        return values[int(rng.integers(len(values)))]
    kind, lo, hi = spec
    if kind == "int":
        return int(rng.integers(lo, hi + 1))
    value = rng.uniform(lo, hi) if kind == "uniform" else math.exp(rng.uniform(math.log(lo), math.log(hi)))
    return float(f"{value:.4g}")


def optuna_distribution(values: list | str):
    """The Optuna distribution of a sample's values: a range (int: both ends included), or a choice of a list."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    spec = parse_range(values) if isinstance(values, str) else None
    if spec is None:
        return CategoricalDistribution(values)
    kind, lo, hi = spec
    if kind == "int":
        return IntDistribution(lo, hi)
    return FloatDistribution(lo, hi, log=kind == "loguniform")


def parse_values(text: str) -> list | str:
    """'8,16' -> [8, 16]; a YAML list ('[[128,128],[256,256]]') for values that hold commas; a range
    ('int:4:32', 'loguniform:1e-4:3e-3') as it is."""
    text = text.strip()
    if parse_range(text) is not None:
        return text
    values = yaml.safe_load(text) if text.startswith("[") else [yaml.safe_load(v) for v in text.split(",")]
    if not isinstance(values, list) or not values or any(v is None for v in values):
        raise ValueError(f"expected one or more values, got '{text}'")
    return values


def search_space(
    grid: list[str] = (),
    sample: list[str] = (),
    num_samples: int = 0,
    baseline: bool | str | list[str] | None = False,
    path: str | Path | None = None,
    section: dict | None = None,
    origin: str = "search_space",
    match: str | None = None,
) -> SearchSpace:
    """The search space of `--grid KEY=V1,V2`, `--sample KEY=V1,V2`, `--baseline [ARMS]`, `--match` and a YAML section.

    The section comes from a file's top-level `search_space:` (`path`), or is given as it is
    (`section`, e.g. written inline in a mixes file; `origin` names it in error messages). It
    holds `grid:` and `sample:` mappings of key -> list of values, `num_samples:`,
    `baseline:` (true, or a list of arms: dense, moe, pkm), `match:` (flops, params or active),
    `mix_search:` (the mixture search's settings, see peerlab.mixsearch) and
    `ladder:` (a scale ladder's, see peerlab.ladder); the command line adds to it.
    """
    space = SearchSpace()
    if path:
        try:
            raw = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as err:
            raise ConfigError(f"{path}: cannot read the search space: {str(err).splitlines()[0]}") from None
        section = (raw or {}).get("search_space") if isinstance(raw, dict) else None
        if not isinstance(section, dict):
            raise ConfigError(
                f"{path}: expected a top-level 'search_space:' mapping "
                "(grid, sample, num_samples, baseline, match, mix_search, ladder)"
            )
        origin = f"{path}: search_space"
    if section is not None:
        for k in section:
            if k not in SECTION_KEYS:
                raise ConfigError(f"{origin}.{k}: unknown key (known: {', '.join(SECTION_KEYS)})")
        mix = section.get("mix_search")
        if mix is not None and not isinstance(mix, dict):
            raise ConfigError(f"{origin}.mix_search: expected a mapping of its settings (mixes, prior, bounds, ...)")
        space.mix_search = dict(mix or {})
        ladder = section.get("ladder")
        if ladder is not None and not isinstance(ladder, dict):
            raise ConfigError(f"{origin}.ladder: expected a mapping (scales, promote, pin, target_flops)")
        space.ladder = dict(ladder or {})
        for part in ("grid", "sample"):
            body = section.get(part) or {}
            if not isinstance(body, dict):
                raise ConfigError(f"{origin}.{part}: expected a mapping of key -> list of values")
            for key, values in body.items():
                ranged = part == "sample" and isinstance(values, str)
                if ranged:
                    try:
                        parse_range(values) or _raise(f"expected a list or a range ({', '.join(RANGE_KINDS)}:LOW:HIGH)")
                    except ValueError as err:
                        raise ConfigError(f"{origin}.{part}.{key}: {err}") from None
                elif not isinstance(values, list) or not values:
                    raise ConfigError(f"{origin}.{part}.{key}: expected a non-empty list of values")
                getattr(space, part)[_key(str(key), f"{origin}.{part}")] = values
        space.num_samples = section.get("num_samples") or 0
        space.baseline = parse_arms(section.get("baseline"), f"{origin}.baseline")
        space.match = section.get("match")
        if not isinstance(space.num_samples, int) or isinstance(space.num_samples, bool) or space.num_samples < 0:
            raise ConfigError(f"{origin}.num_samples: expected a whole number >= 0, got {space.num_samples!r}")
    for flag, items in (("--grid", grid), ("--sample", sample)):
        for item in items:
            key, eq, text = item.partition("=")
            if not eq:
                raise ConfigError(f"{flag} {item}: expected KEY=VALUE1,VALUE2")
            try:
                values = parse_values(text)
            except (ValueError, yaml.YAMLError) as err:
                raise ConfigError(f"{flag} {item}: {str(err).splitlines()[0]}") from None
            if flag == "--grid" and isinstance(values, str):
                raise ConfigError(f"{flag} {item}: a range is sampled, not a grid: use --sample {item}")
            target = space.grid if flag == "--grid" else space.sample
            target[_key(key, flag)] = values
    space.num_samples = num_samples or space.num_samples
    space.baseline = parse_arms(baseline) or space.baseline
    from_section = match is None and space.match is not None
    space.match = check_match(match or space.match, space.baseline, f"{origin}.match" if from_section else "--match")
    if space.sample and space.num_samples < 1:
        raise ConfigError("--sample needs --num-samples N (or search_space.num_samples) of at least 1")
    return space


def check_metric(metric: str, datasets: set[str]) -> None:
    """The sweep's metric must be one the training runs report: loss, or a held-out metric of a dataset or the
    mean; or a weighted sum of them ('eval_bpb/code*0.5+eval_bpb/prose*0.5')."""
    from peerlab.mixsearch import parse_metric

    allowed = {"loss", "eval_loss/mean", "eval_bpb/mean"} | {f"eval_{m}/{d}" for m in ("loss", "bpb") for d in datasets}
    for term in parse_metric(metric):
        if term in allowed:
            continue
        kind, slash, name = term.partition("/")
        if slash and kind in ("eval_loss", "eval_bpb"):
            raise ConfigError(
                f"--metric {metric}: '{term}' names an unknown dataset '{name}' (the datasets are "
                f"{', '.join(sorted(datasets))})"
            )
        raise ConfigError(
            f"--metric {metric}: '{term}' is not a metric the runs report; use {', '.join(sorted(allowed))}"
        )


def setting_label(setting: dict) -> str:
    """A short readable name: 'num_experts_per_tok=16,query_dim=32', 'no_peer' (the dense arm), 'moe', 'pkm', or
    'default'."""
    if setting.get("use_peer") is False or setting.get("ffn_type") == "dense":
        return NO_PEER
    if setting.get("ffn_type") in ARMS:  # an arm's size is in its config, the plan and trials.parquet
        return setting["ffn_type"]
    if not setting:
        return "default"
    return ",".join(f"{k.split('.')[-1]}={_short(v)}" for k, v in setting.items())


def apply_to_config(raw: dict, setting: dict) -> dict:
    """The whole config (plain data) with one setting applied: training keys to train_config, the rest by
    apply_setting to model_config."""
    out = json.loads(json.dumps(raw))
    model = {k: v for k, v in setting.items() if not k.startswith("train_config.")}
    out["model_config"] = apply_setting(out["model_config"], model)
    for key, value in setting.items():
        if key.startswith("train_config."):
            out["train_config"][key.removeprefix("train_config.")] = value
    return out


def _short(value) -> str:
    if isinstance(value, list):
        return "x".join(str(v) for v in value)
    return str(value).lower() if isinstance(value, bool) else str(value)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9=.+-]+", "_", text).strip("_")


def _raise(message: str):
    raise ValueError(message)


def apply_setting(model_config: dict, setting: dict) -> dict:
    """The model_config dict with one setting applied (PEER's num_experts and product_key_dim kept consistent);
    a key 'moe_config.expert_size' sets that section's key."""
    out = json.loads(json.dumps(model_config))
    peer = out["peer_config"]
    for key, value in setting.items():
        section, dot, name = key.partition(".")
        if dot and isinstance(out.get(section), dict):
            out[section][name] = value
        else:
            out[key] = value
    if "peer_config.num_experts" in setting and "peer_config.product_key_dim" not in setting:
        n = int(setting["peer_config.num_experts"])
        root = math.isqrt(n)
        if root * root != n:
            raise ConfigError(
                f"peer_config.num_experts={n} is not a square: also sweep peer_config.product_key_dim (n1 x n2 = N)"
            )
        peer["product_key_dim"] = [root, root]
    elif "peer_config.product_key_dim" in setting and "peer_config.num_experts" not in setting:
        n1, n2 = setting["peer_config.product_key_dim"]
        peer["num_experts"] = int(n1) * int(n2)
    return out


@dataclass
class Trial:
    """One cell of the sweep with one seed: its id, labels and full resolved config."""

    trial_id: str
    mix: str
    setting: str
    seed: int
    overrides: dict
    config: dict  # the full config as plain data (config_from_dict accepts it)
    scale: str = ""  # a ladder's scale (peerlab.ladder.Scale.label): the cell is the same at every scale

    @property
    def cell(self) -> str:
        return f"{self.mix} | {self.setting}"


def plan_trials(base: Config, mixes: dict[str, DataMix], space: SearchSpace, seeds: int) -> list[Trial]:
    """Every trial of the sweep, each config resolved and validated; ConfigError names the trial.

    Trials run in this order: seed by seed, setting by setting, and within a setting every mix.
    So the first trials to finish cover every mix, and early stopping compares a trial with
    other mixes' rungs, not only with a same-mix neighbour that is a near-tie.
    """
    base_raw = to_dict(base)
    seed0 = base.train_config.seed
    trials, ids = [], set()
    for s in range(seeds):
        for setting in space.settings(seed0, base):
            label = setting_label(setting)
            for mix in mixes.values():
                trial_id = _slug(f"{mix.name}_{label}_s{seed0 + s}")
                if trial_id in ids:  # two labels that slug alike: keep ids unique and stable
                    trial_id = f"{trial_id}_{len(trials)}"
                ids.add(trial_id)
                try:
                    raw = apply_to_config(base_raw, setting)
                except ConfigError as err:
                    raise ConfigError(f"trial {trial_id}: {err}") from None
                set_mix(raw, mix, mixes)
                raw["train_config"]["seed"] = seed0 + s
                try:
                    config_from_dict(raw, origin=f"trial {trial_id}")
                except ConfigError as err:
                    raise ConfigError(f"{err} (setting {label} on mix {mix.name})") from None
                trials.append(Trial(trial_id, mix.name, label, seed0 + s, setting, raw))
    return trials


def set_mix(raw: dict, mix: DataMix, mixes: dict[str, DataMix]) -> None:
    """Train the config (plain data) on `mix`, and evaluate it on every dataset of the sweep's `mixes` too.

    The datasets of the other mixes that `mix` does not train on become its `eval_datasets` (held-out part
    only), so eval_bpb/mean and each eval_bpb/<name> measure every trial on the same text: mixes of
    different datasets were each scored on their own. The base config's own eval_datasets stay.
    """
    d = raw["dataset_config"]
    own = {x.name for x in mix.datasets}
    evals = [e for e in d.get("eval_datasets") or [] if e["name"] not in own]
    names = own | {e["name"] for e in evals}
    for other in mixes.values():
        for entry in other.datasets:
            if entry.name not in names:
                evals.append(to_dict(entry))
                names.add(entry.name)
    d["datasets"] = [to_dict(x) for x in mix.datasets]
    d["eval_datasets"] = evals


def trial_of(
    base_raw: dict, mix: DataMix, setting: dict, seed: int, trial_id: str, mixes: dict[str, DataMix] | None = None
) -> Trial:
    """One trial: the base config (plain data) with a mix's datasets (evaluated on those of the sweep's
    `mixes` too, `set_mix`), a setting and a seed; validated."""
    try:
        raw = apply_to_config(base_raw, setting)
    except ConfigError as err:
        raise ConfigError(f"trial {trial_id}: {err}") from None
    set_mix(raw, mix, mixes or {mix.key: mix})
    raw["train_config"]["seed"] = seed
    config_from_dict(raw, origin=f"trial {trial_id}")
    return Trial(trial_id, mix.name, setting_label(setting), seed, setting, raw)


@dataclass
class OptunaPlan:
    """An Optuna search (Ray Tune's OptunaSearch, TPE) over the sampled keys, and the mix when there are several."""

    base: dict  # the base config as plain data
    mixes: dict[str, DataMix]  # by name
    space: dict[str, list | str]  # key -> a list (a choice) or a range 'int:4:32'
    num_samples: int
    metric: str
    mode: str

    def searcher(self):
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        space = {k: optuna_distribution(v) for k, v in self.space.items()}
        if len(self.mixes) > 1:
            space["mix"] = optuna_distribution(list(self.mixes))
        seed = int(self.base["train_config"]["seed"])
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        return OptunaSearch(space, metric=self.metric, mode=self.mode, sampler=optuna.samplers.TPESampler(seed=seed))

    def make_trial(self, suggestion: dict) -> Trial:
        """The trial of one Optuna suggestion; ids count the suggestions: optuna_007_<mix>_<setting>_s42."""
        mix = self.mixes[suggestion.get("mix", next(iter(self.mixes)))]
        setting = {k: suggestion[k] for k in self.space}
        seed = int(self.base["train_config"]["seed"])
        self.count = getattr(self, "count", 0) + 1
        trial_id = _slug(f"optuna_{self.count:03d}_{mix.name}_{setting_label(setting)}_s{seed}")
        return trial_of(self.base, mix, setting, seed, trial_id, self.mixes)


def check_optuna_space(space: SearchSpace) -> dict[str, list | str]:
    """The keys an Optuna search samples: --sample ranges and lists (grid keys as choices); ConfigError if none."""
    keys = {**{k: list(v) for k, v in space.grid.items()}, **space.sample}
    if not keys:
        raise ConfigError("--search optuna needs ranges to search: --sample 'peer_config.num_experts_per_tok=int:4:32'")
    for key, values in keys.items():
        if isinstance(values, list) and any(isinstance(v, (list, dict)) for v in values):
            raise ConfigError(f"--search optuna: {key} has list values, which Optuna cannot choose among; use a grid")
    if space.num_samples < 1:
        raise ConfigError("--search optuna needs --num-samples N (or search_space.num_samples): the trials to run")
    return keys


# --------------------------------------------------------------------------------------
# The trial records in the sweep folder
# --------------------------------------------------------------------------------------

MARKERS = {"done.json": "finished", "stopped.json": "stopped", "error.json": "failed"}
ATTEMPTS = "attempts.jsonl"  # one line per start of a trial (node, step it started from), one per error it ended with


def trial_dir(sweep_dir: Path, trial_id: str) -> Path:
    return Path(sweep_dir) / "trials" / trial_id


def trial_status(run_dir: Path) -> tuple[str, dict]:
    """('finished' | 'stopped' | 'failed' | 'unfinished', the marker's content)."""
    for name, status in MARKERS.items():
        path = Path(run_dir) / name
        if path.is_file():
            return status, json.loads(path.read_text())
    return "unfinished", {}


def mark(run_dir: Path, name: str, content: dict) -> None:
    """Write one marker (atomically) after removing the others."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    for other in MARKERS:
        (run_dir / other).unlink(missing_ok=True)
    write_json(run_dir / name, content)


def write_json(path: Path | str, content: dict) -> None:
    """Write JSON through a temporary file and a rename: a crash never leaves half a file (a URI: one PUT,
    which object storage makes visible whole)."""
    if storage.is_remote(str(path)):
        storage.write_bytes(str(path), json.dumps(content, indent=1, default=float).encode())
        return
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(content, indent=1, default=float))
    tmp.replace(path)


# --------------------------------------------------------------------------------------
# The trainable (runs in the trial's Ray actor)
# --------------------------------------------------------------------------------------


def run_trial(params: dict) -> None:
    """Tune function trainable: one training run on Ray Train; its metrics reach Tune as it goes.

    With train_config.num_workers = 0 the loop runs in this actor (Train's local mode: no
    start-up of a worker group, the right choice for CPU sweeps); with N >= 1 a worker group
    of N is started and TuneReportCallback forwards rank 0's metrics. The run folder may be a
    URI (a sweep on object storage): the run then stages on this actor's node (`fit`).

    Each start appends a line to the run's attempts.jsonl: the node, Tune's trial id, the step it
    starts from. Tune runs a trial again when its actor or node was lost (the sweep's
    max_failures); an error of the run itself (`peerlab.train.failures.NOT_RETRIED`) is recorded
    there too, and a retry of it fails at once with the same error instead of training again.
    """
    import ray

    from peerlab.train.failures import not_retried
    from peerlab.train.launch import fit

    spec = params["trial"]
    cfg = config_from_dict(spec["config"], origin=f"trial {spec['trial_id']}")
    run_dir = spec["run_dir"]
    tune_id = _tune_trial_id()
    records = read_attempts(run_dir)
    earlier = [a for a in records if tune_id and a.get("tune_trial_id") == tune_id]
    if earlier and earlier[-1].get("error") and not earlier[-1].get("retried", True):
        raise TrialError(earlier[-1]["error"])  # the run's own error comes back on every try: not trained again
    for name in MARKERS:
        remove(storage.join(run_dir, name))
    context = ray.get_runtime_context()
    attempt = {
        "attempt": sum("node_id" in r for r in records) + 1,
        "node_id": context.get_node_id(),
        "node_ip": ray.util.get_node_ip_address(),
        "tune_trial_id": tune_id,
        "from_step": newest_step(run_dir),
        "started_at": time.time(),
    }
    append_attempt(run_dir, attempt)
    callbacks, options = [], {"report_to": "tune"}  # local mode: the loop reports to Tune itself
    share = context.get_assigned_resources().get("GPU", 0.0)
    if 0 < share < 1:  # a GPU shared with other trials (--gpus-per-trial 0.25): its memory capped to the share
        options["gpu_memory_fraction"] = share
    if cfg.train_config.num_workers > 0:
        from ray.tune.integration.ray_train import TuneReportCallback

        callbacks, options = [TuneReportCallback()], {}
    start = time.time()
    try:
        result = fit(cfg, run_dir, quiet=True, callbacks=callbacks, **options)
        if result.error is not None:
            raise result.error
    except Exception as err:
        line = error_line([x for x in str(err).strip().splitlines() if x.strip()]) or type(err).__name__
        append_attempt(run_dir, {"attempt": attempt["attempt"], "tune_trial_id": tune_id, "error": line,
                                 "retried": not not_retried(err), "ended_at": time.time()})  # fmt: skip
        raise
    done = {"wall_s": time.time() - start, "finished_at": time.time(), "node_id": attempt["node_id"]}
    write_json(storage.join(run_dir, "done.json"), {**done, "attempts": attempt["attempt"]})


class TrialError(RuntimeError):
    """A trial's own error (its config, data, a non-finite loss), raised again when Tune retries it."""


def _tune_trial_id() -> str | None:
    try:
        from ray import tune

        return tune.get_context().get_trial_id()
    except Exception:  # not inside a Tune trial (a test calling run_trial directly)
        return None


def read_attempts(run_dir: str | Path, starts_only: bool = False) -> list[dict]:
    """The run's attempts.jsonl (a path or a URI): one line per start of the trial, one per error it ended with."""
    path = storage.join(str(run_dir), ATTEMPTS)
    try:
        if not storage.exists(path):
            return []
        lines = storage.read_bytes(path).decode().splitlines()
    except storage.StorageError:
        return []
    records = [json.loads(line) for line in lines if line.strip()]
    return [r for r in records if "node_id" in r] if starts_only else records


def append_attempt(run_dir: str | Path, record: dict) -> None:
    path = storage.join(str(run_dir), ATTEMPTS)
    if storage.is_remote(path):  # object storage has no append: the file again, with the line
        before = storage.read_bytes(path) if storage.exists(path) else b""
        storage.write_bytes(path, before + json.dumps(record).encode() + b"\n")
    else:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")


def newest_step(run_dir: str | Path) -> int:
    """The step of the run's newest complete checkpoint (its manifest written; a path or a URI), 0 when none."""
    try:
        names = storage.complete_checkpoints(str(run_dir))
    except storage.StorageError:
        return 0
    return int(names[-1].split("-", 1)[1]) if names else 0


def remove(path: str) -> None:
    """Remove a file (a path or a URI) that may not exist."""
    if storage.is_remote(path):
        storage.delete(path)
    else:
        storage.local_path(path).unlink(missing_ok=True)


def resolved_run_config(trial: Trial, sweep_dir: Path, uri: str | None = None) -> dict:
    """What the trainable receives: the trial's config with output_dir inside the sweep folder, or inside the
    sweep's URI (object storage: every node writes the trial's folder there)."""
    from peerlab.train.launch import absolute_paths

    raw = to_dict(absolute_paths(config_from_dict(trial.config)))  # trial actors run in other folders
    trials = storage.join(uri, "trials") if uri else str(Path(sweep_dir).resolve() / "trials")
    raw["train_config"]["output_dir"] = trials
    return {"trial_id": trial.trial_id, "config": raw, "run_dir": storage.join(trials, trial.trial_id)}


# --------------------------------------------------------------------------------------
# The driver: one Tuner over the trials that are still to run
# --------------------------------------------------------------------------------------


@dataclass
class Resources:
    """What each trial gets: CPUs and GPUs of its actor, and Ray Train workers (0: Train's local mode)."""

    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    workers_per_trial: int = 0
    max_concurrent: int = 1


@dataclass
class Schedule:
    """ASHA early stopping (`scheduler="asha"`) on `metric`, or every trial to the end (None)."""

    scheduler: str | None = None
    metric: str = "eval_bpb/mean"
    mode: str = "min"
    grace_steps: int | None = None  # steps before ASHA's first cut (default: the metric's first report, `first_cut`)
    reduction_factor: int = 2


def run_sweep(
    trials: list[Trial],
    sweep_dir: Path,
    resources: Resources,
    schedule: Schedule,
    total: int,
    verbose: bool = False,
    search: TrialSearch | None = None,
    done_before: int | None = None,
    num_samples: int = -1,
    uri: str | None = None,
    max_failures: int = 0,
    synced=None,
) -> dict[str, str]:
    """Run `trials` with Ray Tune; returns {trial id: status}. `total` counts the whole sweep (for progress).

    With `search`, the trials come from it as the sweep goes (a mixture search, Optuna),
    `trials` holds some of the kind it makes (for the step count) and `done_before` counts the
    trials an earlier run of the sweep ended; `num_samples` caps the trials of a search that
    never says it is done (Optuna). Prints a line per trial per
    report of the sweep's metric (each evaluation) and per trial that ends; `verbose` adds
    Tune's own status output.

    `uri`: the sweep's folder on object storage, where the trials write their run folders (`sweep_dir`
    is then its local staging copy and `synced()` brings the trials' files into it). A trial whose actor
    or node is lost runs again up to `max_failures` times, from its newest checkpoint (a line says which
    step, 0 when it had none); an error of the run itself is not retried (`run_trial`).
    """
    from ray import tune
    from ray.tune.schedulers import FIFOScheduler, TrialScheduler

    from peerlab.mixsearch import metric_value

    # Held-out metrics come every eval_steps, not in every report: ASHA waits for them (Tune's strict check would fail).
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    sweep_dir = Path(sweep_dir).resolve()
    by_id = search.trials if search is not None else {t.trial_id: t for t in trials}
    steps_of: dict[str, int] = {}
    steps = max(_steps(t) for t in trials)

    def our_trial(tune_trial) -> Trial:
        ours = by_id[tune_trial.config["trial"]["trial_id"]]
        if ours.trial_id not in steps_of:
            steps_of[ours.trial_id] = _steps(ours)
        return ours

    def measure(result: dict) -> float | None:
        return metric_value(result, schedule.metric)

    class RecordingASHA(FIFOScheduler):
        """ASHA by `Rungs` (Ray's rule with re-checks); writes stopped.json in every trial it stops early."""

        def __init__(self, rungs: Rungs):
            super().__init__()
            self.rungs, self.stopped = rungs, 0

        def on_trial_result(self, tune_controller, trial, result):
            ours, value = our_trial(trial), measure(result)
            if search is not None and search.protect(ours):
                return TrialScheduler.CONTINUE  # a trial the search needs whole (a mixture search's validation)
            if value is None or "step" not in result or result["step"] >= steps_of[ours.trial_id]:
                return TrialScheduler.CONTINUE  # no metric here, or its last step: it writes its final outputs
            if self.rungs.report(ours.trial_id, result["step"], value if schedule.mode == "max" else -value):
                return TrialScheduler.CONTINUE
            self.stopped += 1
            mark(trial_dir(sweep_dir, ours.trial_id), "stopped.json", {"step": result["step"], schedule.metric: value})
            return TrialScheduler.STOP

        def debug_string(self) -> str:
            return f"ASHA (peerlab.tune.Rungs): rungs at steps {sorted(self.rungs.recorded)}, {self.stopped} stopped"

    done_before = total - len(trials) if done_before is None else done_before  # trials ended in an earlier run
    best: dict = {}

    class Progress(tune.Callback):
        """A line per trial per report of the metric, and per trial that ends: done, running, pending, the best."""

        def on_trial_result(self, iteration, trials, trial, result, **info):
            value = measure(result)
            if value is None or "step" not in result:
                return
            ours = our_trial(trial)
            print(
                f"  {ours.trial_id} step {result['step']}/{steps_of[ours.trial_id]}: "
                f"{schedule.metric} {value:.4f}  ({result.get('time_total_s', 0.0):.0f} s)",
                flush=True,
            )

        def _line(self, trials_now, trial, how: str) -> None:
            ours = our_trial(trial)
            value = measure(trial.last_result or {})
            if value is not None and how == "done":  # a stopped trial's metric is from an earlier step
                better = not best or (value < best["value"] if schedule.mode == "min" else value > best["value"])
                if better:
                    best.update(value=value, cell=ours.cell, trial=ours.trial_id)
            running = sum(t.status == "RUNNING" and t is not trial for t in trials_now)
            ended = done_before + sum(t.status in ("TERMINATED", "ERROR") or t is trial for t in trials_now)
            # Tune creates trials as slots free up; a search's total is its plan (it may end sooner)
            status = {"RUNNING": running, "PENDING": max(total - ended - running, 0)}
            shown = f"{schedule.metric} {value:.4f}" if value is not None else "no metric"
            lead = f"; best so far {best['cell']} ({best['value']:.4f})" if best else ""
            print(
                f"[{ended}/{max(total, ended + running)} done, {status['RUNNING']} running, {status['PENDING']} pending] "
                f"{ours.trial_id} {how}: {shown}{lead}",
                flush=True,
            )

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._line(trials, trial, "stopped early" if _status(sweep_dir, our_trial(trial)) == "stopped" else "done")

        def on_trial_error(self, iteration, trials, trial, **info):
            self._line(trials, trial, "failed")

        def on_trial_recover(self, iteration, trials, trial, **info):
            ours = our_trial(trial)
            run_dir = storage.join(uri, "trials", ours.trial_id) if uri else str(trial_dir(sweep_dir, ours.trial_id))
            records = read_attempts(run_dir)
            if records and records[-1].get("retried") is False:
                return  # the run's own error: Tune's retry fails at once with it (run_trial), nothing was lost
            starts = [r for r in records if "node_id" in r]
            where = f" on node {starts[-1]['node_id'][:12]}" if starts else ""
            error = getattr(trial, "error_file", None)
            reason = ""
            if error and Path(error).is_file():
                lines = [x for x in Path(error).read_text().strip().splitlines() if x.strip()]
                reason = f" ({error_line(lines)[:200]})"
            step = newest_step(run_dir)
            again = f"continues from its checkpoint of step {step}" if step else (
                "restarts from step 0: it had no checkpoint yet")  # fmt: skip
            print(f"  {ours.trial_id} was lost{where}{reason}; Tune runs it again "
                  f"(try {trial.num_failures + 1} of {max_failures + 1}) and it {again}", flush=True)  # fmt: skip

    scheduler = None
    if schedule.scheduler == "asha":
        grace = schedule.grace_steps or first_cut([t.config for t in trials], schedule.metric, steps)
        # max_t past the last step, and no stop at the last step (above): a trial always ends by itself.
        scheduler = RecordingASHA(Rungs(grace, steps + 1, schedule.reduction_factor))
    trainable = tune.with_resources(run_trial, {"CPU": resources.cpus_per_trial, "GPU": resources.gpus_per_trial})
    if search is None:
        space, samples = {"trial": tune.grid_search([resolved_run_config(t, sweep_dir, uri) for t in trials])}, 1
    else:
        space, samples = {}, num_samples  # -1: the search says when it is done
    tuner = tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(
            search_alg=search,
            num_samples=samples,
            scheduler=scheduler,
            metric=schedule.metric if scheduler else None,
            mode=schedule.mode if scheduler else None,
            max_concurrent_trials=resources.max_concurrent,
            reuse_actors=True,
            trial_dirname_creator=lambda t: t.config["trial"]["trial_id"],
            trial_name_creator=lambda t: t.config["trial"]["trial_id"],
        ),
        run_config=tune.RunConfig(
            name="tune",
            storage_path=str(sweep_dir / ".ray"),
            callbacks=[Progress()],
            verbose=1 if verbose else 0,
            failure_config=tune.FailureConfig(max_failures=max_failures),
        ),
    )
    with contextlib.nullcontext() if verbose else tune_output_to(sweep_dir / ".ray" / "tune.log"):
        results = tuner.fit()
    for result in results:
        if result.error is not None:
            trial_id = result.config["trial"]["trial_id"]
            lines = [line for line in str(result.error).strip().splitlines() if line.strip()]
            mark(trial_dir(sweep_dir, trial_id), "error.json", {"error": error_line(lines)})
    if synced is not None:  # the trials' own markers (done.json), from the URI
        try:
            synced()
        except (storage.StorageError, OSError) as err:  # the bucket out of reach: the statuses are the last synced
            print(f"warning: the trials' folders could not be read back from {uri}: {err}", flush=True)
    return {t.trial_id: _status(sweep_dir, t) for t in by_id.values()}


try:
    from ray.tune.search import Searcher as _Searcher
except ImportError:  # pragma: no cover
    _Searcher = object


class TrialSearch(_Searcher):
    """A Tune searcher that turns another searcher's suggestions into peerlab trials.

    The inner searcher (peerlab.mixsearch.MixSearch, Ray's OptunaSearch) suggests plain values
    (a mix, a seed, PEER settings); `make_trial(suggestion)` makes the Trial (its id stable for
    the same suggestion, so a resumed sweep finds its run folder); the trainable gets its
    resolved config. Results go back to the inner searcher as they are.
    """

    def __init__(self, inner, make_trial, sweep_dir: Path, metric: str | None = None, protect=None, uri=None):
        super().__init__()
        self.inner, self.make_trial, self.sweep_dir = inner, make_trial, Path(sweep_dir).resolve()
        self.uri = uri  # the sweep's folder on object storage, where the trials write (run_sweep)
        self.protect = protect or (lambda trial: False)  # trials early stopping must leave to run to the end
        self.trials: dict[str, Trial] = {}  # our trial id -> Trial, in the order they started
        self.metric_expr = metric  # a weighted sum is added to each result under its own text (Optuna reads it)
        self.last: dict[str, float] = {}  # Tune trial id -> the metric's latest value

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return self.inner.set_search_properties(metric, mode, config, **spec) or True

    def suggest(self, trial_id: str):
        from peerlab.train.launch import write_resolved_config

        suggestion = self.inner.suggest(trial_id)
        if suggestion is None or suggestion == _Searcher.FINISHED:
            return suggestion
        trial = self.make_trial(suggestion)
        self.trials[trial.trial_id] = trial
        folder = trial_dir(self.sweep_dir, trial.trial_id)
        for name in MARKERS:  # a trial run again (resume) starts without its old ending
            (folder / name).unlink(missing_ok=True)
        write_resolved_config(config_from_dict(trial.config), folder)
        return {"trial": resolved_run_config(trial, self.sweep_dir, self.uri)}

    def _with_metric(self, trial_id: str, result: dict | None) -> dict | None:
        """The result with the metric's value under its own text; the latest value where this report has none
        (a trial's last report may be lm-eval's, without held-out metrics)."""
        if result is None or not self.metric_expr:
            return result
        from peerlab.mixsearch import metric_value

        value = metric_value(result, self.metric_expr)
        if value is not None:
            self.last[trial_id] = value
        value = self.last.get(trial_id)
        return result if value is None else {**result, self.metric_expr: value}

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if self.metric_expr:
            from peerlab.mixsearch import metric_value

            if metric_value(result, self.metric_expr) is None:
                return  # a report without the metric (held-out metrics come every eval_steps): Optuna needs it
        self.inner.on_trial_result(trial_id, self._with_metric(trial_id, result))

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        self.inner.on_trial_complete(trial_id, result=self._with_metric(trial_id, result), error=error)


def __getattr__(name: str):
    """peerlab.tune.MixSearch: the mixture search's Tune searcher (peerlab.mixsearch), imported when asked for."""
    if name == "MixSearch":
        from peerlab.mixsearch import MixSearch

        return MixSearch
    raise AttributeError(name)


@contextlib.contextmanager
def tune_output_to(path: Path):
    """Tune's own console output (its experiment table, trial error tracebacks, warnings) into `path`.

    Tune logs through the `ray.tune` logger, and its default reporter prints its experiment
    table and every trial error whatever the verbosity: the legacy reporter
    (RAY_AIR_NEW_OUTPUT=0) prints nothing at verbose=0. The sweep prints its own lines.
    """
    logger = logging.getLogger("ray.tune")
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    saved = logger.propagate, os.environ.get("RAY_AIR_NEW_OUTPUT")
    logger.addHandler(handler)
    logger.propagate = False
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    try:
        yield
    finally:
        logger.removeHandler(handler)
        handler.close()
        logger.propagate = saved[0]
        if saved[1] is None:
            os.environ.pop("RAY_AIR_NEW_OUTPUT", None)
        else:
            os.environ["RAY_AIR_NEW_OUTPUT"] = saved[1]


class Rungs:
    """ASHA's rungs (Li et al. 2020, asynchronous successive halving), with re-checks.

    Rungs fall at grace x rf^k steps below max_t. A trial's reward (higher is better) is
    recorded at each rung it reaches, and it goes on only while it is in the top 1/rf of the
    results recorded at every rung it has passed: at or above the (1 - 1/rf) percentile of
    the other trials' results there. Ray's AsyncHyperBandScheduler makes that decision once,
    when the trial reaches the rung, against the results already there, so the first trials
    to arrive always go on (the first has nothing to lose to). Here it is made again at each
    of the trial's later reports, against every result recorded since: in a small sweep the
    trials that happened to get there first face the same test as the rest, and a trial so
    stopped leaves the later rungs it should not have reached. Trials run one after another
    are decided exactly as Ray decides them (a test checks this against Ray's _Bracket).
    """

    def __init__(self, grace: int, max_t: int, rf: float):
        count = int(math.log(max_t / grace) / math.log(rf) + 1)  # as Ray's _Bracket
        self.rf = rf
        self.recorded: dict[int, dict[str, float]] = {int(grace * rf**k): {} for k in range(count)}

    def report(self, trial_id: str, step: int, reward: float) -> bool:
        """Record `reward` at the highest rung `step` has reached (once per rung); True: go on."""
        for milestone in sorted(self.recorded, reverse=True):
            if step >= milestone and trial_id not in self.recorded[milestone]:
                self.recorded[milestone][trial_id] = reward
                break
        milestones = sorted(self.recorded)
        for i, milestone in enumerate(milestones):
            results = self.recorded[milestone]
            others = [r for t, r in results.items() if t != trial_id]
            if trial_id in results and others:
                if results[trial_id] < np.nanpercentile(others, (1 - 1 / self.rf) * 100):
                    for later in milestones[i + 1 :]:  # it should not have passed this rung: its later
                        self.recorded[later].pop(trial_id, None)  # results do not count against others
                    return False
        return True


def error_line(lines: list[str]) -> str:
    """The line of a Ray-wrapped traceback that says what went wrong (the last 'SomethingError: ...')."""
    for line in reversed(lines):
        if re.match(r"^\s*[\w.]+(Error|Exception)\b", line):
            return line.strip()
    return lines[-1].strip() if lines else "unknown error"


def first_cut(configs: list[dict], metric: str, steps: int) -> int:
    """ASHA's default grace period: the first step at which every trial (its config) has reported `metric`.

    Held-out metrics (`eval_*`) come every `eval_steps`, the training loss every
    `logging_steps`; ASHA can compare trials from their first report on (Ray's own default
    grace period is 1, the first report). A quarter of the run where a trial never reports
    the metric before its end.
    """
    every = "eval_steps" if metric.startswith("eval_") else "logging_steps"
    firsts = [c["train_config"].get(every) or 0 for c in configs]
    first = max(firsts, default=0)
    return first if 0 < first < steps else max(1, steps // 4)


def _steps(trial: Trial) -> int:
    """The trial's optimizer steps, as its run will count them (epochs over unstreamed data included)."""
    from peerlab.train.launch import with_steps_per_epoch
    from peerlab.train.optim import total_steps

    return total_steps(with_steps_per_epoch(config_from_dict(trial.config)).train_config)


def _status(sweep_dir: Path, trial: Trial) -> str:
    return trial_status(trial_dir(sweep_dir, trial.trial_id))[0]
