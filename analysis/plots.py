"""Figures of the report (matplotlib, Agg). Each function takes the table it shows and returns a Figure."""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

MAX_LINES = 8  # cells drawn in one curve plot (the best ones)


def label(metric: str) -> str:
    """Axis label with the unit of a metric."""
    if metric.startswith("eval_bpb/") or metric.endswith("bits_per_byte"):
        return f"{metric} (bits/byte)"
    if "loss" in metric:
        return f"{metric} (nats/token)"
    units = {"tokens": "tokens", "flops": "FLOPs", "wall_s": "s", "steps": "steps", "params_active": "parameters"}
    if metric in units:
        return f"{metric} ({units[metric]})"
    if metric.startswith("lm_eval/"):
        return f"{metric} (score)"
    return metric


def _grid(n: int, width: float = 4.2, height: float = 3.2, cols: int = 3):
    cols = min(cols, max(n, 1))
    rows = math.ceil(max(n, 1) / cols)
    width = max(width, 7.0 / cols)  # room for the figure title over a single panel
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, axes.flat


def leaderboard_plot(board: pd.DataFrame, metric: str, top: int = 20) -> plt.Figure:
    """Cell means with 95% intervals on the ranked metric, best on top."""
    b = board.dropna(subset=[metric]).head(top).iloc[::-1]
    fig, ax = plt.subplots(figsize=(9, 0.35 * len(b) + 1.6))
    lo, hi = b.get(f"{metric} lo"), b.get(f"{metric} hi")
    err = None if lo is None else np.vstack([b[metric] - lo, hi - b[metric]]).clip(min=0)
    ax.errorbar(
        b[metric],
        range(len(b)),
        xerr=err,
        fmt="o",
        color="C0",
        ecolor="C0",
        capsize=3,
        label="mean over seeds, 95% interval",
    )
    ax.set_yticks(range(len(b)), b["cell"])
    ax.set_xlabel(label(metric))
    ax.set_title(f"Leaderboard: {metric} per cell (best on top)")
    ax.legend(loc="best", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return fig


def differences_plot(diff: pd.DataFrame, metric: str, min_diff: float | None = None) -> plt.Figure:
    """Each cell minus the reference cell, with 95% intervals and the noise floor band."""
    d = diff.iloc[::-1]
    fig, ax = plt.subplots(figsize=(9, 0.35 * len(d) + 1.8))
    err = np.vstack([d["diff"] - d["lo"], d["hi"] - d["diff"]])
    colors = np.where(d["significant"], "C3", "C7")
    ax.errorbar(d["diff"], range(len(d)), xerr=np.nan_to_num(err), fmt="none", ecolor="C7", capsize=3)
    ax.scatter(d["diff"], range(len(d)), c=colors, zorder=3)
    ax.scatter([], [], c="C3", label="significant (Holm p < 0.05)")
    ax.scatter([], [], c="C7", label="not significant")
    if min_diff is not None and np.isfinite(min_diff):
        ax.axvspan(-min_diff, min_diff, color="C1", alpha=0.15, label="seed noise floor (95%)")
    ax.axvline(0, color="k", lw=0.8)
    ax.set_yticks(range(len(d)), d["cell"])
    ref = diff["reference"].iloc[0] if len(diff) else ""
    ax.set_xlabel(f"difference in {label(metric)}, cell minus reference")
    ax.set_title(f"Differences against the best cell ({ref})")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    return fig


def factor_plot(effects: pd.DataFrame, factor: str, metrics: list[str]) -> plt.Figure:
    """Mean and 95% interval of each metric per level of one factor."""
    e = effects[effects["factor"] == factor]
    metrics = [m for m in metrics if m in set(e["metric"])]
    fig, axes = _grid(len(metrics))
    for ax, m in zip(axes, metrics):
        g = e[e["metric"] == m]
        numeric = pd.to_numeric(g["level"], errors="coerce")
        x = numeric.to_numpy() if numeric.notna().all() else np.arange(len(g))
        err = np.nan_to_num(np.vstack([g["mean"] - g["lo"], g["hi"] - g["mean"]]))
        ax.errorbar(x, g["mean"], yerr=err, fmt="o-", capsize=3, label="mean over trials, 95% interval")
        if numeric.notna().all():
            ax.set_xlabel(f"{factor} ({'share of tokens' if factor.startswith('weight/') else 'value'})")
        else:
            ax.set_xticks(x, g["level"], rotation=30 if g["level"].str.len().max() > 6 else 0)
            ax.set_xlabel(factor)
        ax.set_ylabel(label(m))
        ax.set_title(f"{m} (ANOVA p = {g['p'].iloc[0]:.2g})", fontsize=10)
        ax.legend(fontsize=7, loc="best")
    fig.suptitle(f"Effect of {factor}")
    fig.tight_layout()
    return fig


def curves_plot(frame: pd.DataFrame, order: list[str], ylabel: str, title: str) -> plt.Figure:
    """One line per cell (mean over seeds) with its 95% band; the `order`ed best cells only."""
    fig, ax = plt.subplots(figsize=(9, 5))
    for i, cell in enumerate([c for c in order if c in set(frame["cell"])][:MAX_LINES]):
        g = frame[frame["cell"] == cell]
        ax.plot(g["step"], g["mean"], color=f"C{i}", label=cell)
        ax.fill_between(g["step"], g["lo"], g["hi"], color=f"C{i}", alpha=0.2, lw=0)
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def heldout_plot(frame: pd.DataFrame, order: list[str], title: str = "Held-out metrics") -> plt.Figure:
    """A held-out metric over steps, one panel per dataset (or lm-eval task and metric)."""
    metrics = list(dict.fromkeys(frame["metric"]))
    fig, axes = _grid(len(metrics))
    cells = [c for c in order if c in set(frame["cell"])][:MAX_LINES]
    for ax, m in zip(axes, metrics):
        for i, cell in enumerate(cells):
            g = frame[(frame["metric"] == m) & (frame["cell"] == cell)]
            ax.plot(g["step"], g["mean"], "o-", ms=3, color=f"C{i}", label=cell)
            ax.fill_between(g["step"], g["lo"], g["hi"], color=f"C{i}", alpha=0.2, lw=0)
        ax.set_title(m, fontsize=10)
        ax.set_xlabel("training step")
        ax.set_ylabel(label(m))
    axes[0].legend(fontsize=6, loc="best")
    fig.suptitle(f"{title} over training (mean over seeds, 95% band)")
    fig.tight_layout()
    return fig


STYLES = ["-", "--", ":", "-."]
MARKERS = ["o", "s", "^", "v", "D", "x"]


def usage_plot(over_time: pd.DataFrame, turnover: pd.DataFrame) -> plt.Figure:
    """Usage share, KL to uniform, dead share, hot count and hot-expert persistence over steps.

    Colour: PEER setting (up to 10); line style and marker: layer.
    """
    panels = [
        ("usage", "share of experts used (0-1)"),
        ("kl_uniform", "KL(load || uniform) (nats)"),
        ("dead", "share of dead experts (0-1)"),
        ("hot_count", "hot experts (count)"),
    ]
    panels = [p for p in panels if p[0] in set(over_time["stat"])]
    kept = turnover.assign(stat="hot_kept", mean=turnover["hot_kept"]).drop(columns="hot_kept")
    if not kept.empty:
        panels.append(("hot_kept", "share of hot ids still hot (0-1)"))
    data = pd.concat([over_time, kept], ignore_index=True)
    settings = list(dict.fromkeys(data["setting"]))[:10]
    layers = sorted(data["layer"].unique())
    colour = {s: f"C{i}" for i, s in enumerate(settings)}
    style = {ly: (STYLES[i % len(STYLES)], MARKERS[i // len(STYLES) % len(MARKERS)]) for i, ly in enumerate(layers)}
    titles = {"hot_kept": "hot experts kept from the previous snapshot"}
    fig, axes = _grid(len(panels), width=4.6, cols=3)
    for ax, (stat, ylabel) in zip(axes, panels):
        sub = data[(data["stat"] == stat) & data["setting"].isin(settings)]
        for (setting, layer), g in sub.groupby(["setting", "layer"], sort=False):
            ls, marker = style[layer]
            ax.plot(g["step"], g["mean"], ls=ls, marker=marker, ms=3, color=colour[setting], lw=1.2)
        ax.set_title(titles.get(stat, stat), fontsize=10)
        ax.set_xlabel("training step")
        ax.set_ylabel(ylabel)
    handles = [plt.Line2D([], [], color=c, lw=2, label=s) for s, c in colour.items()]
    handles += [
        plt.Line2D([], [], color="k", ls=ls, marker=m, ms=3, label=f"layer {ly}") for ly, (ls, m) in style.items()
    ]
    free_slot = len(panels) % 3 != 0  # the legend goes in the grid's empty corner, else beside the panels
    fig.legend(
        handles=handles,
        loc="lower right" if free_slot else "center right",
        fontsize=7,
        ncol=2 if free_slot else 1,
        title="colour: setting; style: layer",
        title_fontsize=7,
    )
    fig.suptitle("Expert usage over training (mean over mixes and seeds)")
    fig.tight_layout(rect=None if free_slot else (0, 0, 0.8, 1))
    return fig


def load_hist_plot(hists: pd.DataFrame) -> plt.Figure:
    """Histogram of per-expert load z x N at the end of training, one panel per setting, a line per layer."""
    settings = list(dict.fromkeys(hists["setting"]))[:MAX_LINES]
    fig, axes = _grid(len(settings))
    for ax, setting in zip(axes, settings):
        h = hists[hists["setting"] == setting]
        for i, (layer, g) in enumerate(h.groupby("layer")):
            ax.stairs(
                g["count"].to_numpy(),
                np.append(g["left"].to_numpy(), g["right"].iloc[-1]),
                color=f"C{i}",
                label=f"layer {layer}",
            )
        ax.axvline(1.0, color="k", lw=0.8, ls="--", label="uniform load (1)")
        ax.set_yscale("symlog", linthresh=1)
        ax.set_title(setting, fontsize=10)
        ax.set_xlabel("expert load z x N (mean 1)")
        ax.set_ylabel("experts (count, summed over trials)")
        ax.legend(fontsize=7, loc="best")
    fig.suptitle("Expert load histogram at the last snapshot")
    fig.tight_layout()
    return fig


def load_grid_plot(grids: pd.DataFrame) -> plt.Figure:
    """Heatmap of the load over the product-key grid (sub-key 1 x sub-key 2), per setting and layer."""
    g = grids.head(12)
    fig, axes = _grid(len(g), width=4.0, height=3.6)
    for ax, row in zip(axes, g.itertuples(index=False)):
        im = ax.imshow(row.grid, cmap="viridis", origin="upper", aspect="auto")
        fig.colorbar(im, ax=ax, label="load z x N (mean 1)")
        ax.set_title(f"{row.setting}, layer {row.layer}", fontsize=9)
        ax.set_xlabel(f"sub-key 2 block (of {row.cols})")
        ax.set_ylabel(f"sub-key 1 block (of {row.rows})")
    fig.suptitle("Expert load over the product-key grid (last snapshot, mean over trials)")
    fig.tight_layout()
    return fig


def surrogate_plot(rec: pd.DataFrame, metric: str) -> plt.Figure:
    """Observed mean per tried mix against the leave-one-mix-out prediction of the surrogate."""
    tried = rec[rec["kind"] == "tried"]
    fig, ax = plt.subplots(figsize=(6, 5))
    ax.scatter(tried["observed"], tried["predicted"], label="tried mix (held out of the fit)")
    for row in tried.itertuples(index=False):
        ax.annotate(str(row.mix), (row.observed, row.predicted), fontsize=7, xytext=(3, 3), textcoords="offset points")
    both = pd.concat([tried["observed"], tried["predicted"]]).dropna()
    if len(both):
        ax.plot([both.min(), both.max()], [both.min(), both.max()], "k--", lw=0.8, label="prediction = observation")
    rho = rec.attrs.get("loo_spearman", np.nan)
    ax.set_xlabel(f"observed {label(metric)}")
    ax.set_ylabel(f"predicted {label(metric)}")
    ax.set_title(f"Mixture surrogate, leave-one-mix-out (Spearman {rho:.2f})")
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return fig


def compute_plot(trials: pd.DataFrame, metric: str) -> plt.Figure:
    """Each finished trial's metric against its training compute, coloured by PEER setting."""
    ok = trials[(trials["status"] != "failed")].dropna(subset=[metric, "flops"])
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, (setting, g) in enumerate(ok.groupby("setting")):
        ax.scatter(g["flops"], g[metric], color=f"C{i % 10}", s=18, alpha=0.8, label=setting)
    ax.set_xscale("log")
    ax.set_xlabel("training compute per trial (FLOPs, 6 x active parameters x tokens)")
    ax.set_ylabel(label(metric))
    ax.set_title(f"{metric} against compute, one point per trial")
    ax.legend(fontsize=7, loc="best", title="setting", title_fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


KIND_MARKERS = {"proxy": "o", "anchor": "s", "validation": "^"}
MARKS = {  # the mixes a mixture search singles out: marker, size, face colour
    "recommended": ("*", 320, "gold"),
    "best tried": ("s", 150, "none"),
    "prior": ("D", 90, "lightgrey"),
}


def _rounds(points: pd.DataFrame, ax, x: np.ndarray, y: np.ndarray) -> list:
    """Scatter the search's trials: colour by round, marker by kind, hollow where a trial has no metric.
    Returns the legend handles."""
    rounds = sorted(points["round"].dropna().unique())
    colour = {r: f"C{i % 10}" for i, r in enumerate(rounds)}
    measured = points["metric"].notna().to_numpy()
    for (r, kind), g in points.groupby(["round", "kind"], sort=True):
        i = points.index.get_indexer(g.index)
        marker = KIND_MARKERS.get(kind, "o")
        for done in (True, False):
            j = i[measured[i] == done]
            if len(j):
                face = colour[r] if done else "none"
                ax.scatter(x[j], y[j], marker=marker, s=40, facecolors=face, edgecolors=colour[r], zorder=3)
    handles = [plt.Line2D([], [], ls="", marker="o", color=c, label=f"round {r:g}") for r, c in colour.items()]
    for kind in [k for k in KIND_MARKERS if k in set(points["kind"])]:
        handles.append(plt.Line2D([], [], ls="", marker=KIND_MARKERS[kind], color="k", label=kind))
    if not measured.all():
        handles.append(plt.Line2D([], [], ls="", marker="o", mfc="none", color="k", label="no metric (failed, queued)"))
    return handles


def mix_fit_plot(points: pd.DataFrame, metric: str, model: str, rho: float) -> plt.Figure:
    """The final fit's prediction at each proxy's mix (x) against the metric it measured (y), identity dashed."""
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    x, y = points["fitted"].to_numpy(), points["metric"].to_numpy()
    handles = _rounds(points, ax, x, y)
    ahead = points["prediction"].notna().to_numpy()  # proposals of round 2 on: the fit's prediction before they ran
    if ahead.any():
        ax.scatter(points["prediction"][ahead], y[ahead], marker="x", color="0.4", zorder=2)
        handles.append(plt.Line2D([], [], ls="", marker="x", color="0.4", label="predicted when proposed"))
    ax.legend(handles=handles, fontsize=7, loc="best")
    both = np.concatenate([x, y, points["prediction"][ahead]])
    ax.plot([both.min(), both.max()], [both.min(), both.max()], "k--", lw=0.8)
    ax.set_xlabel(f"fitted {label(metric)} ({model}, final fit)")
    ax.set_ylabel(f"measured {label(metric)}")
    ax.set_title(f"Mixture search: fitted against measured (leave-one-out Spearman {rho:.2f})", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


CORNERS = np.array([[0.0, 0.0], [1.0, 0.0], [0.5, np.sqrt(3) / 2]])  # the simplex's vertices in the plane


def ternary(w: np.ndarray) -> np.ndarray:
    """Barycentric to 2-D: each mix (a row of 3 weights) as the weighted mean of the triangle's corners."""
    w = np.atleast_2d(np.asarray(w, float))
    return (w / w.sum(1, keepdims=True)) @ CORNERS


def simplex_plot(points: pd.DataFrame, domains: list[str], marks: dict[str, np.ndarray], metric: str) -> plt.Figure:
    """The search's proposals on the 3-domain simplex, with the recommendation, the best tried and the prior."""
    fig, ax = plt.subplots(figsize=(7, 6.4))
    ax.plot(*np.vstack([CORNERS, CORNERS[:1]]).T, color="k", lw=1)
    for i in range(3):  # grid lines where domain i holds 0.2, 0.4, ...
        j, k = [a for a in range(3) if a != i]
        for t in (0.2, 0.4, 0.6, 0.8):
            ends = np.zeros((2, 3))
            ends[:, i] = t
            ends[0, j], ends[1, k] = 1 - t, 1 - t
            ax.plot(*ternary(ends).T, color="0.85", lw=0.6, zorder=0)
    for corner, name, offset in zip(CORNERS, domains, [(-8, -14), (8, -14), (0, 8)]):
        ax.annotate(f"{name} = 1", corner, xytext=offset, textcoords="offset points", ha="center", fontsize=9)
    xy = ternary(points[[f"weight/{d}" for d in domains]].to_numpy())
    handles = _rounds(points, ax, xy[:, 0], xy[:, 1])
    for name, w in marks.items():
        marker, size, face = MARKS[name]
        p = ternary(w)[0]
        ax.scatter(*p, marker=marker, s=size, facecolors=face, edgecolors="k", linewidths=1.5, zorder=5)
        handles.append(plt.Line2D([], [], ls="", marker=marker, ms=np.sqrt(size) * 0.7, mfc=face, mec="k", label=name))
    ax.legend(handles=handles, fontsize=7, loc="upper right")
    ax.set_aspect("equal")
    ax.axis("off")
    ax.set_title(f"Mixture search proposals ({metric}); colour: round, marker: kind", fontsize=10)
    fig.tight_layout()
    return fig


def mix_weights_plot(weights: pd.DataFrame) -> plt.Figure:
    """Grouped bars: one group per domain, one bar per mix (rows of `weights`: index mix name, columns domains)."""
    n, k = weights.shape
    fig, ax = plt.subplots(figsize=(max(6.5, 1.3 * k + 3), 4.5))
    width = 0.8 / max(n, 1)
    for i, (name, row) in enumerate(weights.iterrows()):
        ax.bar(np.arange(k) + (i - (n - 1) / 2) * width, row.to_numpy(float), width, color=f"C{i % 10}", label=name)
    ax.set_xticks(np.arange(k), weights.columns)
    ax.set_ylabel("weight (share of tokens)")
    ax.set_title("Mixture search: weights of the recommendation, the best tried, the prior and the top proxies")
    ax.legend(fontsize=7, loc="best")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def ladder_plot(ladder: pd.DataFrame, metric: str, fits: dict, target: float) -> plt.Figure:
    """The metric against training FLOPs (log), a line of points per cell, its fitted curve dashed to the target."""
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for cell, group in ladder[ladder[metric].notna()].groupby("cell", sort=False):
        mean = group.groupby("flops")[metric].mean().sort_index()
        (line,) = ax.plot(mean.index, mean.values, "o-", label=cell)
        if cell in fits:
            x = np.exp(np.linspace(np.log(mean.index.min()), np.log(target), 100))
            ax.plot(x, fits[cell](x), "--", color=line.get_color(), alpha=0.7)
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel(label(metric))
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def source_heatmap_plot(heat: pd.DataFrame, cell: str) -> plt.Figure:
    """Heatmap of each source's load (z_s x N) over blocks of consecutive experts, one panel per PEER layer."""
    h = heat.head(6)
    fig, axes = _grid(len(h), width=5.0, height=0.6 + 0.45 * max(len(s) for s in h["sources"]) + 1.2, cols=2)
    for ax, row in zip(axes, h.itertuples(index=False)):
        im = ax.imshow(row.grid, cmap="viridis", aspect="auto", interpolation="nearest")
        fig.colorbar(im, ax=ax, label="load z x N (mean 1)")
        ax.set_yticks(range(len(row.sources)), row.sources, fontsize=8)
        ax.set_xlabel(f"expert block (of {row.grid.shape[1]}, consecutive expert ids)")
        ax.set_title(f"layer {row.layer}: NMI(source; expert) {row.nmi:.3f}", fontsize=9)
    fig.suptitle(f"Expert load by data source, {cell} (last snapshot, mean over seeds)")
    fig.tight_layout()
    return fig


def source_mix_plot(by_cell: pd.DataFrame) -> plt.Figure:
    """Per source, its mix weight against its dead share (left) and against the layer's dead share (right),
    one point per cell (mean over PEER layers and seeds)."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), squeeze=False)
    sources = list(dict.fromkeys(by_cell["source"]))
    for i, source in enumerate(sources):
        g = by_cell[by_cell["source"] == source]
        for ax, stat in zip(axes.flat, ("dead", "layer_dead")):
            ax.scatter(g["weight"], g[stat], color=f"C{i % 10}", s=18, label=source)
    axes[0, 0].set_ylabel("share of experts the source never reached (0-1)")
    axes[0, 1].set_ylabel("share of dead experts in the layer (0-1)")
    for ax in axes.flat:
        ax.set_xlabel("the source's weight in the mix")
    axes[0, 0].legend(fontsize=7, title="source")
    fig.suptitle("How the mix's weights move dead experts (one point per cell and source)")
    fig.tight_layout()
    return fig
