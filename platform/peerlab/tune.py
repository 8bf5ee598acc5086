"""Ablation sweeps on Ray Tune: the search space, the trial plan, the trainable, the trial records.

A sweep is the product  mixes x PEER settings x seeds. Each trial is one training run
(`peerlab.train.launch.fit`: Ray Train's TorchTrainer) inside a Tune function trainable,
the pattern Ray 2.60 supports (FACTS.md). Its run folder is `<sweep>/trials/<trial id>/`
with the outputs of any run (resolved_config.yaml, metrics.jsonl, usage.parquet,
evals.jsonl, checkpoints/), plus one marker that says how it ended:

    done.json     the run finished (written by the trial itself)
    stopped.json  the scheduler (ASHA) stopped it early (written by the driver)
    error.json    it failed; the error's last line (written by the driver)
    none          it never ran, or the sweep was interrupted while it ran

`--resume` runs every trial without done.json or stopped.json again; an interrupted trial
continues from its newest checkpoint (a run continues by itself from its own folder).
Trial ids are stable names, `<mix>_<setting>_s<seed>`, so a resumed sweep finds its trials.

Search-space keys are `model_config` keys of the PEER part: `peer_config.<key>` (any key
of peer_config), `peer_start_layer` and `use_peer`. Setting `num_experts` alone sets
`product_key_dim` to [sqrt N, sqrt N]; setting `product_key_dim` alone sets `num_experts`.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from peerlab.config import Config, ConfigError, DataMix, PeerConfig, config_from_dict, to_dict

PEER_KEYS = {f"peer_config.{k}" for k in PeerConfig.__dataclass_fields__} | {"peer_start_layer", "use_peer"}
NO_PEER = "no_peer"


@dataclass
class SearchSpace:
    """The PEER part of a sweep: a grid, random samples, and an optional dense baseline arm."""

    grid: dict[str, list] = field(default_factory=dict)  # every combination is a setting
    sample: dict[str, list] = field(default_factory=dict)  # num_samples seeded random picks, crossed with the grid
    num_samples: int = 0
    baseline: bool = False  # add one setting with use_peer: false (the dense MLP everywhere)

    def settings(self, seed: int = 0) -> list[dict]:
        """The PEER settings: {model_config key: value}; {} is the base config's own setting."""
        import numpy as np

        grid_keys = list(self.grid)
        points = [dict(zip(grid_keys, values)) for values in itertools.product(*(self.grid[k] for k in grid_keys))]
        if self.sample and self.num_samples > 0:
            rng = np.random.default_rng(seed)
            picks = []
            for _ in range(self.num_samples):
                pick = {k: v[int(rng.integers(len(v)))] for k, v in self.sample.items()}
                if pick not in picks:
                    picks.append(pick)
            points = [{**p, **q} for p in points for q in picks]
        if self.baseline:
            points.append({"use_peer": False})
        return points

    def to_dict(self) -> dict:
        return {"grid": self.grid, "sample": self.sample, "num_samples": self.num_samples, "baseline": self.baseline}


def _key(key: str, origin: str) -> str:
    key = key.strip().removeprefix("model_config.")
    if key not in PEER_KEYS:
        known = ", ".join(sorted(PEER_KEYS))
        raise ConfigError(f"{origin}: '{key}' cannot be swept; the search space takes the PEER keys: {known}")
    return key


def parse_values(text: str) -> list:
    """'8,16' -> [8, 16]; a YAML list ('[[128,128],[256,256]]') for values that hold commas."""
    text = text.strip()
    values = yaml.safe_load(text) if text.startswith("[") else [yaml.safe_load(v) for v in text.split(",")]
    if not isinstance(values, list) or not values or any(v is None for v in values):
        raise ValueError(f"expected one or more values, got '{text}'")
    return values


def search_space(
    grid: list[str] = (),
    sample: list[str] = (),
    num_samples: int = 0,
    baseline: bool = False,
    path: str | Path | None = None,
    section: dict | None = None,
    origin: str = "search_space",
) -> SearchSpace:
    """The search space of `--grid KEY=V1,V2`, `--sample KEY=V1,V2`, `--baseline` and a YAML section.

    The section comes from a file's top-level `search_space:` (`path`), or is given as it is
    (`section`, e.g. written inline in a mixes file; `origin` names it in error messages). It
    holds `grid:` and `sample:` mappings of key -> list of values, `num_samples:` and
    `baseline:`; the command line adds to it.
    """
    space = SearchSpace()
    if path:
        try:
            raw = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as err:
            raise ConfigError(f"{path}: cannot read the search space: {str(err).splitlines()[0]}") from None
        section = (raw or {}).get("search_space") if isinstance(raw, dict) else None
        if not isinstance(section, dict):
            raise ConfigError(
                f"{path}: expected a top-level 'search_space:' mapping (grid, sample, num_samples, baseline)"
            )
        origin = f"{path}: search_space"
    if section is not None:
        for k in section:
            if k not in ("grid", "sample", "num_samples", "baseline"):
                raise ConfigError(f"{origin}.{k}: unknown key (known: grid, sample, num_samples, baseline)")
        for part in ("grid", "sample"):
            body = section.get(part) or {}
            if not isinstance(body, dict):
                raise ConfigError(f"{origin}.{part}: expected a mapping of key -> list of values")
            for key, values in body.items():
                if not isinstance(values, list) or not values:
                    raise ConfigError(f"{origin}.{part}.{key}: expected a non-empty list of values")
                getattr(space, part)[_key(str(key), f"{origin}.{part}")] = values
        space.num_samples, space.baseline = section.get("num_samples") or 0, section.get("baseline", False)
        if not isinstance(space.num_samples, int) or isinstance(space.num_samples, bool) or space.num_samples < 0:
            raise ConfigError(f"{origin}.num_samples: expected a whole number >= 0, got {space.num_samples!r}")
        if not isinstance(space.baseline, bool):
            raise ConfigError(f"{origin}.baseline: expected true or false, got {space.baseline!r}")
    for flag, items in (("--grid", grid), ("--sample", sample)):
        for item in items:
            key, eq, text = item.partition("=")
            if not eq:
                raise ConfigError(f"{flag} {item}: expected KEY=VALUE1,VALUE2")
            try:
                values = parse_values(text)
            except (ValueError, yaml.YAMLError) as err:
                raise ConfigError(f"{flag} {item}: {str(err).splitlines()[0]}") from None
            target = space.grid if flag == "--grid" else space.sample
            target[_key(key, flag)] = values
    space.num_samples = num_samples or space.num_samples
    space.baseline = baseline or space.baseline
    if space.sample and space.num_samples < 1:
        raise ConfigError("--sample needs --num-samples N (or search_space.num_samples) of at least 1")
    return space


def check_metric(metric: str, datasets: set[str]) -> None:
    """The sweep's metric must be one the training runs report: loss, or a held-out metric of a dataset or the mean."""
    allowed = {"loss", "eval_loss/mean", "eval_bpb/mean"} | {f"eval_{m}/{d}" for m in ("loss", "bpb") for d in datasets}
    if metric not in allowed:
        raise ConfigError(f"--metric {metric}: not a metric the runs report; use one of {', '.join(sorted(allowed))}")


def setting_label(setting: dict) -> str:
    """A short readable name: 'num_experts_per_tok=16,query_dim=32', 'no_peer', or 'default'."""
    if setting.get("use_peer") is False:
        return NO_PEER
    if not setting:
        return "default"
    return ",".join(f"{k.removeprefix('peer_config.')}={_short(v)}" for k, v in setting.items())


def _short(value) -> str:
    if isinstance(value, list):
        return "x".join(str(v) for v in value)
    return str(value).lower() if isinstance(value, bool) else str(value)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9=.+-]+", "_", text).strip("_")


def apply_setting(model_config: dict, setting: dict) -> dict:
    """The model_config dict with one PEER setting applied (num_experts and product_key_dim kept consistent)."""
    out = json.loads(json.dumps(model_config))
    peer = out["peer_config"]
    for key, value in setting.items():
        if key.startswith("peer_config."):
            peer[key.removeprefix("peer_config.")] = value
        else:
            out[key] = value
    if "peer_config.num_experts" in setting and "peer_config.product_key_dim" not in setting:
        n = int(setting["peer_config.num_experts"])
        root = math.isqrt(n)
        if root * root != n:
            raise ConfigError(
                f"peer_config.num_experts={n} is not a square: also sweep peer_config.product_key_dim (n1 x n2 = N)"
            )
        peer["product_key_dim"] = [root, root]
    elif "peer_config.product_key_dim" in setting and "peer_config.num_experts" not in setting:
        n1, n2 = setting["peer_config.product_key_dim"]
        peer["num_experts"] = int(n1) * int(n2)
    return out


@dataclass
class Trial:
    """One cell of the sweep with one seed: its id, labels and full resolved config."""

    trial_id: str
    mix: str
    setting: str
    seed: int
    overrides: dict
    config: dict  # the full config as plain data (config_from_dict accepts it)

    @property
    def cell(self) -> str:
        return f"{self.mix} | {self.setting}"


def plan_trials(base: Config, mixes: dict[str, DataMix], space: SearchSpace, seeds: int) -> list[Trial]:
    """Every trial of the sweep, each config resolved and validated; ConfigError names the trial.

    Trials run in this order: seed by seed, setting by setting, and within a setting every mix.
    So the first trials to finish cover every mix, and early stopping compares a trial with
    other mixes' rungs, not only with a same-mix neighbour that is a near-tie.
    """
    base_raw = to_dict(base)
    seed0 = base.train_config.seed
    trials, ids = [], set()
    for s in range(seeds):
        for setting in space.settings(seed0):
            label = setting_label(setting)
            for mix in mixes.values():
                trial_id = _slug(f"{mix.name}_{label}_s{seed0 + s}")
                if trial_id in ids:  # two labels that slug alike: keep ids unique and stable
                    trial_id = f"{trial_id}_{len(trials)}"
                ids.add(trial_id)
                raw = json.loads(json.dumps(base_raw))
                try:
                    raw["model_config"] = apply_setting(raw["model_config"], setting)
                except ConfigError as err:
                    raise ConfigError(f"trial {trial_id}: {err}") from None
                raw["dataset_config"]["datasets"] = [to_dict(d) for d in mix.datasets]
                raw["train_config"]["seed"] = seed0 + s
                try:
                    config_from_dict(raw, origin=f"trial {trial_id}")
                except ConfigError as err:
                    raise ConfigError(f"{err} (setting {label} on mix {mix.name})") from None
                trials.append(Trial(trial_id, mix.name, label, seed0 + s, setting, raw))
    return trials


# --------------------------------------------------------------------------------------
# The trial records in the sweep folder
# --------------------------------------------------------------------------------------

MARKERS = {"done.json": "finished", "stopped.json": "stopped", "error.json": "failed"}


def trial_dir(sweep_dir: Path, trial_id: str) -> Path:
    return Path(sweep_dir) / "trials" / trial_id


def trial_status(run_dir: Path) -> tuple[str, dict]:
    """('finished' | 'stopped' | 'failed' | 'unfinished', the marker's content)."""
    for name, status in MARKERS.items():
        path = Path(run_dir) / name
        if path.is_file():
            return status, json.loads(path.read_text())
    return "unfinished", {}


def mark(run_dir: Path, name: str, content: dict) -> None:
    """Write one marker (atomically) after removing the others."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    for other in MARKERS:
        (run_dir / other).unlink(missing_ok=True)
    write_json(run_dir / name, content)


def write_json(path: Path, content: dict) -> None:
    """Write JSON through a temporary file and a rename: a crash never leaves half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(content, indent=1))
    tmp.replace(path)


# --------------------------------------------------------------------------------------
# The trainable (runs in the trial's Ray actor)
# --------------------------------------------------------------------------------------


def run_trial(params: dict) -> None:
    """Tune function trainable: one training run on Ray Train; its metrics reach Tune as it goes.

    With train_config.num_workers = 0 the loop runs in this actor (Train's local mode: no
    start-up of a worker group, the right choice for CPU sweeps); with N >= 1 a worker group
    of N is started and TuneReportCallback forwards rank 0's metrics.
    """
    from peerlab.train.launch import fit

    spec = params["trial"]
    cfg = config_from_dict(spec["config"], origin=f"trial {spec['trial_id']}")
    run_dir = Path(spec["run_dir"])
    for name in MARKERS:
        (run_dir / name).unlink(missing_ok=True)
    callbacks, options = [], {"report_to": "tune"}  # local mode: the loop reports to Tune itself
    if cfg.train_config.num_workers > 0:
        from ray.tune.integration.ray_train import TuneReportCallback

        callbacks, options = [TuneReportCallback()], {}
    start = time.time()
    result = fit(cfg, run_dir, quiet=True, callbacks=callbacks, **options)
    if result.error is not None:
        raise result.error
    mark(run_dir, "done.json", {"wall_s": time.time() - start, "finished_at": time.time()})


def resolved_run_config(trial: Trial, sweep_dir: Path) -> dict:
    """What the trainable receives: the trial's config with output_dir inside the sweep folder."""
    from peerlab.train.launch import absolute_paths

    raw = to_dict(absolute_paths(config_from_dict(trial.config)))  # trial actors run in other folders
    raw["train_config"]["output_dir"] = str(Path(sweep_dir).resolve() / "trials")
    return {
        "trial_id": trial.trial_id,
        "config": raw,
        "run_dir": str(trial_dir(Path(sweep_dir).resolve(), trial.trial_id)),
    }


# --------------------------------------------------------------------------------------
# The driver: one Tuner over the trials that are still to run
# --------------------------------------------------------------------------------------


@dataclass
class Resources:
    """What each trial gets: CPUs and GPUs of its actor, and Ray Train workers (0: Train's local mode)."""

    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    workers_per_trial: int = 0
    max_concurrent: int = 1


@dataclass
class Schedule:
    """ASHA early stopping (`scheduler="asha"`) on `metric`, or every trial to the end (None)."""

    scheduler: str | None = None
    metric: str = "eval_bpb/mean"
    mode: str = "min"
    grace_steps: int | None = None  # steps before ASHA's first cut (default: the metric's first report, `first_cut`)
    reduction_factor: int = 2


def run_sweep(
    trials: list[Trial], sweep_dir: Path, resources: Resources, schedule: Schedule, total: int, verbose: bool = False
) -> dict[str, str]:
    """Run `trials` with Ray Tune; returns {trial id: status}. `total` counts the whole sweep (for progress).

    Prints a line per trial per report of the sweep's metric (each evaluation) and per trial
    that ends; `verbose` adds Tune's own status output.
    """
    from ray import tune
    from ray.tune.schedulers import FIFOScheduler, TrialScheduler

    # Held-out metrics come every eval_steps, not in every report: ASHA waits for them (Tune's strict check would fail).
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    sweep_dir = Path(sweep_dir).resolve()
    steps_of = {t.trial_id: _steps(t) for t in trials}
    steps = max(steps_of.values())
    by_id = {t.trial_id: t for t in trials}

    def our_trial(tune_trial) -> Trial:
        return by_id[tune_trial.config["trial"]["trial_id"]]

    class RecordingASHA(FIFOScheduler):
        """ASHA by `Rungs` (Ray's rule with re-checks); writes stopped.json in every trial it stops early."""

        def __init__(self, rungs: Rungs):
            super().__init__()
            self.rungs, self.stopped = rungs, 0

        def on_trial_result(self, tune_controller, trial, result):
            ours, value = our_trial(trial), result.get(schedule.metric)
            if value is None or "step" not in result or result["step"] >= steps_of[ours.trial_id]:
                return TrialScheduler.CONTINUE  # no metric here, or its last step: it writes its final outputs
            if self.rungs.report(ours.trial_id, result["step"], value if schedule.mode == "max" else -value):
                return TrialScheduler.CONTINUE
            self.stopped += 1
            mark(trial_dir(sweep_dir, ours.trial_id), "stopped.json", {"step": result["step"], schedule.metric: value})
            return TrialScheduler.STOP

        def debug_string(self) -> str:
            return f"ASHA (peerlab.tune.Rungs): rungs at steps {sorted(self.rungs.recorded)}, {self.stopped} stopped"

    done_before = total - len(trials)
    best: dict = {}

    class Progress(tune.Callback):
        """A line per trial per report of the metric, and per trial that ends: done, running, pending, the best."""

        def on_trial_result(self, iteration, trials, trial, result, **info):
            value = result.get(schedule.metric)
            if value is None or "step" not in result:
                return
            ours = our_trial(trial)
            print(
                f"  {ours.trial_id} step {result['step']}/{steps_of[ours.trial_id]}: "
                f"{schedule.metric} {value:.4f}  ({result.get('time_total_s', 0.0):.0f} s)",
                flush=True,
            )

        def _line(self, trials_now, trial, how: str) -> None:
            ours = our_trial(trial)
            value = (trial.last_result or {}).get(schedule.metric)
            if value is not None and how == "done":  # a stopped trial's metric is from an earlier step
                better = not best or (value < best["value"] if schedule.mode == "min" else value > best["value"])
                if better:
                    best.update(value=value, cell=ours.cell, trial=ours.trial_id)
            running = sum(t.status == "RUNNING" and t is not trial for t in trials_now)
            ended = done_before + sum(t.status in ("TERMINATED", "ERROR") or t is trial for t in trials_now)
            status = {"RUNNING": running, "PENDING": total - ended - running}  # Tune creates trials as slots free up
            shown = f"{schedule.metric} {value:.4f}" if value is not None else "no metric"
            lead = f"; best so far {best['cell']} ({best['value']:.4f})" if best else ""
            print(
                f"[{ended}/{total} done, {status['RUNNING']} running, {status['PENDING']} pending] "
                f"{ours.trial_id} {how}: {shown}{lead}",
                flush=True,
            )

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._line(trials, trial, "stopped early" if _status(sweep_dir, our_trial(trial)) == "stopped" else "done")

        def on_trial_error(self, iteration, trials, trial, **info):
            self._line(trials, trial, "failed")

    scheduler = None
    if schedule.scheduler == "asha":
        grace = schedule.grace_steps or first_cut([t.config for t in trials], schedule.metric, steps)
        # max_t past the last step, and no stop at the last step (above): a trial always ends by itself.
        scheduler = RecordingASHA(Rungs(grace, steps + 1, schedule.reduction_factor))
    trainable = tune.with_resources(run_trial, {"CPU": resources.cpus_per_trial, "GPU": resources.gpus_per_trial})
    specs = [resolved_run_config(t, sweep_dir) for t in trials]
    tuner = tune.Tuner(
        trainable,
        param_space={"trial": tune.grid_search(specs)},
        tune_config=tune.TuneConfig(
            scheduler=scheduler,
            metric=schedule.metric if scheduler else None,
            mode=schedule.mode if scheduler else None,
            max_concurrent_trials=resources.max_concurrent,
            trial_dirname_creator=lambda t: t.config["trial"]["trial_id"],
            trial_name_creator=lambda t: t.config["trial"]["trial_id"],
        ),
        run_config=tune.RunConfig(
            name="tune",
            storage_path=str(sweep_dir / ".ray"),
            callbacks=[Progress()],
            verbose=1 if verbose else 0,
            failure_config=tune.FailureConfig(max_failures=0),
        ),
    )
    with contextlib.nullcontext() if verbose else tune_output_to(sweep_dir / ".ray" / "tune.log"):
        results = tuner.fit()
    for result in results:
        if result.error is not None:
            trial_id = result.config["trial"]["trial_id"]
            lines = [line for line in str(result.error).strip().splitlines() if line.strip()]
            mark(trial_dir(sweep_dir, trial_id), "error.json", {"error": error_line(lines)})
    return {t.trial_id: _status(sweep_dir, t) for t in trials}


@contextlib.contextmanager
def tune_output_to(path: Path):
    """Tune's own console output (its experiment table, trial error tracebacks, warnings) into `path`.

    Tune logs through the `ray.tune` logger, and its default reporter prints its experiment
    table and every trial error whatever the verbosity: the legacy reporter
    (RAY_AIR_NEW_OUTPUT=0) prints nothing at verbose=0. The sweep prints its own lines.
    """
    logger = logging.getLogger("ray.tune")
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    saved = logger.propagate, os.environ.get("RAY_AIR_NEW_OUTPUT")
    logger.addHandler(handler)
    logger.propagate = False
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    try:
        yield
    finally:
        logger.removeHandler(handler)
        handler.close()
        logger.propagate = saved[0]
        if saved[1] is None:
            os.environ.pop("RAY_AIR_NEW_OUTPUT", None)
        else:
            os.environ["RAY_AIR_NEW_OUTPUT"] = saved[1]


class Rungs:
    """ASHA's rungs (Li et al. 2020, asynchronous successive halving), with re-checks.

    Rungs fall at grace x rf^k steps below max_t. A trial's reward (higher is better) is
    recorded at each rung it reaches, and it goes on only while it is in the top 1/rf of the
    results recorded at every rung it has passed: at or above the (1 - 1/rf) percentile of
    the other trials' results there. Ray's AsyncHyperBandScheduler makes that decision once,
    when the trial reaches the rung, against the results already there, so the first trials
    to arrive always go on (the first has nothing to lose to). Here it is made again at each
    of the trial's later reports, against every result recorded since: in a small sweep the
    trials that happened to get there first face the same test as the rest, and a trial so
    stopped leaves the later rungs it should not have reached. Trials run one after another
    are decided exactly as Ray decides them (a test checks this against Ray's _Bracket).
    """

    def __init__(self, grace: int, max_t: int, rf: float):
        count = int(math.log(max_t / grace) / math.log(rf) + 1)  # as Ray's _Bracket
        self.rf = rf
        self.recorded: dict[int, dict[str, float]] = {int(grace * rf**k): {} for k in range(count)}

    def report(self, trial_id: str, step: int, reward: float) -> bool:
        """Record `reward` at the highest rung `step` has reached (once per rung); True: go on."""
        for milestone in sorted(self.recorded, reverse=True):
            if step >= milestone and trial_id not in self.recorded[milestone]:
                self.recorded[milestone][trial_id] = reward
                break
        milestones = sorted(self.recorded)
        for i, milestone in enumerate(milestones):
            results = self.recorded[milestone]
            others = [r for t, r in results.items() if t != trial_id]
            if trial_id in results and others:
                if results[trial_id] < np.nanpercentile(others, (1 - 1 / self.rf) * 100):
                    for later in milestones[i + 1 :]:  # it should not have passed this rung: its later
                        self.recorded[later].pop(trial_id, None)  # results do not count against others
                    return False
        return True


def error_line(lines: list[str]) -> str:
    """The line of a Ray-wrapped traceback that says what went wrong (the last 'SomethingError: ...')."""
    for line in reversed(lines):
        if re.match(r"^\s*[\w.]+(Error|Exception)\b", line):
            return line.strip()
    return lines[-1].strip() if lines else "unknown error"


def first_cut(configs: list[dict], metric: str, steps: int) -> int:
    """ASHA's default grace period: the first step at which every trial (its config) has reported `metric`.

    Held-out metrics (`eval_*`) come every `eval_steps`, the training loss every
    `logging_steps`; ASHA can compare trials from their first report on (Ray's own default
    grace period is 1, the first report). A quarter of the run where a trial never reports
    the metric before its end.
    """
    every = "eval_steps" if metric.startswith("eval_") else "logging_steps"
    firsts = [c["train_config"].get(every) or 0 for c in configs]
    first = max(firsts, default=0)
    return first if 0 < first < steps else max(1, steps // 4)


def _steps(trial: Trial) -> int:
    """The trial's optimizer steps, as its run will count them (epochs over unstreamed data included)."""
    from peerlab.train.launch import with_steps_per_epoch
    from peerlab.train.optim import total_steps

    return total_steps(with_steps_per_epoch(config_from_dict(trial.config)).train_config)


def _status(sweep_dir: Path, trial: Trial) -> str:
    return trial_status(trial_dir(sweep_dir, trial.trial_id))[0]
