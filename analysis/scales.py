"""A scale ladder's results (ladder.parquet, written by experiments/ablate.py --ladder) as tables.

- `scale_boards`: the leaderboard of every scale (mean and 95% interval over seeds).
- `rank_agreement`: each scale against the largest: Kendall's tau-b of the cells' means and
  decision accuracy (the share of pairs ordered as at the largest scale, DataDecide), with a
  bootstrap interval over seeds.
- `scale_fits`: per cell, L(C) = E + A * C^-alpha fitted to its points and extrapolated to the
  target compute with a bootstrap interval; flagged where too few scales back it.
- `crossings`: pairs of cells whose fitted curves cross between the smallest compute and the target.
The math is peerlab.ladder's.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from peerlab.ladder import MIN_POINTS, crossing, decision_accuracy_interval, fit_power_law, kendall_tau

from analysis.compare import leaderboard

TARGET_TIMES = 10.0  # without a target compute, the fits are extrapolated to 10x the largest scale's


def scale_order(ladder: pd.DataFrame) -> list[str]:
    """The scales' labels, smallest compute first."""
    return ladder.groupby("scale")["multiple"].first().sort_values().index.tolist()


def usable_points(ladder: pd.DataFrame, metric: str) -> pd.DataFrame:
    return ladder[(ladder["status"] != "failed") & ladder[metric].notna()] if metric in ladder else ladder.iloc[:0]


def scale_boards(ladder: pd.DataFrame, metric: str, mode: str) -> pd.DataFrame:
    """Every scale's leaderboard: scale, multiple, rank, cell, seeds, the metric's mean, lo and hi."""
    frames = []
    for scale in scale_order(ladder):
        part = ladder[ladder["scale"] == scale]
        board = leaderboard(part, metric, mode, metrics=[metric])
        cols = ["rank", "cell", "seeds", "stopped", "failed", metric, f"{metric} lo", f"{metric} hi"]
        frames.append(board[cols].assign(scale=scale, multiple=part["multiple"].iloc[0]))
    if not frames:
        return pd.DataFrame(columns=["scale", "multiple", "rank", "cell"])
    out = pd.concat(frames, ignore_index=True)
    return out[["scale", "multiple", *[c for c in out.columns if c not in ("scale", "multiple")]]]


def _seed_values(points: pd.DataFrame, metric: str) -> dict[str, dict]:
    """{cell: {seed: value}}: the bootstrap resamples seeds across cells."""
    return {cell: group.groupby("seed")[metric].mean().to_dict() for cell, group in points.groupby("cell")}


def rank_agreement(ladder: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Each smaller scale against the largest scale that ranked two or more cells: cells in common,
    Kendall's tau-b of their means, decision accuracy and its 95% bootstrap interval over seeds."""
    points = usable_points(ladder, metric)
    order = [s for s in scale_order(ladder) if points[points["scale"] == s]["cell"].nunique() >= 2]
    columns = ["scale", "against", "cells", "kendall_tau", "decision_accuracy", "accuracy lo", "accuracy hi"]
    if len(order) < 2:
        return pd.DataFrame(columns=columns)
    top = order[-1]
    large = _seed_values(points[points["scale"] == top], metric)
    rows = []
    for scale in order[:-1]:
        small = _seed_values(points[points["scale"] == scale], metric)
        common = sorted(set(small) & set(large))
        if len(common) < 2:
            continue
        s = {c: small[c] for c in common}
        g = {c: large[c] for c in common}
        tau = kendall_tau(
            [np.mean(list(s[c].values())) for c in common], [np.mean(list(g[c].values())) for c in common]
        )
        acc, lo, hi = decision_accuracy_interval(s, g)
        rows.append([scale, top, len(common), tau, acc, lo, hi])
    return pd.DataFrame(rows, columns=columns)


def target_compute(ladder: pd.DataFrame, target_flops: float | None) -> tuple[float, str]:
    """The compute the fits extrapolate to, and where it comes from."""
    if target_flops:
        return float(target_flops), "--target-flops"
    return float(ladder["flops"].max()) * TARGET_TIMES, f"{TARGET_TIMES:g}x the largest scale's compute"


def scale_fits(ladder: pd.DataFrame, metric: str, target: float) -> tuple[pd.DataFrame, dict]:
    """Per cell: points, scales, E, A, alpha, the prediction at `target` with its 95% interval, and a
    note; and {cell: PowerLawFit} for the cells that could be fitted (three or more scales)."""
    points = usable_points(ladder, metric)
    if "status" in points:  # a run ASHA stopped early did not reach its scale's compute: not a point of the curve
        points = points[points["status"] != "stopped"]
    rows, fits = [], {}
    for cell, group in points.groupby("cell", sort=False):
        scales = group["scale"].nunique()
        row = {"cell": cell, "points": len(group), "scales": scales}
        if group["flops"].nunique() < 3:
            rows.append({**row, "note": f"{scales} scale(s): a curve of 3 parameters needs 3 or more"})
            continue
        fit = fit_power_law(group["flops"], group[metric])
        lo, hi = fit.interval(target) if fit.enough else (math.nan, math.nan)  # an exact fit has no residuals
        fits[cell] = fit
        note = "" if fit.enough else f"{MIN_POINTS - 1} scales fit the curve exactly: its form is untested"
        rows.append(
            {
                **row,
                "E": fit.E,
                "A": fit.A,
                "alpha": fit.alpha,
                "at target": float(fit(target)),
                "target lo": lo,
                "target hi": hi,
                "note": note,
            }
        )
    columns = ["cell", "points", "scales", "E", "A", "alpha", "at target", "target lo", "target hi", "note"]
    return pd.DataFrame(rows).reindex(columns=columns), fits


def crossings(fits: dict, lo: float, hi: float, measured: float) -> pd.DataFrame:
    """Pairs of fitted cells whose curves cross in [lo, hi] FLOPs: the compute where they do, which cell
    is lower before it, whether that is inside the computes run (up to `measured`) or an extrapolation,
    and whether both curves are tested (4 or more scales each)."""
    rows = []
    cells = list(fits)
    for i, a in enumerate(cells):
        for b in cells[i + 1 :]:
            at = crossing(fits[a], fits[b], lo, hi)
            if at is None:
                continue
            before = a if fits[a](lo) < fits[b](lo) else b
            rows.append(
                {
                    "cell": a,
                    "other": b,
                    "cross at FLOPs": at,
                    "lower before": before,
                    "where": "within the scales run" if at <= measured else "extrapolated",
                    "curves tested": bool(fits[a].enough and fits[b].enough),
                }
            )
    columns = ["cell", "other", "cross at FLOPs", "lower before", "where", "curves tested"]
    return pd.DataFrame(rows, columns=columns)


def winners(boards: pd.DataFrame) -> dict[str, str]:
    """{scale: its first-ranked cell}."""
    top = boards[boards["rank"] == 1]
    return {s: c for s, c in zip(top["scale"], top["cell"])}
