"""One training run as one Ray Train job: the cluster, the workers' resources, the TorchTrainer.

`start_ray(address)` joins the cluster at `address` (or RAY_ADDRESS), else starts a local
one bound to 127.0.0.1 with its dashboard. `scaling_config(cfg)` sizes the workers from the
config and the cluster: one GPU per worker (nccl) where there are enough GPUs, otherwise
CPU workers (gloo) that ask for at most one CPU each and leave one for Ray Data, so that
2 workers on a 2-core machine do not wait forever for resources (FACTS.md).
`fit(cfg, run_dir)` runs `peerlab.train.worker.train_loop` on them and prints a progress line
per logged step. Ray Train restarts the worker group up to `max_failures` times when workers
are lost; an error no restart can fix (bad config, data, tokenizer or checkpoint, a
non-finite loss: `peerlab.train.failures`) ends the run at once, and `fit` raises it as the
worker did.

By default Ray's own output (the workers' and the controller's logs, Ray Train's report
dumps, its warnings) stays in Ray's log files; `start_ray(verbose=True)` sends it to the
console as well.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import yaml

from peerlab.cli import job_runtime_env
from peerlab.config import Config, to_dict
from peerlab.train.optim import total_steps
from peerlab.train.worker import environment, train_loop


def start_ray(address: str | None = None, verbose: bool = False) -> tuple[str | None, str | None]:
    """Connect to (or start) Ray; returns the dashboard URL and the folder of Ray's logs (None where unknown).

    Without `verbose` the workers' and Ray's own logs stay in that folder (and on the
    dashboard): the console shows the platform's lines only.
    """
    import logging

    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # local clusters: no token for the dashboard (FACTS.md)
    if ray.is_initialized():
        context = ray.get_runtime_context()
        return getattr(context, "dashboard_url", None), None
    address = address or os.environ.get("RAY_ADDRESS")
    console = {"log_to_driver": verbose, "logging_level": logging.INFO if verbose else logging.WARNING}
    if address:
        # Inside `ray job submit`, Ray refuses a runtime env that repeats a key of the job's own
        job = (job_runtime_env() or {}).get("env_vars") or {}
        env_vars = {k: v for k, v in environment().items() if k not in job}
        info = ray.init(address=address, runtime_env={"env_vars": env_vars}, **console)
    else:
        info = ray.init(
            _node_ip_address="127.0.0.1",
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            runtime_env={"env_vars": environment()},
            **console,
        )
    url = info.dashboard_url
    session = info.address_info.get("session_dir")
    return (f"http://{url}" if url and not url.startswith("http") else url), (session and f"{session}/logs")


def scaling_config(cfg: Config):
    import ray
    from ray.train import ScalingConfig

    t = cfg.train_config
    workers = t.num_workers
    resources = ray.cluster_resources()
    gpus, cpus = resources.get("GPU", 0), resources.get("CPU", 1)
    use_gpu = t.use_gpu if t.use_gpu is not None else (workers > 0 and gpus >= workers)
    if use_gpu:
        return ScalingConfig(num_workers=workers, use_gpu=True)
    per_worker = min(1.0, max(0.1, (cpus - 1.0) / max(workers, 1)))
    return ScalingConfig(num_workers=workers, use_gpu=False, resources_per_worker={"CPU": per_worker})


def absolute_paths(cfg: Config, base: Path | None = None) -> Config:
    """The config with its local paths made absolute: Ray workers run in other working directories."""
    from dataclasses import replace

    from peerlab.data.sources import is_local
    from peerlab.storage import is_remote, local_path

    base = base or Path.cwd()

    def fix(path: str) -> str:
        if is_remote(path):  # object storage (peerlab.storage): a URI, the same from every worker
            return path
        p = local_path(path).expanduser()
        return str(p if p.is_absolute() else (base / p).resolve())

    d, t, e = cfg.dataset_config, cfg.train_config, cfg.eval_config
    datasets = [replace(x, path=fix(x.path)) if is_local(x) else x for x in d.datasets]
    eval_datasets = [replace(x, path=fix(x.path)) if is_local(x) else x for x in d.eval_datasets]
    tokenizer = fix(d.tokenizer_name) if (base / d.tokenizer_name).exists() else d.tokenizer_name
    resume = fix(t.resume_from_checkpoint) if t.resume_from_checkpoint else None
    return replace(
        cfg,
        dataset_config=replace(d, datasets=datasets, eval_datasets=eval_datasets, tokenizer_name=tokenizer),
        train_config=replace(t, output_dir=fix(t.output_dir), resume_from_checkpoint=resume),
        eval_config=replace(
            e,
            evals_registry_path=fix(e.evals_registry_path),
            eval_data_dir=fix(e.eval_data_dir) if e.eval_data_dir else None,
        ),
    )


def epoch_tokens(cfg: Config) -> int:
    """Tokens (with end-of-text tokens) of one pass over every training dataset, counted in this process."""
    from peerlab.data.sources import Selection, documents
    from peerlab.data.tokenizer import cached_tokenizer

    tokenizer = cached_tokenizer(cfg.dataset_config.tokenizer_name)
    selection = Selection(heldout_fraction=cfg.dataset_config.heldout_fraction)
    total = 0
    for entry in cfg.dataset_config.datasets:
        texts = [text for _, _, text in documents(entry, selection)]
        for start in range(0, len(texts), 512):
            total += sum(
                len(ids) + 1 for ids in tokenizer(texts[start : start + 512], add_special_tokens=False)["input_ids"]
            )
    return total


def with_steps_per_epoch(cfg: Config) -> Config:
    """Epochs over datasets that are not streamed, without steps_per_epoch: one epoch is one pass over them all.

    steps_per_epoch = blocks in that pass / blocks per optimizer step (all workers), rounded up.
    """
    from dataclasses import replace

    t, d = cfg.train_config, cfg.dataset_config
    if t.num_train_epochs is None or t.steps_per_epoch is not None:
        return cfg
    blocks = epoch_tokens(cfg) // (d.max_seq_length + 1)
    per_step = t.per_device_train_batch_size * t.gradient_accumulation_steps * max(t.num_workers, 1)
    steps = max(1, -(-blocks // per_step))
    return replace(cfg, train_config=replace(t, steps_per_epoch=steps))


def write_resolved_config(cfg: Config, run_dir: Path) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "resolved_config.yaml"
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return path


def fit(cfg: Config, run_dir: Path | str, quiet: bool = False, callbacks: list | None = None, **loop_options):
    """Run the training job; returns Ray Train's Result.

    `run_dir` may be a URI (s3://bucket/runs/name, peerlab.storage): the run then trains in a
    local staging folder (a temporary one, removed after), which starts with the URI's run files
    and newest complete checkpoint, and rank 0 mirrors it back at every checkpoint and at the end.

    Raises a worker's own error as it was raised (`peerlab.train.failures.NOT_RETRIED`: the
    workers are not restarted for it), and Ray Train's error when it gave up on lost workers. `callbacks` go to Ray
    Train's RunConfig (a sweep passes Tune's TuneReportCallback).
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig

    from peerlab import storage
    from peerlab.tracking import Progress
    from peerlab.train.failures import Trainer, own_error

    staging = None
    if storage.is_remote(str(run_dir)):
        uri = str(run_dir).rstrip("/")
        staging = Path(tempfile.mkdtemp(prefix="peerlab-run-"))
        run_dir = staging / uri.rsplit("/", 1)[-1]
        storage.pull_run(uri, run_dir)
        loop_options["run_uri"] = uri
    run_dir = storage.local_path(str(run_dir)).resolve()
    cfg = with_steps_per_epoch(absolute_paths(cfg))
    write_resolved_config(cfg, run_dir)
    trainer = Trainer(
        train_loop,
        train_loop_config={"config": to_dict(cfg), "run_dir": str(run_dir), **loop_options},
        scaling_config=scaling_config(cfg),
        run_config=RunConfig(
            name=run_dir.name,
            storage_path=str(run_dir.parent / ".ray"),
            failure_config=FailureConfig(max_failures=cfg.train_config.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=1),
            callbacks=callbacks or None,
        ),
    )
    progress = None if quiet else Progress(run_dir, total_steps(cfg.train_config))
    if progress:
        progress.start()
    finished = False
    try:
        result = trainer.fit()
        finished = result.error is None
        return result
    except Exception as err:
        original = own_error(err)
        if original is None:
            raise
        raise original from None
    finally:
        if progress:
            progress.stop.set()
            progress.join()
        if staging is not None and finished:  # everything went up with the run's last push
            shutil.rmtree(staging, ignore_errors=True)
        elif staging is not None:  # lines after the last checkpoint did not: the folder stays
            print(f"the run's local folder stays in {run_dir} (what it wrote after its last checkpoint is only there)")
