"""The sweep report: `python analysis/report.py SWEEP_DIR [--metric M] [--mode min|max] [--out DIR] [--no-plots]`.

Writes report.md, a self-contained report.html (images embedded), one PNG per figure and one
CSV per table into SWEEP_DIR/report/ (or --out), and prints the path of report.md.
From code: `write_report(sweep_dir, metric=None) -> Path`. A sweep folder with a mixture
search (mix_search.parquet, from peerlab.mixsearch) gets a "Mixture search" section too.
"""

from __future__ import annotations

import argparse
import base64
import html
import re
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import the package from the repo root, not analysis/ itself
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from analysis.compare import (  # noqa: E402
    baseline_differences,
    differences,
    factor_effects,
    factor_p_values,
    failures,
    leaderboard,
    mean_interval,
    noise_floor,
    pairwise,
)
from analysis.dynamics import (  # noqa: E402
    curves,
    eval_curves,
    heldout_curves,
    hot_turnover,
    load_grids,
    load_histograms,
    usage_by_setting,
    usage_over_time,
    usage_summary,
)
from analysis.load import (  # noqa: E402
    MixSearchResult,
    Sweep,
    cost_columns,
    load_mix_search,
    load_sweep,
    lower_is_better,
    metric_columns,
    mix_table,
    usable,
)
from analysis import plots  # noqa: E402
from peerlab.tables import trial_column  # noqa: E402
from analysis.scales import (  # noqa: E402
    crossings,
    rank_agreement,
    scale_boards,
    scale_fits,
    scale_order,
    target_compute,
    winners,
)
from analysis.sources import pair_overlaps, source_by_cell, source_heatmaps, weight_effects  # noqa: E402
from analysis.surrogate import recommend_mix  # noqa: E402

STATS_TEXT = (
    "Intervals are 95% t-intervals of the mean over seeds (omitted with one seed). Differences between "
    "cells use a paired t-test on seed-matched runs when two cells share at least two seeds, Welch's "
    "t-test otherwise; p-values are Holm-adjusted over the comparisons of a table. The noise floor is the "
    "seed-to-seed standard deviation pooled over cells; `min_diff` is the half-width of the 95% interval of "
    "a difference between two cells, the smallest difference the seeds can tell from noise. Factor effects "
    "use a one-way ANOVA over the factor's levels (other factors averaged over)."
)


def fmt(x) -> str:
    """4 significant digits; blanks for NaN."""
    if isinstance(x, (bool, np.bool_)):
        return "yes" if x else "no"
    if isinstance(x, (int, np.integer)):
        return f"{x:,}" if abs(x) >= 10_000 else str(x)
    if isinstance(x, (float, np.floating)):
        if not np.isfinite(x):
            return ""
        if float(x).is_integer() and abs(x) < 1e6:
            return str(int(x))
        return f"{x:.4g}"
    return "" if x is None else str(x)


def with_intervals(board: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    """Leaderboard for reading: `mean ± half-width` strings in place of mean, lo, hi."""
    shown = board[[c for c in ("rank", "cell", "seeds", "stopped", "failed") if c in board]].copy()
    for m in metrics:
        if m not in board:
            continue
        half = (board[f"{m} hi"] - board[f"{m} lo"]) / 2 if f"{m} hi" in board else pd.Series(np.nan, board.index)
        shown[m] = [fmt(v) + (f" ± {fmt(h)}" if np.isfinite(h) and h > 0 else "") for v, h in zip(board[m], half)]
    return shown


def inline(text: str) -> str:
    """Markdown **bold** and `code` of one line as HTML."""
    text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", html.escape(text))
    return re.sub(r"`(.+?)`", r"<code>\1</code>", text)


class Doc:
    """Report blocks rendered both to Markdown and to self-contained HTML; figures and tables saved beside."""

    def __init__(self, out: Path, figures: bool = True):
        self.out, self.figures, self.md, self.html = out, figures, [], []

    def heading(self, text: str, level: int = 2) -> None:
        self.md.append(f"{'#' * level} {text}\n")
        self.html.append(f"<h{level}>{html.escape(text)}</h{level}>")

    def para(self, text: str) -> None:
        self.md.append(text + "\n")
        self.html.append(f"<p>{inline(text)}</p>")

    def bullets(self, items: list[str]) -> None:
        self.md.append("\n".join(f"- {i}" for i in items) + "\n")
        self.html.append("<ul>" + "".join(f"<li>{inline(i)}</li>" for i in items) + "</ul>")

    def table(self, frame: pd.DataFrame, name: str, shown: pd.DataFrame | None = None, rows: int = 40) -> None:
        """Save `frame` as name.csv; show `shown` (default: frame formatted), at most `rows` rows."""
        frame.to_csv(self.out / f"{name}.csv", index=False)
        view = (frame if shown is None else shown).head(rows)
        view = view.apply(lambda col: col.map(fmt)) if len(view) else view
        more = f"(first {rows} of {len(frame)} rows; all in {name}.csv)" if len(frame) > rows else f"({name}.csv)"
        md_view = view.apply(lambda col: col.str.replace("|", "\\|", regex=False)) if len(view) else view
        self.md.append(md_view.to_markdown(index=False) + f"\n\n{more}\n")
        self.html.append(
            '<div class="t">' + view.to_html(index=False, escape=True, border=0) + f"</div><p class=s>{more}</p>"
        )

    def figure(self, make, name: str, alt: str) -> None:
        """Draw `make()` (a function returning a Figure) into name.png and embed it; nothing with plots off."""
        if not self.figures:
            return
        fig = make()
        path = self.out / f"{name}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        data = base64.b64encode(path.read_bytes()).decode()
        self.md.append(f"![{alt}]({name}.png)\n")
        self.html.append(f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">')

    def write(self, title: str) -> Path:
        (self.out / "report.md").write_text("\n".join(self.md))
        page = HTML_PAGE.format(title=html.escape(title), body="\n".join(self.html))
        (self.out / "report.html").write_text(page)
        return self.out / "report.md"


HTML_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: sans-serif; max-width: 1200px; margin: 1em auto; padding: 0 1em; color: #222; }}
table {{ border-collapse: collapse; font-size: 0.85em; }}
th, td {{ border-bottom: 1px solid #ddd; padding: 2px 8px; text-align: left; white-space: nowrap; }}
th {{ background: #f3f3f3; }}
.t {{ overflow-x: auto; }} .s {{ color: #777; font-size: 0.8em; }}
img {{ max-width: 100%; display: block; margin: 0.5em 0 1.5em; }}
.summary {{ background: #f5f8ff; border-left: 4px solid #36c; padding: 0.3em 1em; }}
</style></head>
<body>
{body}
<script>
window.addEventListener("load", () => {{
  const broken = [...document.images].filter(i => !(i.complete && i.naturalWidth > 0));
  broken.forEach(i => console.error("broken image: " + i.alt));
  document.body.dataset.images = document.images.length + " loaded, " + broken.length + " broken";
}});
</script>
</body></html>
"""


def summary(
    sweep: Sweep,
    metric: str,
    board: pd.DataFrame,
    diff: pd.DataFrame,
    noise: pd.DataFrame,
    rec: pd.DataFrame | None,
    effects: pd.DataFrame,
    base: pd.DataFrame,
    mix: MixSearchResult | None = None,
) -> list[str]:
    """The plain-words summary: best cell, how sure, the mixture search's answer, what to try next."""
    t = sweep.trials
    lower = sweep.mode == "min"
    lines = []
    n_failed = int((t["status"] == "failed").sum())
    ranked = board.dropna(subset=["rank"])
    if ranked.empty:
        return [f"No trial finished with a value of {metric}: there is no winner to report."] + (
            [f"{n_failed} of {len(t)} trials failed (listed below)."] if n_failed else []
        )
    best = ranked.iloc[0]
    half = (best.get(f"{metric} hi", np.nan) - best.get(f"{metric} lo", np.nan)) / 2
    seeds = int(best["seeds"])
    ci = f" ± {fmt(half)} (95% interval over {seeds} seeds)" if np.isfinite(half) else f" ({seeds} seed, no interval)"
    lines.append(
        f"Best cell: **{best['cell']}**, {metric} = {fmt(best[metric])}{ci} "
        f"({'lower' if lower else 'higher'} is better)."
    )
    if len(ranked) > 1 and not diff.empty:
        runner = diff.iloc[0]
        worse = int((diff["significant"] & ~diff["better"]).sum())
        # diff is on the seeds both cells have (paired) and may disagree with the means over all seeds
        ahead = runner["diff"] < 0 if lower else runner["diff"] > 0
        if np.isfinite(runner["p_holm"]):
            if ahead:
                verdict = (
                    "it beats the best cell on those seeds, significantly: the ranking over all seeds rests on "
                    "seeds only one of them has (run the missing seeds)"
                    if runner["better"]
                    else "the best cell's lead is not significant: it may be noise"
                )
                where = (
                    f"ahead on the {int(runner['n'])} seeds both cells have"
                    if runner["test"] == "paired t"
                    else "ahead"
                )
            else:
                verdict = "a real lead" if runner["significant"] else "not a significant lead: it may be noise"
                where = "behind"
            lines.append(
                f"Next is {runner['cell']}, {fmt(abs(runner['diff']))} {where} "
                f"(95% interval of the difference {fmt(runner['lo'])} to {fmt(runner['hi'])}, "
                f"{runner['test']}, Holm p = {fmt(runner['p_holm'])}): {verdict}. "
                f"{worse} of {len(diff)} other cells are significantly worse."
            )
        else:
            lines.append(
                f"Next is {runner['cell']}, {fmt(abs(runner['diff']))} behind; with one seed per cell "
                "there are no intervals or tests, so how sure this is cannot be said."
            )
    row = noise[noise["metric"] == metric]
    if not row.empty:
        lines.append(
            f"Seed noise: the seed-to-seed standard deviation of {metric} is {fmt(row['sd'].iloc[0])}; "
            f"differences under {fmt(row['min_diff'].iloc[0])} are within the noise."
        )
    else:
        lines.append("Only one seed per cell: intervals, tests and the noise floor are omitted.")
    if len(base):
        at_best = base[base["cell"] == best["cell"]]
        line = f"PEER against the dense arm: {int(base['better'].sum())} of {len(base)} PEER cells beat no_peer on the same mix"
        if len(at_best):
            b = at_best.iloc[0]
            sure = (
                "significant" if b["significant"] else ("not significant" if np.isfinite(b["p_holm"]) else "untested")
            )
            line += f"; the best cell differs from its dense arm by {fmt(b['diff'])} ({sure})"
        lines.append(line + ".")
    if n_failed:
        lines.append(f"{n_failed} of {len(t)} trials failed (listed under Failed trials).")
    if mix is not None:
        lines.append(mix_summary(mix))
    nxt = []
    sig = effects[(effects["metric"] == metric) & effects["significant"]].drop_duplicates("factor")
    if not sig.empty:
        top = sig.sort_values("p").iloc[0]
        lev = effects[(effects["factor"] == top["factor"]) & (effects["metric"] == metric)]
        best_level = lev.loc[lev["mean"].idxmin() if lower else lev["mean"].idxmax(), "level"]
        nxt.append(
            f"{top['factor']} matters most (ANOVA p = {fmt(top['p'])}, best at {best_level}): explore around that value"
        )
    if len(ranked) > 1 and not diff.empty and not bool(diff.iloc[0]["significant"]):
        nxt.append(f"run more seeds of the top cells to separate {best['cell']} from {diff.iloc[0]['cell']}")
    if rec is not None and len(rec):
        wcols = [c for c in rec.columns if c.startswith("weight/")]
        r = rec[rec["kind"] == "recommended"]
        if not r.empty:
            mix = ", ".join(f"{c.split('/', 1)[1]} {r[c].iloc[0]:.2f}" for c in wcols)
            trust = "" if rec.attrs.get("trusted") else " (not trusted: " + rec.attrs.get("note", "") + ")"
            nxt.append(f"try the surrogate's mix {mix}{trust}")
        else:
            nxt.append(rec.attrs.get("note", "no mix recommendation"))
    if nxt:
        lines.append("What to try next: " + "; ".join(nxt) + ".")
    return lines


def write_report(
    sweep_dir: str | Path,
    metric: str | None = None,
    out: str | Path | None = None,
    mode: str | None = None,
    figures: bool = True,
) -> Path:
    """Write the report of a sweep folder; returns the path of report.md.

    `metric` (default: the sweep's) is what cells are ranked on; `mode` ("min" or "max") defaults to the
    sweep's for its own metric, else to the metric's direction (losses and bpb min, lm-eval scores max).
    `figures=False` writes the tables and text only (fast).
    """
    sweep = load_sweep(sweep_dir)
    metric = trial_column(metric) if metric else metric
    if metric and metric != sweep.metric:
        sweep.meta["metric"] = metric
        sweep.meta["mode"] = "min" if lower_is_better(metric) else "max"
    if mode:
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', not {mode!r}")
        sweep.meta["mode"] = mode
    metric = sweep.metric
    if metric not in sweep.trials:
        raise ValueError(
            f"metric {metric!r} is not a column of trials.parquet; try one of {metric_columns(sweep.trials)}"
        )
    out = Path(out) if out else sweep.path / "report"
    out.mkdir(parents=True, exist_ok=True)
    ladder = only_first_scale(sweep)  # a ladder's sweep: its table; the sections before "Across scales" see x1
    t, cells = sweep.trials, sweep.cells
    metrics = [metric] + [m for m in metric_columns(t) if m != metric]

    board = leaderboard(t, metric, sweep.mode)
    diff = differences(t, metric, sweep.mode)
    noise = noise_floor(t, metrics)
    effects = factor_effects(t, metrics)
    base = baseline_differences(t, metric, sweep.mode)  # each PEER cell against the dense arm of its mix
    rec = recommend_mix(t, metric, sweep.mode) if len(usable(t, metric)) else None
    mix = load_mix_search(sweep.path)
    order = board["cell"].tolist()

    doc = Doc(out, figures)
    doc.heading(f"Sweep report: {sweep.meta['name']}", 1)
    doc.html.append('<div class="summary">')
    doc.heading("Summary")
    doc.bullets(
        summary(sweep, metric, board, diff, noise, rec, effects, base, mix)
        + ([ladder_summary(ladder, sweep)] if ladder is not None else [])
    )
    doc.html.append("</div>")

    doc.heading("The sweep")
    counts = t["status"].value_counts().to_dict()
    seeds = t.groupby("cell")["seed"].nunique()
    doc.bullets(
        [
            f"Folder: {sweep.path}",
            f"Ranked on {metric} ({'lower' if sweep.mode == 'min' else 'higher'} is better).",
            f"{len(t)} trials in {t['cell'].nunique()} cells ({t['mix'].nunique()} mixes x {t['setting'].nunique()} "
            f"settings); trials by status: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) + ".",
            f"Seeds per cell: {seeds.min()}"
            + (f" to {seeds.max()}" if seeds.max() != seeds.min() else "")
            + (" (a single seed: intervals and tests are omitted)." if seeds.max() <= 1 else "."),
            "Early-stopped trials (ASHA) are counted with the metrics they reached when stopped.",
        ]
        + (
            [
                f"A scale ladder: the sections up to 'Across scales' are those of its smallest scale "
                f"({sweep.meta['ladder_first']}), where every cell ran; 'Across scales' compares the scales."
            ]
            if ladder is not None
            else []
        )
    )
    weights = mix_table(sweep.meta)
    if len(weights):
        doc.para("The mixes (normalised weight of each dataset):")
        doc.table(weights, "mixes")
    space = sweep.meta.get("search_space") or {}
    if space:
        doc.para("PEER search space: " + "; ".join(f"{k}: {', '.join(map(str, v))}" for k, v in space.items()) + ".")
    doc.para(STATS_TEXT)

    fails = failures(t)
    if len(fails):
        doc.heading("Failed trials")
        doc.table(fails, "failed_trials")

    doc.heading("Leaderboard")
    doc.para(
        "Mean ± 95% half-width over seeds, ranked on the sweep's metric; each cell's model by its training FLOPs "
        "per token and total parameters; tokens and FLOPs per trial."
    )
    sizes = [c for c in ("flops_per_token", "params_total") if c in t]  # the cell's model, next to the cell
    doc.table(
        board, "leaderboard", with_intervals(board, sizes + metrics + [c for c in cost_columns(t) if c not in sizes])
    )
    if board[metric].notna().any():
        doc.figure(lambda: plots.leaderboard_plot(board, metric), "leaderboard", f"{metric} per cell")
    if "flops" in t and usable(t, metric)["flops"].notna().any():
        doc.figure(lambda: plots.compute_plot(t, metric), "compute", f"{metric} against compute")

    doc.heading("Differences and the noise floor")
    if diff.empty:
        doc.para("Only one cell has results: nothing to compare.")
    else:
        doc.para(f"Each cell against the best ({diff['reference'].iloc[0]}) on {metric}: difference cell minus best.")
        doc.table(diff, "differences", diff.drop(columns="reference"))
        floor = noise.set_index("metric")["min_diff"].get(metric, np.nan)
        doc.figure(lambda: plots.differences_plot(diff, metric, floor), "differences", f"differences in {metric}")
    if len(base):
        doc.heading("Against the dense baseline", 3)
        wins = int(base["better"].sum())
        doc.para(
            f"Each PEER cell against the dense arm (no_peer) of the same mix on {metric}: {wins} of {len(base)} "
            "cells beat it significantly (difference cell minus dense; Holm over this table)."
        )
        doc.table(base, "baseline_differences")
    if t["cell"].nunique() <= 40 and len(diff):
        pairwise(t, metric, sweep.mode).to_csv(out / "pairwise.csv", index=False)
        doc.para("Every pair of cells, tested the same way: pairwise.csv.")
    if noise.empty:
        doc.para("Only one seed per cell: the noise floor cannot be measured.")
    else:
        doc.table(noise, "noise_floor")

    doc.heading("Effect of each factor")
    if effects.empty:
        doc.para("No mix weight or PEER setting varies across the finished trials.")
    else:
        overview = factor_p_values(effects, metrics)
        doc.para("ANOVA p-value of each factor on each metric (below 0.05: the factor changes the metric).")
        doc.table(overview, "factor_p_values")
        doc.table(effects, "factor_effects", effects[effects["metric"] == metric], rows=60)
        shown = metrics[:3]
        for i, f in enumerate(effects["factor"].unique()):
            doc.figure(lambda f=f: plots.factor_plot(effects, f, shown), f"factor_{i}", f"effect of {f}")

    doc.heading("Training curves")
    per_trial = sweep.curves.groupby("trial_id").size() if "trial_id" in sweep.curves else pd.Series(dtype=int)
    window = max(1, int(per_trial.median()) // 100) if len(per_trial) else 1  # about 100 smoothed points
    loss = curves(sweep.curves, cells, "loss", smooth=window)
    if loss.empty:
        doc.para("No curves.parquet: no curves to show.")
    else:
        doc.figure(
            lambda: plots.curves_plot(
                loss,
                order,
                plots.label("train loss"),
                f"Train loss per cell (best {min(len(order), plots.MAX_LINES)} cells, mean over seeds, 95% band"
                + (f", rolling mean of {window} logged steps)" if window > 1 else ")"),
            ),
            "loss_curves",
            "train loss over steps",
        )
        held = heldout_curves(sweep.curves, cells)
        if not held.empty:
            held.to_csv(out / "heldout_curves.csv", index=False)
            doc.figure(
                lambda: plots.heldout_plot(held, order, "Held-out bits per byte"),
                "heldout_curves",
                "held-out bits per byte over steps",
            )
    lm = eval_curves(sweep.evals, cells)
    if lm.groupby(["metric", "cell"])["step"].nunique().gt(1).any():
        lm.to_csv(out / "lm_eval_curves.csv", index=False)
        doc.figure(
            lambda: plots.heldout_plot(lm, order, "lm-eval metrics"), "lm_eval_curves", "lm-eval metrics over steps"
        )

    doc.heading("Expert usage")
    use = usage_summary(sweep.usage, cells)
    if use.empty:
        doc.para("No usage.parquet rows: no PEER layer logged expert usage.")
    else:
        doc.para(
            "Per PEER setting and layer at the last snapshot, mean over mixes and seeds: usage share, KL to "
            "uniform (nats), dead share, hot-expert count and the top expert's load x N (per cell in usage_summary.csv)."
        )
        doc.table(use, "usage_summary", usage_by_setting(use))
        doc.figure(
            lambda: plots.usage_plot(usage_over_time(sweep.usage, cells), hot_turnover(sweep.usage, cells)),
            "usage_over_time",
            "expert usage over steps",
        )
        hists = load_histograms(sweep.usage, cells)
        if not hists.empty:
            doc.figure(lambda: plots.load_hist_plot(hists), "load_histogram", "expert load histogram")
        grids = load_grids(sweep.usage, cells)
        if not grids.empty:
            doc.figure(lambda: plots.load_grid_plot(grids), "load_grid", "load over the product-key grid")
        if hists.empty and grids.empty:
            doc.para("This folder has no load histograms or grids (older format): those plots are skipped.")

    sources_section(doc, sweep, board)

    doc.heading("Mixture recommendation")
    if rec is None:
        doc.para("No finished trials: no surrogate.")
    else:
        a = rec.attrs
        doc.para(
            f"A Scheffe quadratic mixture model (ridge) of weights -> {metric}, fitted on the mixes of setting "
            f"{a['setting']} ({a['mixes']} mixes, {a['params']} parameters); leave-one-mix-out Spearman "
            f"{fmt(a['loo_spearman'])}. {a['note'][0].upper() + a['note'][1:]}."
        )
        doc.table(rec, "mix_recommendation")
        if (rec["kind"] == "tried").any() and rec["predicted"].notna().any():
            doc.figure(
                lambda: plots.surrogate_plot(rec, metric), "surrogate", "surrogate predictions against observations"
            )
    if mix is not None:
        mix_section(doc, mix, sweep.mode)
    if ladder is not None:
        ladder_section(doc, ladder, sweep)
    return doc.write(f"Sweep report: {sweep.meta['name']}")


# --------------------------------------------------------------------------------------
# Experts by data source (usage_by_source.parquet: analysis/sources.py)
# --------------------------------------------------------------------------------------


def sources_section(doc: Doc, sweep: Sweep, board: pd.DataFrame) -> None:
    """Which experts each dataset of the mix uses: a heatmap for the best cell, and how the weights move load."""
    doc.heading("Experts by data source")
    t = sweep.trials
    by_cell = source_by_cell(sweep.usage_by_source, sweep.usage, t)
    if by_cell.empty:
        doc.para("No usage_by_source.parquet rows: no PEER layer logged expert usage by data source.")
        return
    doc.para(
        "Each PEER layer's router mass split by the dataset each training sequence came from, at the last "
        "snapshot. Per cell and source, mean over PEER layers and seeds: the source's weight in the mix, its "
        "share of the routed mass (its share of the tokens), the share of experts it reached (usage) and did not "
        "reach (dead), the KL of its load to uniform (nats), the share of experts only it reached (exclusive), the "
        "whole layer's dead share, and NMI = I(source; expert) / H(source) (0: every source spreads over the "
        "experts alike, 1: the expert tells the source)."
    )
    doc.table(by_cell, "source_usage", rows=60)
    ranked = [c for c in board["cell"] if c in set(by_cell["cell"])]
    if ranked:
        best = ranked[0]
        ids = t.loc[t["cell"] == best, "trial_id"].tolist()
        heat = source_heatmaps(sweep.usage_by_source, ids)
        if not heat.empty:
            doc.figure(
                lambda: plots.source_heatmap_plot(heat, best), "source_heatmap", f"expert load by data source, {best}"
            )
    effects = weight_effects(by_cell)
    doc.para(
        "How each source's mix weight moves expert load, per setting across its mixes: the weights tried and the "
        "Spearman correlation of the weight with the source's dead share, its KL to uniform, its mass share and "
        "the layer's dead share (NaN with fewer than 3 distinct weights)."
    )
    doc.table(effects, "source_weight_effects")
    if by_cell["weight"].notna().any():
        doc.figure(lambda: plots.source_mix_plot(by_cell), "source_mix", "mix weight against dead experts")
    pairs = pair_overlaps(sweep.usage_by_source, t)
    if len(pairs):
        doc.para(
            "Overlap between sources' experts, per setting and layer (mean over trials): overlap = sum over experts "
            "of min(z_a, z_b) of the two load distributions (1: the same, 0: disjoint); jaccard = shared over "
            "combined used experts."
        )
        doc.table(pairs, "source_overlap")


# --------------------------------------------------------------------------------------
# A scale ladder (ablate.py --ladder): ladder.parquet read back into the "Across scales" section
# --------------------------------------------------------------------------------------


def only_first_scale(sweep: Sweep) -> pd.DataFrame | None:
    """A ladder's sweep: its ladder.parquet, and `sweep` cut to the smallest scale's trials (every cell
    ran there), so the sections that compare cells compare them at one size. None for other sweeps."""
    path = sweep.path / "ladder.parquet"
    if not path.is_file() or "scale" not in sweep.trials:
        return None
    ladder = pd.read_parquet(path)
    if ladder.empty:
        return None
    first = scale_order(ladder)[0]
    ids = set(sweep.trials.loc[sweep.trials["scale"] == first, "trial_id"])
    sweep.trials = sweep.trials[sweep.trials["trial_id"].isin(ids)].reset_index(drop=True)
    for name in ("curves", "usage", "evals", "usage_by_source"):
        frame = getattr(sweep, name)
        if "trial_id" in frame:
            setattr(sweep, name, frame[frame["trial_id"].isin(ids)])
    sweep.meta["ladder_first"] = first
    return ladder


def ladder_facts(ladder: pd.DataFrame, sweep: Sweep) -> dict:
    """The tables of the section: boards, agreement, fits, crossings, the target compute."""
    metric, mode = sweep.metric, sweep.mode
    boards = scale_boards(ladder, metric, sweep.mode)
    target, where = target_compute(ladder, (sweep.meta.get("ladder") or {}).get("target_flops"))
    fits_table, fits = scale_fits(ladder, metric, target)
    cross = crossings(fits, float(ladder["flops"].min()), target, float(ladder["flops"].max()))
    return {
        "boards": boards,
        "agreement": rank_agreement(ladder, metric),
        "fits": fits_table,
        "fit_objects": fits,
        "crossings": cross,
        "target": target,
        "target_from": where,
        "winners": winners(boards),
        "mode": mode,
    }


def ladder_summary(ladder: pd.DataFrame, sweep: Sweep) -> str:
    """One line: each scale's winner, and how well the smallest scale ranked as the largest."""
    facts = ladder_facts(ladder, sweep)
    won = facts["winners"]
    order = [s for s in scale_order(ladder) if s in won]
    if not order:
        return "Across scales: no scale has a ranked cell yet."
    line = "Across scales: winners " + ", ".join(f"{s} {won[s]}" for s in order)
    agree = facts["agreement"]
    if len(agree):
        a = agree.iloc[0]
        interval = (
            f"95% interval {fmt(a['accuracy lo'] * 100)} to {fmt(a['accuracy hi'] * 100)}%, "
            if np.isfinite(a["accuracy lo"])
            else "one seed: no interval, "
        )
        line += (
            f"; {a['scale']} orders {fmt(a['decision_accuracy'] * 100)}% of cell pairs as {a['against']} does "
            f"({interval}Kendall tau {fmt(a['kendall_tau'])}, {int(a['cells'])} cells)"
        )
    same = len(set(won[s] for s in order)) == 1
    return line + (". The same cell wins at every scale." if same else ". The winner changes with scale.")


def ladder_section(doc: Doc, ladder: pd.DataFrame, sweep: Sweep) -> None:
    facts = ladder_facts(ladder, sweep)
    metric = sweep.metric
    meta = sweep.meta.get("ladder") or {}
    doc.heading("Across scales")
    how = (
        "every cell at every scale"
        if meta.get("promote", 1) >= 1
        else f"the better {fmt(meta.get('promote'))} of each scale's cells promoted to the next"
        + (f", plus the pinned ({'; '.join(meta['pin'])})" if meta.get("pin") else "")
    )
    sizes = (
        ladder.groupby("scale")
        .agg(
            multiple=("multiple", "first"),
            cells=("cell", "nunique"),
            trials=("trial_id", "count"),
            params_total=("params_total", "max"),
            params_active=("params_active", "max"),
            tokens=("tokens", "max"),
            flops=("flops", "max"),
        )
        .reindex(scale_order(ladder))
        .reset_index()
    )
    doc.para(
        f"The sweep ran at {len(sizes)} scales of its base config's compute ({how}); each scale's model and "
        f"token budget come from one rule (peerlab.ladder.scale_config) or a preset. Ranked on {metric}."
    )
    doc.table(sizes, "ladder_scales")
    doc.para("Each scale's leaderboard (mean ± 95% interval over seeds):")
    doc.table(facts["boards"], "ladder_boards")
    agree = facts["agreement"]
    if len(agree):
        doc.para(
            "Rank agreement with the largest scale: Kendall's tau-b of the cells' means, and decision accuracy, "
            "the share of cell pairs a scale orders as the largest does (DataDecide), with a 95% bootstrap "
            "interval over seeds (none with one seed). 1 is a perfect forecast, 0.5 a coin."
        )
        doc.table(agree, "ladder_agreement")
    else:
        doc.para("Rank agreement needs two scales that each ranked two or more cells: not yet.")
    doc.para(
        f"Per cell, a saturating power law L(C) = E + A C^-alpha of {metric} against training FLOPs, "
        f"extrapolated to {facts['target']:.3g} FLOPs ({facts['target_from']}), with a 95% residual-bootstrap "
        "interval. A cell needs 3 scales for a curve and 4 for a curve that a point tests."
    )
    doc.table(facts["fits"], "ladder_fits")
    if len(facts["crossings"]):
        doc.para(
            "Cells whose fitted curves cross before the target compute (the lower one changes there); a "
            "crossing beyond the scales run, or on untested curves, is the fit's guess:"
        )
        doc.table(facts["crossings"], "ladder_crossings")
    elif facts["fit_objects"]:
        doc.para("No two fitted curves cross before the target compute.")
    doc.figure(
        lambda: plots.ladder_plot(ladder, metric, facts["fit_objects"], facts["target"]),
        "ladder",
        f"{metric} against training compute, per cell",
    )


# --------------------------------------------------------------------------------------
# The mixture search (peerlab.mixsearch): its files read back into tables and a section
# --------------------------------------------------------------------------------------

MIX_ARMS = {"recommended": "val_recommended", "best tried": "val_best_tried", "prior": "val_prior"}
TOP_PROXIES = 3  # proxies shown beside the recommendation, the best tried and the prior in the weights bars


def mix_text(weights: dict) -> str:
    """{'a': 0.5, 'b': 0.5} -> 'a 0.50, b 0.50'."""
    return ", ".join(f"{d} {float(w):.2f}" for d, w in weights.items())


def mix_measured(mix: MixSearchResult) -> pd.DataFrame:
    """The proxies and anchors with a metric: what the search's fit learns from."""
    t = mix.table
    return t[(t["kind"] != "validation") & t["status"].isin(["finished", "stopped"]) & t["metric"].notna()]


def mix_validated(mix: MixSearchResult) -> pd.DataFrame:
    """The finished validation runs (the recommendation's own rule: stopped or failed runs do not count)."""
    t = mix.table
    return t[(t["kind"] == "validation") & (t["status"] == "finished") & t["metric"].notna()]


def mix_final_fit(mix: MixSearchResult) -> dict:
    """The fit behind the recommendation and the `fitted` column: {"n", "scores", "chosen"} ({} before any fit)."""
    rec = mix.rec or {}
    if mix.fit.get("final"):
        return mix.fit["final"]
    if rec.get("model"):
        return {"n": rec.get("proxies"), "scores": rec.get("fit") or {}, "chosen": rec["model"]}
    return (mix.fit.get("fits") or [{}])[-1]


def mix_best_measured(mix: MixSearchResult, mode: str) -> pd.Series | None:
    """The measured proxy with the best metric: the best tried mix while there is no recommendation."""
    m = mix_measured(mix)
    if m.empty:
        return None
    return m.loc[m["metric"].idxmin() if mode != "max" else m["metric"].idxmax()]


def mix_arm_weights(mix: MixSearchResult, mode: str) -> dict[str, dict]:
    """The weights of the recommendation, the best tried mix and the prior, as far as the files have them.

    Before a recommendation the best tried mix is the best measured proxy, and there is no prior to show.
    """
    rec, t = mix.rec or {}, mix.table
    out = {}
    for arm, label in MIX_ARMS.items():
        w = rec.get("weights") if arm == "recommended" else (rec.get(arm.replace(" ", "_")) or {}).get("weights")
        rows = t[t["label"] == label]
        if not w and len(rows):
            w = {d: float(rows[f"weight/{d}"].iloc[0]) for d in mix.domains}
        best = mix_best_measured(mix, mode) if not w and arm == "best tried" else None
        if best is not None:
            w = {d: float(best[f"weight/{d}"]) for d in mix.domains}
        if w:
            out[arm] = w
    return out


def mix_arms(mix: MixSearchResult, mode: str) -> pd.DataFrame:
    """The validation arms: mix, seeds, mean and 95% interval over seeds; the fit's prediction for the recommendation."""
    rec = mix.rec or {}
    stats = mean_interval(mix_validated(mix).groupby("label")["metric"]).set_index("label")
    stats = stats.reindex(list(MIX_ARMS.values()))  # an arm with no finished seed: NaN
    pred = rec.get("predicted") or {}
    rows = []
    for arm, w in mix_arm_weights(mix, mode).items():
        s = stats.loc[MIX_ARMS[arm]]
        mine = arm == "recommended"
        rows.append(
            {
                "arm": arm,
                "mix": mix_text(w),
                "seeds": int(np.nan_to_num(s["n"])),
                "mean": s["mean"],
                "lo": s["lo"],
                "hi": s["hi"],
                "predicted": pred.get("mean", np.nan) if mine else np.nan,
                "predicted lo": pred.get("lo", np.nan) if mine else np.nan,
                "predicted hi": pred.get("hi", np.nan) if mine else np.nan,
                "as a proxy": (rec.get("best_tried") or {}).get("measured", np.nan) if arm == "best tried" else np.nan,
            }
        )
    return pd.DataFrame(rows)


def mix_fits(mix: MixSearchResult) -> pd.DataFrame:
    """Every fit of mix_fit.json, the final one last: points, each model's cross-validated Spearman and RMSE, the chosen."""
    fits = [(f"for round {f.get('round')}", f) for f in mix.fit.get("fits") or []]
    final = mix_final_fit(mix) if mix.fit.get("final") or mix.rec else None
    fits += [("final", final)] if final else []
    rows = []
    for name, f in fits:
        row = {"fit": name, "n": f.get("n")}
        for model, s in (f.get("scores") or {}).items():
            row[f"{model} spearman"] = s.get("spearman", np.nan)
            row[f"{model} rmse"] = s.get("rmse", np.nan)
        rows.append({**row, "chosen": f.get("chosen")})
    frame = pd.DataFrame(rows)
    return frame[[c for c in frame.columns if c != "chosen"] + ["chosen"]] if len(frame) else frame


def mix_weights(mix: MixSearchResult, mode: str) -> pd.DataFrame:
    """The weights of the recommendation, the best tried, the prior and the best few other proxies, a row each."""
    rows = mix_arm_weights(mix, mode)
    measured = dict.fromkeys(rows, np.nan)
    best_id = ((mix.rec or {}).get("best_tried") or {}).get("id")
    if best_id is not None:
        measured["best tried"] = mix.rec["best_tried"].get("measured", np.nan)
    elif (best := mix_best_measured(mix, mode)) is not None:
        best_id, measured["best tried"] = best["id"], best["metric"]
    m = mix_measured(mix)
    top = m[m["id"] != best_id].sort_values("metric", ascending=mode != "max")
    for _, r in top.head(TOP_PROXIES).iterrows():
        rows[r["id"]] = {d: r[f"weight/{d}"] for d in mix.domains}
        measured[r["id"]] = r["metric"]
    frame = pd.DataFrame.from_dict(rows, orient="index", columns=mix.domains)
    return frame.assign(measured=pd.Series(measured)).rename_axis("mix").reset_index()


def mix_tradeoffs(mix: MixSearchResult, mode: str) -> tuple[pd.DataFrame, str]:
    """Each `value/...` metric of the recommendation, the best tried and the prior: the validation runs' means over
    seeds, else the measured proxy nearest each arm's mix. Returns the table and a sentence of where it came from."""
    t = mix.table
    values = [c for c in t.columns if c.startswith("value/")]
    if not values:
        return pd.DataFrame(), "No trial of the search reported its metrics yet: no per-domain trade-offs to show."
    val = mix_validated(mix)
    means = {}
    if val[values].notna().any().any():
        for arm, label in MIX_ARMS.items():
            if (val["label"] == label).any():
                means[arm] = val.loc[val["label"] == label, values].mean()
        note = "Mean over the seeds of each validation arm of every metric the trials reported"
    else:
        m = mix_measured(mix)
        m = m[m[values].notna().any(axis=1)]
        arms = mix_arm_weights(mix, mode) if mix.rec else {}
        if m.empty or not arms:
            return pd.DataFrame(), (
                "No validation runs and no recommendation yet: the per-domain trade-offs of a recommendation "
                "cannot be shown."
            )
        grid = m[[f"weight/{d}" for d in mix.domains]].to_numpy()
        near = []
        for arm, w in arms.items():
            dist = 0.5 * np.abs(grid - np.array([w[d] for d in mix.domains])).sum(1)
            i = int(np.argmin(dist))
            means[arm] = m.iloc[i][values]
            near.append(f"{arm} {m['id'].iloc[i]} (total-variation distance {dist[i]:.2f})")
        note = (
            "No validation runs yet: each arm is read off the measured proxy nearest its mix ("
            + "; ".join(near)
            + "), one seed each"
        )
    keys = [c.split("/", 1)[1] for c in values]
    frame = pd.DataFrame({"metric": keys, "better": ["lower" if lower_is_better(k) else "higher" for k in keys]})
    for arm in MIX_ARMS:
        frame[arm] = means[arm].to_numpy(float) if arm in means else np.nan
    frame["recommended - best tried"] = frame["recommended"] - frame["best tried"]
    return frame, note


def mix_summary(mix: MixSearchResult) -> str:
    """One line for the summary: the recommended mix, its interval and the verdict."""
    rec, metric = mix.rec, mix.metric
    if rec is None:
        return (
            f"Mixture search: {len(mix_measured(mix))} of {int((mix.table['kind'] != 'validation').sum())} proxies "
            f"measured, no recommendation yet (the fit needs 3)."
        )
    line = f"Mixture search: recommended mix **{mix_text(rec['weights'])}**"
    v, p = rec.get("validated"), rec.get("predicted") or {}
    if v:
        half = f"95% interval {fmt(v['lo'])} to {fmt(v['hi'])}" if np.isfinite(v["lo"]) else "no interval"
        line += f", validated {metric} = {fmt(v['mean'])} ({half}, {v['n']} seeds)"
        best = (rec.get("best_tried") or {}).get("validated")
        line += f" against {fmt(best['mean'])} for the best tried mix" if best else ""
        return line + f": {rec.get('verdict', 'not validated')}."
    if p:
        line += f", predicted {metric} = {fmt(p['mean'])} (interval {fmt(p['lo'])} to {fmt(p['hi'])})"
    return line + "; not validated on fresh seeds (yet)."


def mix_section(doc: Doc, mix: MixSearchResult, mode: str) -> None:
    """The "Mixture search" section: predicted against measured, the proposals, the fits and the trade-offs."""
    t, rec, metric, domains = mix.table, mix.rec, mix.metric, mix.domains
    mode = (rec or {}).get("mode") or mode
    search, measured = t[t["kind"] != "validation"], mix_measured(mix)
    doc.heading("Mixture search")
    counts = ", ".join(f"{k} {v}" for k, v in sorted(t["status"].value_counts().items()))
    rounds, runs = search["round"].nunique(), int((t["kind"] == "validation").sum())
    direction = "" if rec else ", taken from the sweep until recommendation.json names the search's own"
    doc.para(
        f"A closed-loop mixture search (peerlab.mixsearch) over {len(domains)} domains ({', '.join(domains)}) on "
        f"{metric} ({'lower' if mode != 'max' else 'higher'} is better{direction}): {len(search)} proxies and anchors in "
        f"{rounds} round{'s' * (rounds != 1)} and {runs} validation run{'s' * (runs != 1)}; trials by status: "
        f"{counts}. Failed proxies are left out of the fit."
    )
    if t["setting"].nunique() > 1:
        doc.para(
            f"Each mix ran under {t['setting'].nunique()} settings: the fit gives each setting an offset, and the "
            "means below pool the settings."
        )
    if rec is None:
        doc.para(
            f"No recommendation.json yet: {len(measured)} proxies have a metric and the fit needs 3. "
            "What the search has measured so far is shown below."
        )
    else:
        doc.para(
            f"Recommended mix: **{mix_text(rec['weights'])}** (the optimum of the {rec.get('model')} fit on "
            f"{rec.get('proxies')} proxies, inside the constraints and the trust region; recommended_mix.yaml)."
        )

    doc.heading("Predicted against measured", 3)
    final = mix_final_fit(mix)
    points = measured[measured["fitted"].notna()]
    if points.empty:
        doc.para("No fitted values yet (the fit needs 3 proxies with a metric): nothing to compare.")
    else:
        chosen = final.get("chosen", "fit")
        score = (final.get("scores") or {}).get(chosen, {})
        rho = score.get("spearman", np.nan)
        doc.para(
            f"The final fit ({chosen}, on {final.get('n', len(points))} proxies) at each proxy's mix against the "
            f"{metric} it measured; on the dashed line they agree. These are in-sample predictions; the honest "
            f"measure is the chosen model's leave-one-out Spearman, {fmt(rho)} (RMSE {fmt(score.get('rmse', np.nan))}). "
            "The grey crosses are out of sample: what the fit of the time predicted for a proposal before it ran."
        )
        doc.figure(lambda: plots.mix_fit_plot(points, metric, chosen, rho), "mix_fit", "fitted against measured")
    arms = mix_arms(mix, mode)
    if len(arms) and (rec is not None or len(mix_validated(mix))):
        doc.para(
            f"The validation arms: mean and 95% t-interval of {metric} over fresh seeds (validation runs that "
            "finished), the fit's predicted interval for the recommendation (mean ± 1.96 cross-validated RMSE), "
            "and the best tried mix's own proxy run."
        )
        doc.table(arms, "mix_validation")
    if rec is not None:
        line = f"Verdict: the recommendation is **{rec.get('verdict', 'not validated')}**"
        d = rec.get("difference")
        if d:
            line += (
                f" (recommended minus best tried {fmt(d['mean'])}, Welch 95% interval {fmt(d['lo'])} to {fmt(d['hi'])})"
            )
        doc.para(line + ".")
    if not len(mix_validated(mix)):
        doc.para(
            "No validation run has finished (the search is still running, or ran without a validation round): "
            "the recommendation, the best tried mix and the prior have no measured means over seeds."
        )

    doc.heading("The proposals on the simplex", 3)
    weights = mix_weights(mix, mode)
    marks = {arm: np.array([w[d] for d in domains]) for arm, w in mix_arm_weights(mix, mode).items()}
    if len(domains) == 3:
        doc.para(
            "Every proxy's mix on the simplex (a corner is all of one domain): colour by round, marker by kind, "
            "hollow where the trial has no metric (failed or not run yet); the recommendation is the star."
        )
        doc.figure(
            lambda: plots.simplex_plot(search, domains, marks, metric), "mix_simplex", "proposals on the simplex"
        )
    else:
        doc.para(
            f"With {len(domains)} domains the simplex is not drawn: the weights of the recommendation, the best "
            f"tried mix, the prior and the best {TOP_PROXIES} other proxies, as bars."
        )
        doc.figure(lambda: plots.mix_weights_plot(weights.set_index("mix")[domains]), "mix_weights_bars", "mix weights")
    doc.table(weights, "mix_weights", weights.round(dict.fromkeys(domains, 4)))

    doc.heading("Fit quality", 3)
    fits = mix_fits(mix)
    if fits.empty:
        doc.para("No fit yet (the fit needs 3 proxies with a metric).")
    else:
        doc.para(
            "Each fit of the search (the one that proposed a round, and the final one behind the recommendation): "
            "each model's cross-validated (leave-one-out; 5-fold past 40 points) Spearman and RMSE. The chosen "
            "model has the best Spearman, or the lowest RMSE of those within 0.05 of it."
        )
        doc.table(fits, "mix_fits")

    doc.heading("Per-domain trade-offs of the recommendation", 3)
    trade, note = mix_tradeoffs(mix, mode)
    if trade.empty:
        doc.para(note)
    else:
        doc.para(note + "; `recommended - best tried` is the difference (read it with `better`).")
        doc.table(trade, "mix_tradeoffs")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", help="folder written by experiments/ablate.py (holds trials.parquet)")
    parser.add_argument("--metric", help="column of trials.parquet to rank on (default: sweep.json's metric)")
    parser.add_argument("--out", help="output folder (default: SWEEP_DIR/report)")
    parser.add_argument("--mode", choices=["min", "max"], help="better direction of --metric (default: inferred)")
    parser.add_argument("--no-plots", action="store_true", help="tables and text only (fast)")
    args = parser.parse_args(argv)
    try:
        path = write_report(args.sweep_dir, args.metric, args.out, args.mode, figures=not args.no_plots)
    except (FileNotFoundError, ValueError) as err:
        print(f"report: {err}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
