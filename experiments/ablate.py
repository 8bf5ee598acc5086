"""Ablation sweep: data mixes x PEER settings x seeds, one training run per trial, on Ray Tune.

    python experiments/ablate.py --custom-datasets configs/datasets.yaml
        [--config FILE] [--set KEY=VALUE ...] [--mixes a,b]
        [--grid peer_config.num_experts_per_tok=8,16 ...] [--sample KEY=V1,V2 ... --num-samples N]
        [--baseline] [--search-space FILE] [--seeds N] [--name SWEEP]
        [--scheduler asha] [--metric eval_bpb/mean] [--mode min] [--grace-steps N]
        [--max-concurrent N] [--cpus-per-trial X] [--gpus-per-trial X] [--workers-per-trial N]
        [--address ADDR] [--resume] [--dry-run] [--no-report] [--verbose]

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
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from peerlab.cli import (  # noqa: E402
    INTERRUPTED,
    UsageError,
    add_config_arguments,
    add_verbose_argument,
    checked_data,
    checked_evals,
    config_from_arguments,
)
from peerlab.config import ConfigError, config_from_dict, load_mixes_file  # noqa: E402
from peerlab.tune import (  # noqa: E402
    Resources,
    Schedule,
    Trial,
    check_metric,
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
    ap.add_argument("--num-samples", type=int, default=0, help="random PEER points drawn from the --sample values")
    ap.add_argument("--baseline", action="store_true", help="add a use_peer: false arm (dense MLP everywhere)")
    ap.add_argument(
        "--search-space",
        help="YAML file with a search_space: section (grid, sample, num_samples); default: the mixes file's",
    )
    ap.add_argument("--seeds", type=int, default=1, help="seeds per cell (train_config.seed, +1, ...)")
    ap.add_argument("--name", help="sweep name: results go to <output_dir>/<name> (default: sweep_<mixes file>)")
    ap.add_argument("--scheduler", choices=["asha", "none"], default="none", help="ASHA early stopping, or none")
    ap.add_argument("--metric", default="eval_bpb/mean", help="metric for ASHA and 'best' (default eval_bpb/mean)")
    ap.add_argument("--mode", choices=["min", "max"], default="min")
    ap.add_argument(
        "--grace-steps",
        type=int,
        help="ASHA: steps before the first cut (default: the metric's first report, e.g. eval_steps)",
    )
    ap.add_argument("--max-concurrent", type=int, help="trials at once (default: what the resources allow)")
    ap.add_argument("--cpus-per-trial", type=float, help="CPUs of each trial (default: shared out)")
    ap.add_argument("--gpus-per-trial", type=float, help="GPUs of each trial in local mode (default: 1 if GPUs)")
    ap.add_argument("--workers-per-trial", type=int, default=0, help="Ray Train workers per trial (0: local mode)")
    ap.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else a local cluster)")
    ap.add_argument("--resume", action="store_true", help="continue the sweep of this name")
    ap.add_argument("--dry-run", action="store_true", help="plan, validate and print the trials; start nothing")
    ap.add_argument("--no-report", action="store_true", help="skip the analysis report at the end")
    add_verbose_argument(ap)
    return ap.parse_args(argv)


def plan(args: argparse.Namespace) -> tuple[list[Trial], dict]:
    """The trials and the sweep's description; ConfigError/UsageError on anything wrong."""
    try:
        mixes_file = load_mixes_file(args.custom_datasets)
    except ConfigError as err:
        raise UsageError(str(err)) from None
    mixes = mixes_file.mixes
    config_from = "--config" if args.config else args.custom_datasets if mixes_file.base_config else "default"
    args.config = args.config or str(mixes_file.base_config or DEFAULT_CONFIG)
    base = config_from_arguments(args)
    named = mixes_file.search_space  # the mixes file's: a file, or the section inline; --search-space overrides it
    section = named if isinstance(named, dict) and not args.search_space else None
    space_file = args.search_space or (str(named) if named is not None and section is None else None)
    try:
        origin = f"{args.custom_datasets}: search_space"
        space = search_space(args.grid, args.sample, args.num_samples, args.baseline, space_file, section, origin)
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
    try:
        check_metric(args.metric, {d.name for m in mixes.values() for d in m.datasets})
        trials = plan_trials(base, mixes, space, args.seeds)
    except ConfigError as err:
        raise UsageError(str(err)) from None
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
        "search_space": {**space.grid, **space.sample} | ({"use_peer": [True, False]} if space.baseline else {}),
        "search": space.to_dict(),
        "search_space_from": space_file or (f"{args.custom_datasets} (inline)" if section else None),
        "base_config": args.config,
        "base_config_from": config_from,
        "overrides": args.overrides,
        "custom_datasets": args.custom_datasets,
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
    per_trial = args.cpus_per_trial or max(0.1, round((cpus - reserve) / concurrent, 2))
    if per_trial * concurrent + reserve > cpus + 1e-9 and not args.cpus_per_trial:
        concurrent = max(1, int((cpus - reserve) // per_trial))
    return Resources(per_trial, gpus_per_trial, 0, concurrent)


def check_fits(trials: list[Trial], res: Resources, memory_bytes: float, gpu_bytes: float | None) -> None:
    """Weights, gradients and AdamW state of the biggest trial against the memory it would run in."""
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
        return
    running = per_trial * max(res.max_concurrent, 1) * max(res.workers_per_trial, 1)
    if running > memory_bytes:
        raise UsageError(
            f"{res.max_concurrent} trial(s) at once need {running / gib:.1f} GiB for weights, gradients and AdamW "
            f"state (trial {biggest.trial_id}: {per_trial / gib:.1f} GiB each) but this machine has "
            f"{memory_bytes / gib:.1f} GiB available: lower --max-concurrent, or fewer experts"
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


def print_plan(trials: list[Trial], res: Resources, info: dict) -> None:
    space = (info.get("search_space_from") or "the command line") if info.get("search_space") else "none"
    config_from = {"--config": "--config", "default": "the default"}.get(info.get("base_config_from"), "the mixes file")
    print(f"base config {info['base_config']} (from {config_from}); search space: {space}", flush=True)
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
    args = arguments(argv)
    trials, info = plan(args)
    cfg0 = config_from_dict(trials[0].config)
    name = args.name or f"sweep_{Path(args.custom_datasets).stem}"
    sweep_dir = Path(cfg0.train_config.output_dir) / name
    plan_file = sweep_dir / "sweep.json"
    if args.resume:
        if not plan_file.is_file():
            raise UsageError(f"--resume: {plan_file} does not exist; start the sweep without --resume")
        saved = json.loads(plan_file.read_text())
        trials = [Trial(**t) for t in saved["trials"]]
        info = {k: v for k, v in saved.items() if k not in ("trials", "name", "resources")}
        args.metric, args.mode = info["metric"], info["mode"]
        print(f"resuming {sweep_dir}: the saved plan of {len(trials)} trials is used", flush=True)
    elif plan_file.is_file():  # the same command again continues its sweep; another sweep is refused
        saved = json.loads(plan_file.read_text())["trials"]
        if json.dumps(saved, sort_keys=True) != json.dumps([asdict(t) for t in trials], sort_keys=True):
            raise UsageError(
                f"{sweep_dir} already holds another sweep: continue it with --resume, or pick another --name"
            )
        args.resume = True
        print(f"{sweep_dir} holds this sweep: continuing it (finished trials are not run again)", flush=True)

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
    if local:
        res = resources(args, trials, cpus, gpus)
        check_fits(trials, res, available_memory(), gpu_bytes)
    if args.dry_run:
        print_plan(trials, res if local else resources(args, trials, cpus, gpus), info)
        return 0

    import ray

    from peerlab.train.launch import start_ray, write_resolved_config

    joined = not local or ray.is_initialized()
    url, logs = start_ray(args.address, verbose=args.verbose)  # without --verbose Ray's output stays in its logs
    if joined:  # a cluster that already existed: size the trials by it
        cluster = ray.cluster_resources()
        cpus, gpus = cluster.get("CPU", cpus), cluster.get("GPU", 0.0)
        res = resources(args, trials, cpus, gpus)
        node_memory = max((n["Resources"].get("memory", 0) for n in ray.nodes() if n.get("Alive")), default=0)
        check_fits(trials, res, node_memory or available_memory(), gpu_bytes)
    print(f"Ray dashboard: {url or 'not running'}", flush=True)
    if logs and not args.verbose:
        print(f"Ray's logs: {logs} (--verbose shows them here)", flush=True)
    print(f"sweep folder: {sweep_dir}", flush=True)
    sweep_dir.mkdir(parents=True, exist_ok=True)
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

        run_sweep(todo, sweep_dir, res, schedule, total=len(trials), verbose=args.verbose)
    wall = time.time() - start

    from peerlab.tables import write_tables

    paths = write_tables(trials, sweep_dir)
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
