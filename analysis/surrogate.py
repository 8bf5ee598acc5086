"""Mixture recommendation: a Scheffe quadratic mixture model of (mix weights -> metric).

    y = sum_i b_i x_i + sum_{i<j} b_ij x_i x_j      (no intercept: the weights sum to 1)

fitted by ridge regression (a small penalty keeps it defined with few mixes) on the trials of
one PEER setting, then searched over a grid of the simplex. Its held-out quality is the
Spearman rank correlation between each tried mix's mean metric and the prediction of a
model fitted without that mix (leave-one-mix-out: all seeds of the mix are left out).
With fewer distinct mixes than parameters + 2 the fit is not trusted, and the report says so.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
from scipy import stats

from .load import usable, weight_columns

RIDGE = 1e-3
GRID_STEP = 0.05
MAX_GRID = 50_000


def design(x: np.ndarray) -> np.ndarray:
    """Scheffe quadratic terms of weights x (n, q): the q weights and their q(q-1)/2 products."""
    pairs = [x[:, i] * x[:, j] for i, j in itertools.combinations(range(x.shape[1]), 2)]
    return np.column_stack([x, *pairs]) if pairs else x


def fit(x: np.ndarray, y: np.ndarray, ridge: float = RIDGE) -> np.ndarray:
    """Ridge coefficients of the Scheffe model."""
    d = design(x)
    return np.linalg.solve(d.T @ d + ridge * np.eye(d.shape[1]), d.T @ y)


def predict(coef: np.ndarray, x: np.ndarray) -> np.ndarray:
    return design(x) @ coef


def simplex_grid(q: int, step: float = GRID_STEP, rng: np.random.Generator | None = None) -> np.ndarray:
    """Points of the q-simplex: a regular grid where it is small enough, else Dirichlet samples plus vertices."""
    k = round(1 / step)
    if math.comb(k + q - 1, q - 1) <= MAX_GRID:
        bars = np.array(list(itertools.combinations(range(k + q - 1), q - 1)))
        edges = np.column_stack([np.full(len(bars), -1), bars, np.full(len(bars), k + q - 1)])
        return (np.diff(edges, axis=1) - 1) / k
    rng = rng or np.random.default_rng(0)
    return np.vstack([np.eye(q), rng.dirichlet(np.ones(q), MAX_GRID)])


def recommend_mix(trials: pd.DataFrame, metric: str, mode: str = "min", setting: str | None = None) -> pd.DataFrame:
    """Fit the surrogate and predict the best mix for `metric`.

    Rows: kind "recommended" (the predicted optimum over the simplex) and one "tried" row per
    mix, with the `weight/<dataset>` columns, `observed` (mean over seeds) and `predicted`
    (leave-one-mix-out for tried mixes). `attrs` holds the fit: setting, mixes, params,
    loo_spearman, trusted (bool), distance_to_tried (total variation from the optimum to the
    nearest tried mix) and note (plain words).
    """
    wcols = weight_columns(trials)
    ok = usable(trials, metric)
    if setting is None and not ok.empty:
        best = ok.groupby("cell")[metric].mean()
        best_cell = best.idxmin() if mode == "min" else best.idxmax()
        setting = ok.loc[ok["cell"] == best_cell, "setting"].iloc[0]
    ok = ok[ok["setting"] == setting].fillna({c: 0.0 for c in wcols})
    mixes = ok.groupby("mix")[[*wcols, metric]].mean()
    used = [c for c in wcols if mixes[c].max() > 0]  # a dataset no mix gave weight to stays at 0
    q, n = len(used), len(mixes)
    params = q + q * (q - 1) // 2
    info = dict(
        setting=setting,
        metric=metric,
        mixes=n,
        params=params,
        loo_spearman=np.nan,
        trusted=False,
        distance_to_tried=np.nan,
    )
    out = mixes.rename(columns={metric: "observed"}).assign(kind="tried", predicted=np.nan).reset_index()
    if q < 2 or n < 3:
        info["note"] = (
            f"cannot fit: {n} mix(es) over {q} dataset(s); the surrogate needs at least 3 mixes of 2+ datasets"
        )
        out.attrs = info
        return out[["kind", "mix", *wcols, "observed", "predicted"]]
    x, y = mixes[used].to_numpy(float), mixes[metric].to_numpy(float)
    loo = np.array([predict(fit(np.delete(x, i, 0), np.delete(y, i)), x[i : i + 1])[0] for i in range(n)])
    rho = stats.spearmanr(loo, y).statistic if np.ptp(y) > 0 and np.ptp(loo) > 0 else np.nan
    coef = fit(x, y)
    grid = simplex_grid(q)
    pred = predict(coef, grid)
    best = int(np.argmin(pred) if mode == "min" else np.argmax(pred))
    out["predicted"] = loo
    rec = (
        pd.DataFrame([grid[best]], columns=used)
        .reindex(columns=wcols, fill_value=0.0)
        .assign(kind="recommended", mix="(recommended)", observed=np.nan, predicted=pred[best])
    )
    out = pd.concat([rec, out], ignore_index=True)[["kind", "mix", *wcols, "observed", "predicted"]]
    reach = float(np.abs(x - grid[best]).sum(axis=1).min() / 2)  # total variation to the nearest tried mix
    info["distance_to_tried"] = reach
    enough = n >= params + 2
    info.update(loo_spearman=float(rho), trusted=bool(enough and rho >= 0.5))
    if not enough:
        info["note"] = (
            f"too few mixes to trust: {n} mixes for a model of {params} parameters (needs at least {params + 2}); "
            "treat the recommendation as a guess and run more mixes"
        )
    elif not rho >= 0.5:
        info["note"] = f"the surrogate ranks held-out mixes poorly (Spearman {rho:.2f}); do not trust its optimum"
    else:
        info["note"] = f"the surrogate ranks held-out mixes well (leave-one-mix-out Spearman {rho:.2f})"
    if reach > 0.25:
        info["note"] += (
            f"; its optimum lies {reach:.2f} (total variation) from the nearest tried mix, an extrapolation: "
            "try it as a new mix before relying on it"
        )
    out.attrs = info
    return out
