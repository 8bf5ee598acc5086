"""Command-line plumbing shared by the scripts in experiments/: --config, --set, --verbose, checks, exit statuses.

Exit statuses of experiments/train.py (ablate.py uses 0, 2 and 130: its failed trials are recorded, not fatal):

    0    done
    1    the run failed: Ray Train gave up after restarting lost workers max_failures times, or an unexpected error
    2    refused before anything started: a config, data, tokenizer, checkpoint path or flag that cannot be used
    3    the run stopped on an error no restart can fix (a non-finite loss, bad data met in training)
    130  interrupted (Ctrl-C; the same command continues the run); ablate.py: trials were left unfinished, continue
         with --resume
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from peerlab.config import Config, ConfigError, load_config

DONE, FAILED, REFUSED, STOPPED, INTERRUPTED = 0, 1, 2, 3, 130
DEMO_DATA = "./data/demo"  # where configs read the embedded default corpus; the run prepares it (checked_data)


class UsageError(SystemExit):
    """Exit status 2 with a one-line message on stderr, before anything starts."""

    def __init__(self, message: str):
        print(f"error: {message}", file=sys.stderr)
        super().__init__(REFUSED)


def add_config_arguments(parser: argparse.ArgumentParser, default_config: str | None, help: str | None = None) -> None:
    parser.add_argument("--config", default=default_config, help=help or f"YAML config (default: {default_config})")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one key, e.g. --set train_config.learning_rate=3e-4 (repeatable)",
    )


def config_from_arguments(args: argparse.Namespace) -> Config:
    """The validated config named by --config and --set; a bad one exits 2 with one line."""
    try:
        return load_config(args.config, args.overrides)
    except ConfigError as err:
        raise UsageError(str(err)) from None


def add_verbose_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="also show Ray's own output (worker and controller logs, Ray Train's reports, warnings) here; "
        "by default it stays in Ray's log folder, printed at the start",
    )


def reads_demo_corpus(path: str) -> bool:
    """A dataset path of the embedded default corpus, which the run prepares itself when it is missing."""
    return str(path).startswith(DEMO_DATA)


def checked_data(cfg: Config):
    """Prepare the demo corpus when the config reads it, then check the data; returns the tokenizer.

    Runs before Ray starts; bad data exits 2 with one line.
    """
    from peerlab.data import DataError, TokenizerError, check_data
    from peerlab.data.corpus import prepare_demo_corpus

    d = cfg.dataset_config
    if any(reads_demo_corpus(e.path) for e in [*d.datasets, *d.eval_datasets]):
        prepare_demo_corpus(DEMO_DATA)
    try:
        tokenizer = check_data(cfg.dataset_config, cfg.model_config, workers=max(cfg.train_config.num_workers, 1))
    except (DataError, TokenizerError) as err:
        raise UsageError(str(err)) from None
    for entry in d.datasets:  # a folder with files it never reads (test/, another split): said once a process
        said = split_summary(entry)
        if said and entry.path not in _said:
            _said.add(entry.path)
            print(f"dataset '{entry.name}': {entry.path} {said}", flush=True)
    return tokenizer


_said: set[str] = set()  # the folders whose split_summary was printed


def split_summary(entry) -> str:
    """FileList.summary of a local folder with files it never reads (empty otherwise: a file, a hub dataset,
    a folder that trains on all its files, or on all but its held-out ones)."""
    from peerlab.data import list_files
    from peerlab.data.sources import is_local

    if not is_local(entry) or not Path(entry.path).expanduser().is_dir():
        return ""
    files = list_files(entry)
    return files.summary() if files.unread else ""


def checked_evals(cfg: Config) -> None:
    """Every name in eval_config.evals is a task lm-eval or the registry knows; else exit 2 with one line.

    Runs before Ray starts, so a misspelt benchmark fails now and not after training.
    """
    if not cfg.eval_config.evals:
        return
    from peerlab.eval.harness import task_manager
    from peerlab.eval.lm import EvalError

    try:
        task_manager(cfg.eval_config.evals, cfg.eval_config.evals_registry_path, cfg.eval_config.eval_data_dir)
    except EvalError as err:
        raise UsageError(str(err)) from None


def checked_paths(cfg: Config) -> list[str]:
    """Every local dataset path exists (files are not read); else exit 2 with one line. For dry runs.

    Paths of the embedded default corpus are prepared by the run itself: while they are
    missing they are returned (to be reported) instead of refused.
    """
    from peerlab.data import DataError, list_files
    from peerlab.data.sources import is_local

    prepared_by_the_run = []
    for entry in [*cfg.dataset_config.datasets, *cfg.dataset_config.eval_datasets]:
        if not is_local(entry):
            continue
        if reads_demo_corpus(entry.path) and not Path(entry.path).exists():
            prepared_by_the_run.append(entry.path)
            continue
        try:
            list_files(entry)
        except DataError as err:
            raise UsageError(str(err)) from None
    return prepared_by_the_run


def checked_storage(uri: str) -> None:
    """An output_dir on object storage can be written with the environment's credentials; a local one is
    not inside a submitted job's copy of its working directory (which Ray deletes); else exit 2 with
    one line naming it. Runs before Ray starts."""
    from peerlab.storage import StorageError, check_writable, is_remote, local_path

    if not is_remote(uri):
        job_dir = submitted_job_dir()
        path = local_path(uri).expanduser().resolve()
        if job_dir is not None and (path == job_dir or job_dir in path.parents):
            raise UsageError(
                f"train_config.output_dir: {uri} is inside this job's copy of --working-dir ({job_dir}), which Ray "
                "deletes after the job: give an s3:// URI or an absolute path every node shares "
                "(--set train_config.output_dir=...)"
            )
        return
    try:
        check_writable(uri)
    except StorageError as err:
        raise UsageError(f"train_config.output_dir: {err}") from None


def job_runtime_env() -> dict | None:
    """The runtime env of a job run by `ray job submit` (its working_dir, env_vars), None outside one."""
    import json
    import os

    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")  # set by Ray's job supervisor for the job's entrypoint
    if not raw:
        return None
    try:
        return json.loads(raw).get("runtime_env") or {}
    except ValueError:
        return None


def submitted_job_dir() -> Path | None:
    """The working directory of a job run by `ray job submit --working-dir` (Ray unpacks a copy there), else None."""
    return Path.cwd().resolve() if (job_runtime_env() or {}).get("working_dir") else None


def checked_resume(cfg: Config) -> Config:
    """The config with resume_from_checkpoint resolved to one complete checkpoint, before Ray starts.

    It may name a checkpoint folder, a run folder or a run's checkpoints/ folder (their
    newest complete checkpoint), locally or on object storage (s3://...: the checkpoint is
    downloaded into a temporary folder and checked against its manifest). Anything else exits 2
    with one line.
    """
    from peerlab.train.checkpoint import CheckpointError, resolve, step_of

    t = cfg.train_config
    if not t.resume_from_checkpoint:
        return cfg
    try:
        folder = resolve(fetched(t.resume_from_checkpoint))
    except CheckpointError as err:
        raise UsageError(f"train_config.resume_from_checkpoint: {err}") from None
    step = step_of(folder)
    if t.max_steps and step > t.max_steps:
        raise UsageError(
            f"train_config.resume_from_checkpoint: {folder} is at step {step}, past max_steps = {t.max_steps}; "
            "raise max_steps or resume from an earlier checkpoint"
        )
    return dataclasses.replace(cfg, train_config=dataclasses.replace(t, resume_from_checkpoint=str(folder)))


def _differences(old: dict, new: dict, prefix: str) -> list[str]:
    """'key: old -> new' for each leaf where two config sections differ (lists of one length item by item)."""
    out = []
    for key in dict.fromkeys([*old, *new]):
        a, b = old.get(key), new.get(key)
        if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
            a, b = dict(enumerate(a)), dict(enumerate(b))
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}.{key}")
        elif a != b:
            out.append(f"{prefix}.{key}: {a!r} -> {b!r}")
    return out


def _weights_misfit(cfg: Config, checkpoint: str) -> str | None:
    """Where the weights of `checkpoint` (a path or a URI) do not fit the model `cfg` builds, in words; None where
    they fit. Read from model.safetensors' header alone; the model is built on the meta device."""
    import torch

    from peerlab import storage
    from peerlab.model import build_model

    file = storage.join(checkpoint, "model.safetensors")
    try:
        header = storage.read_safetensors_header(file)
    except (OSError, ValueError, storage.StorageError):  # unreadable: the worker's load checks it against the manifest
        return None
    saved = {name: tuple(t["shape"]) for name, t in header.items() if name != "__metadata__"}
    with torch.device("meta"):
        wanted = {name: tuple(t.shape) for name, t in build_model(cfg.model_config).state_dict().items()}

    def shape(name: str, of: dict) -> str:
        return "none" if of.get(name) is None else "x".join(map(str, of[name])) or "a scalar"

    for name in sorted(saved.keys() | wanted.keys()):
        if saved.get(name) != wanted.get(name):
            return f"{name}: {shape(name, saved)} in the checkpoint, {shape(name, wanted)} in this config's model"
    return None


def checked_weights(cfg: Config) -> None:
    """A resume_from_checkpoint (resolved by `checked_resume`) whose weights do not fit this config's model: one
    line before Ray starts (it failed in the workers, after Ray started)."""
    named = cfg.train_config.resume_from_checkpoint
    misfit = _weights_misfit(cfg, named) if named else None
    if misfit is not None:
        raise UsageError(
            f"train_config.resume_from_checkpoint: {named} holds another model than this config's ({misfit})"
        )


def checked_continuation(cfg: Config, run_dir: str) -> bool:
    """A run folder (a path or a URI) that holds checkpoints continues from its newest: checked before Ray starts
    and before the folder's resolved_config.yaml is written again. A config whose model the checkpoint's weights
    do not fit (names and shapes), or a newest checkpoint past max_steps, exits 2 with one line; another
    model_config that the weights still fit (rope_theta, the usage logging), another data config or seed, and a
    resume_from_checkpoint that is not the one used, are said on the console. Returns whether the folder holds
    checkpoints (then resume_from_checkpoint is not used)."""
    import yaml

    from peerlab import storage
    from peerlab.config import config_from_dict, to_dict
    from peerlab.train.launch import absolute_paths

    t = cfg.train_config
    names = storage.complete_checkpoints(run_dir)  # manifest written; the worker checks the files' hashes as it loads
    if not names:
        return False
    newest = names[-1]
    step = int(newest.removeprefix("step-"))
    try:
        old = to_dict(
            config_from_dict(yaml.safe_load(storage.read_bytes(storage.join(run_dir, "resolved_config.yaml"))))
        )
    except Exception:  # noqa: BLE001 -- no readable record of the run's config: the checkpoint's own load decides
        old = None
    new = to_dict(absolute_paths(cfg))
    changed = _differences(old["model_config"], new["model_config"], "model_config") if old is not None else []
    misfit = _weights_misfit(cfg, storage.join(run_dir, "checkpoints", newest))
    if misfit is not None:
        what = changed[0] + (" and more" if changed[1:] else "") if changed else misfit
        raise UsageError(
            f"{run_dir} holds checkpoints of another model ({what}): "
            "give the run another --name, or delete the folder to start it again"
        )
    if old is not None:
        changed += _differences(old["dataset_config"], new["dataset_config"], "dataset_config")
        changed += _differences({"seed": old["train_config"]["seed"]}, {"seed": t.seed}, "train_config")
    if changed:
        print(f"warning: {run_dir} continues from step {step} with {'; '.join(changed)}", flush=True)
    if t.max_steps and step > t.max_steps:
        raise UsageError(
            f"{run_dir} is at step {step}, past max_steps = {t.max_steps}; raise max_steps or give the run another --name"
        )

    def where(path: str) -> str:  # a URI as written, a local path resolved
        return path.rstrip("/") if storage.is_remote(path) else str(Path(path).expanduser().resolve())

    named = t.resume_from_checkpoint
    own = {
        where(p) for p in (run_dir, storage.join(run_dir, "checkpoints"), storage.join(run_dir, "checkpoints", newest))
    }
    if named and where(str(named)) not in own:
        print(
            f"warning: train_config.resume_from_checkpoint {named} is not used: {run_dir} continues from its own "
            f"newest checkpoint ({newest})",
            flush=True,
        )
    return True


def fetched(path: str) -> str:
    """A local path as it is; a checkpoint (or run) on object storage, its newest complete checkpoint
    downloaded into a temporary folder. CheckpointError with one line when there is none."""
    import atexit
    import shutil
    import tempfile

    from peerlab import storage
    from peerlab.train.checkpoint import CheckpointError

    if not storage.is_remote(path):
        return str(storage.local_path(path))
    staging = tempfile.mkdtemp(prefix="peerlab-resume-")
    atexit.register(shutil.rmtree, staging, True)  # the run reads it while this process lives
    try:
        folder = storage.fetch_checkpoint(path, Path(staging))
    except storage.StorageError as err:
        raise CheckpointError(str(err)) from None
    if folder is None:
        raise CheckpointError(f"{path} holds no complete checkpoint")
    return str(folder)
