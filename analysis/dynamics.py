"""What happened during training: loss curves per cell and expert usage of the PEER layers."""

from __future__ import annotations

import numpy as np
import pandas as pd

from .compare import mean_interval

USAGE_STATS = ["usage", "kl_uniform", "dead", "hot_count", "max_share_x_n"]


def curves(curve_table: pd.DataFrame, cells: pd.DataFrame, column: str = "loss", smooth: int = 1) -> pd.DataFrame:
    """Tidy: cell, step, n, mean, lo, hi of `column` over seeds (NaN steps dropped).

    `smooth` > 1 takes a rolling mean of that many logged steps within each trial first.
    """
    if curve_table.empty or column not in curve_table:
        return pd.DataFrame(columns=["cell", "step", "n", "mean", "lo", "hi"])
    c = curve_table[["trial_id", "step", column]].dropna().sort_values(["trial_id", "step"])
    if smooth > 1:
        c[column] = c.groupby("trial_id")[column].transform(lambda s: s.rolling(smooth, min_periods=1).mean())
    c = c.merge(cells, on="trial_id")
    return mean_interval(c.groupby(["cell", "step"])[column])[["cell", "step", "n", "mean", "lo", "hi"]]


def eval_columns(curve_table: pd.DataFrame, prefix: str = "eval_bpb/") -> list[str]:
    return sorted(c for c in curve_table.columns if c.startswith(prefix))


def heldout_curves(curve_table: pd.DataFrame, cells: pd.DataFrame, prefix: str = "eval_bpb/") -> pd.DataFrame:
    """Tidy: held-out metric over evaluation steps, one block per dataset (column `metric`)."""
    frames = [curves(curve_table, cells, col).assign(metric=col) for col in eval_columns(curve_table, prefix)]
    frames = [f for f in frames if not f.empty]
    if not frames:
        return pd.DataFrame(columns=["metric", "cell", "step", "n", "mean", "lo", "hi"])
    out = pd.concat(frames, ignore_index=True)
    return out[["metric", "cell", "step", "n", "mean", "lo", "hi"]]


def eval_curves(evals: pd.DataFrame, cells: pd.DataFrame) -> pd.DataFrame:
    """Tidy lm-eval results over steps (from evals.parquet): metric is `lm_eval/<task>/<metric>`,
    with mean, lo, hi over seeds per cell and step."""
    cols = ["metric", "cell", "step", "n", "mean", "lo", "hi"]
    if evals.empty or not {"trial_id", "step", "task", "metric", "value"} <= set(evals.columns):
        return pd.DataFrame(columns=cols)
    e = evals.dropna(subset=["value"]).assign(name="lm_eval/" + evals["task"].astype(str) + "/" + evals["metric"])
    e = e.merge(cells, on="trial_id")
    return mean_interval(e.groupby(["name", "cell", "step"])["value"]).rename(columns={"name": "metric"})[cols]


def _with_cells(usage: pd.DataFrame, cells: pd.DataFrame) -> pd.DataFrame:
    return usage.merge(cells, on="trial_id")


def last_snapshot(usage: pd.DataFrame) -> pd.DataFrame:
    """The last usage row of every trial and layer."""
    last = usage.groupby(["trial_id", "layer"])["step"].transform("max")
    return usage[usage["step"] == last]


def usage_summary(usage: pd.DataFrame, cells: pd.DataFrame) -> pd.DataFrame:
    """Per setting, cell and layer at the last snapshot: mean over seeds of usage share, KL to uniform,
    dead share, hot-expert count and the top expert's load x N; plus `experts` (N) and `seeds`."""
    cols = ["setting", "cell", "layer", "experts", "seeds", *USAGE_STATS]
    if usage.empty:
        return pd.DataFrame(columns=cols)
    u = _with_cells(last_snapshot(usage), cells)
    stats = [s for s in USAGE_STATS if s in u]
    out = u.groupby(["setting", "cell", "layer"]).agg(
        experts=("experts", "first"), seeds=("trial_id", "nunique"), **{s: (s, "mean") for s in stats}
    )
    return out.reset_index()


def usage_by_setting(summary: pd.DataFrame) -> pd.DataFrame:
    """`usage_summary` averaged over the cells (mixes) of each setting and layer."""
    stats = [c for c in USAGE_STATS if c in summary]
    out = summary.groupby(["setting", "layer"]).agg(
        experts=("experts", "first"), cells=("cell", "nunique"), **{c: (c, "mean") for c in stats}
    )
    return out.reset_index()


def usage_over_time(usage: pd.DataFrame, cells: pd.DataFrame) -> pd.DataFrame:
    """Tidy: setting, layer, step, stat, mean over the setting's trials (all mixes and seeds)."""
    if usage.empty:
        return pd.DataFrame(columns=["setting", "layer", "step", "stat", "mean"])
    u = _with_cells(usage, cells)
    stats = [s for s in USAGE_STATS if s in u]
    long = u.melt(id_vars=["setting", "layer", "step"], value_vars=stats, var_name="stat")
    return long.groupby(["setting", "layer", "step", "stat"])["value"].mean().rename("mean").reset_index()


def hot_turnover(usage: pd.DataFrame, cells: pd.DataFrame) -> pd.DataFrame:
    """How stable the hot experts are: per trial, layer and snapshot the share of its (logged) hot ids
    that were also hot at the previous snapshot; averaged per setting, layer and step."""
    cols = ["setting", "layer", "step", "hot_kept"]
    if usage.empty or "hot_ids" not in usage:
        return pd.DataFrame(columns=cols)
    u = usage[["trial_id", "layer", "step", "hot_ids"]].sort_values("step")
    u = u.assign(prev_step=u.groupby(["trial_id", "layer"])["step"].shift())
    ids = u.explode("hot_ids").dropna(subset=["hot_ids"]).rename(columns={"hot_ids": "expert"})
    prev = ids[["trial_id", "layer", "step", "expert"]].rename(columns={"step": "prev_step"}).assign(kept=1)
    both = ids.dropna(subset=["prev_step"]).merge(prev, on=["trial_id", "layer", "prev_step", "expert"], how="left")
    kept = both.assign(kept=both["kept"].notna()).groupby(["trial_id", "layer", "step"])["kept"].mean()
    kept = kept.rename("hot_kept")
    out = _with_cells(kept.reset_index(), cells)
    return out.groupby(["setting", "layer", "step"])["hot_kept"].mean().reset_index()[cols]


def load_histograms(usage: pd.DataFrame, cells: pd.DataFrame) -> pd.DataFrame:
    """Tidy histogram of per-expert load z x N at each trial's last snapshot, summed per setting and layer
    on 64 common bins spanning all its trials' bins (each trial bin counted at its centre). Columns:
    setting, layer, left, right, count."""
    cols = ["setting", "layer", "left", "right", "count"]
    if usage.empty or "load_hist_counts" not in usage:
        return pd.DataFrame(columns=cols)
    u = _with_cells(last_snapshot(usage), cells).dropna(subset=["load_hist_counts"])
    frames = []
    for (setting, layer), g in u.groupby(["setting", "layer"]):
        trial_edges = [np.asarray(e, dtype=float) for e in g["load_hist_edges"]]
        edges = np.linspace(min(e[0] for e in trial_edges), max(e[-1] for e in trial_edges), 65)
        centres = np.concatenate([0.5 * (e[1:] + e[:-1]) for e in trial_edges])
        weights = np.concatenate([np.asarray(c, dtype=float) for c in g["load_hist_counts"]])
        counts, _ = np.histogram(centres, bins=edges, weights=weights)
        frames.append(
            pd.DataFrame({"setting": setting, "layer": layer, "left": edges[:-1], "right": edges[1:], "count": counts})
        )
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=cols)


def load_grids(usage: pd.DataFrame, cells: pd.DataFrame) -> pd.DataFrame:
    """Mean product-key load grid (z x N over the sqrt(N) x sqrt(N) key pairs, pooled) per setting and layer
    at the last snapshot. Columns: setting, layer, rows, cols, grid (2-D array), trials."""
    cols = ["setting", "layer", "rows", "cols", "grid", "trials"]
    if usage.empty or "load_grid" not in usage or "grid_shape" not in usage:
        return pd.DataFrame(columns=cols)
    u = _with_cells(last_snapshot(usage), cells).dropna(subset=["load_grid"])
    u = u.assign(rows=u["grid_shape"].str[0].astype(int), cols=u["grid_shape"].str[1].astype(int))
    out = u.groupby(["setting", "layer", "rows", "cols"])["load_grid"].agg(
        grid=lambda s: np.mean(np.stack([np.asarray(v, dtype=float) for v in s]), axis=0), trials="count"
    )
    out = out.reset_index()
    out["grid"] = [g.reshape(r, c) for g, r, c in zip(out["grid"], out["rows"], out["cols"])]
    return out[cols]
