"""Running lm-eval tasks on a model: task lookup, offline skips, and the rows of `evals.jsonl`.

`run_lm_eval(lm, names, registry_path, ...)` resolves the task names with lm-eval's
`TaskManager` (the registry folder as include path; lm-eval's own 14,000 task configs are
indexed only when a name is not in the registry, which saves about 6 s), loads each task on
its own, and runs the loaded ones with `lm_eval.simple_evaluate`. A task whose data cannot be
had (a hub dataset with HF_HUB_OFFLINE=1, a missing data file) gives one warning line naming
it and how to make it available, and the others run. A code-executing task (humaneval) runs
only with `confirm_run_unsafe_code`, as lm-eval requires. An unknown name is an `EvalError`.

Each result becomes a row {step, task, metric, value, stderr}: `metric` is lm-eval's metric
name, with its filter appended after a comma when that is not "none" (gsm8k's
`exact_match,strict-match`); `stderr` is null where lm-eval gives none.

lm-eval ends every `simple_evaluate` with `add_env_info`, whose torch `collect_env` runs
`pip list` and `nvidia-smi` (1.1-1.5 s a call here, paid at every evaluation of every trial);
`light_env_info` records the versions instead, and the rows never used the rest.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from peerlab.eval.lm import EvalError
from peerlab.eval.registry import DATA_KEY, EvalDataError

log = logging.getLogger("peerlab.eval")


@dataclass
class EvalOutcome:
    rows: list[dict]  # {"task", "metric", "value", "stderr"}
    skipped: dict[str, str] = field(default_factory=dict)  # task -> the warning line
    seconds: float = 0.0


def task_manager(names: list[str], registry_path: str | Path | None, data_dir: str | Path | None = None):
    """A TaskManager that knows `names`: the registry alone when it holds them all, else lm-eval's tasks too."""
    from lm_eval.tasks import TaskManager

    metadata = {DATA_KEY: str(Path(data_dir).expanduser().resolve())} if data_dir else None
    include = None
    if registry_path:
        registry = Path(registry_path).expanduser()
        if not registry.is_dir():
            raise EvalError(f"eval registry {registry} is not a folder of lm-eval task YAML")
        include = str(registry.resolve())
        manager = TaskManager(include_path=include, include_defaults=False, metadata=metadata)
        if all(_known(manager, n) for n in names):
            return manager
    manager = TaskManager(include_path=include, metadata=metadata)
    unknown = [n for n in names if not _known(manager, n)]
    if unknown:
        everything = manager.all_tasks + manager.all_groups + manager.all_tags
        close = difflib.get_close_matches(unknown[0], everything, n=3)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise EvalError(f"unknown lm-eval task '{unknown[0]}' (not in lm-eval nor in {registry_path}){hint}")
    return manager


def _known(manager, name: str) -> bool:
    return name in manager.all_tasks or name in manager.all_groups or name in manager.all_tags


def unavailable_message(name: str, err: BaseException) -> str:
    """The one warning line for a task that cannot be loaded."""
    first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
    if isinstance(err, EvalDataError):
        return f"lm-eval task '{name}' skipped: {first}"
    return (
        f"lm-eval task '{name}' skipped: its data cannot be loaded here ({type(err).__name__}: {first}); "
        "to make it available run it once where the Hugging Face hub is reachable (or pre-download its dataset "
        "into the HF cache, HF_HOME), then offline runs (HF_HUB_OFFLINE=1) find it there"
    )


def load_tasks(manager, names: list[str], confirm_run_unsafe_code: bool = False) -> tuple[list, dict[str, str]]:
    """(loaded Task and Group objects, {name: warning line} of those skipped); one task failing spares the rest."""
    loaded, skipped = [], {}
    for name in names:
        try:
            built = manager.load([name])
        except Exception as err:  # lm-eval raises whatever datasets raises: connection, file, value errors
            skipped[name] = unavailable_message(name, err)
            log.warning(skipped[name])
            continue
        unsafe = [t for t, task in built["tasks"].items() if getattr(task, "UNSAFE_CODE", False)]
        if unsafe and not confirm_run_unsafe_code:
            skipped[name] = (
                f"lm-eval task '{name}' skipped: it executes model-written code ({', '.join(unsafe)}); "
                "opt in with eval_config.confirm_run_unsafe_code: true (lm-eval: --confirm_run_unsafe_code, "
                "and HF_ALLOW_CODE_EVAL=1)"
            )
            log.warning(skipped[name])
            continue
        children = {c for kids in built["group_map"].values() for c in kids}
        top = [group for g, group in built["groups"].items() if g not in children]
        loaded += top or list(built["tasks"].values())  # a group brings its own tasks; a tag is its tasks
    return loaded, skipped


def result_rows(results: dict) -> list[dict]:
    """{"task", "metric", "value", "stderr"} for every numeric metric of lm-eval's results["results"]."""
    rows = []
    for task, entry in results.get("results", {}).items():
        for key, value in entry.items():
            if "," not in key or "_stderr," in key:
                continue
            metric, filt = key.split(",", 1)
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            stderr = entry.get(f"{metric}_stderr,{filt}")
            stderr = float(stderr) if isinstance(stderr, (int, float)) and math.isfinite(stderr) else None
            rows.append(
                {
                    "task": task,
                    "metric": metric if filt == "none" else f"{metric},{filt}",
                    "value": float(value),
                    "stderr": stderr,
                }
            )
    return rows


def run_lm_eval(
    lm,
    names: list[str],
    registry_path: str | Path | None,
    data_dir: str | Path | None = None,
    limit: int | float | None = None,
    confirm_run_unsafe_code: bool = False,
    bootstrap_iters: int = 1000,
) -> EvalOutcome:
    """Run the lm-eval tasks `names` on `lm` (a PeerlabLM or any lm_eval LM); see the module docstring."""
    import lm_eval

    start = time.perf_counter()
    if not names:
        return EvalOutcome(rows=[])
    manager = task_manager(names, registry_path, data_dir)
    loaded, skipped = load_tasks(manager, names, confirm_run_unsafe_code)
    if not loaded:
        return EvalOutcome(rows=[], skipped=skipped, seconds=time.perf_counter() - start)
    with light_env_info():
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=loaded,
            task_manager=manager,
            limit=limit,
            bootstrap_iters=bootstrap_iters,
            log_samples=False,
            confirm_run_unsafe_code=confirm_run_unsafe_code,
            verbosity="WARNING",
        )
    return EvalOutcome(rows=result_rows(results or {}), skipped=skipped, seconds=time.perf_counter() - start)


@contextlib.contextmanager
def light_env_info():
    """lm-eval's `add_env_info` without torch's `collect_env` (a `pip list` subprocess): versions only."""
    from importlib.metadata import version

    import lm_eval.evaluator
    import torch
    import transformers

    def add_versions(storage: dict) -> None:
        storage.update(
            pretty_env_info=f"torch {torch.__version__}",
            transformers_version=transformers.__version__,
            lm_eval_version=version("lm_eval"),
        )

    full = lm_eval.evaluator.add_env_info
    lm_eval.evaluator.add_env_info = add_versions
    try:
        yield
    finally:
        lm_eval.evaluator.add_env_info = full


def format_table(rows: list[dict]) -> str:
    """The rows as a plain text table: task, metric, value, stderr."""
    lines = [f"{'task':<28} {'metric':<24} {'value':>12} {'stderr':>10}"]
    for r in rows:
        stderr = f"{r['stderr']:.4f}" if r["stderr"] is not None else "-"
        lines.append(f"{r['task']:<28} {r['metric']:<24} {r['value']:>12.4f} {stderr:>10}")
    return "\n".join(lines)
