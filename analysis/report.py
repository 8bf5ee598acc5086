"""The sweep report: `python analysis/report.py SWEEP_DIR [--metric M] [--mode min|max] [--out DIR] [--no-plots]`.

Writes report.md, a self-contained report.html (images embedded), one PNG per figure and one
CSV per table into SWEEP_DIR/report/ (or --out), and prints the path of report.md.
From code: `write_report(sweep_dir, metric=None) -> Path`.
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
    Sweep,
    cost_columns,
    load_sweep,
    lower_is_better,
    metric_columns,
    mix_table,
    usable,
)
from analysis import plots  # noqa: E402
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
) -> list[str]:
    """The plain-words summary: best cell, how sure, what to try next."""
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
        if np.isfinite(runner["p_holm"]):
            verdict = "a real lead" if runner["significant"] else "not a significant lead: it may be noise"
            lines.append(
                f"Next is {runner['cell']}, {fmt(abs(runner['diff']))} behind "
                f"(95% interval of the difference {fmt(runner['lo'])} to {fmt(runner['hi'])}, "
                f"{runner['test']}, Holm p = {fmt(runner['p_holm'])}): {verdict}. "
                f"{int(diff['significant'].sum())} of {len(diff)} other cells are significantly worse."
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
    t, cells = sweep.trials, sweep.cells
    metrics = [metric] + [m for m in metric_columns(t) if m != metric]

    board = leaderboard(t, metric, sweep.mode)
    diff = differences(t, metric, sweep.mode)
    noise = noise_floor(t, metrics)
    effects = factor_effects(t, metrics)
    base = baseline_differences(t, metric, sweep.mode)  # each PEER cell against the dense arm of its mix
    rec = recommend_mix(t, metric, sweep.mode) if len(usable(t, metric)) else None
    order = board["cell"].tolist()

    doc = Doc(out, figures)
    doc.heading(f"Sweep report: {sweep.meta['name']}", 1)
    doc.html.append('<div class="summary">')
    doc.heading("Summary")
    doc.bullets(summary(sweep, metric, board, diff, noise, rec, effects, base))
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
    doc.para("Mean ± 95% half-width over seeds, ranked on the sweep's metric; tokens and FLOPs per trial.")
    doc.table(board, "leaderboard", with_intervals(board, metrics + cost_columns(t)))
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
    return doc.write(f"Sweep report: {sweep.meta['name']}")


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
