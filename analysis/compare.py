"""What the trials say about the cells: leaderboard, seed noise, differences, factor effects.

Statistics used (and said in the report):
- 95% interval of a cell's mean: mean +- t(0.975, n-1) * sd / sqrt(n) over its seeds
  (omitted with a single seed).
- Noise floor: the seed-to-seed standard deviation pooled over cells,
  sqrt(sum (n_i - 1) s_i^2 / sum (n_i - 1)).
- Difference of two cells: a paired t-test on the seed-matched differences when the cells
  share at least two seeds, Welch's t-test otherwise; p-values Holm-adjusted over the
  comparisons of one table.
- Effect of a factor: one-way ANOVA of the metric over the factor's levels (other factors
  averaged over).
"""

from __future__ import annotations


import numpy as np
import pandas as pd
from scipy import stats

from peerlab.tune import NO_PEER, error_line

from .load import cost_columns, metric_columns, peer_columns, usable, weight_columns

ALPHA = 0.05


def t_halfwidth(sd: pd.Series, n: pd.Series) -> pd.Series:
    """Half-width of the 95% t interval of a mean (NaN for n < 2)."""
    n = n.astype(float)
    t = pd.Series(stats.t.ppf(1 - ALPHA / 2, np.where(n > 1, n - 1, np.nan)), index=n.index)
    return t * sd / np.sqrt(n)


def mean_interval(grouped) -> pd.DataFrame:
    """n, mean, sd and the 95% t interval (lo, hi) of each group of a grouped Series, groups as columns."""
    out = grouped.agg(["count", "mean", "std"]).rename(columns={"count": "n", "std": "sd"}).reset_index()
    half = t_halfwidth(out["sd"], out["n"])
    return out.assign(lo=out["mean"] - half, hi=out["mean"] + half)


def cell_stats(trials: pd.DataFrame, metrics: list[str] | None = None) -> pd.DataFrame:
    """Tidy: one row per cell and metric with n (seeds), mean, sd, lo, hi over usable trials."""
    metrics = metrics or metric_columns(trials) + cost_columns(trials)
    ok = trials[trials["status"] != "failed"]
    long = ok.melt(id_vars=["cell", "mix", "setting", "seed"], value_vars=metrics, var_name="metric").dropna(
        subset=["value"]
    )
    return mean_interval(long.groupby(["cell", "mix", "setting", "metric"], sort=False)["value"])


def leaderboard(trials: pd.DataFrame, metric: str, mode: str = "min", metrics: list[str] | None = None) -> pd.DataFrame:
    """One row per cell, ranked on `metric`: mean, lo, hi of every metric and cost, seeds and failures.

    Columns: rank, cell, mix, setting, seeds (trials with a value of `metric`), stopped, failed, then `<m>`,
    `<m> lo`, `<m> hi` per metric.
    Cells whose trials all failed come last with no rank.
    """
    metrics = metrics or metric_columns(trials) + cost_columns(trials)
    metrics = [metric] + [m for m in metrics if m != metric and m in trials]
    long = cell_stats(trials, metrics)
    wide = long.pivot(index="cell", columns="metric", values=["mean", "lo", "hi"])
    wide.columns = [m if s == "mean" else f"{m} {s}" for s, m in wide.columns]
    order = [c for m in metrics for c in (m, f"{m} lo", f"{m} hi")]
    wide = wide.reindex(columns=order)  # a metric no trial reported stays a column of NaN
    # seeds: the trials the ranking metric's mean and interval are over (not failed, with a value)
    counted = (trials["status"] != "failed") & (trials[metric].notna() if metric in trials else False)
    counts = (
        trials.assign(_counted=counted)
        .groupby("cell", sort=False)
        .agg(
            mix=("mix", "first"),
            setting=("setting", "first"),
            seeds=("_counted", "sum"),
            stopped=("status", lambda s: int((s == "stopped").sum())),
            failed=("status", lambda s: int((s == "failed").sum())),
        )
    )
    board = counts.join(wide[order], how="left")
    ascending = mode == "min"
    if metric in board:
        board["rank"] = board[metric].rank(ascending=ascending, method="min").astype("Int64")
    else:
        board["rank"] = pd.array([pd.NA] * len(board), dtype="Int64")
    board = board.sort_values(["rank", "cell"], na_position="last").reset_index()
    return board[["rank", "cell", "mix", "setting", "seeds", "stopped", "failed", *order]]


def failures(trials: pd.DataFrame) -> pd.DataFrame:
    """The failed trials with their error, one line each."""
    failed = trials[trials["status"] == "failed"]
    cols = [c for c in ("trial_id", "cell", "seed", "error") if c in failed]
    out = failed[cols].copy()
    if "error" in out:  # sweeps store one line already; a whole traceback is cut to its "...Error: message" line
        out["error"] = out["error"].fillna("").astype(str).map(lambda e: error_line(e.splitlines())[:200])
    return out.reset_index(drop=True)


def noise_floor(trials: pd.DataFrame, metrics: list[str] | None = None) -> pd.DataFrame:
    """Seed-to-seed standard deviation per metric, pooled over cells with two or more seeds.

    Columns: metric, sd (pooled), df, cells, seeds (typical per cell) and `min_diff`: the half-width
    of the 95% interval of a difference between two cells of that many seeds (smaller differences
    are within the noise).
    """
    metrics = metrics or metric_columns(trials)
    s = cell_stats(trials, metrics)
    s = s[s["n"] > 1].assign(ss=lambda d: (d["n"] - 1) * d["sd"] ** 2, df=lambda d: d["n"] - 1)
    pooled = s.groupby("metric", sort=False).agg(
        ss=("ss", "sum"), df=("df", "sum"), cells=("cell", "nunique"), seeds=("n", "median")
    )
    pooled["sd"] = np.sqrt(pooled["ss"] / pooled["df"])
    t = stats.t.ppf(1 - ALPHA / 2, pooled["df"])
    pooled["min_diff"] = t * pooled["sd"] * np.sqrt(2 / pooled["seeds"])
    out = pooled.reindex([m for m in metrics if m in pooled.index]).reset_index()
    return out[["metric", "sd", "df", "cells", "seeds", "min_diff"]]


def holm(p: pd.Series) -> pd.Series:
    """Holm-adjusted p-values (NaN stays NaN)."""
    valid = p.dropna().sort_values()
    m = len(valid)
    adj = (valid * (m - np.arange(m))).cummax().clip(upper=1.0)
    return adj.reindex(p.index)


def compare_pair(a: pd.DataFrame, b: pd.DataFrame, metric: str) -> dict:
    """Difference a - b of `metric` (frames of trials with seed and metric): paired by seed where possible."""
    xa, xb = a.set_index("seed")[metric].dropna(), b.set_index("seed")[metric].dropna()
    xa, xb = xa.groupby(level=0).mean(), xb.groupby(level=0).mean()
    common = xa.index.intersection(xb.index)
    diff = xa.mean() - xb.mean()
    if len(common) >= 2:
        d = xa[common] - xb[common]
        res = stats.ttest_rel(xa[common], xb[common])
        half = stats.t.ppf(1 - ALPHA / 2, len(d) - 1) * d.std() / np.sqrt(len(d))
        return dict(diff=d.mean(), lo=d.mean() - half, hi=d.mean() + half, p=res.pvalue, test="paired t", n=len(d))
    if len(xa) >= 2 and len(xb) >= 2:
        res = stats.ttest_ind(xa, xb, equal_var=False)
        ci = res.confidence_interval(1 - ALPHA)
        return dict(diff=diff, lo=ci.low, hi=ci.high, p=res.pvalue, test="Welch t", n=min(len(xa), len(xb)))
    return dict(diff=diff, lo=np.nan, hi=np.nan, p=np.nan, test="none (one seed)", n=min(len(xa), len(xb)))


DIFF_COLUMNS = ["cell", "reference", "diff", "lo", "hi", "p", "p_holm", "test", "n", "significant", "better"]


def compare_pairs(ok: pd.DataFrame, pairs: pd.DataFrame, metric: str, lower: bool) -> pd.DataFrame:
    """Test each (cell, reference) row of `pairs` on `metric`; Holm over the table."""
    groups = dict(tuple(ok.groupby("cell")))
    rows = [
        {"cell": c, "reference": r, **compare_pair(groups[c], groups[r], metric)}
        for c, r in zip(pairs["cell"], pairs["reference"])
    ]
    out = pd.DataFrame(rows, columns=["cell", "reference", "diff", "lo", "hi", "p", "test", "n"])
    out["p_holm"] = holm(out["p"])
    out["significant"] = out["p_holm"] < ALPHA
    out["better"] = out["significant"] & ((out["diff"] < 0) if lower else (out["diff"] > 0))
    return out[DIFF_COLUMNS]


def differences(trials: pd.DataFrame, metric: str, mode: str = "min", reference: str | None = None) -> pd.DataFrame:
    """Every cell against a reference cell (default: the best one) on `metric`, the runner-up first.

    Columns: cell, reference, diff (cell - reference), lo, hi (95%), p, p_holm, test, n, significant,
    better (the cell beats the reference, significantly).
    """
    ok = usable(trials, metric)
    if ok.empty:
        return pd.DataFrame(columns=DIFF_COLUMNS)
    means = ok.groupby("cell")[metric].mean()
    lower = mode == "min"
    reference = reference or (means.idxmin() if lower else means.idxmax())
    if reference not in means.index:
        raise ValueError(f"no cell {reference!r} with results for {metric}; cells: {sorted(means.index)}")
    pairs = pd.DataFrame({"cell": means.index[means.index != reference], "reference": reference})
    out = compare_pairs(ok, pairs, metric, lower)
    return out.sort_values("diff", ascending=lower).reset_index(drop=True)


def pairwise(trials: pd.DataFrame, metric: str, mode: str = "min") -> pd.DataFrame:
    """Every pair of cells (each once, the better-ranked as reference); Holm over all pairs."""
    ok = usable(trials, metric)
    lower = mode == "min"
    ranked = ok.groupby("cell")[metric].mean().sort_values(ascending=lower).index.to_series()
    pairs = ranked.rename("reference").to_frame().merge(ranked.rename("cell").to_frame(), how="cross")
    order = {c: i for i, c in enumerate(ranked)}
    pairs = pairs[pairs["reference"].map(order) < pairs["cell"].map(order)]
    return compare_pairs(ok, pairs, metric, lower) if len(pairs) else pd.DataFrame(columns=DIFF_COLUMNS)


def baseline_differences(trials: pd.DataFrame, metric: str, mode: str = "min", baseline: str = NO_PEER) -> pd.DataFrame:
    """Each PEER cell against the `baseline` setting (the dense arm) of the same mix: what PEER buys per mix.

    Empty when no cell has that setting. Columns as `differences`. Other arms (MoE, PKM: peer/use_peer
    false) are left out; the leaderboard ranks them with the rest.
    """
    ok = usable(trials, metric)
    base = ok.loc[ok["setting"] == baseline, ["mix", "cell"]].drop_duplicates().rename(columns={"cell": "reference"})
    if base.empty:
        return pd.DataFrame(columns=DIFF_COLUMNS)
    peer = ok["peer/use_peer"].astype(bool) if "peer/use_peer" in ok else True
    pairs = ok.loc[(ok["setting"] != baseline) & peer, ["mix", "cell"]].drop_duplicates().merge(base, on="mix")
    out = compare_pairs(ok, pairs, metric, mode == "min")
    return out.sort_values(["reference", "diff"], ascending=[True, mode == "min"]).reset_index(drop=True)


def factors(trials: pd.DataFrame) -> list[str]:
    """Columns that vary across the usable trials: mix weights and PEER settings."""
    ok = trials[trials["status"] != "failed"]
    cols = weight_columns(ok) + peer_columns(ok)
    return [c for c in cols if ok[c].astype(str).nunique() > 1]


def peer_slice(trials: pd.DataFrame, factor: str) -> pd.DataFrame:
    """The trials that read the effect of one PEER key.

    PEER trials only (a dense arm has no experts), except for peer/use_peer itself. When the swept
    PEER keys form a full grid, all of them (the other keys are balanced over the levels); otherwise
    (one key at a time around a default) only the trials whose other swept keys sit at their most
    common value, so that a level is not confounded with another key's change.
    """
    sub = trials
    if factor != "peer/use_peer" and "peer/use_peer" in sub:
        sub = sub[sub["peer/use_peer"].astype(bool)]
    swept = [c for c in peer_columns(sub) if c != "peer/use_peer" and sub[c].astype(str).nunique() > 1]
    if factor == "peer/use_peer" or factor not in swept:
        return sub
    keys = sub[swept].astype(str)
    # Keys that move together (num_experts and the product_key_dim it sets) are one factor.
    others = [c for c in swept if not aliased(keys, factor, c)]
    if not others:
        return sub
    distinct = [c for i, c in enumerate(swept) if not any(aliased(keys, c, d) for d in swept[:i])]
    full_grid = len(keys[distinct].drop_duplicates()) == keys[distinct].nunique().prod()
    if full_grid:
        return sub
    at_mode = (keys[others] == keys[others].mode().iloc[0]).all(axis=1)
    return sub[at_mode]


def aliased(keys: pd.DataFrame, a: str, b: str) -> bool:
    """Whether columns a and b determine each other (one-to-one levels), so they cannot be read apart."""
    pairs = len(keys[[a, b]].drop_duplicates()) if a != b else keys[a].nunique()
    return pairs == keys[a].nunique() == keys[b].nunique()


def factor_effects(
    trials: pd.DataFrame, metrics: list[str] | None = None, factor_list: list[str] | None = None
) -> pd.DataFrame:
    """Tidy: per factor, level and metric the mean and 95% interval over trials, and the factor's ANOVA p.

    PEER factors are read on the trials of `peer_slice` (PEER trials; one key at a time when the sweep is not a grid).
    Columns: factor, level, metric, n, mean, lo, hi, p (one-way ANOVA over levels), significant.
    """
    metrics = metrics or metric_columns(trials)
    factor_list = factor_list if factor_list is not None else factors(trials)
    ok = trials[trials["status"] != "failed"]
    frames = []
    for factor in factor_list:
        sub = peer_slice(ok, factor) if factor.startswith("peer/") else ok
        long = sub.assign(level=sub[factor].map(level_name)).melt(
            id_vars=["level"], value_vars=[m for m in metrics if m in sub], var_name="metric"
        )
        long = long.dropna(subset=["value"])
        agg = mean_interval(long.groupby(["metric", "level"], sort=False)["value"])
        pvals = long.groupby("metric", sort=False)[["level", "value"]].apply(_anova).rename("p")
        agg = agg.merge(pvals, left_on="metric", right_index=True, how="left").assign(factor=factor)
        agg["_order"] = pd.to_numeric(agg["level"], errors="coerce")
        frames.append(agg.sort_values(["metric", "_order", "level"]).drop(columns="_order"))
    cols = ["factor", "level", "metric", "n", "mean", "lo", "hi", "p"]
    if not frames:
        return pd.DataFrame(columns=[*cols, "significant"])
    out = pd.concat(frames, ignore_index=True)[cols]
    out["significant"] = out["p"] < ALPHA
    return out


def level_name(value) -> str:
    """A factor level as text: floats to 3 significant digits (mix weights), the rest as they are."""
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def factor_p_values(effects: pd.DataFrame, metrics: list[str] | None = None) -> pd.DataFrame:
    """Wide: one row per factor, its ANOVA p on each metric (columns in `metrics` order)."""
    wide = effects.drop_duplicates(["factor", "metric"]).pivot(index="factor", columns="metric", values="p")
    wide = wide[[m for m in (metrics or list(wide.columns)) if m in wide.columns]].reset_index()
    wide.columns.name = None
    return wide


def _anova(group: pd.DataFrame) -> float:
    samples = [g.to_numpy() for _, g in group.groupby("level")["value"] if len(g) > 0]
    if len(samples) < 2 or sum(len(s) for s in samples) <= len(samples) or all(len(s) < 2 for s in samples):
        return np.nan
    return float(stats.f_oneway(*samples).pvalue)
