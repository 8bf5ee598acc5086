"""Where a run's numbers go: metrics.jsonl, Ray's dashboard metrics, wandb (optional), the driver's progress.

Only rank 0 writes. `metrics.jsonl` holds one JSON object per logged step; `evals.jsonl` one
per lm-eval result (`append_evals`: step, task, metric, value, stderr), appended, never rewritten. Loss and
tokens/s are also Ray metrics (`ray.util.metrics.Gauge`), which the Ray dashboard shows.
wandb runs only when the config has a `wandb_config`; `WANDB_MODE=offline` works without an
account. The driver follows the run folder (`Progress`) and prints a line per start of the
workers, per logged step and per lm-eval evaluation.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import math
import re
import secrets
import threading
import time
from pathlib import Path

log = logging.getLogger("peerlab.train")


def wandb_run_id(run_dir: Path) -> str:
    """The run's wandb id, kept in <run>/wandb_id: made once per run folder (its name and 8 random hex
    digits), so the same run resumed logs on in its wandb run (on object storage too: the file travels
    with the run's files), while runs of the same name in other folders (the same trial id in another
    sweep) or in a folder deleted and used again get wandb runs of their own. A folder from before the
    file, whose wandb/ holds a run under the bare name (the id used then), keeps that id."""
    path = Path(run_dir) / "wandb_id"
    kept = path.read_text().strip() if path.is_file() else ""
    if kept:
        return kept
    name = Path(run_dir).name
    if any((Path(run_dir) / "wandb").glob(f"*run-*-{glob.escape(name)}")):
        run_id = name
    else:
        run_id = f"{re.sub(r'[^A-Za-z0-9_.-]', '-', name)[:48]}-{secrets.token_hex(4)}"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(".wandb_id.tmp")
    tmp.write_text(run_id + "\n")
    tmp.replace(path)
    return run_id


class MetricsLog:
    """Appends one JSON object per logged step to <run>/metrics.jsonl (and to the dashboard and wandb)."""

    def __init__(self, run_dir: Path, config, enabled: bool):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.gauges = None
        self.wandb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        end_cut_line(self.path)
        try:
            from ray.util.metrics import Gauge

            self.gauges = {
                "loss": Gauge("peerlab_train_loss", description="training loss of the latest logged step"),
                "tokens_per_s": Gauge("peerlab_tokens_per_s", description="training tokens per second"),
            }
        except Exception as err:  # no Ray worker context (a plain in-process run): the dashboard is not there
            log.debug("Ray metrics unavailable: %s", err)
        if config.wandb_config is not None:
            import wandb

            w = config.wandb_config
            self.wandb = wandb.init(
                project=w.project,
                entity=w.entity,
                name=w.name or Path(run_dir).name,
                dir=str(run_dir),
                config=_plain(config),
                resume="allow",
                id=wandb_run_id(run_dir),
            )
            # Every chart's x axis is the training step, logged as a value ("step") rather than as
            # wandb's own row counter: rows of a step wandb has passed (a resumed run's first steps,
            # the lm-eval set of a run resumed at its end) are kept instead of dropped.
            self.wandb.define_metric("step")
            self.wandb.define_metric("*", step_metric="step", step_sync=True)
            self.log_model = w.log_model

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.gauges:
            for key, gauge in self.gauges.items():
                if key in record and math.isfinite(record[key]):
                    gauge.set(record[key])
        if self.wandb is not None:
            wandb_log(self.wandb, record, record["step"])

    def checkpoint(self, folder: Path, step: int, final: bool = False) -> None:
        """wandb log_model: 'checkpoints' logs every checkpoint, 'all' also the final model; null nothing."""
        if self.wandb is None or self.log_model is None or (final and self.log_model != "all"):
            return
        import wandb

        artifact = wandb.Artifact(f"{self.wandb.name}-model", type="model", metadata={"step": step})
        artifact.add_dir(str(folder))
        self.wandb.log_artifact(artifact, aliases=[f"step-{step}", *(["final"] if final else [])])

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


def wandb_log(run, values: dict, step: int) -> None:
    """Log `values` to the wandb run at training step `step` (the x axis MetricsLog defines)."""
    run.log({**values, "step": step})


def _plain(config) -> dict:
    from peerlab.config import to_dict

    return to_dict(config)


def end_cut_line(path: Path) -> None:
    """Before appending to a JSON-lines file: end a last line a crash cut short, so the lines that follow
    stay whole (`read_lines` leaves the cut one out)."""
    if path.is_file() and path.stat().st_size:
        with open(path, "rb+") as f:
            f.seek(-1, 2)
            if f.read(1) != b"\n":
                f.write(b"\n")


def read_lines(path: Path) -> list[dict]:
    """The records of a JSON-lines file (none if it is missing). A line that does not parse (one a crash
    cut short) is left out."""
    path = Path(path)
    records = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            record = json.loads(line)
        except ValueError:
            if line.strip():
                log.warning("%s: a line that is not JSON is left out: %.80s", path, line)
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def read_metrics(run_dir: Path) -> list[dict]:
    return read_lines(Path(run_dir) / "metrics.jsonl")


EVAL_KEYS = ("step", "task", "metric", "value", "stderr")


def append_evals(run_dir: Path, step: int, rows: list[dict], wandb_run=None) -> Path:
    """Append lm-eval results to <run>/evals.jsonl: one {step, task, metric, value, stderr} per line.

    Earlier lines are never rewritten. With a wandb run each value is also logged as
    `lm_eval/<task>/<metric>` at `step`.
    """
    path = Path(run_dir) / "evals.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    end_cut_line(path)
    with open(path, "a") as f:
        for row in rows:
            f.write(json.dumps({"step": step, **{k: row.get(k) for k in EVAL_KEYS[1:]}}) + "\n")
    if wandb_run is not None and rows:
        wandb_log(wandb_run, {f"lm_eval/{r['task']}/{r['metric']}": r["value"] for r in rows}, step)
    return path


def read_evals(run_dir: Path) -> list[dict]:
    return read_lines(Path(run_dir) / "evals.jsonl")


class Progress(threading.Thread):
    """Follows a run folder in the driver and prints the run's lines as they arrive.

    A line when the workers start (and again when Ray Train restarts them after losing one),
    a line per logged step (`format_progress`) and a table per lm-eval evaluation. Files that
    exist when it starts belong to earlier runs of the folder: only what is new is printed.
    """

    def __init__(self, run_dir: Path, total_steps: int, every: float = 1.0):
        super().__init__(daemon=True)
        self.run_dir = Path(run_dir)
        self.total = total_steps
        self.every = every
        self.stop = threading.Event()
        self.offsets = {name: self._size(name) for name in ("metrics.jsonl", "evals.jsonl")}
        self.info_stamp = self._stamp()
        self.attempts = 0

    def _size(self, name: str) -> int:
        path = self.run_dir / name
        return path.stat().st_size if path.is_file() else 0

    def _stamp(self) -> int | None:
        path = self.run_dir / "run_info.json"
        return path.stat().st_mtime_ns if path.is_file() else None

    def run(self) -> None:
        while not self.stop.is_set():
            self.poll()
            self.stop.wait(self.every)
        self.poll()

    def _new_records(self, name: str) -> list[dict]:
        path = self.run_dir / name
        if not path.is_file():
            return []
        records = []
        with open(path) as f:
            f.seek(self.offsets[name])
            for line in f:
                if not line.endswith("\n"):
                    break
                self.offsets[name] += len(line)
                with contextlib.suppress(ValueError):  # a line a crash cut short (read_lines)
                    records.append(json.loads(line))
        return records

    def poll(self) -> None:
        stamp = self._stamp()
        if stamp is not None and stamp != self.info_stamp:  # run_info.json is rewritten at every start of the workers
            self.info_stamp = stamp
            self.attempts += 1
            print(format_start(json.loads((self.run_dir / "run_info.json").read_text()), self.attempts), flush=True)
        for record in self._new_records("metrics.jsonl"):
            print(format_progress(record, self.total), flush=True)
        rows = self._new_records("evals.jsonl")
        if rows:
            from peerlab.eval.harness import format_table

            for step in sorted({r["step"] for r in rows}):
                table = format_table([r for r in rows if r["step"] == step])
                print(f"lm-eval at step {step}:\n{table}", flush=True)


def format_start(info: dict, attempt: int) -> str:
    """The line of a start of the workers, from its run_info.json."""
    where = f"{info.get('workers', 1)} {info.get('device', '?')} worker(s)"
    start = info.get("start_step", 0)
    if attempt > 1:
        return f"workers restarted (attempt {attempt}): {where}, continuing from the checkpoint of step {start}"
    return f"training on {where}" + (f", continuing from the checkpoint of step {start}" if start else "")


def format_progress(record: dict, total: int) -> str:
    step, rate = record.get("step", 0), record.get("tokens_per_s", 0.0)
    eta = record.get("eta_s")
    eta_text = time.strftime("%H:%M:%S", time.gmtime(eta)) if eta is not None and math.isfinite(eta) else "?"
    # a held-out evaluation off the logging grid has a record of its own, without loss, rate or ETA
    trained = "loss" in record
    parts = [f"step {step}/{total}", *([f"loss {record['loss']:.4f}", f"{rate:,.0f} tokens/s"] if trained else [])]
    evals = [f"{k.split('/', 1)[1]} {v:.3f}" for k, v in record.items() if k.startswith("eval_loss/")]
    if evals:
        parts.append("held-out " + ", ".join(evals))
    return "  ".join([*parts, *([f"ETA {eta_text}"] if trained else [])])
