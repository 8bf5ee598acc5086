"""Reading a sweep: tables (pandas DataFrames) and the report of what an ablation found.

from analysis import load_sweep, leaderboard
sweep = load_sweep("output/sweeps/demo")
leaderboard(sweep.trials, sweep.metric, sweep.mode)
"""

from .compare import (
    baseline_differences,
    cell_stats,
    differences,
    factor_effects,
    factor_p_values,
    factors,
    failures,
    leaderboard,
    noise_floor,
    pairwise,
)
from .dynamics import (
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
from .load import Sweep, load_sweep, metric_columns, mix_table
from .surrogate import recommend_mix

__all__ = [
    "baseline_differences",
    "Sweep",
    "cell_stats",
    "curves",
    "differences",
    "eval_curves",
    "factor_effects",
    "factor_p_values",
    "factors",
    "failures",
    "heldout_curves",
    "hot_turnover",
    "leaderboard",
    "load_grids",
    "load_histograms",
    "load_sweep",
    "metric_columns",
    "mix_table",
    "noise_floor",
    "pairwise",
    "recommend_mix",
    "usage_by_setting",
    "usage_over_time",
    "usage_summary",
]
