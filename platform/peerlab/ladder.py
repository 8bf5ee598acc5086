"""A scale ladder: the base config at several multiples of its compute, and what the rankings across them say.

- `scale_config(raw, scale)` is the one rule that turns a compute multiplier into a model and a
  token budget. Compute is C = (training FLOPs per token) x tokens. Tokens grow as the model's
  FLOPs per token (D proportional to N, as in Chinchilla's compute-optimal allocation), so each
  gets sqrt(scale). The model grows width and depth together (each by the cube root of its
  growth, d^2 L being the size of its matrices); attention heads, MLA's latent rank, the dense
  MLP, PEER's query size and PEER's expert count follow the width (so PEER's tables, 2 N d a
  layer, grow as d^2 L like the blocks' other matrices). Head sizes, PEER's heads and k stay.
  The step count is then set so the scale's FLOPs are `scale` times the base's, within a step.
- `ladder_sizes(raw)`: parameters (total, active), tokens and FLOPs of a config.
- `fit_power_law(flops, values)`: L(C) = E + A * C^-alpha (the saturating form of Kaplan et al.
  2020 and Hoffmann et al. 2022, eq. 2 with the data term folded in), with a bootstrap interval
  of its extrapolation. Three points determine it exactly, so fewer than four are flagged.
- `kendall_tau(x, y)` (tau-b) and `decision_accuracy(small, large)`: the share of pairs of cells
  ordered at a small scale as at the large one (DataDecide, Magnusson et al. 2025), with a
  bootstrap over seeds in `decision_accuracy_interval`.
- `crossing(fit_a, fit_b, lo, hi)`: the compute at which two cells' fitted curves cross.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

MIN_POINTS = 4  # a saturating power law has 3 parameters: 3 points fit it exactly, a 4th tests it


class LadderError(ValueError):
    """A ladder that cannot be built: one line, naming the scale."""


# --------------------------------------------------------------------------------------
# The rule: a compute multiplier -> a model and a token budget
# --------------------------------------------------------------------------------------


def _round_to(x: float, multiple: int, least: int) -> int:
    return max(least, round(x / multiple) * multiple)


def grown_model(raw: dict, growth: float) -> dict:
    """The model section of `raw` with width and depth grown by growth^(1/3) each (its blocks' matrices,
    d^2 L, by about `growth`); PEER's expert count grows as the width."""
    model = raw["model_config"]
    g = growth ** (1 / 3)
    m = copy.deepcopy(model)
    m["hidden_size"] = _round_to(model["hidden_size"] * g, 8, 8)
    width = m["hidden_size"] / model["hidden_size"]  # after rounding: what the rest follows
    least_layers = model.get("peer_start_layer", 1) + 1 if model.get("use_peer", True) else 1
    m["num_hidden_layers"] = max(least_layers, round(model["num_hidden_layers"] * g))
    m["num_attention_heads"] = max(1, round(model["num_attention_heads"] * width))
    m["intermediate_size"] = _round_to(model["intermediate_size"] * width, 8, 8)
    a = m["mla_config"]
    a["kv_lora_rank"] = _round_to(model["mla_config"]["kv_lora_rank"] * width, 8, 8)
    if model["mla_config"].get("q_lora_rank"):
        a["q_lora_rank"] = _round_to(model["mla_config"]["q_lora_rank"] * width, 8, 8)
    p = m["peer_config"]
    p["query_dim"] = _round_to(model["peer_config"]["query_dim"] * width, 2, 2)
    # N grows as the width does, so the expert tables (2 N d per PEER layer) grow as d^2 L, like every
    # other matrix of the blocks; each sub-key set by the square root.
    side = math.sqrt(width)
    n1, n2 = model["peer_config"]["product_key_dim"]
    k = model["peer_config"]["num_experts_per_tok"]
    p["product_key_dim"] = [max(k, round(n1 * side)), max(k, round(n2 * side))]
    p["num_experts"] = p["product_key_dim"][0] * p["product_key_dim"][1]
    return m


def _flops_per_token(raw: dict) -> int:
    from peerlab.config import config_from_dict
    from peerlab.model.size import training_flops_per_token

    cfg = config_from_dict(raw)
    return training_flops_per_token(cfg.model_config, cfg.dataset_config.max_seq_length)


def scale_config(raw: dict, scale: float) -> dict:
    """The config (a plain dict, as config.to_dict gives) at `scale` times the compute of `raw`.

    The model's FLOPs per token grow by about sqrt(scale) (the grown model closest to it among
    a fine grid of growths, after rounding), and the steps make up the rest, so the FLOPs are
    scale x the base's within one step. eval_steps and save_steps keep their share of the run.
    """
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise LadderError(f"--ladder {scale}: a scale is a multiple of the base config's compute, > 0")
    if not raw["train_config"].get("max_steps"):
        raise LadderError(
            "train_config.max_steps: a ladder scales the step count, and this config trains by epochs; set max_steps"
        )
    out = copy.deepcopy(raw)
    if scale != 1:
        base = _flops_per_token(raw)
        goal = math.log(math.sqrt(scale))
        best = None
        for growth in np.exp(np.linspace(-4 * abs(goal) - 0.1, 4 * abs(goal) + 0.1, 61)):
            trial = {**raw, "model_config": grown_model(raw, float(growth))}
            miss = abs(math.log(_flops_per_token(trial) / base) - goal)
            if best is None or miss < best[0]:
                best = (miss, trial["model_config"])
        out["model_config"] = best[1]
        ratio = _flops_per_token(out) / base
        t = out["train_config"]
        steps = max(1, round(raw["train_config"]["max_steps"] * scale / ratio))
        share = steps / raw["train_config"]["max_steps"]
        t["max_steps"] = steps
        for key in ("eval_steps", "save_steps", "logging_steps"):
            if t.get(key):
                t[key] = max(1, min(steps, round(raw["train_config"][key] * share)))
    return out


def ladder_sizes(raw: dict) -> dict:
    """params_total, params_active, tokens (a run's training tokens) and flops (its training FLOPs)."""
    from peerlab.config import config_from_dict
    from peerlab.model.size import training_flops_per_token
    from peerlab.model.size import active_parameters

    cfg = config_from_dict(raw)
    t = cfg.train_config
    tokens = (
        t.max_steps
        * t.per_device_train_batch_size
        * t.gradient_accumulation_steps
        * max(t.num_workers, 1)
        * cfg.dataset_config.max_seq_length
    )
    total, active = active_parameters(cfg.model_config)
    flops = training_flops_per_token(cfg.model_config, cfg.dataset_config.max_seq_length) * tokens
    return {"params_total": total, "params_active": active, "tokens": tokens, "flops": float(flops)}


# --------------------------------------------------------------------------------------
# Trends: a saturating power law per cell, and where two cells' curves cross
# --------------------------------------------------------------------------------------


@dataclass
class PowerLawFit:
    """L(C) = E + A * C^-alpha, with C in units of `c0` (the smallest compute) for conditioning."""

    E: float
    A: float
    alpha: float
    c0: float
    n: int
    enough: bool  # at least MIN_POINTS distinct computes: the fit is tested by a point it did not need
    boot: np.ndarray | None = None  # (B, 3) bootstrap refits (E, A, alpha), for intervals

    def __call__(self, flops) -> np.ndarray:
        return self.E + self.A * (np.asarray(flops, float) / self.c0) ** -self.alpha

    def interval(self, flops: float, level: float = 0.95) -> tuple[float, float]:
        """The bootstrap interval of the prediction at `flops` (NaN without bootstrap refits)."""
        if self.boot is None or not len(self.boot):
            return (math.nan, math.nan)
        c = flops / self.c0
        preds = self.boot[:, 0] + self.boot[:, 1] * c ** -self.boot[:, 2]
        q = (1 - level) / 2
        return float(np.quantile(preds, q)), float(np.quantile(preds, 1 - q))


def _fit_once(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """Least squares of y = E + A x^-alpha: for each alpha, (E, A) is a simple linear regression on
    z = x^-alpha (closed form); alpha is the best of a grid, refined by golden-section search."""

    def fits(alphas: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        z = x[None, :] ** -alphas[:, None]  # (alphas, points)
        zc = z - z.mean(1, keepdims=True)
        yc = y - y.mean()
        szz = (zc * zc).sum(1)
        A = np.where(szz > 0, (zc * yc).sum(1) / np.where(szz > 0, szz, 1), 0.0)
        E = y.mean() - A * z.mean(1)
        sse = ((y[None, :] - E[:, None] - A[:, None] * z) ** 2).sum(1)
        return sse, E, A

    grid = np.linspace(0.01, 3.0, 150)
    i = int(np.argmin(fits(grid)[0]))
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    golden = (math.sqrt(5) - 1) / 2
    for _ in range(30):
        a, b = hi - golden * (hi - lo), lo + golden * (hi - lo)
        sse = fits(np.array([a, b]))[0]
        if sse[0] < sse[1]:
            hi = b
        else:
            lo = a
    alpha = (lo + hi) / 2
    _, E, A = fits(np.array([alpha]))
    return float(E[0]), float(A[0]), alpha


def fit_power_law(flops, values, bootstrap: int = 200, seed: int = 0) -> PowerLawFit:
    """Fit L(C) = E + A * C^-alpha to (flops, values): every seed's value a point of its own.

    The interval comes from refits on the fitted curve plus resampled residuals (a residual
    bootstrap: the computes are the design, the seeds' scatter the noise). A fit with fewer
    than MIN_POINTS distinct computes is flagged (`enough` false): its residuals are all but
    zero, and so is its interval.
    """
    x = np.asarray(flops, float)
    y = np.asarray(values, float)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    distinct = len(np.unique(x))
    if distinct < 3:
        raise ValueError(f"a power law needs 3 or more distinct computes, got {distinct}")
    c0 = float(x.min())
    E, A, alpha = _fit_once(x / c0, y)
    fitted = E + A * (x / c0) ** -alpha
    # Residuals inflated for the 3 fitted parameters (their spread would understate the noise).
    residuals = (y - fitted) * math.sqrt(len(x) / max(len(x) - 3, 1))
    rng = np.random.default_rng(seed)
    boot = [_fit_once(x / c0, fitted + rng.choice(residuals, len(x))) for _ in range(bootstrap)]
    return PowerLawFit(E, A, alpha, c0, len(x), distinct >= MIN_POINTS, np.array(boot))


def crossing(a: PowerLawFit, b: PowerLawFit, lo: float, hi: float) -> float | None:
    """The compute in [lo, hi] where the fitted curves a and b cross (the first, on a log grid refined
    by bisection), or None where one stays ahead."""
    grid = np.exp(np.linspace(math.log(lo), math.log(hi), 400))
    diff = a(grid) - b(grid)
    signs = np.sign(diff)
    change = np.nonzero(signs[:-1] * signs[1:] < 0)[0]
    if not len(change):
        return None
    left, right = math.log(grid[change[0]]), math.log(grid[change[0] + 1])
    for _ in range(60):
        mid = (left + right) / 2
        if np.sign(a(math.exp(mid)) - b(math.exp(mid))) == signs[change[0]]:
            left = mid
        else:
            right = mid
    return math.exp((left + right) / 2)


# --------------------------------------------------------------------------------------
# Rank agreement between scales
# --------------------------------------------------------------------------------------


def kendall_tau(x, y) -> float:
    """Kendall's tau-b of two paired score lists (ties allowed): (concordant - discordant) over
    sqrt((pairs - ties in x) (pairs - ties in y))."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    n = len(x)
    concordant = discordant = ties_x = ties_y = 0
    for i in range(n):
        for j in range(i + 1, n):
            dx, dy = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
            if dx == 0:
                ties_x += 1
            if dy == 0:
                ties_y += 1
            if dx * dy > 0:
                concordant += 1
            elif dx * dy < 0:
                discordant += 1
    pairs = n * (n - 1) // 2
    denom = math.sqrt((pairs - ties_x) * (pairs - ties_y))
    return (concordant - discordant) / denom if denom else math.nan


def decision_accuracy(small: dict, large: dict) -> float:
    """The share of pairs of cells (in both) that `small`'s scores order as `large`'s do.

    A pair the large scale ties decides nothing and is left out; a pair the small scale ties
    counts one half (a coin flip picks the same winner half the time).
    """
    cells = sorted(set(small) & set(large))
    agree, pairs = 0.0, 0
    for i, a in enumerate(cells):
        for b in cells[i + 1 :]:
            truth = np.sign(large[a] - large[b])
            if truth == 0:
                continue
            guess = np.sign(small[a] - small[b])
            agree += 0.5 if guess == 0 else float(guess == truth)
            pairs += 1
    return agree / pairs if pairs else math.nan


def decision_accuracy_interval(
    small: dict, large: dict, bootstrap: int = 1000, seed: int = 0
) -> tuple[float, float, float]:
    """Decision accuracy of the seed means, and its 95% bootstrap interval over seeds.

    `small` and `large` map each cell to its values by seed ({seed: value}; a list is read as seeds
    0, 1, ...). A draw resamples the seeds (with replacement) and takes every cell's values at those
    seeds, at both scales: cells run on the same seeds share the seed's data order and start, so the
    seeds, not each cell's values apart, are what varies. With one seed there is no interval (NaN bounds).
    """
    small = {c: _by_seed(v) for c, v in small.items()}
    large = {c: _by_seed(v) for c, v in large.items()}
    mean = {c: float(np.mean(list(v.values()))) for c, v in small.items()}
    point = decision_accuracy(mean, {c: float(np.mean(list(v.values()))) for c, v in large.items()})
    seeds = sorted({s for v in (*small.values(), *large.values()) for s in v}, key=str)
    if len(seeds) <= 1:
        return point, math.nan, math.nan  # one seed: nothing to resample, no interval
    rng = np.random.default_rng(seed)

    def means(values: dict, draw) -> dict:
        out = {}
        for cell, by_seed in values.items():
            drawn = [by_seed[s] for s in draw if s in by_seed]
            if drawn:
                out[cell] = float(np.mean(drawn))
        return out

    draws = []
    for _ in range(bootstrap):
        draw = [seeds[i] for i in rng.integers(len(seeds), size=len(seeds))]
        draws.append(decision_accuracy(means(small, draw), means(large, draw)))
    draws = np.array([d for d in draws if not math.isnan(d)])
    if not len(draws):
        return point, math.nan, math.nan
    return point, float(np.quantile(draws, 0.025)), float(np.quantile(draws, 0.975))


def _by_seed(values) -> dict:
    """{seed: value} from a mapping, or from a list (seeds 0, 1, ...)."""
    return dict(values) if isinstance(values, dict) else dict(enumerate(values))


# --------------------------------------------------------------------------------------
# A sweep's ladder: its scales (multiples or preset files), and which cells go up
# --------------------------------------------------------------------------------------

# What a preset may change: the model's sizes and the run's budget. Anything else of the model
# (use_peer, PEER's heads and k, the vocabulary, ...) or of the data's shape is another architecture.
SIZE_KEYS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "max_position_embeddings",
    "mla_config.q_lora_rank",
    "mla_config.kv_lora_rank",
    "mla_config.qk_rope_head_dim",
    "mla_config.v_head_dim",
    "mla_config.qk_nope_head_dim",
    "peer_config.num_experts",
    "peer_config.product_key_dim",
    "peer_config.query_dim",
    "peer_config.log_expert_usage",  # logging, not architecture
    "peer_config.log_freq",
    "peer_config.usage_threshold",
)
BUDGET_KEYS = (
    "max_steps",
    "eval_steps",
    "save_steps",
    "logging_steps",
    "learning_rate",
    "warmup_ratio",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
)
SHAPE_KEYS = ("tokenizer_name", "max_seq_length")  # dataset_config keys a preset must share with the base


@dataclass
class Scale:
    """One rung of the ladder: its label (x1, x4, or a preset's file name), its compute as a
    multiple of the base config's, and the preset file it comes from (None: the rule's)."""

    label: str
    multiple: float
    preset: str | None = None


@dataclass
class LadderOptions:
    """A sweep's ladder: --ladder, --promote, --pin and --target-flops (or the ladder: section)."""

    scales: list  # numbers (multiples of the base's compute) and preset config files, as given
    promote: float = 0.5  # the share of a scale's cells that go up to the next; 1: every cell at every scale
    pin: list[str] = field(default_factory=list)  # cells that go up whatever their rank
    target_flops: float | None = None  # the compute each cell's fitted curve is extrapolated to


LADDER_KEYS = ("scales", "promote", "pin", "target_flops")


def ladder_options(section: dict | None, flags: dict, origin: str = "ladder") -> LadderOptions | None:
    """The ladder of the search space's `ladder:` section overridden by the flags given (None: not given).

    None when neither names scales. `flags` holds scales (the --ladder text, comma-separated),
    promote, pin (a list) and target_flops.
    """
    values = {}
    for key, value in (section or {}).items():
        if key not in LADDER_KEYS:
            raise LadderError(f"{origin}.{key}: unknown key (known: {', '.join(LADDER_KEYS)})")
        values[key] = value
    if isinstance(flags.get("scales"), str):
        flags = {**flags, "scales": [s.strip() for s in flags["scales"].split(",") if s.strip()]}
    values |= {k: v for k, v in flags.items() if v not in (None, [])}
    if not values.get("scales"):
        if any(k in values for k in ("promote", "pin", "target_flops")):
            raise LadderError("--promote, --pin and --target-flops need --ladder S1,S2,... (or ladder.scales) to run")
        return None
    scales = values["scales"]
    if not isinstance(scales, list):
        scales = [scales]
    promote = values.get("promote", 0.5)
    if isinstance(promote, bool) or not isinstance(promote, (int, float)) or not 0 < promote <= 1:
        raise LadderError(f"{origin}.promote (--promote): expected a share in (0, 1], got {promote!r}")
    pin = values.get("pin") or []
    pin = [pin] if isinstance(pin, str) else [str(p) for p in pin]
    target = values.get("target_flops")
    if target is not None:
        try:
            target = float(target)
        except (TypeError, ValueError):
            target = math.nan
        if not (math.isfinite(target) and target > 0):
            raise LadderError(
                f"{origin}.target_flops (--target-flops): expected FLOPs > 0, got {values['target_flops']!r}"
            )
    return LadderOptions(scales, float(promote), pin, target)


def _get(raw: dict, dotted: str):
    for part in dotted.split("."):
        raw = raw.get(part) if isinstance(raw, dict) else None
    return raw


def _flatten(raw: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in raw.items():
        if isinstance(v, dict):
            out |= _flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_preset(base: dict, preset: dict, path: str) -> None:
    """A preset may differ from the base config only in size (SIZE_KEYS) and budget (BUDGET_KEYS);
    LadderError names the first other key that differs."""
    a, b = _flatten(base["model_config"]), _flatten(preset["model_config"])
    for key in sorted(set(a) | set(b)):
        if key not in SIZE_KEYS and a.get(key) != b.get(key):
            raise LadderError(
                f"--ladder {path}: model_config.{key} is {b.get(key)!r} where the base config has {a.get(key)!r}; "
                f"a preset may change only sizes ({', '.join(k for k in SIZE_KEYS[:4])}, ...) and the step budget"
            )
    for key in SHAPE_KEYS:
        if base["dataset_config"].get(key) != preset["dataset_config"].get(key):
            raise LadderError(
                f"--ladder {path}: dataset_config.{key} is {preset['dataset_config'].get(key)!r} where the base "
                f"config has {base['dataset_config'].get(key)!r}; a preset may change only sizes and the step budget"
            )
    if not preset["train_config"].get("max_steps"):
        raise LadderError(f"--ladder {path}: train_config.max_steps: a preset of a ladder trains a set number of steps")


def preset_config(base: dict, preset: dict) -> dict:
    """The base config with a preset's sizes and budget (what it may change), everything else the base's."""
    out = copy.deepcopy(base)
    for key in SIZE_KEYS:
        value = _get(preset["model_config"], key)
        *parents, last = key.split(".")
        target = out["model_config"]
        for part in parents:
            target = target[part]
        target[last] = copy.deepcopy(value)
    for key in BUDGET_KEYS:
        out["train_config"][key] = preset["train_config"].get(key)
    return out


def _scale_label(multiple: float) -> str:
    return f"x{multiple:g}"


def parse_scales(items: list, base: dict, origin: str = "--ladder") -> list[tuple[Scale, dict]]:
    """Each scale of the ladder with its base config (plain data), smallest compute first.

    An item is a number (a multiple of the base's compute, by `scale_config`'s rule) or a
    config file (a preset: the base with the preset's sizes and budget, `check_preset`); a
    preset's multiple is its FLOPs over the base's. LadderError names the bad item.
    """
    from peerlab.config import ConfigError, config_from_dict, load_config, to_dict

    if len(items) < 2:
        raise LadderError(f"{origin} {','.join(map(str, items))}: a ladder needs two or more scales")
    if not base["train_config"].get("max_steps"):
        raise LadderError(
            "train_config.max_steps: a ladder scales the step count, and this config trains by epochs; set max_steps"
        )
    base_flops = ladder_sizes(base)["flops"]
    out = []
    for item in items:
        text = str(item).strip()
        try:
            multiple = float(text)
        except ValueError:
            multiple = None
        if multiple is not None:
            raw = scale_config(base, multiple)  # LadderError for 0, negatives, NaN
            out.append((Scale(_scale_label(multiple), multiple), raw))
            continue
        if not Path(text).is_file():
            raise LadderError(f"{origin} {text}: neither a number (a multiple of the base's compute) nor a config file")
        try:
            preset = to_dict(load_config(text))
        except ConfigError as err:
            raise LadderError(f"{origin} {text}: {err}") from None
        check_preset(base, preset, text)
        raw = preset_config(base, preset)
        try:
            config_from_dict(raw, origin=text)
        except ConfigError as err:
            raise LadderError(f"{origin} {text}: {err}") from None
        label = Path(text).stem
        out.append((Scale(label, ladder_sizes(raw)["flops"] / base_flops, text), raw))
    out.sort(key=lambda pair: pair[0].multiple)
    labels = [s.label for s, _ in out]
    for i in range(1, len(out)):
        if labels[i] in labels[:i] or math.isclose(out[i][0].multiple, out[i - 1][0].multiple, rel_tol=1e-3):
            raise LadderError(f"{origin}: {labels[i - 1]} and {labels[i]} are the same compute; give distinct scales")
    return out


def cell_means(trials, metric: str) -> dict[str, float]:
    """{cell: mean of `metric`} over a scale's rows of trials.parquet (a DataFrame), NaN where no run has it.

    The training loss (`loss`) is trials.parquet's `final_loss`. A failed run is left out: what it logged
    before it failed is not its scale's result (the report's boards leave it out too).
    """
    from peerlab.tables import trial_column

    column = trial_column(metric)
    cells = trials["cell"]
    if column not in trials:
        return {c: math.nan for c in cells.unique()}
    values = trials[column].where(trials["status"] != "failed")
    return {c: float(v) for c, v in values.groupby(cells, sort=False).mean().items()}


def promoted(means: dict[str, float], fraction: float, mode: str, pinned: set[str]) -> list[str]:
    """The cells that go up to the next scale: the better `fraction` of those with a measured metric
    (rounded up; two at least where two were measured, so the next scale still ranks something),
    ties broken by name, plus every pinned cell."""
    measured = sorted(
        (c for c, v in means.items() if v is not None and math.isfinite(v)),
        key=lambda c: ((means[c] if mode == "min" else -means[c]), c),
    )
    keep = min(len(measured), max(math.ceil(fraction * len(measured) - 1e-9), min(2, len(measured))))
    chosen = set(measured[:keep]) | (pinned & set(means))
    return sorted(chosen)
