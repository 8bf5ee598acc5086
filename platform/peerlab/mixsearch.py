"""Closed-loop mixture search: proxy runs on proposed mixes, a regression of the metric on the weights, its optimum.

The method is proxy regression (RegMix, Liu et al. 2024; olmix's repetition limits and prior):
train small proxies on mixes w in the simplex, fit metric ~ f(w), and take f's optimum. Here
the loop is closed inside a Ray Tune sweep, in rounds:

    round 1      N mixes drawn from Dirichlet(concentration * prior), within the bounds and the
                 repetition limits, plus the mixes file's own named mixes ("anchors")
    round r > 1  fit f on every proxy so far; propose the N best mixes of f that lie inside the
                 constraints and within a trust region (total-variation distance <= radius) of a
                 tried mix, kept apart from each other
    validation   the recommended mix (f's optimum, fixed after the last round), the best tried
                 mix and the prior mix, each run with S fresh seeds: means, 95% intervals and a
                 verdict (is the recommendation better than the best tried beyond the seed noise?)

f is whichever of three regressions has the better leave-one-out Spearman correlation with the
measured metric: a Scheffe quadratic mixture model (ridge), a log-linear model and a Gaussian
process. Proxies stopped early by ASHA enter with the step they reached as a covariate
(log(full steps / step)); predictions are made at full length. Failed proxies are recorded and
left out of the fit.

`MixSearch` is a Ray Tune `Searcher`: it puts each mix in the trial's config as
config["mix"] = {domain: weight} (and config["seed"]); `recommendation()` gives the result.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from peerlab.config import ConfigError

try:  # the Tune base class where Ray is installed; the numerics below need only numpy and scikit-learn
    from ray.tune.search import Searcher
except ImportError:  # pragma: no cover
    Searcher = object

TRUST_RADIUS = 0.25  # total-variation distance from a tried mix inside which the fit is trusted
EPS = 1e-4  # log-linear model: log(w + EPS)
RECOMMEND_CAUTION = 1.0  # the recommendation: the fit's mean plus one standard deviation where it has one
FIRST_SHARE = 0.65  # of a sample budget, round 1's share: the global fit needs the points more than the refinement  # proposals go where the fit's mean is best (they are how it learns); the recommendation is cautious
SPEARMAN_TIE = 0.05
SAME_MIX = 0.005  # mixes closer than this (total variation) are the same mix  # models whose cross-validated Spearman is this close to the best are chosen by their error


# --------------------------------------------------------------------------------------
# The feasible set: bounds and repetition limits
# --------------------------------------------------------------------------------------


@dataclass
class Constraints:
    """lo <= w <= hi, sum w = 1: the mixes a search may propose."""

    domains: list[str]
    lo: np.ndarray
    hi: np.ndarray

    def feasible(self, w: np.ndarray, tol: float = 1e-9) -> bool:
        return bool(np.all(w >= self.lo - tol) and np.all(w <= self.hi + tol) and abs(w.sum() - 1) < 1e-6)

    def project(self, v: np.ndarray) -> np.ndarray:
        """The Euclidean projection of v (one mix, or a row each) onto the feasible set:
        w_i = clip(v_i - tau, lo_i, hi_i), with tau found by bisection so that sum w = 1."""
        v = np.asarray(v, float)
        rows = np.atleast_2d(v)
        a = (rows - self.hi).min(1, keepdims=True) - 1.0
        b = (rows - self.lo).max(1, keepdims=True) + 1.0
        for _ in range(60):
            tau = (a + b) / 2
            over = np.clip(rows - tau, self.lo, self.hi).sum(1, keepdims=True) > 1
            a, b = np.where(over, tau, a), np.where(over, b, tau)
        w = np.clip(rows - (a + b) / 2, self.lo, self.hi)
        w = w / w.sum(1, keepdims=True)
        return w if v.ndim == 2 else w[0]

    def as_dict(self) -> dict:
        return {d: [float(a), float(b)] for d, a, b in zip(self.domains, self.lo, self.hi)}


def constraints(
    domains: list[str],
    bounds: dict[str, tuple[float, float]] | None = None,
    max_repeats: float | None = None,
    tokens: dict[str, float] | None = None,
    budget_tokens: float | None = None,
) -> Constraints:
    """The feasible set of `bounds` and `max_repeats`; ConfigError (one line) if no mix is in it.

    No source may be read more than `max_repeats` passes at the trial's planned token budget:
    w_i * budget_tokens <= max_repeats * tokens_i, so w_i <= max_repeats * tokens_i / budget_tokens.
    """
    k = len(domains)
    lo, hi = np.zeros(k), np.ones(k)
    for name, (a, b) in (bounds or {}).items():
        if name not in domains:
            raise ConfigError(f"--mix-bounds {name}: no dataset of that name (the domains are {', '.join(domains)})")
        if not 0 <= a <= b <= 1:
            raise ConfigError(f"--mix-bounds {name}={a}:{b}: expected 0 <= lo <= hi <= 1")
        i = domains.index(name)
        lo[i], hi[i] = a, b
    if lo.sum() > 1 + 1e-9 or hi.sum() < 1 - 1e-9:
        raise ConfigError(
            f"--mix-bounds: no mix fits them (the lower bounds sum to {lo.sum():.3g}, the upper to {hi.sum():.3g}; "
            f"a mix sums to 1): widen the bounds"
        )
    if max_repeats is not None:
        if max_repeats <= 0:
            raise ConfigError(f"--max-repeats {max_repeats}: expected a number of passes > 0")
        if not tokens or not budget_tokens:
            raise ConfigError("--max-repeats needs each dataset's token count and the trial's token budget")
        limit = np.array([max_repeats * tokens[d] / budget_tokens for d in domains])
        hi = np.minimum(hi, limit)
        if hi.sum() < 1 - 1e-9 or np.any(hi < lo - 1e-12):
            held = ", ".join(f"{d} {tokens[d]:,.0f}" for d in domains)
            raise ConfigError(
                f"--max-repeats {max_repeats:g}: no mix can meet it: a trial reads {budget_tokens:,.0f} tokens and the "
                f"sources hold {held} tokens ({max_repeats:g} passes cover {sum(limit) * budget_tokens:,.0f} at most); "
                f"raise --max-repeats or train fewer steps"
            )
    return Constraints(list(domains), lo, hi)


def parse_bounds(text: str) -> dict[str, tuple[float, float]]:
    """'prose=0.1:0.6,code=0:0.5' -> {'prose': (0.1, 0.6), 'code': (0.0, 0.5)}."""
    out = {}
    for item in [x.strip() for x in str(text).split(",") if x.strip()]:
        name, eq, rng = item.partition("=")
        lo, colon, hi = rng.partition(":")
        try:
            out[name.strip()] = (float(lo), float(hi))
        except ValueError:
            raise ConfigError(f"--mix-bounds {item}: expected name=lo:hi, e.g. code=0.1:0.5") from None
        if not eq or not colon:
            raise ConfigError(f"--mix-bounds {item}: expected name=lo:hi, e.g. code=0.1:0.5")
    return out


def parse_metric(text: str) -> dict[str, float]:
    """'eval_bpb/code*0.5+eval_bpb/prose*0.5' -> {'eval_bpb/code': 0.5, 'eval_bpb/prose': 0.5}; 'loss' -> {'loss': 1}."""
    terms: dict[str, float] = {}
    for term in [t.strip() for t in str(text).split("+")]:
        parts = [p.strip() for p in term.split("*")]
        numbers = [p for p in parts if re.fullmatch(r"-?[0-9.]+(e-?[0-9]+)?", p)]
        names = [p for p in parts if p not in numbers]
        if not term or len(names) != 1 or len(parts) > 2:
            raise ConfigError(
                f"--metric {text}: expected a metric or a weighted sum like 'eval_bpb/code*0.5+eval_bpb/prose*0.5'"
            )
        terms[names[0]] = terms.get(names[0], 0.0) + (float(numbers[0]) if numbers else 1.0)
    return terms


def metric_value(result: dict, metric: str | dict[str, float]) -> float | None:
    """The metric (a key, or a weighted sum of keys) from one result; None where a term is missing."""
    terms = parse_metric(metric) if isinstance(metric, str) else metric
    values = [result.get(k) for k in terms]
    if any(v is None or not np.isfinite(v) for v in values):
        return None
    return float(sum(w * float(v) for w, v in zip(terms.values(), values)))


def tv(a: np.ndarray, b: np.ndarray) -> float:
    """Total-variation distance between two mixes: half the L1 distance."""
    return 0.5 * float(np.abs(np.asarray(a) - np.asarray(b)).sum())


def dirichlet(
    prior: np.ndarray, concentration: float, n: int, cons: Constraints, rng: np.random.Generator
) -> np.ndarray:
    """n feasible draws from Dirichlet(concentration * prior): rejection first, projection for the rest."""
    alpha = np.maximum(concentration * np.asarray(prior, float), 1e-3)
    out = []
    for _ in range(50):
        draws = rng.dirichlet(alpha, size=max(4 * n, 64))
        out += [w for w in draws if cons.feasible(w)]
        if len(out) >= n:
            return np.array(out[:n])
    rest = cons.project(rng.dirichlet(alpha, size=n - len(out)))
    return np.concatenate([np.array(out).reshape(-1, len(alpha)), rest])


def spread(cands: np.ndarray, n: int, fixed: np.ndarray | None = None) -> np.ndarray:
    """n of the candidates, picked greedily to be far apart (maximin in total variation), also from `fixed`."""
    chosen = [] if fixed is None else list(np.atleast_2d(fixed))
    picks = []
    far = np.full(len(cands), np.inf)
    for c in chosen:
        far = np.minimum(far, 0.5 * np.abs(cands - c).sum(1))
    for _ in range(min(n, len(cands))):
        i = int(np.argmax(far)) if np.isfinite(far).any() else 0
        picks.append(cands[i])
        far = np.minimum(far, 0.5 * np.abs(cands - cands[i]).sum(1))
    return np.array(picks)


# --------------------------------------------------------------------------------------
# The regressions of the metric on the weights
# --------------------------------------------------------------------------------------


class Scheffe:
    """Scheffe's quadratic mixture model y = sum_i b_i w_i + sum_{i<j} b_ij w_i w_j (+ covariates), ridge-fitted.

    No intercept: sum w = 1 makes it one of the linear terms (Cornell, Experiments with Mixtures, eq. 2.8).
    """

    name = "scheffe_quadratic"

    def __init__(self, ridge: float = 1e-3):
        self.ridge = ridge

    def features(self, w: np.ndarray) -> np.ndarray:
        k = w.shape[1]
        pairs = [w[:, i] * w[:, j] for i in range(k) for j in range(i + 1, k)]
        return np.column_stack([w, *pairs]) if pairs else w

    def fit(self, w: np.ndarray, z: np.ndarray, y: np.ndarray) -> Scheffe:
        x = np.column_stack([self.features(w), z])
        self.mean_ = y.mean()
        a = x.T @ x + self.ridge * np.eye(x.shape[1])
        self.coef_ = np.linalg.solve(a, x.T @ (y - self.mean_))  # the sum-to-one terms absorb the centring
        return self

    def predict(self, w: np.ndarray, z: np.ndarray) -> np.ndarray:
        return np.column_stack([self.features(w), z]) @ self.coef_ + self.mean_


class LogLinear(Scheffe):
    """y = c + sum_i b_i log(w_i + eps) (+ covariates): diminishing returns in each domain's share."""

    name = "log_linear"

    def features(self, w: np.ndarray) -> np.ndarray:
        return np.column_stack([np.ones(len(w)), np.log(w + EPS)])


class GaussianProcess:
    """A Gaussian process on (w, covariates): RBF kernel with a length scale per input, plus white noise."""

    name = "gaussian_process"

    def __init__(self, kernel=None):
        self.kernel = kernel  # given: fixed hyperparameters (the cross-validation folds reuse the full fit's)

    def fit(self, w: np.ndarray, z: np.ndarray, y: np.ndarray) -> GaussianProcess:
        from sklearn.gaussian_process import GaussianProcessRegressor
        from sklearn.gaussian_process.kernels import RBF, ConstantKernel, WhiteKernel

        x = np.column_stack([w, z])
        kernel = self.kernel or ConstantKernel(1.0, (1e-3, 1e3)) * RBF(
            np.full(x.shape[1], 0.3), (1e-2, 1e2)
        ) + WhiteKernel(0.1, (1e-6, 1.0))
        fixed = self.kernel is not None
        self.model_ = GaussianProcessRegressor(
            kernel,
            normalize_y=True,
            n_restarts_optimizer=0 if fixed else 2,
            optimizer=None if fixed else "fmin_l_bfgs_b",
            random_state=0,
        )
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # bounds reached on a tiny sample: the fit is still usable
            self.model_.fit(x, y)
        return self

    def predict(self, w: np.ndarray, z: np.ndarray) -> np.ndarray:
        return self.model_.predict(np.column_stack([w, z]))

    def std(self, w: np.ndarray, z: np.ndarray) -> np.ndarray:
        return self.model_.predict(np.column_stack([w, z]), return_std=True)[1]


MODELS = (Scheffe, LogLinear, GaussianProcess)


@dataclass
class Fit:
    """The chosen regression and what the cross-validation said of every one tried."""

    model: object
    scores: dict  # model name -> {"spearman": ..., "rmse": ..., "n": ...}
    chosen: str
    rmse: float  # the chosen model's cross-validated error: the predictions' error scale

    covariates: int = 0

    def predict(self, w: np.ndarray) -> np.ndarray:
        w = np.atleast_2d(w)
        return self.model.predict(w, np.zeros((len(w), self.covariates)))

    def score(self, w: np.ndarray, sign: float, caution: float = 1.0) -> np.ndarray:
        """What the search minimises: sign * prediction, plus `caution` predictive standard deviations
        where the model has them (the Gaussian process): a mix far from the data is not a bargain."""
        w = np.atleast_2d(w)
        out = sign * self.predict(w)
        if caution and hasattr(self.model, "std"):
            out = out + caution * self.model.std(w, np.zeros((len(w), self.covariates)))
        return out


def cross_validate(make, w: np.ndarray, z: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Leave-one-out (5-fold past 40 points) Spearman correlation and RMSE of out-of-fold predictions."""
    from scipy.stats import spearmanr

    n = len(y)
    folds = np.arange(n) if n <= 40 else np.arange(n) % 5
    pred = np.empty(n)
    for f in np.unique(folds):
        test = folds == f
        model = make().fit(w[~test], z[~test], y[~test])
        pred[test] = model.predict(w[test], z[test])
    rho = spearmanr(pred, y).statistic if np.std(pred) > 0 and np.std(y) > 0 else 0.0
    return float(0.0 if np.isnan(rho) else rho), float(np.sqrt(np.mean((pred - y) ** 2)))


def fit(w: np.ndarray, steps: np.ndarray, y: np.ndarray, full_steps: float | None = None) -> Fit:
    """Every model, cross-validated; the one with the best Spearman (then the lower error) refitted on all points.

    `steps`: the step each proxy's metric was taken at; shorter (early-stopped) proxies get the
    covariate log(full_steps / step), and predictions are made at full length.
    """
    w, y = np.asarray(w, float), np.asarray(y, float)
    full = float(full_steps or np.max(steps))
    short = np.log(full / np.maximum(np.asarray(steps, float), 1.0))
    z = short[:, None] if np.ptp(short) > 1e-9 else np.zeros((len(y), 0))
    scores, fitted = {}, {}
    for make in MODELS:
        fitted[make.name] = make().fit(w, z, y)
        # The folds keep the full fit's kernel: its hyperparameters stay fixed as the other models' ridge does,
        # and each fold refits the posterior, the standard leave-one-out of a Gaussian process (Rasmussen and
        # Williams 2006, sec. 5.4.2). Refitting the kernel per fold too was tried: at 12 points in 5 domains its
        # Spearman fell to 0.31, the log-linear model was chosen, and the recommendation landed 0.11 (total
        # variation) from a planted optimum against 0.06 (tests/test_mixsearch.py).
        if make is GaussianProcess:
            kernel = fitted[make.name].model_.kernel_
            make = lambda kernel=kernel: GaussianProcess(kernel)
        if len(y) >= 4:
            rho, rmse = cross_validate(make, w, z, y)
        else:
            rho, rmse = float("nan"), float("nan")
        scores[fitted_name(make)] = {"spearman": rho, "rmse": rmse, "n": len(y)}
    # The best Spearman; within SPEARMAN_TIE of it, the lowest error (a rank difference that small is noise).
    rho = {m.name: np.nan_to_num(scores[m.name]["spearman"], nan=-2.0) for m in MODELS}
    close = [m for m in rho if rho[m] >= max(rho.values()) - SPEARMAN_TIE]
    best = min(close, key=lambda m: np.nan_to_num(scores[m]["rmse"], nan=np.inf))
    return Fit(fitted[best], scores, best, scores[best]["rmse"], z.shape[1])


def fitted_name(make) -> str:
    return getattr(make, "name", GaussianProcess.name)


def optimise(
    model: Fit,
    cons: Constraints,
    tried: np.ndarray,
    sign: float,
    n: int,
    rng: np.random.Generator,
    radius: float = TRUST_RADIUS,
    separation: float = 0.0,
    avoid: np.ndarray | None = None,
    caution: float = 1.0,
) -> np.ndarray:
    """The n best mixes of the fit (`Fit.score`, lower is better) within `radius` of a tried mix.

    Candidates: broad Dirichlet draws and local draws around every tried mix, then three rounds
    of local refinement around the best so far. Picks are greedy, each at least `separation`
    (total variation) from the other picks and from the mixes in `avoid`.
    """
    k = len(cons.domains)
    tried = np.atleast_2d(tried)

    def inside(c: np.ndarray) -> np.ndarray:
        d = 0.5 * np.abs(c[:, None, :] - tried[None, :, :]).sum(-1).min(1)
        return c[d <= radius + 1e-9]

    def local(centres: np.ndarray, conc: float, each: int) -> np.ndarray:
        draws = [rng.dirichlet(np.maximum(conc * c, 1e-3) + 0.05, size=each) for c in centres]
        return cons.project(np.concatenate(draws))

    cands = np.concatenate(
        [
            dirichlet(np.full(k, 1 / k), k, 2000, cons, rng),
            local(tried, 30.0, 60),
            local(tried, 120.0, 30),
            tried,
        ]
    )
    cands = inside(cands)
    for conc in (100.0, 400.0, 1600.0):
        score = model.score(cands, sign, caution)
        best = cands[np.argsort(score)[: max(n, 5)]]
        cands = np.concatenate([cands, inside(local(best, conc, 200))])
    score = model.score(cands, sign, caution)
    picks: list[np.ndarray] = []
    away = list(np.atleast_2d(avoid)) if avoid is not None and len(avoid) else []
    for i in np.argsort(score):
        c = cands[i]
        if all(tv(c, p) >= separation for p in picks + away):
            picks.append(c)
            if len(picks) == n:
                break
    return np.array(picks)


# --------------------------------------------------------------------------------------
# The searcher
# --------------------------------------------------------------------------------------

ENDED = ("finished", "stopped", "failed")


class MixSearch(Searcher):
    """Ray Tune searcher over data mixes: Dirichlet proxies, fitted proposals in rounds, a seeded validation round.

    MixSearch(domains=["prose", "code", "docs"], metric="eval_bpb/mean", mode="min") is all a
    `tune.Tuner(trainable, tune_config=tune.TuneConfig(search_alg=..., num_samples=32))` needs:
    each trial's config gets "mix" ({domain: weight}), "seed", and "mix_id". With a finite
    num_samples and no num_mixes, the rounds share what the validation round leaves of it.

    prior: "uniform", {domain: weight}, or a list in domain order. concentration: of the Dirichlet
    around the prior (default: the number of domains, so a uniform prior draws uniformly over
    the simplex). bounds: {domain: (lo, hi)}. max_repeats with tokens ({domain: tokens held})
    and budget_tokens (tokens a trial reads): no source read more than that many passes.
    anchors: {name: {domain: weight}} run in round 1 too. settings: other config entries a
    proposal is run under, each its own trial (PEER settings); the fit gives each an offset.
    state_path: a JSON file the searcher keeps its state in; given and present, it resumes from it.
    """

    def __init__(
        self,
        domains: list[str],
        metric: str | None = None,
        mode: str | None = None,
        prior="uniform",
        concentration: float | None = None,
        bounds: dict | None = None,
        max_repeats: float | None = None,
        tokens: dict | None = None,
        budget_tokens: float | None = None,
        num_mixes: int | None = None,
        rounds: int = 2,
        validate_seeds: int = 3,
        anchors: dict | None = None,
        seed: int = 0,
        trust_radius: float = TRUST_RADIUS,
        settings: list[dict] | None = None,
        full_steps: float | None = None,
        state_path: str | Path | None = None,
    ):
        super().__init__(metric=metric, mode=mode)
        if len(domains) < 2:
            raise ConfigError(f"a mixture search needs at least two domains, got {list(domains)}")
        if rounds < 1 or validate_seeds < 0 or (num_mixes is not None and num_mixes < 1):
            raise ConfigError("a mixture search needs rounds >= 1, num_mixes >= 1 and validate_seeds >= 0")
        self.domains = list(domains)
        self.cons = constraints(self.domains, bounds, max_repeats, tokens, budget_tokens)
        self.prior = self.cons.project(self._vector(prior))
        self.concentration = float(concentration or len(self.domains))
        self.rounds, self.validate_seeds = rounds, validate_seeds
        # round 1 draws num_mixes; each later round proposes half as many (it refines, round 1 maps the simplex)
        self.first_mixes = num_mixes
        self.later_mixes = None if num_mixes is None else max(2, math.ceil(num_mixes / 2))
        self.anchors = {name: self.cons.project(self._vector(w)) for name, w in (anchors or {}).items()}
        self.seed, self.trust_radius, self.full_steps = seed, trust_radius, full_steps
        self.settings = list(settings or [{}])
        self.state_path = Path(state_path) if state_path else None
        self.rng = np.random.default_rng(seed)
        self.proposals: list[dict] = []  # every trial asked for, in order (see _add)
        self.by_trial: dict[str, int] = {}  # Tune trial id -> index in proposals
        self.round = 0  # the last round proposed; rounds + 1 is the validation round
        self.fits: list[dict] = []  # one per fit: the round it proposed for, the scores, the chosen model
        self.recommended: dict | None = None
        if self.state_path and self.state_path.is_file():
            self.set_state(json.loads(self.state_path.read_text()))

    # ---- Tune's interface -----------------------------------------------------------

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        self._metric = self._metric or metric
        self._mode = self._mode or mode
        samples = spec.get("num_samples")
        if self.first_mixes is None and samples and samples > 0:  # the rounds share what validation leaves
            per_setting = samples // len(self.settings) - 3 * self.validate_seeds - len(self.anchors)
            per_setting = max(per_setting, 2 * self.rounds)
            self.first_mixes = max(2, round(per_setting * FIRST_SHARE)) if self.rounds > 1 else per_setting
            self.later_mixes = max(1, (per_setting - self.first_mixes) // max(self.rounds - 1, 1))
        return True

    def suggest(self, trial_id: str):
        if self.first_mixes is None:  # no budget given: 12 mixes in round 1, 6 in each later round
            self.first_mixes, self.later_mixes = 12, 6
        queued = next((i for i, p in enumerate(self.proposals) if p["status"] == "queued"), None)
        if queued is None:
            if any(p["status"] == "running" for p in self.proposals):
                return None  # the round is still running: its results shape the next
            if not self._next_round():
                return Searcher.FINISHED
            queued = next((i for i, p in enumerate(self.proposals) if p["status"] == "queued"), None)
            if queued is None:
                return Searcher.FINISHED
        p = self.proposals[queued]
        p["status"], p["tune_trial"] = "running", trial_id
        self.by_trial[trial_id] = queued
        self._save()
        return self.trial_config(p)

    def trial_config(self, p: dict) -> dict:
        """What a trial's config gets: the mix, the seed and the proposal's id (and its setting's entries)."""
        return {"mix": dict(zip(self.domains, p["weights"])), "seed": p["seed"], "mix_id": p["id"], **p["setting"]}

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        i = self.by_trial.get(trial_id)
        value = metric_value(result, self.metric) if self.metric else None
        if i is not None and value is not None:
            p = self.proposals[i]
            p["metric"], p["step"] = value, float(result.get("step", result.get("training_iteration", 1)))
            terms = parse_metric(self.metric) if isinstance(self.metric, str) else {}
            p["values"] = {  # the metric's terms and every held-out metric: the per-domain trade-offs
                k: float(v)
                for k, v in result.items()
                if (k in terms or k.startswith("eval_")) and isinstance(v, (int, float)) and np.isfinite(v)
            }

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        i = self.by_trial.get(trial_id)
        if i is None:
            return
        if result and not error:
            self.on_trial_result(trial_id, result)
        p = self.proposals[i]
        if error or p.get("metric") is None:
            p["status"] = "failed"
        else:
            short = self.full_steps and p["step"] is not None and p["step"] < self.full_steps
            p["status"] = "stopped" if short else "finished"
        self._save()

    def get_state(self) -> dict:
        return {
            "domains": self.domains,
            "proposals": self.proposals,
            "round": self.round,
            "fits": self.fits,
            "recommended": self.recommended,
            "mixes_per_round": [self.first_mixes, self.later_mixes],
            "rng": self.rng.bit_generator.state,
        }

    def set_state(self, state: dict) -> None:
        if state.get("domains") != self.domains:
            raise ConfigError(f"{self.state_path}: a search over {state.get('domains')}, not {self.domains}")
        self.proposals, self.round, self.fits = state["proposals"], state["round"], state["fits"]
        self.recommended = state["recommended"]
        self.first_mixes, self.later_mixes = state.get("mixes_per_round") or (self.first_mixes, self.later_mixes)
        self.rng.bit_generator.state = state["rng"]
        for p in self.proposals:  # what ran when the sweep stopped runs again, under its own id
            if p["status"] == "running":
                p["status"] = "queued"
        self.by_trial = {}

    def save(self, checkpoint_path: str) -> None:
        Path(checkpoint_path).write_text(json.dumps(self.get_state()))

    def restore(self, checkpoint_path: str) -> None:
        self.set_state(json.loads(Path(checkpoint_path).read_text()))

    # ---- the rounds ---------------------------------------------------------------------

    def _vector(self, prior) -> np.ndarray:
        if isinstance(prior, str):
            if prior != "uniform":
                raise ConfigError(f"mix prior '{prior}': expected 'uniform', a mix, or weights per domain")
            return np.full(len(self.domains), 1 / len(self.domains))
        if isinstance(prior, dict):
            unknown = set(prior) - set(self.domains)
            if unknown:
                raise ConfigError(f"mix weights name {min(unknown)}, not a domain ({', '.join(self.domains)})")
            v = np.array([float(prior.get(d, 0.0)) for d in self.domains])
        else:
            v = np.asarray(prior, float)
        if v.shape != (len(self.domains),) or np.any(v < 0) or v.sum() <= 0:
            raise ConfigError(f"mix weights {prior!r}: expected a non-negative weight per domain")
        return v / v.sum()

    def _add(self, weights: np.ndarray, kind: str, label: str, seed: int, prediction: float | None = None) -> None:
        for s, setting in enumerate(self.settings):
            suffix = f"_x{s}" if len(self.settings) > 1 else ""
            self.proposals.append(
                {
                    "id": f"{label}{suffix}_s{seed}",
                    "round": self.round,
                    "kind": kind,
                    "label": label,
                    "weights": [float(x) for x in weights],
                    "seed": seed,
                    "setting": setting,
                    "setting_index": s,
                    "prediction": prediction,
                    "status": "queued",
                    "metric": None,
                    "step": None,
                }
            )

    def _next_round(self) -> bool:
        """Queue the next round's trials; False when the search is over."""
        if self.round == 0:
            self.round = 1
            from peerlab.tune import _slug  # (tune imports this module lazily: no cycle at import)

            for name, w in self.anchors.items():
                self._add(w, "anchor", f"anchor_{_slug(str(name))}", self.seed)
            # A space-filling pick of Dirichlet draws: the fit sees the simplex evenly, not a clump by chance.
            draws = dirichlet(self.prior, self.concentration, 30 * self.first_mixes, self.cons, self.rng)
            fixed = np.array(list(self.anchors.values())) if self.anchors else None
            for j, w in enumerate(spread(draws, self.first_mixes, fixed)):
                self._add(w, "proxy", f"r1_{j:02d}", self.seed)
            return True
        if self.round < self.rounds:
            self.round += 1
            current = self.fit()
            if current is None:  # nothing measured yet: another round of draws
                picks = dirichlet(self.prior, self.concentration, self.later_mixes, self.cons, self.rng)
                predictions = [None] * len(picks)
            else:
                tried = self.tried_weights()
                picks = optimise(
                    current,
                    self.cons,
                    tried,
                    self._sign,
                    self.later_mixes,
                    self.rng,
                    self.trust_radius,
                    separation=self.trust_radius / 4,
                    avoid=tried,
                    caution=0.0,
                )
                predictions = list(current.predict(picks)) if len(picks) else []
            for j, (w, pred) in enumerate(zip(picks, predictions)):
                self._add(w, "proxy", f"r{self.round}_{j:02d}", self.seed, None if pred is None else float(pred))
            return True
        if self.round == self.rounds:
            self.round += 1
            rec = self.recommendation()
            if rec is None or self.validate_seeds == 0:
                return False
            self.recommended = rec
            arms = {"recommended": rec["weights"], "best_tried": rec["best_tried"]["weights"], "prior": self.prior}
            named = rec.get("best_named")
            if named and named["id"] != rec["best_tried"]["id"]:  # the file's best mix, when a proxy beat it
                arms["best_named"] = named["weights"]
            if tv(self._array(rec["weights"]), self._array(rec["best_tried"]["weights"])) < SAME_MIX:
                del arms["best_tried"]  # the fit's optimum is the best tried mix: one arm measures both
            for name, w in arms.items():
                vec = np.array([w[d] for d in self.domains]) if isinstance(w, dict) else np.asarray(w)
                for s in range(self.validate_seeds):
                    self._add(vec, "validation", f"val_{name}", self.seed + 1 + s)
            self._save()
            return True
        return False

    def _array(self, weights: dict) -> np.ndarray:
        return np.array([weights[d] for d in self.domains])

    @property
    def _sign(self) -> float:
        return -1.0 if self.mode == "max" else 1.0

    def measured(self) -> list[dict]:
        """Proxies (and anchors) with a metric: what the fit learns from."""
        return [
            p
            for p in self.proposals
            if p["kind"] != "validation" and p["status"] in ("finished", "stopped") and p.get("metric") is not None
        ]

    def tried_weights(self) -> np.ndarray:
        return np.array([p["weights"] for p in self.proposals if p["kind"] != "validation"])

    def fit(self, log: bool = True) -> Fit | None:
        """The regression of the metric on the weights over every measured proxy (None below 3 of them)."""
        rows = self.measured()
        if len(rows) < 3:
            return None
        w = np.array([r["weights"] for r in rows])
        y = np.array([r["metric"] for r in rows])
        steps = np.array([r["step"] or 1 for r in rows])
        if len(self.settings) > 1:  # an offset per setting: the setting's mean, taken out before the fit
            idx = np.array([r["setting_index"] for r in rows])
            offsets = {s: y[idx == s].mean() - y.mean() for s in np.unique(idx)}
            y = y - np.array([offsets[s] for s in idx])
        result = fit(w, steps, y, self.full_steps)
        if log:
            self.fits.append({"round": self.round, "n": len(rows), "scores": result.scores, "chosen": result.chosen})
        for p in self.proposals:
            if p["kind"] != "validation" and p["status"] in ENDED:
                p["fitted"] = float(result.predict(np.array(p["weights"]))[0])
        return result

    def recommendation(self) -> dict | None:
        """{'weights': {domain: w}, 'predicted': {...}, 'best_tried': {...}, 'prior': {...}, ...}; None before 3 results.

        The recommended mix is the fit's optimum inside the constraints and within the trust
        region of the tried mixes; after the validation round it carries the measured means and
        95% intervals over seeds, and a verdict against the best tried mix.
        """
        rows = self.measured()
        if len(rows) < 3:
            return None
        if self.recommended is None or self.round <= self.rounds:
            current = self.fit(log=False)
            rng = np.random.default_rng(self.seed + 7919)
            best_w = optimise(
                current,
                self.cons,
                self.tried_weights(),
                self._sign,
                1,
                rng,
                self.trust_radius,
                caution=RECOMMEND_CAUTION,
            )[0]
            pred = float(current.predict(best_w)[0])
            full = max(r["step"] or 1 for r in rows)
            best = min([r for r in rows if (r["step"] or 1) >= full], key=lambda r: self._sign * r["metric"])
            anchors = [r for r in rows if r["kind"] == "anchor" and (r["step"] or 1) >= full]
            named = min(anchors, key=lambda r: self._sign * r["metric"]) if anchors else None
            rec = {
                "weights": dict(zip(self.domains, map(float, best_w))),
                "predicted": {"mean": pred, "lo": pred - 1.96 * current.rmse, "hi": pred + 1.96 * current.rmse},
                "model": current.chosen,
                "fit": current.scores,
                "best_tried": {
                    "id": best["id"],
                    "weights": dict(zip(self.domains, best["weights"])),
                    "measured": best["metric"],
                },
                "prior": {"weights": dict(zip(self.domains, map(float, self.prior)))},
                "proxies": len(rows),
                "metric": self.metric if isinstance(self.metric, str) else str(self.metric),
                "mode": self.mode,
            }
            if named is not None:
                rec["best_named"] = {
                    "id": named["id"],
                    "name": named["label"].removeprefix("anchor_"),
                    "weights": dict(zip(self.domains, named["weights"])),
                    "measured": named["metric"],
                }
        else:
            rec = json.loads(json.dumps(self.recommended))
        arms = (("val_recommended", None), ("val_best_tried", "best_tried"), ("val_prior", "prior"))
        for arm, key in (*arms, ("val_best_named", "best_named")):
            values = [p["metric"] for p in self.proposals if p["label"] == arm and p["status"] == "finished"]
            if values:
                (rec[key] if key else rec)["validated"] = interval(values)
        same = tv(self._array(rec["weights"]), self._array(rec["best_tried"]["weights"])) < SAME_MIX
        if same and "validated" in rec:
            rec["best_tried"]["validated"] = rec["validated"]
        named = rec.get("best_named")
        if named and named["id"] == rec["best_tried"]["id"] and "validated" in rec["best_tried"]:
            named["validated"] = rec["best_tried"]["validated"]  # the best tried mix is the file's own
        rec["verdict"], rec["difference"] = compare(rec.get("validated"), rec["best_tried"].get("validated"), self.mode)
        if same:
            rec["verdict"], rec["difference"] = "the recommended mix is the best tried mix", None
        if named:
            rec["verdict_named"], rec["difference_named"] = compare(
                rec.get("validated"), named.get("validated"), self.mode
            )
            rec["verdict_named"] = rec["verdict_named"].replace(
                "the best tried mix", f"the file's best mix ({named['name']})"
            )
        return rec

    def _save(self) -> None:
        if self.state_path:
            from peerlab.tune import write_json

            write_json(self.state_path, self.get_state())


def interval(values: list[float]) -> dict:
    """Mean and 95% t-interval of a few seeds' values."""
    from scipy.stats import t

    v = np.asarray(values, float)
    half = float(t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else float("nan")
    return {
        "mean": float(v.mean()),
        "lo": float(v.mean() - half),
        "hi": float(v.mean() + half),
        "n": len(v),
        "values": [float(x) for x in v],
    }


def compare(a: dict | None, b: dict | None, mode: str | None) -> tuple[str, dict | None]:
    """Whether arm a (the recommendation) beat arm b beyond the seed noise: the verdict, and Welch's 95%
    interval of the difference a - b."""
    from scipy.stats import t

    if not a or not b:
        return "not validated", None
    if a["n"] < 2 or b["n"] < 2:
        return "not enough seeds to compare", None
    va, vb = np.var(a["values"], ddof=1) / a["n"], np.var(b["values"], ddof=1) / b["n"]
    diff = a["mean"] - b["mean"]
    se = math.sqrt(va + vb)
    dof = (va + vb) ** 2 / ((va**2 / (a["n"] - 1)) + (vb**2 / (b["n"] - 1))) if se > 0 else 1.0
    half = float(t.ppf(0.975, dof) * se) if se > 0 else 0.0
    difference = {"mean": diff, "lo": diff - half, "hi": diff + half}
    gain = -diff if mode != "max" else diff
    if gain - half > 0:
        return "better than the best tried mix beyond the noise", difference
    if gain + half < 0:
        return "worse than the best tried mix beyond the noise", difference
    return "not better than the best tried mix beyond the noise", difference


# --------------------------------------------------------------------------------------
# The outputs in the sweep folder
# --------------------------------------------------------------------------------------


def write_outputs(search: MixSearch, sweep_dir: Path, datasets: dict | None = None) -> dict[str, Path]:
    """mix_search.parquet, mix_fit.json, recommendation.json and recommended_mix.yaml in `sweep_dir`.

    mix_search.parquet  one row per trial of the search: id, round, kind (anchor, proxy,
                        validation), label, seed, setting, status, step, metric, weight/<domain>,
                        prediction (the fit's, when it was proposed), fitted (the last fit's), and
                        value/<key> (the metric's terms and every eval_* metric of its last report)
    mix_fit.json        every fit: the round it proposed for, its points, each model's
                        cross-validated Spearman and RMSE, the chosen one; and the final fit
    recommendation.json `MixSearch.recommendation()`: weights, predicted metric and interval,
                        validated mean and 95% interval, best tried, the file's best named mix
                        (best_named) and prior with theirs, verdicts against the best tried
                        (verdict, difference) and the best named (verdict_named, difference_named)
    recommended_mix.yaml the recommendation as a `data_mixes:` file (`datasets`: {domain: entry
                        as a dict}, from the mixes file), which --custom-datasets takes as it is
    """
    import pandas as pd
    import yaml

    from peerlab.tune import write_json

    sweep_dir = Path(sweep_dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    rec = search.recommendation()
    rows = []
    for p in search.proposals:
        row = {
            k: p.get(k)
            for k in ("id", "round", "kind", "label", "seed", "status", "step", "metric", "prediction", "fitted")
        }
        row["trial_id"] = p.get("trial_id", p["id"])
        row["setting"] = json.dumps(p.get("setting") or {}, sort_keys=True)
        row.update({f"weight/{d}": w for d, w in zip(search.domains, p["weights"])})
        row.update({f"value/{k}": v for k, v in (p.get("values") or {}).items()})
        rows.append(row)
    paths = {
        "mix_search": sweep_dir / "mix_search.parquet",
        "mix_fit": sweep_dir / "mix_fit.json",
        "recommendation": sweep_dir / "recommendation.json",
    }
    table = pd.DataFrame(rows)
    for col in ("step", "metric", "prediction", "fitted"):
        if col in table:
            table[col] = pd.to_numeric(table[col], errors="coerce")
    tmp = paths["mix_search"].with_name(".mix_search.parquet.tmp")
    table.to_parquet(tmp, index=False)
    tmp.replace(paths["mix_search"])
    final = None
    if rec is not None:
        final = {"n": rec["proxies"], "scores": rec["fit"], "chosen": rec["model"]}
    write_json(
        paths["mix_fit"],
        {
            "metric": rec and rec["metric"],
            "fits": search.fits,
            "final": final,
            "constraints": search.cons.as_dict(),
            "trust_radius": search.trust_radius,
        },
    )
    if rec is not None:
        write_json(paths["recommendation"], rec)
        if datasets:
            entries = []
            for d in search.domains:
                entry = dict(datasets[d])
                entry["weight"] = round(float(rec["weights"][d]), 6)
                entries.append(entry)
            doc = {"data_mixes": {"recommended": {"name": "recommended", "datasets": entries}}}
            paths["recommended_mix"] = sweep_dir / "recommended_mix.yaml"
            head = f"# The mixture search's recommendation ({rec['metric']}, {rec['verdict']}).\n"
            paths["recommended_mix"].write_text(head + yaml.safe_dump(doc, sort_keys=False))
    else:
        paths.pop("recommendation")
    return paths


# --------------------------------------------------------------------------------------
# A sweep's mixture search (experiments/ablate.py --mix-search N)
# --------------------------------------------------------------------------------------

MIN_SHARE = 0.01  # every domain keeps this share in a sweep's mixes: each trial evaluates every domain
OPTION_ALIASES = {  # the mix_search: section's keys, also under the command line's flag names
    "mixes": "mixes",
    "num_mixes": "mixes",
    "mix_search": "mixes",
    "prior": "prior",
    "mix_prior": "prior",
    "concentration": "concentration",
    "mix_concentration": "concentration",
    "bounds": "bounds",
    "mix_bounds": "bounds",
    "max_repeats": "max_repeats",
    "rounds": "rounds",
    "mix_rounds": "rounds",
    "validate_seeds": "validate_seeds",
    "metric": "metric",
}


@dataclass
class MixOptions:
    """The mixture search's settings (the flags of ablate.py, or the search space's `mix_search:` section)."""

    mixes: int  # Dirichlet draws in round 1 (each later round proposes half as many)
    prior: str = "tokens"  # "uniform", "tokens" (each source's share of the tokens) or a mix's name
    concentration: float | None = None  # of the Dirichlet around the prior (default: the number of domains)
    bounds: dict = field(default_factory=dict)  # domain -> (lo, hi)
    max_repeats: float | None = None  # passes over any source at a trial's token budget
    rounds: int = 2
    validate_seeds: int = 3
    metric: str | None = None


def mix_options(section: dict, flags: dict, origin: str = "mix_search") -> MixOptions | None:
    """The options of the section overridden by the flags that were given (None values are not given).

    None when neither asks for a mixture search (no number of mixes).
    """
    values = {}
    for key, value in (section or {}).items():
        if key not in OPTION_ALIASES:
            raise ConfigError(f"{origin}.{key}: unknown key (known: {', '.join(sorted(set(OPTION_ALIASES)))})")
        values[OPTION_ALIASES[key]] = value
    values |= {k: v for k, v in flags.items() if v is not None}
    if values.get("mixes") is None:
        if any(k in values for k in ("prior", "concentration", "bounds", "max_repeats", "rounds", "validate_seeds")):
            raise ConfigError("the mixture search's settings need --mix-search N (or mix_search.mixes) to run it")
        return None
    if isinstance(values.get("bounds"), str):
        values["bounds"] = parse_bounds(values["bounds"])
    elif isinstance(values.get("bounds"), dict):
        try:
            values["bounds"] = {str(k): (float(v[0]), float(v[1])) for k, v in values["bounds"].items()}
        except (TypeError, ValueError, IndexError):
            raise ConfigError(f"{origin}.bounds: expected name: [lo, hi] entries, or 'name=lo:hi,...'") from None
    checks = {"mixes": (int, 1), "rounds": (int, 1), "validate_seeds": (int, 0)}
    for key, (kind, least) in checks.items():
        v = values.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, kind) or v < least):
            raise ConfigError(f"{origin}.{key} (--{_flag(key)}): expected a whole number >= {least}, got {v!r}")
    for key in ("concentration", "max_repeats"):
        v = values.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0):
            raise ConfigError(f"{origin}.{key} (--{_flag(key)}): expected a number > 0, got {v!r}")
    return MixOptions(**values)


def _flag(key: str) -> str:
    return {"mixes": "mix-search", "max_repeats": "max-repeats", "validate_seeds": "validate-seeds"}.get(
        key, f"mix-{key}"
    )


@dataclass
class MixPlan:
    """A sweep's mixture search: its domains (the datasets of the mixes file), the searcher, and its trials."""

    domains: list[str]
    entries: dict[str, dict]  # domain -> its dataset entry (plain data), from the mixes file
    anchors: dict[str, dict[str, float]]  # the file's mixes: name -> {domain: weight}
    settings: list[dict]  # the PEER settings each mix is run under ({} is the base config's)
    base: dict  # the base config as plain data
    options: MixOptions
    metric: str
    mode: str
    prior: dict[str, float]
    tokens: dict[str, int] | None
    budget_tokens: int
    full_steps: int

    def searcher(self, state_path: Path | None = None) -> MixSearch:
        bounds = {d: (max(MIN_SHARE, lo), hi) for d, (lo, hi) in self.options.bounds.items()}
        bounds = {d: bounds.get(d, (MIN_SHARE, 1.0)) for d in self.domains}
        return MixSearch(
            domains=self.domains,
            metric=self.metric,
            mode=self.mode,
            prior=self.prior,
            concentration=self.options.concentration,
            bounds=bounds,
            max_repeats=self.options.max_repeats,
            tokens=self.tokens,
            budget_tokens=self.budget_tokens,
            num_mixes=self.options.mixes,
            rounds=self.options.rounds,
            validate_seeds=self.options.validate_seeds,
            anchors=self.anchors,
            seed=int(self.base["train_config"]["seed"]),
            settings=self.settings,
            full_steps=self.full_steps,
            state_path=state_path,
        )

    def planned(self) -> int:
        """Trials the search runs when every round is full: anchors and round 1, later rounds, validation
        (the recommended, best tried and prior mixes, and the file's best mix, which runs when a proxy beat it)."""
        o = self.options
        per_setting = len(self.anchors) + o.mixes + (o.rounds - 1) * max(2, math.ceil(o.mixes / 2))
        arms = 3 + (1 if self.anchors else 0)
        return (per_setting + arms * o.validate_seeds) * len(self.settings)

    def make_trial(self, suggestion: dict):
        """The Trial of one suggestion of the searcher: the base config with its mix, seed and PEER setting."""
        from peerlab.config import config_from_dict
        from peerlab.tune import Trial, apply_to_config, setting_label

        setting = {k: v for k, v in suggestion.items() if k not in ("mix", "seed", "mix_id")}
        raw = apply_to_config(self.base, setting)
        d = raw["dataset_config"]
        d["datasets"] = [{**self.entries[x], "weight": float(suggestion["mix"][x])} for x in self.domains]
        d["eval_datasets"] = [e for e in d.get("eval_datasets") or [] if e["name"] not in self.domains]
        raw["train_config"]["seed"] = int(suggestion["seed"])
        trial_id = suggestion["mix_id"]
        if raw.get("wandb_config"):
            raw["wandb_config"]["name"] = trial_id
        config_from_dict(raw, origin=f"trial {trial_id}")
        label = re.sub(r"(_x\d+)?_s\d+$", "", trial_id)
        return Trial(trial_id, label, setting_label(setting), int(suggestion["seed"]), setting, raw)

    def describe(self) -> dict:
        """What sweep.json records of the search."""
        o = self.options
        return {
            "domains": self.domains,
            "prior": o.prior,
            "prior_weights": self.prior,
            "concentration": o.concentration or len(self.domains),
            "bounds": {d: list(b) for d, b in o.bounds.items()},
            "min_share": MIN_SHARE,
            "max_repeats": o.max_repeats,
            "tokens": self.tokens,
            "budget_tokens": self.budget_tokens,
            "mixes": o.mixes,
            "rounds": o.rounds,
            "validate_seeds": o.validate_seeds,
            "anchors": self.anchors,
            "settings": self.settings,
            "metric": self.metric,
            "mode": self.mode,
        }


def plan_mix_search(base, mixes: dict, settings: list[dict], options: MixOptions, metric: str, mode: str) -> MixPlan:
    """The mixture search over the datasets of `mixes` (DataMix by key); ConfigError (one line) on bad input.

    A domain is a dataset name; its entry (path, format, ...) is the one the mixes file gives it
    (every mix must give the same one). Token counts are read (local sources only) where the
    prior is "tokens" or a repetition limit is set.
    """
    from peerlab.config import to_dict
    from peerlab.data.sources import count_tokens, is_local
    from peerlab.train.launch import with_steps_per_epoch
    from peerlab.train.optim import total_steps

    entries: dict[str, dict] = {}
    anchors: dict[str, dict[str, float]] = {}
    for mix in mixes.values():
        total = sum(d.weight for d in mix.datasets)
        anchors[mix.name] = {d.name: d.weight / total for d in mix.datasets}
        for d in mix.datasets:
            entry = {k: v for k, v in to_dict(d).items() if k != "weight"}
            if d.name in entries and entries[d.name] != entry:
                raise ConfigError(
                    f"mix {mix.name}: dataset '{d.name}' differs from the same name in another mix; a mixture "
                    f"search needs one source per dataset name"
                )
            entries[d.name] = entry
    domains = list(entries)
    if len(domains) < 2:
        raise ConfigError(f"--mix-search: the mixes file names one dataset ({domains[0]}); a mix needs two or more")
    cfg = base
    t = cfg.train_config
    steps = total_steps(with_steps_per_epoch(cfg).train_config)
    budget = steps * t.per_device_train_batch_size * t.gradient_accumulation_steps * cfg.dataset_config.max_seq_length
    budget *= max(t.num_workers, 1)
    if options.prior not in ("tokens", "uniform", *anchors):
        raise ConfigError(
            f"--mix-prior {options.prior}: expected uniform, tokens or the name of a mix in the mixes file "
            f"(it has: {', '.join(anchors)})"
        )
    bounds = {d: (max(MIN_SHARE, lo), hi) for d, (lo, hi) in options.bounds.items()}
    constraints(domains, {d: bounds.get(d, (MIN_SHARE, 1.0)) for d in domains})  # the bounds alone, before counting
    tokens = None
    if options.prior == "tokens" or options.max_repeats is not None:
        hub = [d for d in domains if not is_local(_entry(entries[d]))]
        if hub:
            why = "--mix-prior tokens" if options.prior == "tokens" else "--max-repeats"
            raise ConfigError(
                f"{why} needs each source's token count, and '{hub[0]}' is a hub dataset (not counted here): "
                f"use --mix-prior uniform or a mix's name, without --max-repeats"
            )
        tok = cfg.dataset_config.tokenizer_name
        tokens = {d: count_tokens(_entry(entries[d]), tok, cfg.dataset_config.heldout_fraction) for d in domains}
    if options.prior == "tokens":
        prior = {d: tokens[d] / sum(tokens.values()) for d in domains}
    elif options.prior == "uniform":
        prior = {d: 1 / len(domains) for d in domains}
    else:
        prior = {d: anchors[options.prior].get(d, 0.0) for d in domains}
    plan = MixPlan(
        domains, entries, anchors, settings or [{}], to_dict(cfg), options, metric, mode, prior, tokens, budget, steps
    )
    searcher = plan.searcher()  # the bounds and repetition limits checked now, before Ray starts
    plan.prior = dict(zip(domains, map(float, searcher.prior)))
    return plan


def _entry(raw: dict):
    from peerlab.config import DatasetEntry

    return DatasetEntry(**raw)
