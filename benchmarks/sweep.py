"""Where a sweep's wall time goes, and what ASHA saves: the demo sweep, full grid against ASHA.

    python benchmarks/sweep.py [--out output/bench-sweep] [--skip-asha] [ablate.py flags ...]

Runs the README's demo sweep (configs/datasets.yaml x configs/search-demo.yaml on
configs/demo.yaml) twice on one local Ray cluster: every trial to the end, then with
`--scheduler asha`. For each it prints

  training share  the seconds trials spent in training steps (train_s in metrics.jsonl: data,
                  forward, backward, optimizer), summed over trials, over wall time x trials
                  at once: the rest is Ray and trial start-up, evaluation, checkpoints, the report
  trial-steps     optimizer steps run, summed over trials
  best cell       the cell with the best --metric among trials that ran to the end
  rank bound      from the full grid's curves: the fewest trial-steps that any early stopping
                  deciding on ranks at the evaluations could run and still keep the winner
  replay          ASHA's rule (peerlab.tune.Rungs, as the sweep runs it) replayed on the full
                  grid's curves over 200 arrival orders (each trial's pace drawn within +-15%
                  of its measured one): the range of trial-steps and how often the winner is
                  kept, so that one run's luck in which trial reached a rung first shows

Targets (issue 6, this 2-core CPU): a training share of at least 60%; ASHA at most 60% of
the full grid's trial-steps with the same best cell.
"""

from __future__ import annotations

import argparse
import heapq
import importlib.util
import json
import os
import platform
import random
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
DEMO = ["--custom-datasets", "configs/datasets.yaml", "--config", "configs/demo.yaml",
        "--search-space", "configs/search-demo.yaml"]  # fmt: skip


def ablate():
    spec = importlib.util.spec_from_file_location("ablate", ROOT / "experiments" / "ablate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def measure(name: str, out: Path, extra: list[str], run: bool = True) -> dict:
    """Run one sweep (or, with run=False, read one that ran before: its wall time from wall.json)."""
    argv = [*DEMO, "--set", f"train_config.output_dir={out}", "--name", name, *extra]
    sweep = out / name
    if run:
        start = time.perf_counter()
        code = ablate().main(argv)
        wall = time.perf_counter() - start
        (sweep / "wall.json").write_text(json.dumps({"wall_s": wall, "exit": code}))
    saved = json.loads((sweep / "wall.json").read_text()) if (sweep / "wall.json").is_file() else {}
    wall, code = saved.get("wall_s", float("nan")), saved.get("exit")
    trials = pd.read_parquet(sweep / "trials.parquet")
    plan = json.loads((sweep / "sweep.json").read_text())
    metric, mode = plan["metric"], plan["mode"]
    concurrent = plan["resources"]["max_concurrent"]
    finished = trials[trials["status"] == "finished"]
    best = finished.loc[finished[metric].idxmin() if mode == "min" else finished[metric].idxmax()]
    return {
        "name": name,
        "exit": code,
        "wall_s": wall,
        "train_s": float(trials["train_s"].sum()),
        "share": float(trials["train_s"].sum()) / (wall * concurrent),
        "trial_steps": int(trials["steps"].sum()),
        "statuses": trials["status"].value_counts().to_dict(),
        "best": best["cell"],
        "best_value": float(best[metric]),
        "metric": metric,
        "concurrent": concurrent,
    }


def rank_bound(sweep: Path, metric: str, mode: str) -> dict:
    """The fewest trial-steps any early stopping that ranks trials at their evaluations could run
    in this sweep and still keep its winner: a trial ranked above the winner at an evaluation
    cannot be stopped there without stopping the winner too (it is better so far), so each other
    trial runs at least until the first evaluation at which it is worse than the winner, and the
    winner runs to the end. Computed from the full grid's curves, whose trials all ran to the end.
    """
    trials = pd.read_parquet(sweep / "trials.parquet")
    curves = pd.read_parquet(sweep / "curves.parquet").dropna(subset=[metric])
    by_step = curves.pivot_table(index="step", columns="trial_id", values=metric)  # (evaluations, trials)
    finished = trials[trials["status"] == "finished"].set_index("trial_id")
    winner = finished[metric].idxmin() if mode == "min" else finished[metric].idxmax()
    total = int(finished.loc[winner, "steps"])
    for trial in by_step.columns.drop(winner):
        worse = by_step[trial] > by_step[winner] if mode == "min" else by_step[trial] < by_step[winner]
        total += int(worse[worse].index.min()) if worse.any() else int(finished.loc[trial, "steps"])
    return {"trial_steps": total, "share": total / int(trials["steps"].sum())}


def replay(sweep: Path, grace: int | None = None, rf: int = 2, orders: int = 200, start_s: float = 20.0) -> dict:
    """ASHA with re-checks (peerlab.tune.Rungs) replayed on a full grid's curves.

    Trials start in the plan's order as slots free up (`max_concurrent` at once), each after
    `start_s` of set-up, and report the metric at its evaluations at its own pace (seconds a
    step from train_s, times a factor drawn in [0.85, 1.15] per order). A trial stops where
    the rungs say so or at its last step. `grace` defaults to the sweep's own (`first_cut`).
    Returns the trial-steps' share of the full grid (min, max over orders) and the share of
    orders that keep the full grid's winner.
    """
    from peerlab.tune import Rungs, first_cut

    plan = json.loads((sweep / "sweep.json").read_text())
    metric, sign = plan["metric"], (-1 if plan["mode"] == "min" else 1)
    trials = pd.read_parquet(sweep / "trials.parquet").set_index("trial_id")
    curves = pd.read_parquet(sweep / "curves.parquet").dropna(subset=[metric])
    points = {t: dict(zip(g["step"], sign * g[metric])) for t, g in curves.groupby("trial_id")}  # rewards
    order = [t["trial_id"] for t in plan["trials"]]
    last = {t: int(trials.loc[t, "steps"]) for t in order}
    pace = {t: trials.loc[t, "train_s"] / last[t] for t in order}
    winner = trials[metric].idxmin() if plan["mode"] == "min" else trials[metric].idxmax()
    if grace is None:
        grace = first_cut([t["config"] for t in plan["trials"]], metric, max(last.values()))
    slots, rng, shares, kept = plan["resources"]["max_concurrent"], random.Random(0), [], 0
    for _ in range(orders):
        seconds = {t: pace[t] * rng.uniform(0.85, 1.15) for t in order}  # a step, this order
        stopped_at = replay_once(order, points, last, seconds, slots, Rungs(grace, max(last.values()) + 1, rf), start_s)
        shares.append(sum(stopped_at.values()) / sum(last.values()))
        kept += stopped_at[winner] >= last[winner]
    return {"min": min(shares), "max": max(shares), "kept": kept / orders, "grace": grace}


def replay_once(order, points, last, seconds, slots, rungs, start_s) -> dict:
    """{trial: step it stopped at} for one arrival order (see `replay`)."""
    queue, running, stopped_at, events = list(order), set(), {}, []

    def launch(now: float) -> None:
        while queue and len(running) < slots:
            t = queue.pop(0)
            running.add(t)
            for step in points[t]:
                heapq.heappush(events, (now + start_s + step * seconds[t], t, step))

    launch(0.0)
    while events:
        now, t, step = heapq.heappop(events)
        if t in running and (step >= last[t] or not rungs.report(t, step, points[t][step])):
            stopped_at[t] = step
            running.discard(t)
            launch(now)
    return stopped_at


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="output/bench-sweep", help="folder for both sweeps (emptied first)")
    ap.add_argument("--skip-asha", action="store_true")
    ap.add_argument(
        "--reuse-full", action="store_true", help="read the full grid's sweep from --out instead of running it"
    )
    args, extra = ap.parse_known_args(argv)
    out = Path(args.out).resolve()
    if out.exists() and not args.reuse_full:
        import shutil

        shutil.rmtree(out)
    print(f"demo sweep on {platform.machine()}, {os.cpu_count()} CPUs", flush=True)
    full = measure("full", out, extra, run=not args.reuse_full)
    runs = [full]
    if not args.skip_asha:
        runs.append(measure("asha", out, ["--scheduler", "asha", *extra]))
    print()
    print(f"| sweep | wall | in training steps | share of wall x trials at once "
          f"| trial-steps | statuses | best cell ({full['metric']}) |")  # fmt: skip
    print("| --- | ---: | ---: | ---: | ---: | --- | --- |")
    for r in runs:
        statuses = ", ".join(f"{n} {s}" for s, n in r["statuses"].items())
        print(f"| {r['name']} | {r['wall_s']:.0f} s | {r['train_s']:.0f} s | {100 * r['share']:.0f}% "
              f"| {r['trial_steps']} | {statuses} | {r['best']} ({r['best_value']:.4f}) |")  # fmt: skip
    if len(runs) == 2:
        asha = runs[1]
        print(f"ASHA / full grid trial-steps: {asha['trial_steps'] / full['trial_steps']:.2f}; "
              f"same best cell: {asha['best'] == full['best']}")  # fmt: skip
    plan = json.loads((out / "full" / "sweep.json").read_text())
    bound = rank_bound(out / "full", plan["metric"], plan["mode"])
    print(f"fewest trial-steps any early stopping at these evaluations could run and keep the winner: "
          f"{bound['trial_steps']} ({bound['share']:.2f} of the full grid)")  # fmt: skip
    r = replay(out / "full")
    print(f"ASHA replayed on the full grid's curves over 200 arrival orders (first cut {r['grace']} steps): "
          f"{r['min']:.2f} to {r['max']:.2f} of the trial-steps, winner kept in {100 * r['kept']:.0f}%")  # fmt: skip


if __name__ == "__main__":
    main()
