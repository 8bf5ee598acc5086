"""Ablation sweep: data mixes x PEER settings x seeds, one training run per trial, on Ray Tune.

    python experiments/ablate.py --custom-datasets configs/datasets.yaml
        [--config FILE] [--set KEY=VALUE ...] [--mixes a,b]
        [--grid peer_config.num_experts_per_tok=8,16 ...] [--sample KEY=V1,V2 ... --num-samples N]
        [--baseline [dense,moe,pkm] [--match flops|params|active]] [--search-space FILE] [--seeds N] [--name SWEEP]
        [--scheduler asha] [--metric eval_bpb/mean] [--mode min] [--grace-steps N]
        [--max-concurrent N] [--cpus-per-trial X] [--gpus-per-trial X] [--workers-per-trial N]
        [--address ADDR] [--resume] [--dry-run] [--no-report] [--verbose]
        [--mix-search N [--mix-prior tokens|uniform|MIX] [--mix-concentration C]
         [--mix-bounds name=lo:hi,...] [--max-repeats R] [--mix-rounds K] [--validate-seeds S]]
        [--ladder S1,S2,... [--promote F] [--pin CELL ...] [--target-flops X]]

`--mix-search N` searches the mix instead of ranking the file's: the domains are the datasets
the mixes file names; round 1 runs N mixes drawn around the prior plus the file's own mixes,
each later round the optimum of a regression fitted to every result so far, and a validation
round runs the recommended mix, the best tried one and the prior with S seeds each
(peerlab.mixsearch). It writes mix_search.parquet, mix_fit.json, recommendation.json and
recommended_mix.yaml. The same settings can sit in the search space's `mix_search:` section.
--metric may be a weighted sum: 'eval_bpb/code*0.5+eval_bpb/prose*0.5'.

`--ladder 0.5,1,2` runs the sweep at those multiples of the base config's compute (or at
preset config files), each a model and token budget by peerlab.ladder.scale_config's rule:
every cell at the smallest scale, the better `--promote` share of each scale's cells (and the
`--pin`ned ones) at the next. It adds ladder.parquet and the report's "Across scales" section
(rank agreement with the largest scale, a power law per cell extrapolated to --target-flops).
The same settings can sit in the search space's `ladder:` section.

`--baseline` adds a dense arm (use_peer: false, the setting `no_peer`); `--baseline dense,moe,pkm`
adds one setting per arm (ffn_type dense, moe, pkm), crossed with the mixes and seeds. With
`--match flops` (or `params`, `active`) each arm is sized so that its training FLOPs per token
(or parameters, or active parameters) match the base config's PEER cell within 5%
(peerlab.arms.match_arm: dense by intermediate_size, MoE by expert_size, PKM by k or its key
sizes); without it the arms run as the config writes them. The plan (and --dry-run) shows each
arm's size, parameters, FLOPs per token and ratio to the PEER cell. The same settings can sit
in the search space (`baseline: [dense, moe]`, `match: flops`).

The mixes file may name the sweep's base config (`base_config:`) and its PEER search space
(`search_space:`, a file or the section inline), relative to itself: configs/datasets.yaml
names configs/demo.yaml and configs/search-demo.yaml, so the command above alone runs the
embedded default sweep. --config and --search-space override them; without either, the
base config is configs/config.yaml.

Every trial's config is resolved and validated, every mix's data checked, and the memory
each trial needs held against the machine, before Ray starts: a sweep that cannot run
fails at once with one line (exit 2). Results go to <output_dir>/<sweep name>/: sweep.json
(the plan), trials/<trial id>/ (each run's folder), trials.parquet, curves.parquet,
usage.parquet, evals.parquet and, at the end, the analysis report (analysis/report.py).
output_dir may be object storage (s3://bucket/prefix): the sweep then runs in a local temporary
copy of that folder, mirrored to the URI every 30 s and once more, tables and report included,
when it ends or is stopped.

`--resume` continues an interrupted sweep from its sweep.json: trials that finished (or that
ASHA stopped) are not run again; the others continue from their newest checkpoint.
Trials run in Ray Train's local mode (`--workers-per-trial 0`, the default on CPU: no
worker-group start-up per trial) or on N Ray Train workers each (`--workers-per-trial N`,
for GPUs and clusters). Ctrl-C stops the sweep cleanly; run it again with --resume.
The console shows the plan, a line per trial per evaluation and a line per trial that ends;
Ray's own output stays in its logs unless --verbose.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from peerlab import storage  # noqa: E402
from peerlab.arms import ARMS, plan_arms, plan_lines  # noqa: E402
from peerlab.cli import (  # noqa: E402
    INTERRUPTED,
    UsageError,
    add_config_arguments,
    add_verbose_argument,
    checked_data,
    checked_evals,
    checked_storage,
    config_from_arguments,
)
from peerlab.config import ConfigError, TrainConfig, config_from_dict, load_mixes_file, to_dict  # noqa: E402
from peerlab.ladder import LadderError, cell_means, ladder_options, parse_scales  # noqa: E402
from peerlab.mixsearch import MixPlan, mix_options, plan_mix_search  # noqa: E402
from peerlab.tune import (  # noqa: E402
    NO_PEER,
    OptunaPlan,
    Resources,
    Schedule,
    Trial,
    _slug,
    check_metric,
    check_optuna_space,
    plan_trials,
    search_space,
    trial_dir,
    trial_status,
    write_json,
)

DATA_CPUS = 0.1  # what each dataset's Ray Data read task asks for (peerlab.data.mixture.DataOptions.data_cpus)
DEFAULT_CONFIG = "configs/config.yaml"  # the base config when neither --config nor the mixes file names one


def arguments(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_arguments(ap, None, help=f"base config (default: the mixes file's base_config, else {DEFAULT_CONFIG})")
    ap.add_argument(
        "--custom-datasets",
        required=True,
        help="YAML file of named data mixes (data_mixes:), and optionally base_config: and search_space:",
    )
    ap.add_argument("--mixes", help="comma-separated mix names to sweep (default: every mix in the file)")
    ap.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2", help="grid over a PEER key")
    ap.add_argument("--sample", action="append", default=[], metavar="KEY=V1,V2", help="random picks of a PEER key")
    ap.add_argument(
        "--num-samples", type=int, default=0, help="random points drawn from the --sample values (or Optuna's trials)"
    )
    ap.add_argument(
        "--search",
        choices=["grid", "optuna"],
        default="grid",
        help="grid: the grid x seeded random samples; optuna: Ray Tune's OptunaSearch (TPE) over the --sample "
        "ranges ('KEY=int:4:32', 'KEY=loguniform:1e-4:3e-3') and the mixes, --num-samples trials",
    )
    ap.add_argument(
        "--baseline",
        nargs="?",
        const="dense",
        metavar="ARMS",
        help="add baseline arms, one setting each: dense (alone the default: use_peer false, the setting no_peer), "
        "moe, pkm; e.g. --baseline dense,moe,pkm",
    )
    ap.add_argument(
        "--match",
        metavar="QUANTITY",
        help="size each --baseline arm to the PEER cell's: flops (training FLOPs per token), params (all "
        "parameters) or active (parameters per token), within 5%% (default: the arms as the config writes them)",
    )
    ap.add_argument(
        "--search-space",
        help="YAML file with a search_space: section (grid, sample, num_samples); default: the mixes file's",
    )
    ap.add_argument("--seeds", type=int, default=1, help="seeds per cell (train_config.seed, +1, ...)")
    ap.add_argument("--name", help="sweep name: results go to <output_dir>/<name> (default: sweep_<mixes file>)")
    ap.add_argument("--scheduler", choices=["asha", "none"], default="none", help="ASHA early stopping, or none")
    ap.add_argument(
        "--metric",
        help="metric for ASHA, the search and 'best', or a weighted sum 'eval_bpb/code*0.5+eval_bpb/prose*0.5' "
        "(default eval_bpb/mean)",
    )
    ap.add_argument("--mode", choices=["min", "max"], default="min")
    ap.add_argument(
        "--grace-steps",
        type=int,
        help="ASHA: steps before the first cut (default: the metric's first report, e.g. eval_steps)",
    )
    ap.add_argument("--max-concurrent", type=int, help="trials at once (default: what the resources allow)")
    ap.add_argument("--cpus-per-trial", type=float, help="CPUs of each trial (default: shared out)")
    ap.add_argument(
        "--gpus-per-trial",
        type=float,
        help="GPUs of each trial in local mode (default: 1 if GPUs); a fraction (0.25) runs several trials on one "
        "GPU, each with that share of its memory as a cap",
    )
    ap.add_argument("--workers-per-trial", type=int, default=0, help="Ray Train workers per trial (0: local mode)")
    ap.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else a local cluster)")
    ap.add_argument("--resume", action="store_true", help="continue the sweep of this name")
    ap.add_argument("--dry-run", action="store_true", help="plan, validate and print the trials; start nothing")
    ap.add_argument("--no-report", action="store_true", help="skip the analysis report at the end")
    mix = ap.add_argument_group("mixture search (peerlab.mixsearch)")
    mix.add_argument("--mix-search", type=int, metavar="N", help="search the mix: N mixes in round 1")
    mix.add_argument("--mix-prior", help="uniform, tokens (each source's share of the tokens) or a mix's name")
    mix.add_argument("--mix-concentration", type=float, help="Dirichlet concentration around the prior")
    mix.add_argument("--mix-bounds", metavar="NAME=LO:HI,...", help="bounds on each domain's weight")
    mix.add_argument("--max-repeats", type=float, help="no source read more passes than this in a trial")
    mix.add_argument("--mix-rounds", type=int, help="rounds of proxies (default 2)")
    mix.add_argument("--validate-seeds", type=int, help="seeds per arm of the validation round (default 3)")
    lad = ap.add_argument_group("scale ladder (peerlab.ladder)")
    lad.add_argument(
        "--ladder",
        metavar="S1,S2,...",
        help="run the sweep at these multiples of the base config's compute (or preset config files), smallest first",
    )
    lad.add_argument(
        "--promote", type=float, help="share of a scale's cells that go up to the next (default 0.5; 1: every cell)"
    )
    lad.add_argument(
        "--pin",
        action="append",
        default=[],
        metavar="CELL",
        help="a cell that goes up whatever its rank: 'mix | setting', a mix, a setting, or a mixes file "
        "(a mixture search's recommended_mix.yaml) whose mixes join the sweep",
    )
    lad.add_argument("--target-flops", type=float, help="the compute the report extrapolates each cell's curve to")
    add_verbose_argument(ap)
    return ap.parse_args(argv)


def plan(args: argparse.Namespace) -> tuple[list[Trial], dict, MixPlan | OptunaPlan | None]:
    """The trials, the sweep's description and its mixture search (if any); UsageError on anything wrong.

    With a mixture search or an Optuna search the trials come as it goes: the list holds trials
    of the kind it makes (one per PEER setting on the prior mix; seeded draws for Optuna), what
    the resources and the memory check are sized on.
    """
    try:
        mixes_file = load_mixes_file(args.custom_datasets)
    except ConfigError as err:
        raise UsageError(str(err)) from None
    mixes = mixes_file.mixes
    config_from = "--config" if args.config else args.custom_datasets if mixes_file.base_config else "default"
    args.config = args.config or str(mixes_file.base_config or DEFAULT_CONFIG)
    base = config_from_arguments(args)
    configured_workers = base.train_config.num_workers  # a sweep's trials run on --workers-per-trial instead
    named = mixes_file.search_space  # the mixes file's: a file, or the section inline; --search-space overrides it
    section = named if isinstance(named, dict) and not args.search_space else None
    space_file = args.search_space or (str(named) if named is not None and section is None else None)
    try:
        origin = f"{args.custom_datasets}: search_space"
        space = search_space(
            args.grid, args.sample, args.num_samples, args.baseline, space_file, section, origin, args.match
        )
    except ConfigError as err:
        raise UsageError(str(err)) from None
    if args.mixes:
        wanted = [m.strip() for m in args.mixes.split(",") if m.strip()]
        by_name = {m.name: m for m in mixes.values()} | mixes
        unknown = [m for m in wanted if m not in by_name]
        if unknown:
            known = ", ".join(m.name for m in mixes.values())
            raise UsageError(f"--mixes: no mix '{unknown[0]}' in {args.custom_datasets} (it has: {known})")
        mixes = {by_name[m].key: by_name[m] for m in wanted}
    if args.seeds < 1:
        raise UsageError("--seeds must be >= 1")
    if args.workers_per_trial < 0:
        raise UsageError("--workers-per-trial must be >= 0")
    if args.max_concurrent is not None and args.max_concurrent < 1:
        raise UsageError(f"--max-concurrent {args.max_concurrent}: must be >= 1")
    if args.cpus_per_trial is not None and not args.cpus_per_trial > 0:
        raise UsageError(f"--cpus-per-trial {args.cpus_per_trial:g}: must be > 0")
    if args.grace_steps is not None and args.grace_steps < 1:
        raise UsageError(f"--grace-steps {args.grace_steps}: must be >= 1")
    flags = {
        "mixes": args.mix_search,
        "prior": args.mix_prior,
        "concentration": args.mix_concentration,
        "bounds": args.mix_bounds,
        "max_repeats": args.max_repeats,
        "rounds": args.mix_rounds,
        "validate_seeds": args.validate_seeds,
    }
    mixplan = optuna_plan = None
    try:
        where = f"{space_file}: search_space.mix_search" if space_file else f"{origin}.mix_search"
        options = mix_options(space.mix_search, flags, where)
        ladder = ladder_options(
            space.ladder,
            {"scales": args.ladder, "promote": args.promote, "pin": args.pin, "target_flops": args.target_flops},
            f"{space_file}: search_space.ladder" if space_file else f"{origin}.ladder",
        )
        if ladder is not None:
            if options is not None:
                raise ConfigError(
                    "--ladder runs named mixes: run the --mix-search first, then pin its recommendation "
                    "(--pin <its sweep folder>/recommended_mix.yaml)"
                )
            if args.search == "optuna":
                raise ConfigError("--ladder ranks a grid's cells across scales; --search optuna is not crossed with it")
            mixes = with_pinned_mixes(mixes, ladder.pin)
        args.metric = args.metric or (options.metric if options else None) or "eval_bpb/mean"
        evaluated = {d.name for d in base.dataset_config.eval_datasets}  # (every trial evaluates them too)
        check_metric(args.metric, {d.name for m in mixes.values() for d in m.datasets} | evaluated)
        if args.search == "optuna":
            if options is not None:
                raise ConfigError(
                    "--search optuna runs on the file's mixes; --mix-search crosses with grid or sample settings"
                )
            if args.seeds > 1:
                raise ConfigError("--seeds: an Optuna search runs one seed per trial; rank its best with a grid after")
            keys = check_optuna_space(space)
            raw = to_dict(base)
            raw["train_config"].update(num_workers=args.workers_per_trial, resume_from_checkpoint=None)
            optuna_plan = OptunaPlan(
                raw, {m.name: m for m in mixes.values()}, keys, space.num_samples, args.metric, args.mode
            )
            trials = plan_trials(config_from_dict(raw, origin=args.config), mixes, space, 1)  # draws: memory, resources
        elif ladder is not None:
            trials, info_ladder = plan_ladder(base, mixes, space, args.seeds, ladder, args.workers_per_trial)
        elif options is None:
            trials = plan_trials(base, mixes, space, args.seeds)
        else:
            if args.seeds > 1:
                raise ConfigError("--seeds: a mixture search validates with --validate-seeds S (its own seeds)")
            raw = to_dict(base)  # how each trial runs, as below for a grid: on N Train workers, or local mode
            raw["train_config"].update(num_workers=args.workers_per_trial, resume_from_checkpoint=None)
            base = config_from_dict(raw, origin=args.config)
            settings = space.settings(base.train_config.seed, base)
            for mix in mixes.values():  # the demo corpus prepared, every source checked: the search counts tokens
                checked_data(config_from_dict({**raw, "dataset_config": {**raw["dataset_config"],
                                              "datasets": [to_dict(d) for d in mix.datasets]}}))  # fmt: skip
            mixplan = plan_mix_search(base, mixes, settings, options, args.metric, args.mode)
            seed = base.train_config.seed
            trials = [
                mixplan.make_trial({"mix": mixplan.prior, "seed": seed, "mix_id": f"prior_x{i}_s{seed}", **setting})
                for i, setting in enumerate(mixplan.settings)
            ]
    except (ConfigError, LadderError) as err:
        raise UsageError(str(err)) from None
    default_workers = TrainConfig.__dataclass_fields__["num_workers"].default
    if configured_workers not in (args.workers_per_trial, default_workers):  # the config asked for other workers
        how = (
            f"on {args.workers_per_trial} Ray Train workers" if args.workers_per_trial else "in Ray Train's local mode"
        )
        print(
            f"note: each trial runs {how} (--workers-per-trial {args.workers_per_trial}), not on the config's "
            f"train_config.num_workers = {configured_workers}; pass --workers-per-trial {configured_workers} to keep it"
        )
    for trial in trials:  # how each trial runs: on N Train workers, or in its own actor (local mode)
        t = trial.config["train_config"]
        t["num_workers"] = args.workers_per_trial
        t["resume_from_checkpoint"] = None
        if trial.config.get("wandb_config"):
            trial.config["wandb_config"]["name"] = trial.trial_id
    info = {
        "metric": args.metric,
        "mode": args.mode,
        "mixes": {
            m.name: {d.name: d.weight / sum(x.weight for x in m.datasets) for d in m.datasets} for m in mixes.values()
        },
        "seeds": args.seeds,
        "search_space": {**space.grid, **space.sample}
        | ({"use_peer": [True, False]} if space.baseline == ["dense"] else {})
        | ({"ffn_type": ["peer", *space.baseline]} if space.baseline not in ([], ["dense"]) else {})
        | ({"match": [space.match]} if space.match else {}),
        "search": space.to_dict(),
        "search_space_from": space_file or (f"{args.custom_datasets} (inline)" if section else None),
        "base_config": args.config,
        "base_config_from": config_from,
        "overrides": args.overrides,
        "custom_datasets": args.custom_datasets,
    }
    if space.baseline:  # each arm's size and ratio to the PEER cell (the base config; a ladder's at its base scale)
        try:
            cells = {} if ladder is not None else {t.setting: t for t in trials if t.setting not in (NO_PEER, *ARMS)}
            cells = {s: config_from_dict(t.config) for s, t in cells.items() if s != "default"}  # the grid's PEER cells
            info["arms"] = plan_arms(base, space.baseline, space.match, cells)
        except ConfigError as err:
            raise UsageError(str(err)) from None
    if mixplan is not None:
        info["mix_search"] = mixplan.describe()
    if ladder is not None:
        info["ladder"] = info_ladder
    if optuna_plan is not None:
        info["optuna"] = {"space": optuna_plan.space, "num_samples": optuna_plan.num_samples}
    return trials, info, mixplan or optuna_plan


def with_pinned_mixes(mixes: dict, pins: list[str]) -> dict:
    """The sweep's mixes plus those of every pin that is a mixes file (a mixture search's
    recommended_mix.yaml); a mix of the same name must be the same mix."""
    from peerlab.config import load_mixes_file

    out = dict(mixes)
    by_name = {m.name: m for m in mixes.values()}
    for pin in pins:
        if not pin.endswith((".yaml", ".yml")):
            continue
        if not Path(pin).is_file():
            raise ConfigError(f"--pin {pin}: no such file (a pin is a cell, a mix, a setting or a mixes file)")
        for key, mix in load_mixes_file(pin).mixes.items():
            known = by_name.get(mix.name)
            if known is not None and [to_dict(d) for d in known.datasets] != [to_dict(d) for d in mix.datasets]:
                raise ConfigError(f"--pin {pin}: its mix '{mix.name}' differs from the mix of that name; rename one")
            if known is None:
                out[key if key not in out else f"{key}_pinned"] = mix
                by_name[mix.name] = mix
    return out


def plan_ladder(base, mixes: dict, space, seeds: int, ladder, workers: int) -> tuple[list[Trial], dict]:
    """Every trial at every scale (each validated), and the ladder's description for sweep.json: each
    scale's base config's sizes as its trials run (on `workers` Train workers, 0: local mode).

    A scale's trials are the grid's cells on that scale's base config (peerlab.ladder.scale_config's
    rule, or a preset), each cell's own setting on top; their ids start with the scale's label.
    Which of them run is decided as the sweep goes (peerlab.ladder.promoted).
    """
    from peerlab.config import load_mixes_file
    from peerlab.ladder import ladder_sizes

    raw = to_dict(base)
    scales = parse_scales(ladder.scales, raw)
    trials: list[Trial] = []
    for scale, scaled in scales:
        try:
            stage = plan_trials(config_from_dict(scaled, origin=f"--ladder {scale.label}"), mixes, space, seeds)
        except ConfigError as err:
            raise ConfigError(f"--ladder {scale.label}: {err}") from None
        for t in stage:
            t.trial_id, t.scale = _slug(f"{scale.label}_{t.trial_id}"), scale.label
        trials += stage
    cells = sorted({t.cell for t in trials}, key=[t.cell for t in trials].index)
    pinned: list[str] = []
    for pin in ladder.pin:
        if pin.endswith((".yaml", ".yml")):
            names = {m.name for m in load_mixes_file(pin).mixes.values()}
            found = [c for c in cells if c.split(" | ")[0] in names]
        else:
            found = [c for c in cells if pin in (c, *c.split(" | "))]
        if not found:
            raise ConfigError(f"--pin {pin}: no cell, mix or setting of that name (cells: {'; '.join(cells)})")
        pinned += [c for c in found if c not in pinned]
    info = {
        "scales": [
            {"label": s.label, "multiple": s.multiple, "preset": s.preset}
            | ladder_sizes({**r, "train_config": {**r["train_config"], "num_workers": workers}})
            | {
                "hidden_size": r["model_config"]["hidden_size"],
                "num_hidden_layers": r["model_config"]["num_hidden_layers"],
                "num_experts": r["model_config"]["peer_config"]["num_experts"],
                "max_steps": r["train_config"]["max_steps"],
            }
            for s, r in scales
        ],
        "promote": ladder.promote,
        "pin": pinned,
        "target_flops": ladder.target_flops,
        "cells": cells,
    }
    return trials, info


def resources(args: argparse.Namespace, trials: list[Trial], cpus: float, gpus: float) -> Resources:
    """Per-trial resources from the flags, else shared out over the cluster's CPUs (and GPUs)."""
    datasets = max(len(t.config["dataset_config"]["datasets"]) for t in trials)
    workers = args.workers_per_trial
    if workers > 0:  # the Train workers ask for their own CPUs/GPUs (peerlab.train.launch.scaling_config)
        per_run = gpus if gpus else max(cpus - 1, 1)
        concurrent = args.max_concurrent or max(1, int(per_run // workers))
        return Resources(args.cpus_per_trial or 0.1, 0.0, workers, min(concurrent, len(trials)))
    gpus_per_trial = args.gpus_per_trial if args.gpus_per_trial is not None else (1.0 if gpus >= 1 else 0.0)
    if gpus_per_trial > 0:
        concurrent = args.max_concurrent or max(1, int(gpus // gpus_per_trial))
    else:
        concurrent = args.max_concurrent or max(1, int(cpus))
    concurrent = min(concurrent, len(trials))
    # Leave every concurrent trial's Ray Data read tasks their CPUs, or the trials wait on data forever.
    reserve = DATA_CPUS * datasets * concurrent + 0.05
    per_trial = args.cpus_per_trial or max(0.1, math.floor(100 * (cpus - reserve) / concurrent) / 100)  # never up
    if per_trial * concurrent + reserve > cpus + 1e-9 and not args.cpus_per_trial:
        concurrent = max(1, int((cpus - reserve) // per_trial))
    return Resources(per_trial, gpus_per_trial, 0, concurrent)


def check_fits(trials: list[Trial], res: Resources, memory_bytes: float, gpu_bytes: float | None) -> int:
    """Weights, gradients and AdamW state of the biggest trial against the memory it would run in (its share of a
    GPU with a fractional --gpus-per-trial); returns those bytes."""
    from peerlab.model.size import memory_estimate, parameter_formulas

    def need(trial: Trial) -> int:
        cfg = config_from_dict(trial.config)
        shards = max(res.workers_per_trial, 1) if cfg.train_config.fsdp else 1
        return memory_estimate(sum(parameter_formulas(cfg.model_config).values()), shards)["total"]

    biggest = max(trials, key=need)
    per_trial = need(biggest)
    gib = 2**30
    if gpu_bytes is not None and (res.gpus_per_trial > 0 or res.workers_per_trial > 0):
        if per_trial > gpu_bytes:
            raise UsageError(
                f"trial {biggest.trial_id} needs {per_trial / gib:.1f} GiB per GPU for weights, gradients and AdamW "
                f"state (activations come on top) but a GPU has {gpu_bytes / gib:.1f} GiB: use train_config.fsdp "
                f"with more --workers-per-trial, or fewer experts"
            )
        share = res.gpus_per_trial * gpu_bytes
        if 0 < res.gpus_per_trial < 1 and per_trial > share:
            raise UsageError(
                f"--gpus-per-trial {res.gpus_per_trial:g}: a trial's memory cap is {share / gib:.1f} GiB of the GPU's "
                f"{gpu_bytes / gib:.1f} GiB, but trial {biggest.trial_id} needs {per_trial / gib:.1f} GiB for weights, "
                f"gradients and AdamW state: use a larger --gpus-per-trial"
            )
        return per_trial
    running = per_trial * max(res.max_concurrent, 1) * max(res.workers_per_trial, 1)
    if running > memory_bytes:
        raise UsageError(
            f"{res.max_concurrent} trial(s) at once need {running / gib:.1f} GiB for weights, gradients and AdamW "
            f"state (trial {biggest.trial_id}: {per_trial / gib:.1f} GiB each) but this machine has "
            f"{memory_bytes / gib:.1f} GiB available: lower --max-concurrent, or fewer experts"
        )
    return per_trial


def gpu_sharing(res: Resources, per_trial: int, gpu_bytes: float | None) -> str | None:
    """The plan's line for trials that share a GPU (a fractional --gpus-per-trial), or None."""
    if gpu_bytes is None or not 0 < res.gpus_per_trial < 1 or res.workers_per_trial:
        return None
    gib = 2**30
    share = res.gpus_per_trial * gpu_bytes
    by_memory = int(gpu_bytes // max(per_trial, 1))
    return (
        f"GPU sharing: {int(1 / res.gpus_per_trial + 1e-9)} trials per GPU, each capped at {share / gib:.1f} GiB of its "
        f"{gpu_bytes / gib:.1f} GiB (torch.cuda.set_per_process_memory_fraction); a trial needs "
        f"{per_trial / gib:.2f} GiB for weights, gradients and AdamW state, activations on top, so by that count "
        f"{by_memory} would fit"
    )


def available_memory() -> float:
    """Bytes of memory available on this machine (MemAvailable on Linux, else the physical total)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024
    except OSError:
        pass
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def print_plan(trials: list[Trial], res: Resources, info: dict, mixplan: MixPlan | None = None) -> None:
    space = (info.get("search_space_from") or "the command line") if info.get("search_space") else "none"
    config_from = {"--config": "--config", "default": "the default"}.get(info.get("base_config_from"), "the mixes file")
    print(f"base config {info['base_config']} (from {config_from}); search space: {space}", flush=True)
    if info.get("arms"):
        print("\n".join(plan_lines(info["arms"])), flush=True)
    if mixplan is not None:
        print_mix_plan(mixplan, res)
        return
    if info.get("ladder"):
        print_ladder(trials, res, info["ladder"])
        return
    if info.get("optuna"):
        space = ", ".join(f"{k}={v}" for k, v in info["optuna"]["space"].items())
        print(f"Optuna search (TPE) over {space} and {len(info['mixes'])} mix(es): {info['optuna']['num_samples']} "
              f"trials, {res.max_concurrent} at once")  # fmt: skip
        return
    print(
        f"{len(trials)} trials ({len({t.cell for t in trials})} cells), {res.max_concurrent} at once, each with "
        f"{res.cpus_per_trial:g} CPU, {res.gpus_per_trial:g} GPU, "
        f"{res.workers_per_trial or 'no'} Train workers (local mode)"
        if not res.workers_per_trial
        else f"{len(trials)} trials, {res.max_concurrent} at once, each on {res.workers_per_trial} Train workers"
    )
    for t in trials:
        print(f"  {t.trial_id:<48} mix {t.mix:<16} {t.setting:<32} seed {t.seed}")


def main(argv: list[str] | None = None) -> int:
    """The sweep; with output_dir on object storage (s3://...), run in a local staging folder that
    starts as a copy of the URI's sweep folder and is uploaded when the sweep ends or stops."""
    staged: dict = {}
    try:
        return sweep(argv, staged)
    finally:
        kept = False
        if staged.get("mirror"):  # Ray started: trials, tables or a report may have been written
            try:
                staged["mirror"].close()  # the last push: what the sweep wrote since the mirror's last round
                print(f"sweep folder mirrored to {staged['uri']}", flush=True)
            except storage.StorageError as err:
                print(f"error: {err}; the sweep folder stays in {staged['dir']}", file=sys.stderr, flush=True)
                kept = True
        if staged and not kept:
            shutil.rmtree(staged["dir"].parent, ignore_errors=True)


def sweep(argv: list[str] | None, staged: dict) -> int:
    args = arguments(argv)
    trials, info, mixplan = plan(args)
    optuna_plan = mixplan if isinstance(mixplan, OptunaPlan) else None
    mixplan = None if optuna_plan else mixplan
    cfg0 = config_from_dict(trials[0].config)
    name = args.name or f"sweep_{Path(args.custom_datasets).stem}"
    sweep_dir = storage.local_path(cfg0.train_config.output_dir) / name
    checked_storage(storage.join(cfg0.train_config.output_dir, name))  # before Ray: a bucket's credentials, a job's dir
    if storage.is_remote(cfg0.train_config.output_dir):
        uri = storage.join(cfg0.train_config.output_dir, name)
        sweep_dir = Path(tempfile.mkdtemp(prefix="peerlab-sweep-")) / name
        staged.update(dir=sweep_dir, uri=uri)
        try:
            storage.pull_sweep(uri, sweep_dir, plan_only=args.dry_run)  # an earlier run of this sweep, to continue
        except storage.StorageError as err:
            raise UsageError(str(err)) from None
    plan_file = sweep_dir / "sweep.json"
    where = staged.get("uri") or sweep_dir  # the folder as the user named it (a bucket's, not its local copy)
    if mixplan is not None:
        same_search(plan_file, info, args.resume, where)  # a mixture search resumes from its own state file
        args.resume = args.resume or plan_file.is_file()
    elif optuna_plan is not None:
        if args.resume or plan_file.is_file():
            raise UsageError(
                f"{where}: an Optuna search starts afresh (its suggestions are not replayed): pick a new --name"
            )
    elif args.resume:
        if not plan_file.is_file():
            raise UsageError(f"--resume: {where} holds no sweep.json; start the sweep without --resume")
        saved = json.loads(plan_file.read_text())
        if saved.get("mix_search"):
            raise UsageError(f"--resume: {where} holds a mixture search; resume it with its --mix-search command")
        trials = [Trial(**t) for t in saved["trials"]]
        info = {k: v for k, v in saved.items() if k not in ("trials", "name", "resources")}
        args.metric, args.mode = info["metric"], info["mode"]
        print(f"resuming {where}: the saved plan of {len(trials)} trials is used", flush=True)
    elif plan_file.is_file():  # the same command again continues its sweep; another sweep is refused
        saved = json.loads(plan_file.read_text())["trials"]
        if plan_key(saved) != plan_key([asdict(t) for t in trials]):
            raise UsageError(f"{where} already holds another sweep: continue it with --resume, or pick another --name")
        args.resume = True
        print(f"{where} holds this sweep: continuing it (finished trials are not run again)", flush=True)

    for mix in {t.mix: t for t in trials}.values():  # every mix's data, before Ray starts
        checked_data(config_from_dict(mix.config))
    checked_evals(cfg0)  # the lm-eval tasks, the same for every trial: a misspelt one fails now, not after training

    local = not (args.address or os.environ.get("RAY_ADDRESS"))
    cpus, gpus, gpu_bytes = float(os.cpu_count() or 1), 0.0, None
    try:
        import torch

        if torch.cuda.is_available():
            gpus, gpu_bytes = float(torch.cuda.device_count()), float(torch.cuda.get_device_properties(0).total_memory)
    except Exception:
        pass
    planned = mixplan.planned() if mixplan else optuna_plan.num_samples if optuna_plan else len(trials)
    sized = trials * max(1, planned // len(trials))  # what the resources are shared by
    if args.gpus_per_trial is not None and (
        args.gpus_per_trial < 0 or (args.gpus_per_trial > 1 and args.gpus_per_trial % 1)
    ):
        raise UsageError(f"--gpus-per-trial {args.gpus_per_trial:g}: give a fraction of one GPU (0.25) or whole GPUs")
    if (args.gpus_per_trial or 0) > 0 and local and not gpus:
        raise UsageError(f"--gpus-per-trial {args.gpus_per_trial:g}: this machine has no GPU (torch sees none)")
    per_trial_bytes = 0
    if local:
        res = resources(args, sized, cpus, gpus)
        per_trial_bytes = check_fits(trials, res, available_memory(), gpu_bytes)
    if args.dry_run:
        print_plan(trials, res if local else resources(args, sized, cpus, gpus), info, mixplan)
        if local and (line := gpu_sharing(res, per_trial_bytes, gpu_bytes)):
            print(line)
        return 0

    import ray
    from peerlab.train.launch import start_ray, write_resolved_config

    joined = not local or ray.is_initialized()
    url, logs = start_ray(args.address, verbose=args.verbose)  # without --verbose Ray's output stays in its logs
    if joined:  # a cluster that already existed: size the trials by it
        cluster = ray.cluster_resources()
        cpus, gpus = cluster.get("CPU", cpus), cluster.get("GPU", 0.0)
        res = resources(args, sized, cpus, gpus)
        node_memory = max((n["Resources"].get("memory", 0) for n in ray.nodes() if n.get("Alive")), default=0)
        per_trial_bytes = check_fits(trials, res, node_memory or available_memory(), gpu_bytes)
    if line := gpu_sharing(res, per_trial_bytes, gpu_bytes):
        print(line, flush=True)
    print(f"Ray dashboard: {url or 'not running'}", flush=True)
    if logs and not args.verbose:
        print(f"Ray's logs: {logs} (--verbose shows them here)", flush=True)
    print(f"sweep folder: {staged.get('uri', sweep_dir)}", flush=True)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    # Where the trials write and how often Tune runs a lost one again (the base config's max_failures)
    args.placement = {"uri": staged.get("uri"), "max_failures": cfg0.train_config.max_failures, "synced": None}
    if staged:  # the trials write their folders on the URI; the driver's copy and the sweep's files sync with it
        staged["mirror"] = storage.Mirror(sweep_dir, staged["uri"])
        staged["mirror"].start()
        args.placement["synced"] = staged["mirror"].now
    if mixplan is not None:
        return run_mix_search(args, mixplan, info, sweep_dir, res, name)
    if optuna_plan is not None:
        return run_optuna(args, optuna_plan, trials, info, sweep_dir, res, name)
    if info.get("ladder"):
        return run_ladder(args, trials, info, sweep_dir, res, name)
    if not args.resume:
        write_json(plan_file, {"name": name, **info, "resources": asdict(res), "trials": [asdict(t) for t in trials]})
    for t in trials:  # every trial's resolved config, also of those that never run
        folder = trial_dir(sweep_dir, t.trial_id)
        if not (folder / "resolved_config.yaml").is_file():
            write_resolved_config(config_from_dict(t.config), folder)

    todo = [t for t in trials if trial_status(trial_dir(sweep_dir, t.trial_id))[0] not in ("finished", "stopped")]
    print_plan(todo, res, info)
    if len(todo) < len(trials):
        print(f"{len(trials) - len(todo)} trials already done; running {len(todo)}", flush=True)
    schedule = Schedule(None if args.scheduler == "none" else args.scheduler, args.metric, args.mode, args.grace_steps)
    start = time.time()
    if todo:
        from peerlab.tune import run_sweep

        run_sweep(todo, sweep_dir, res, schedule, total=len(trials), verbose=args.verbose, **args.placement)
    wall = time.time() - start

    from peerlab.tables import write_tables

    paths = write_tables(trials, sweep_dir, args.metric)
    import pandas as pd

    table = pd.read_parquet(paths["trials"])
    counts = table["status"].value_counts().to_dict()
    print(f"sweep took {wall:.0f} s: " + ", ".join(f"{n} {s}" for s, n in counts.items()), flush=True)
    print("tables: " + ", ".join(str(p) for p in paths.values()), flush=True)
    failed = table[table["status"] == "failed"]
    for trial_id, error in zip(failed["trial_id"], failed["error"]):
        print(f"  failed: {trial_id}: {error}", flush=True)
    unfinished = int(counts.get("unfinished", 0))
    if not args.no_report:
        report(sweep_dir, args.metric)
    if unfinished:
        print(f"{unfinished} trials did not finish: continue with the same command and --resume", file=sys.stderr)
        return INTERRUPTED
    return 0


def print_ladder(trials: list[Trial], res: Resources, ladder: dict) -> None:
    """The ladder's plan: each scale's model, tokens and compute, and how many cells it runs at most."""
    cells = ladder["cells"]
    how = (
        "every cell at every scale"
        if ladder["promote"] >= 1
        else f"the better {ladder['promote']:g} of each scale's cells go up"
    )
    pins = f", plus pinned: {'; '.join(ladder['pin'])}" if ladder["pin"] else ""
    print(f"scale ladder: {len(ladder['scales'])} scales x {len(cells)} cells; {how}{pins}", flush=True)
    print(f"  {'scale':<12} {'x base':>8} {'params':>12} {'active':>12} {'tokens':>12} {'FLOPs':>10}  model, steps")
    for s in ladder["scales"]:
        model = f"d {s['hidden_size']}, {s['num_hidden_layers']} layers, {s['num_experts']:,} experts"
        steps = s["max_steps"]
        print(
            f"  {s['label']:<12} {s['multiple']:>8.3g} {s['params_total']:>12,} {s['params_active']:>12,} "
            f"{s['tokens']:>12,} {s['flops']:>10.3g}  {model}, {steps} steps"
            + (f"  ({s['preset']})" if s.get("preset") else "")
        )
    seeds = len({t.seed for t in trials})
    print(
        f"at most {len(trials)} trials ({seeds} seed(s) per cell), {res.max_concurrent} at once"
        + (f"; target compute {ladder['target_flops']:.3g} FLOPs" if ladder.get("target_flops") else "")
    )
    for cell in cells:
        print(f"  cell {cell}")


def run_ladder(args, trials: list[Trial], info: dict, sweep_dir: Path, res: Resources, name: str) -> int:
    """The ladder, scale by scale: every cell at the smallest, the promoted ones (and the pinned) at each
    next; then the tables (ladder.parquet too) and the report. Finished trials are not run again."""
    import pandas as pd
    from peerlab.ladder import promoted
    from peerlab.tables import write_tables
    from peerlab.train.launch import write_resolved_config
    from peerlab.tune import run_sweep

    ladder = info["ladder"]
    if not args.resume:
        write_json(
            sweep_dir / "sweep.json",
            {"name": name, **info, "resources": asdict(res), "trials": [asdict(t) for t in trials]},
        )
    multiples = {s["label"]: s["multiple"] for s in ladder["scales"]}
    schedule = Schedule(None if args.scheduler == "none" else args.scheduler, args.metric, args.mode, args.grace_steps)
    cells, ran, start, paths = None, [], time.time(), {}
    for i, scale in enumerate(ladder["scales"]):
        stage = [t for t in trials if t.scale == scale["label"] and (cells is None or t.cell in cells)]
        if not stage:
            print(f"scale {scale['label']}: no cell to run (none measured below, none pinned)", flush=True)
            break
        for t in stage:
            folder = trial_dir(sweep_dir, t.trial_id)
            if not (folder / "resolved_config.yaml").is_file():
                write_resolved_config(config_from_dict(t.config), folder)
        todo = [t for t in stage if trial_status(trial_dir(sweep_dir, t.trial_id))[0] not in ("finished", "stopped")]
        count = len({t.cell for t in stage})
        done = f"; {len(stage) - len(todo)} already done" if len(todo) < len(stage) else ""
        print(
            f"scale {scale['label']} ({scale['multiple']:.3g}x the base's compute): {len(stage)} trials of {count} cells{done}",
            flush=True,
        )
        if todo:
            run_sweep(todo, sweep_dir, res, schedule, total=len(stage), verbose=args.verbose, **args.placement)
        ran += stage
        paths = write_tables(ran, sweep_dir, args.metric, multiples)
        table = pd.read_parquet(paths["trials"])
        here = table[table["trial_id"].isin([t.trial_id for t in stage])]
        if (here["status"] == "unfinished").any():
            print(
                f"scale {scale['label']} did not finish: continue with the same command and --resume", file=sys.stderr
            )
            return INTERRUPTED
        if i + 1 < len(ladder["scales"]):
            means = cell_means(here, args.metric)
            cells = set(promoted(means, ladder["promote"], args.mode, set(ladder["pin"])))
            shown = "; ".join(
                f"{c} ({means[c]:.4f})"
                for c in sorted(cells, key=lambda c: means[c] * (1 if args.mode == "min" else -1))
            )
            print(f"up to {ladder['scales'][i + 1]['label']}: {shown}", flush=True)
    wall = time.time() - start
    table = pd.read_parquet(paths["trials"])
    counts = table["status"].value_counts().to_dict()
    print(f"ladder took {wall:.0f} s: " + ", ".join(f"{n} {s}" for s, n in counts.items()), flush=True)
    print("tables: " + ", ".join(str(p) for p in paths.values()), flush=True)
    for trial_id, error in zip(
        table.loc[table["status"] == "failed", "trial_id"], table.loc[table["status"] == "failed", "error"]
    ):
        print(f"  failed: {trial_id}: {error}", flush=True)
    if not args.no_report:
        report(sweep_dir, args.metric)
    return 0


def print_mix_plan(mixplan: MixPlan, res: Resources) -> None:
    o, shares = mixplan.options, lambda w: ", ".join(f"{d} {w[d]:.2f}" for d in mixplan.domains)
    print(f"mixture search over {', '.join(mixplan.domains)} on {mixplan.metric} ({mixplan.mode})", flush=True)
    print(f"  prior {o.prior}: {shares(mixplan.prior)}; concentration {o.concentration or len(mixplan.domains):g}")
    if mixplan.tokens:
        passes = ", ".join(f"{d} {mixplan.tokens[d]:,}" for d in mixplan.domains)
        print(f"  tokens per source: {passes}; a trial reads {mixplan.budget_tokens:,}")
    bounds = mixplan.searcher().cons
    print(
        "  bounds: " + ", ".join(f"{d} {lo:.2f}..{hi:.2f}" for d, lo, hi in zip(bounds.domains, bounds.lo, bounds.hi))
    )
    arms = "3 or 4 arms (the file's best mix if a proxy beats it)" if mixplan.anchors else "3 arms"
    print(
        f"  round 1: {o.mixes} mixes and {len(mixplan.anchors)} of the file's ({', '.join(mixplan.anchors)}); "
        f"{o.rounds - 1} later round(s) of {max(2, -(-o.mixes // 2))}; validation: {arms} x {o.validate_seeds} seeds; "
        f"x {len(mixplan.settings)} PEER setting(s): about {mixplan.planned()} trials, {res.max_concurrent} at once"
    )


def same_search(plan_file: Path, info: dict, resume: bool, where: Path | str) -> None:
    """A mixture search continues only with its own settings; a grid sweep's folder (`where`, as the user named
    it) is not reused for one."""
    if not plan_file.is_file():
        if resume:
            raise UsageError(f"--resume: {where} holds no sweep.json; start the sweep without --resume")
        return
    saved = json.loads(plan_file.read_text())
    keys = [k for k in info["mix_search"] if k != "tokens"]
    if not saved.get("mix_search") or any(saved["mix_search"].get(k) != info["mix_search"][k] for k in keys):
        raise UsageError(
            f"{where} already holds another sweep: continue it with its own command, or pick another --name"
        )
    print(f"{where} holds this mixture search: continuing it", flush=True)


def run_mix_search(args, mixplan: MixPlan, info: dict, sweep_dir: Path, res: Resources, name: str) -> int:
    """The mixture search on Ray Tune; then its outputs, the tables and the report."""
    from peerlab.mixsearch import write_outputs
    from peerlab.tables import write_tables
    from peerlab.tune import TrialSearch, run_sweep

    plan_file = sweep_dir / "sweep.json"
    if not plan_file.is_file():
        write_json(plan_file, {"name": name, **info, "resources": asdict(res), "trials": []})
    searcher = mixplan.searcher(state_path=sweep_dir / "mix_search_state.json")
    print_mix_plan(mixplan, res)
    schedule = Schedule(None if args.scheduler == "none" else args.scheduler, args.metric, args.mode, args.grace_steps)
    start = time.time()
    seed = mixplan.base["train_config"]["seed"]
    sample = [
        mixplan.make_trial({"mix": mixplan.prior, "seed": seed, "mix_id": f"prior_s{seed}", **s})
        for s in mixplan.settings
    ]
    validation = lambda trial: trial.mix.startswith("val_")  # noqa: E731  (ASHA leaves the validation round whole)
    search = TrialSearch(searcher, mixplan.make_trial, sweep_dir, protect=validation, uri=args.placement["uri"])
    done = sum(p["status"] in ("finished", "stopped", "failed") for p in searcher.proposals)
    run_sweep(sample, sweep_dir, res, schedule, mixplan.planned(), args.verbose, search, done_before=done,
              **args.placement)  # fmt: skip
    wall = time.time() - start
    started = [p for p in searcher.proposals if p["status"] != "queued"]
    trials = [mixplan.make_trial(searcher.trial_config(p)) for p in started]
    for p, trial in zip(started, trials):  # what the trial itself says of how it ended (ASHA, errors)
        status = trial_status(trial_dir(sweep_dir, trial.trial_id))[0]
        if status in ("stopped", "failed") and p["status"] in ("finished", "running"):
            p["status"] = "failed" if p.get("metric") is None else status  # stopped before any metric: failed
    paths = write_outputs(searcher, sweep_dir, mixplan.entries)
    tables = write_tables(trials, sweep_dir, args.metric) if trials else {}
    counts: dict[str, int] = {}
    for p in searcher.proposals:
        counts[p["status"]] = counts.get(p["status"], 0) + 1
    print(f"mixture search took {wall:.0f} s: " + ", ".join(f"{n} {s}" for s, n in counts.items()), flush=True)
    print("outputs: " + ", ".join(str(p) for p in [*paths.values(), *tables.values()]), flush=True)
    rec = searcher.recommendation()
    if rec is not None:
        weights = ", ".join(f"{d} {w:.3f}" for d, w in rec["weights"].items())
        print(f"recommended mix: {weights} ({rec['model']}); {rec['verdict']}", flush=True)
        for arm, body in (("recommended", rec), ("best tried", rec["best_tried"]), ("prior", rec["prior"])):
            v = body.get("validated")
            if v:
                print(f"  {arm}: {args.metric} {v['mean']:.4f} [{v['lo']:.4f}, {v['hi']:.4f}] over {v['n']} seeds")
    if trials and not args.no_report:
        report(sweep_dir, args.metric)
    unfinished = sum(p["status"] in ("queued", "running") for p in searcher.proposals)
    if unfinished or searcher.round <= searcher.rounds:
        print("the mixture search did not finish: continue it with the same command and --resume", file=sys.stderr)
        return INTERRUPTED
    return 0


def run_optuna(args, optuna_plan, sample: list[Trial], info: dict, sweep_dir: Path, res: Resources, name: str) -> int:
    """An Optuna search on Ray Tune (ASHA with it if asked); then the tables and the report."""
    from peerlab.tables import write_tables
    from peerlab.tune import TrialSearch, run_sweep

    write_json(sweep_dir / "sweep.json", {"name": name, **info, "resources": asdict(res), "trials": []})
    space = ", ".join(f"{k}={v}" for k, v in optuna_plan.space.items())
    print(f"Optuna search (TPE) over {space} and {len(optuna_plan.mixes)} mix(es): {optuna_plan.num_samples} trials")
    schedule = Schedule(None if args.scheduler == "none" else args.scheduler, args.metric, args.mode, args.grace_steps)
    search = TrialSearch(optuna_plan.searcher(), optuna_plan.make_trial, sweep_dir, metric=args.metric,
                         uri=args.placement["uri"])  # fmt: skip
    start = time.time()
    run_sweep(sample, sweep_dir, res, schedule, optuna_plan.num_samples, args.verbose, search,
              done_before=0, num_samples=optuna_plan.num_samples, **args.placement)  # fmt: skip
    wall = time.time() - start
    trials = list(search.trials.values())
    saved = json.loads((sweep_dir / "sweep.json").read_text())
    write_json(sweep_dir / "sweep.json", {**saved, "trials": [asdict(t) for t in trials]})
    paths = write_tables(trials, sweep_dir, args.metric)
    import pandas as pd

    table = pd.read_parquet(paths["trials"])
    counts = table["status"].value_counts().to_dict()
    print(f"sweep took {wall:.0f} s: " + ", ".join(f"{n} {s}" for s, n in counts.items()), flush=True)
    print("tables: " + ", ".join(str(p) for p in paths.values()), flush=True)
    if not args.no_report:
        report(sweep_dir, args.metric)
    return 0 if len(trials) >= optuna_plan.num_samples else INTERRUPTED


def plan_key(trials: list[dict]) -> str:
    """A plan's trials as one string to compare; an empty dataset_config.eval_datasets counts as absent, so a
    sweep saved before that key existed is the same sweep."""
    out = json.loads(json.dumps(trials))
    for trial in out:
        data = trial.get("config", {}).get("dataset_config", {})
        if data.get("eval_datasets") == []:
            del data["eval_datasets"]
    return json.dumps(out, sort_keys=True)


def report(sweep_dir: Path, metric: str) -> None:
    """The analysis report of the sweep (analysis/report.py), its path printed."""
    sys.path.insert(0, str(ROOT))
    try:
        from analysis.report import write_report
    except ImportError as err:
        print(f"no report: analysis/ is not available ({err})", flush=True)
        return
    path = write_report(sweep_dir, metric=metric)
    print(f"report: {path}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
