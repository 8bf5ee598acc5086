"""Which experts each data source uses: the sweep's usage_by_source.parquet read back for the report.

The table (written by peerlab.train.usage, gathered by peerlab.tables) has, per trial, step and
PEER layer, a "source" row per dataset of the mix (mass_share, usage, dead, kl_uniform,
exclusive, a pooled load vector, and the layer's mi / nmi) and a "pair" row per pair of
datasets (overlap, jaccard). Everything here reads each trial's last snapshot per layer.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

SOURCE_STATS = ["mass_share", "usage", "dead", "kl_uniform", "exclusive"]


def last_rows(by_source: pd.DataFrame, kind: str) -> pd.DataFrame:
    """The rows of `kind` ("source" or "pair") at each trial's last snapshot of each layer."""
    if by_source.empty or "kind" not in by_source:
        return pd.DataFrame()
    rows = by_source[by_source["kind"] == kind]
    last = rows.groupby(["trial_id", "layer"])["step"].transform("max")
    return rows[rows["step"] == last]


def source_heatmaps(by_source: pd.DataFrame, trial_ids: list[str]) -> pd.DataFrame:
    """Per layer, the sources x pooled-experts load (z_s x N, mean 1 per source) at the last snapshot, averaged
    over `trial_ids` (the seeds of one cell). Columns: layer, sources (list), grid (2-D array), nmi, trials."""
    cols = ["layer", "sources", "grid", "nmi", "trials"]
    rows = last_rows(by_source, "source")
    if rows.empty or "load" not in rows:
        return pd.DataFrame(columns=cols)
    rows = rows[rows["trial_id"].isin(trial_ids)].dropna(subset=["load"]).sort_values("source_index")
    out = []
    for layer, g in rows.groupby("layer"):
        sources = list(dict.fromkeys(g["source"]))
        grid = np.stack(
            [
                np.mean(np.stack([np.asarray(v, dtype=float) for v in g.loc[g["source"] == s, "load"]]), 0)
                for s in sources
            ]
        )
        out.append(
            {
                "layer": layer,
                "sources": sources,
                "grid": grid,
                "nmi": g["nmi"].mean(),
                "trials": g["trial_id"].nunique(),
            }
        )
    return pd.DataFrame(out, columns=cols)


def source_by_cell(by_source: pd.DataFrame, usage: pd.DataFrame, trials: pd.DataFrame) -> pd.DataFrame:
    """One row per cell and source: the source's mix weight, then at the last snapshot, mean over the PEER
    layers and seeds, its mass share, usage, dead share, KL to uniform and exclusive share, and the cell's
    `layer_dead` (dead share of the whole layer, from usage.parquet) and `nmi` (source-expert)."""
    cols = ["cell", "mix", "setting", "source", "weight", *SOURCE_STATS, "layer_dead", "nmi", "seeds"]
    rows = last_rows(by_source, "source")
    if rows.empty:
        return pd.DataFrame(columns=cols)
    keys = trials[["trial_id", "cell", "mix", "setting"]]
    rows = rows.merge(keys, on="trial_id")
    weight_cols = [c for c in trials.columns if c.startswith("weight/")]
    weights = trials.melt(id_vars=["trial_id"], value_vars=weight_cols, var_name="source", value_name="weight")
    weights["source"] = weights["source"].str.removeprefix("weight/")
    rows = rows.merge(weights, on=["trial_id", "source"], how="left")
    if not usage.empty and "dead" in usage:
        last = usage[usage["step"] == usage.groupby(["trial_id", "layer"])["step"].transform("max")]
        rows = rows.merge(
            last[["trial_id", "layer", "dead"]].rename(columns={"dead": "layer_dead"}), on=["trial_id", "layer"]
        )
    else:
        rows = rows.assign(layer_dead=np.nan)
    stats = [*SOURCE_STATS, "weight", "layer_dead", "nmi"]
    per_trial = rows.groupby(["trial_id", "cell", "mix", "setting", "source"], sort=False)[stats].mean().reset_index()
    out = per_trial.groupby(["cell", "mix", "setting", "source"], sort=False).agg(
        seeds=("trial_id", "nunique"), **{s: (s, "mean") for s in stats}
    )
    return out.reset_index()[cols]


def weight_effects(by_cell: pd.DataFrame) -> pd.DataFrame:
    """How a source's mix weight moves expert load, per setting and source, across the setting's cells (mixes):
    the weights tried, and the Spearman correlation of the weight with the source's dead share, its KL to
    uniform, its mass share, and the whole layer's dead share. NaN where fewer than 3 mixes differ in weight."""
    cols = ["setting", "source", "mixes", "weight_min", "weight_max"]
    targets = {
        "dead": "rho_dead",
        "kl_uniform": "rho_kl",
        "mass_share": "rho_mass_share",
        "layer_dead": "rho_layer_dead",
    }
    out = []
    for (setting, source), g in by_cell.groupby(["setting", "source"], sort=False):
        row = {"setting": setting, "source": source, "mixes": g["mix"].nunique()}
        row.update(weight_min=g["weight"].min(), weight_max=g["weight"].max())
        varied = g["weight"].nunique() >= 3
        for stat, name in targets.items():
            ok = g[["weight", stat]].dropna()
            row[name] = ok["weight"].corr(ok[stat], method="spearman") if varied and len(ok) >= 3 else np.nan
        out.append(row)
    return pd.DataFrame(out, columns=cols + list(targets.values()))


def pair_overlaps(by_source: pd.DataFrame, trials: pd.DataFrame) -> pd.DataFrame:
    """Per setting, layer and pair of sources at the last snapshot, mean over the setting's trials: the load
    overlap sum_e min(z_a, z_b) and the Jaccard index of the experts each source used."""
    cols = ["setting", "layer", "source", "other", "overlap", "jaccard", "trials"]
    rows = last_rows(by_source, "pair")
    if rows.empty:
        return pd.DataFrame(columns=cols)
    rows = rows.merge(trials[["trial_id", "setting"]], on="trial_id")
    out = rows.groupby(["setting", "layer", "source", "other"], sort=False).agg(
        overlap=("overlap", "mean"), jaccard=("jaccard", "mean"), trials=("trial_id", "nunique")
    )
    return out.reset_index()[cols]
