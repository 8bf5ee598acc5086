"""Reading a sweep folder (written by experiments/ablate.py) into pandas frames.

The folder holds sweep.json, trials.parquet, curves.parquet, usage.parquet, evals.parquet and
usage_by_source.parquet; everything but trials.parquet is optional, and so is every column the
analysis does not strictly need. A mixture search (peerlab.mixsearch) adds mix_search.parquet, mix_fit.json and
recommendation.json: `load_mix_search`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from peerlab.tables import trial_column

DEFAULT_METRIC = "eval_bpb/mean"
TABLES = ("trials", "curves", "usage", "evals", "usage_by_source")
# lm-eval metrics where lower is better; every other lm_eval/* metric is higher-is-better.
LOWER_BETTER_WORDS = ("loss", "bpb", "perplexity", "bits_per_byte", "ppl", "stderr")


@dataclass
class Sweep:
    """The frames of one sweep folder and its sweep.json (`meta`)."""

    path: Path
    meta: dict
    trials: pd.DataFrame
    curves: pd.DataFrame = field(default_factory=pd.DataFrame)
    usage: pd.DataFrame = field(default_factory=pd.DataFrame)
    evals: pd.DataFrame = field(default_factory=pd.DataFrame)
    usage_by_source: pd.DataFrame = field(default_factory=pd.DataFrame)

    @property
    def metric(self) -> str:
        return self.meta["metric"]

    @property
    def mode(self) -> str:
        return self.meta["mode"]

    @property
    def cells(self) -> pd.DataFrame:
        """trial_id -> cell, mix, setting, seed: the key to join step-level tables on."""
        return self.trials[["trial_id", "cell", "mix", "setting", "seed"]]


def load_sweep(sweep_dir: str | Path) -> Sweep:
    """Read a sweep folder; missing optional tables are empty frames."""
    path = Path(sweep_dir)
    if not (path / "trials.parquet").is_file():
        raise FileNotFoundError(f"{path}: no trials.parquet (is this a sweep folder written by experiments/ablate.py?)")
    frames = {name: _read(path / f"{name}.parquet") for name in TABLES}
    for name, frame in frames.items():
        if "trial_id" in frame:
            frames[name] = frame.assign(trial_id=frame["trial_id"].astype(str))
    trials = normalise_trials(frames.pop("trials"))
    meta = json.loads((path / "sweep.json").read_text()) if (path / "sweep.json").is_file() else {}
    meta.setdefault("name", path.name)
    meta.setdefault("metric", DEFAULT_METRIC if DEFAULT_METRIC in trials.columns else "final_loss")
    meta["metric"] = trial_column(meta["metric"])
    meta.setdefault("mode", "min")
    return Sweep(path=path, meta=meta, trials=trials, **frames)


@dataclass
class MixSearchResult:
    """The files of a mixture search: one row per trial (`table`), mix_fit.json (`fit`), recommendation.json (`rec`).

    `fit` is {} and `rec` None where the search has not written them (yet).
    """

    table: pd.DataFrame
    fit: dict
    rec: dict | None

    @property
    def domains(self) -> list[str]:
        return [c.split("/", 1)[1] for c in weight_columns(self.table)]

    @property
    def metric(self) -> str:
        return (self.rec or {}).get("metric") or self.fit.get("metric") or "the search's metric"


def load_mix_search(sweep_dir: str | Path) -> MixSearchResult | None:
    """The mixture search's files in a sweep folder; None without mix_search.parquet."""
    path = Path(sweep_dir)
    if not (path / "mix_search.parquet").is_file():
        return None
    table = pd.read_parquet(path / "mix_search.parquet")
    numeric = ["round", "seed", "step", "metric", "prediction", "fitted"]
    for col in numeric:
        if col not in table:
            table[col] = float("nan")
    for col, default in (("id", ""), ("kind", "proxy"), ("status", "finished"), ("label", ""), ("setting", "{}")):
        table[col] = table[col].fillna(default) if col in table else default
    numeric += [c for c in table.columns if c.startswith(("weight/", "value/"))]
    table[numeric] = table[numeric].apply(pd.to_numeric, errors="coerce")  # all-null columns may arrive as objects
    return MixSearchResult(table, _read_json(path / "mix_fit.json") or {}, _read_json(path / "recommendation.json"))


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except json.JSONDecodeError:  # written by hand or cut short: read as absent
        return None


def _read(path: Path) -> pd.DataFrame:
    return pd.read_parquet(path) if path.is_file() else pd.DataFrame()


def normalise_trials(trials: pd.DataFrame) -> pd.DataFrame:
    """Fill the key columns a partial table may lack (status, mix, setting, seed, cell)."""
    t = trials.copy()
    t["trial_id"] = t["trial_id"].astype(str)
    if "status" not in t:
        t["status"] = "finished"
    if "error" not in t:
        t["error"] = None
    if "mix" not in t:
        t["mix"] = t["cell"].str.split(" | ", regex=False).str[0] if "cell" in t else "default"
    if "setting" not in t:
        t["setting"] = t["cell"].str.split(" | ", regex=False).str[-1] if "cell" in t else "default"
    if "cell" not in t:
        t["cell"] = t["mix"].astype(str) + " | " + t["setting"].astype(str)
    if "seed" not in t:
        t["seed"] = 0
    weights = weight_columns(t)
    t[weights] = t[weights].fillna(0.0)  # a dataset a mix leaves out has weight 0 there, not an unknown one
    numeric = metric_columns(t) + cost_columns(t) + weights
    t[numeric] = t[numeric].apply(pd.to_numeric, errors="coerce")  # all-null columns may arrive as objects
    return t


def mix_table(meta: dict) -> pd.DataFrame:
    """sweep.json's mixes as a table: one row per mix, one column per dataset weight (0 where absent)."""
    mixes = meta.get("mixes") or {}
    return pd.DataFrame.from_dict(mixes, orient="index").fillna(0.0).rename_axis("mix").reset_index()


def weight_columns(trials: pd.DataFrame) -> list[str]:
    return [c for c in trials.columns if c.startswith("weight/")]


def peer_columns(trials: pd.DataFrame) -> list[str]:
    return [c for c in trials.columns if c.startswith("peer/")]


def metric_columns(trials: pd.DataFrame) -> list[str]:
    """The outcome columns, in report order: train loss, held-out bpb, lm-eval."""
    bpb = sorted(c for c in trials.columns if c.startswith("eval_bpb/") and c != "eval_bpb/mean")
    lm = sorted(c for c in trials.columns if c.startswith("lm_eval/") and "_stderr" not in c)
    head = [c for c in ("final_loss", "eval_bpb/mean") if c in trials.columns]
    return head + bpb + lm


def cost_columns(trials: pd.DataFrame) -> list[str]:
    costs = ("flops_per_token", "params_total", "tokens", "flops", "steps", "wall_s", "params_active")
    return [c for c in costs if c in trials.columns]


def lower_is_better(metric: str) -> bool:
    """Direction of a metric the sweep did not rank on (its own follows its mode): losses and bpb are lower-better."""
    if metric.startswith("lm_eval/"):
        return any(word in metric.rsplit("/", 1)[-1] for word in LOWER_BETTER_WORDS)
    return True


def usable(trials: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Trials that did not fail and have the metric."""
    return trials[(trials["status"] != "failed") & trials[metric].notna()] if metric in trials else trials.iloc[:0]
