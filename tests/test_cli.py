"""The commands: hub names offline, dry runs, resume paths, failures that are not retried, and the console.

Commands that must fail before Ray starts get `--address 127.0.0.1:1` (nothing listens there):
were a check to regress, they could not start a second local cluster next to the tests' own
(FACTS.md: two clusters on one host break each other's Train runs); they would fail to connect.
The real training runs here join the session's cluster (`ray_cluster`) with `--address`, as
tests/test_tune.py's resume test does, so no second cluster is ever started.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from peerlab.data.corpus import DOMAINS
from peerlab.train import checkpoint as ckpt
from tests.conftest import ROOT
from tests.test_tune import tiny_sets

NO_CLUSTER = ["--address", "127.0.0.1:1"]


def train_command(*args: str, env: dict | None = None, timeout: float = 300, cwd: Path = ROOT):
    return subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "train.py"), *args],
        capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout,
    )  # fmt: skip


def tiny_run(demo_corpus: Path, out: Path, steps: int = 6) -> list[str]:
    """--config and --set flags of a tiny demo model on the demo corpus: a checkpoint every step, no lm-eval."""
    sets = [
        *[f"dataset_config.datasets.{i}.path={demo_corpus / d}" for i, d in enumerate(DOMAINS)],
        "train_config.save_steps=1",
        "train_config.save_total_limit=10",
        "eval_config.evals=[]",
    ]
    config = ["--config", str(ROOT / "configs" / "demo.yaml")]
    return [*config, *tiny_sets(demo_corpus, out, steps), *[x for s in sets for x in ("--set", s)]]


def online_env(tmp_path: Path) -> dict:
    """No HF_HUB_OFFLINE, and a hub endpoint where nothing listens: a machine without network, on any machine."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    env.update(HF_ENDPOINT="http://127.0.0.1:1", HF_DATASETS_CACHE=str(tmp_path / "datasets-cache"))
    return env


def one_line(out) -> str:
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    return lines[0]


# --------------------------------------------------------------------------------------
# Hub names without network: one line in seconds, not a minute of retries
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "setting, message",
    [
        ("dataset_config.tokenizer_name=peerlab-test/no-such-tokenizer", "tokenizer 'peerlab-test/no-such-tokenizer'"),
        (
            "dataset_config.datasets.1.path=peerlab-test/no-such-dataset",
            "dataset 'code': 'peerlab-test/no-such-dataset'",
        ),
    ],
)
def test_hub_name_without_network_fails_in_one_line(setting, message, demo_corpus, tmp_path):
    # The Hugging Face libraries retry for about 48 s before they give up (FACTS.md): the timeout is well under that.
    out = train_command(
        *tiny_run(demo_corpus, tmp_path / "out"), "--set", setting, "--set", "dataset_config.datasets.1.format=null",
        *NO_CLUSTER, env=online_env(tmp_path), timeout=30,
    )  # fmt: skip
    assert out.returncode == 2
    line = one_line(out)
    assert message in line and "the hub (http://127.0.0.1:1) cannot be reached" in line
    assert "Ray dashboard" not in out.stdout


def test_a_cached_hub_dataset_is_read_without_network(tmp_path):
    import datasets

    # A dataset `datasets` cached as it caches a hub dataset: <cache>/<namespace>___<name>/<config>/<version>/<hash>/.
    source = tmp_path / "train.jsonl"
    source.write_text("".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(40)))
    built = tmp_path / "built"
    datasets.load_dataset("json", data_files={"train": str(source)}, cache_dir=str(built))
    arrow = next(built.glob("json/*/*/*/json-train.arrow"))
    cached = tmp_path / "datasets-cache" / "peerlab-test___tiny" / "default" / arrow.parent.parent.name
    shutil.copytree(arrow.parent, cached / arrow.parent.name)
    (cached / arrow.parent.name / "json-train.arrow").rename(cached / arrow.parent.name / "tiny-train.arrow")
    script = (
        "from peerlab.config import DatasetEntry\n"
        "from peerlab.data.hub import check_hub_dataset\n"
        "from peerlab.data.sources import Selection, hub_documents\n"
        "entry = DatasetEntry(name='tiny', path='peerlab-test/tiny', text_field='text')\n"
        "check_hub_dataset(entry)\n"
        "print(sum(t.num_rows for t in hub_documents(entry, Selection(heldout_fraction=0))))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], env=online_env(tmp_path), capture_output=True, text=True,
                         timeout=30)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["40"]


# --------------------------------------------------------------------------------------
# Dry runs check local paths; resume_from_checkpoint is checked before Ray starts
# --------------------------------------------------------------------------------------


def test_dry_runs_refuse_a_missing_local_dataset(tmp_path):
    missing = tmp_path / "no-such-folder" / "code.jsonl"
    out = train_command(
        "--config", "configs/demo.yaml", "--set", f"dataset_config.datasets.1.path={missing}", "--dry-run"
    )
    assert out.returncode == 2 and one_line(out) == f"error: dataset 'code': path {missing} does not exist"
    mixes = tmp_path / "mixes.yaml"
    mixes.write_text(f"data_mixes:\n  m:\n    datasets:\n      - {{name: code, path: '{missing}', text_field: text}}\n")
    out = subprocess.run(
        [sys.executable, "experiments/ablate.py", "--custom-datasets", str(mixes), "--config", "configs/demo.yaml",
         "--dry-run"], capture_output=True, text=True, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert out.returncode == 2 and one_line(out) == f"error: dataset 'code': path {missing} does not exist"


def test_dry_run_on_a_fresh_clone_leaves_the_demo_corpus_to_the_run(tmp_path):
    # ./data/demo does not exist under tmp_path: the real run prepares it, so the dry run passes and says so.
    out = train_command("--config", str(ROOT / "configs" / "demo.yaml"), "--dry-run", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert (
        "./data/demo/prose, ./data/demo/code, ./data/demo/docs: the embedded default corpus, prepared by the run"
        in (out.stdout)
    )
    assert not (tmp_path / "data").exists()


def save_checkpoint(run: Path, step: int) -> Path:
    model = {"w": torch.full((2, 2), float(step))}
    return ckpt.save(run / "checkpoints" / f"step-{step:06d}", model, {}, {}, {}, {"step": step})


def test_resume_from_checkpoint_names_a_checkpoint_a_run_or_its_checkpoints_folder(tmp_path):
    from peerlab.eval.lm import find_checkpoint

    run = tmp_path / "run"
    save_checkpoint(run, 3)
    newest = save_checkpoint(run, 6)
    (run / "checkpoints" / "step-000009.tmp").mkdir()  # a save cut short
    (run / "checkpoints" / "step-000012").mkdir()  # no manifest: not complete
    for path in (run, run / "checkpoints", newest):
        assert ckpt.resolve(path) == newest
    assert find_checkpoint(run / "checkpoints") == (newest, run)  # evaluate.py --checkpoint takes the same paths
    for path, message in (
        (run / "checkpoints" / "step-000012", "is not a complete checkpoint (no checkpoint.json)"),
        (tmp_path, "is neither a checkpoint folder"),
        (tmp_path / "nowhere", "does not exist"),
    ):
        with pytest.raises(ckpt.CheckpointError, match=re.escape(message)):
            ckpt.resolve(path)
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    for path in (tmp_path / "empty", tmp_path / "empty" / "checkpoints"):
        with pytest.raises(ckpt.CheckpointError, match="holds no complete checkpoint"):
            ckpt.resolve(path)


@pytest.mark.parametrize("dry_run", [["--dry-run"], []])
def test_a_resume_path_without_a_complete_checkpoint_fails_before_ray_starts(dry_run, demo_corpus, tmp_path):
    # A run's checkpoints/ folder whose only save was cut short: nothing to resume from.
    (tmp_path / "old" / "checkpoints" / "step-000003.tmp").mkdir(parents=True)
    resume = f"train_config.resume_from_checkpoint={tmp_path / 'old' / 'checkpoints'}"
    out = train_command(*tiny_run(demo_corpus, tmp_path / "out"), "--set", resume, *dry_run, *NO_CLUSTER, timeout=120)
    assert out.returncode == 2
    line = one_line(out)
    assert (
        line
        == f"error: train_config.resume_from_checkpoint: {tmp_path / 'old' / 'checkpoints'} holds no complete checkpoint"
    )
    assert "Ray dashboard" not in out.stdout


def test_a_resume_past_max_steps_fails_before_ray_starts(demo_corpus, tmp_path):
    import torch

    from peerlab.train import checkpoint as ckpt

    folder = ckpt.save(tmp_path / "old" / "checkpoints" / "step-000009", {"w": torch.zeros(1)}, {}, {}, {}, {"step": 9})
    resume = f"train_config.resume_from_checkpoint={tmp_path / 'old'}"
    out = train_command(*tiny_run(demo_corpus, tmp_path / "out"), "--set", resume, *NO_CLUSTER, timeout=120)
    assert out.returncode == 2 and "Ray dashboard" not in out.stdout
    assert one_line(out).startswith(
        f"error: train_config.resume_from_checkpoint: {folder} is at step 9, past max_steps = "
    )


def test_a_run_folder_continues_only_with_its_own_model_checked_before_ray_starts(demo_corpus, tmp_path, capsys):
    """A run folder with checkpoints continues from its newest. A config of another model is refused before Ray
    starts and leaves the folder's resolved_config.yaml as it was (it was written again, and the checkpoint could
    no longer be evaluated); a step past max_steps is refused; another data mix or seed, and a
    resume_from_checkpoint that is not used, are said on the console."""
    from peerlab.cli import checked_continuation
    from peerlab.config import load_config
    from peerlab.model import build_model
    from peerlab.train.launch import absolute_paths, write_resolved_config

    flags = tiny_run(demo_corpus, tmp_path / "out")
    overrides = [flags[i + 1] for i, flag in enumerate(flags) if flag == "--set"]
    cfg = load_config(ROOT / "configs" / "demo.yaml", overrides)
    run_dir = tmp_path / "out" / "demo"  # the run the same command names
    written = write_resolved_config(absolute_paths(cfg), run_dir).read_bytes()
    weights = build_model(cfg.model_config).state_dict()
    ckpt.save(run_dir / "checkpoints" / "step-000003", weights, {}, {}, {}, {"step": 3})

    out = train_command(*flags, "--set", "model_config.intermediate_size=96", *NO_CLUSTER, timeout=120)
    assert out.returncode == 2 and "Ray dashboard" not in out.stdout
    assert one_line(out) == (
        f"error: {run_dir} holds checkpoints of another model (model_config.intermediate_size: 64 -> 96): "
        "give the run another --name, or delete the folder to start it again"
    )
    assert (run_dir / "resolved_config.yaml").read_bytes() == written
    out = train_command(*flags, "--set", "train_config.max_steps=2", *NO_CLUSTER, timeout=120)
    assert out.returncode == 2 and "Ray dashboard" not in out.stdout
    assert one_line(out).startswith(f"error: {run_dir} is at step 3, past max_steps = 2")

    capsys.readouterr()
    checked_continuation(load_config(ROOT / "configs" / "demo.yaml", overrides), str(run_dir))
    assert capsys.readouterr().out == ""  # the same run: nothing to say
    elsewhere = ckpt.save(tmp_path / "other" / "checkpoints" / "step-000001", {"w": torch.zeros(1)}, {}, {}, {}, {})
    changed = [*overrides, "dataset_config.datasets.0.weight=0.9", f"train_config.resume_from_checkpoint={elsewhere}"]
    checked_continuation(load_config(ROOT / "configs" / "demo.yaml", changed), str(run_dir))
    said = capsys.readouterr().out
    assert f"warning: {run_dir} continues from step 3 with dataset_config.datasets.0.weight: 0.4 -> 0.9\n" in said
    assert f"resume_from_checkpoint {elsewhere} is not used: {run_dir} continues from its own newest" in said
    # A new run that names a checkpoint of another model: refused before Ray starts, as its own folder's would be.
    out = train_command(*flags, "--name", "fresh", "--set", f"train_config.resume_from_checkpoint={elsewhere}",
                        *NO_CLUSTER, timeout=120)  # fmt: skip
    assert out.returncode == 2 and "Ray dashboard" not in out.stdout
    assert one_line(out).startswith(
        f"error: train_config.resume_from_checkpoint: {elsewhere} holds another model than this config's ("
    )
    for own in (run_dir, run_dir / "checkpoints", run_dir / "checkpoints" / "step-000003"):
        named = [*overrides, f"train_config.resume_from_checkpoint={own}"]
        checked_continuation(load_config(ROOT / "configs" / "demo.yaml", named), str(run_dir))
        assert capsys.readouterr().out == ""
    # A model_config the weights still fit (how usage is logged) is said, not refused.
    logged = [*overrides, "model_config.peer_config.log_freq=7"]
    checked_continuation(load_config(ROOT / "configs" / "demo.yaml", logged), str(run_dir))
    assert "with model_config.peer_config.log_freq: 3 -> 7" in capsys.readouterr().out
    # Weights that do not fit the same config (a layout that changed since they were saved): refused, by tensor.
    weights["layers.1.mlp.sub_keys"] = weights["layers.1.mlp.sub_keys"][:4]
    ckpt.save(run_dir / "checkpoints" / "step-000004", weights, {}, {}, {}, {"step": 4})
    with pytest.raises(SystemExit):
        checked_continuation(load_config(ROOT / "configs" / "demo.yaml", overrides), str(run_dir))
    assert "(layers.1.mlp.sub_keys: 4x8 in the checkpoint, 32x8 in this config's model)" in capsys.readouterr().err


def test_a_dataset_with_fewer_documents_than_workers_fails_before_ray_starts(demo_corpus, tmp_path):
    book = tmp_path / "book.jsonl"
    book.write_text(json.dumps({"text": "one long book. " * 200}) + "\n")
    settings = ["--set", f"dataset_config.datasets.2.path={book}", "--set", "train_config.num_workers=2"]
    out = train_command(*tiny_run(demo_corpus, tmp_path / "out"), *settings, *NO_CLUSTER, timeout=120)
    assert out.returncode == 2 and "Ray dashboard" not in out.stdout
    assert one_line(out) == (
        f"error: dataset 'docs': {book} has 1 training documents for 2 workers; workers share a dataset by "
        "documents, so some would have none: split its text into more documents, or train on fewer workers"
    )


# --------------------------------------------------------------------------------------
# Failures: our own errors are not retried; lost workers are
# --------------------------------------------------------------------------------------


def test_failure_policy_raises_own_errors_and_retries_lost_workers():
    """The private parts of Ray Train that peerlab.train.failures relies on, with the installed Ray."""
    from ray.exceptions import ActorDiedError
    from ray.train import FailureConfig
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback
    from ray.train.v2._internal.execution.failure_handling import DefaultFailurePolicy, FailureDecision
    from ray.train.v2.api.exceptions import WorkerGroupError

    from peerlab.train import failures
    from peerlab.train.worker import TrainingError

    assert hasattr(failures.Trainer.__mro__[1], "_initialize_and_run_controller")  # the hook the controller is given
    own = TrainingError("the loss is nan at step 3; the run stops here")
    wrapped = WorkerGroupError("rank 0 failed", {0: UserExceptionWithTraceback(own, "Traceback ...")})
    lost = WorkerGroupError("rank 1 died", {1: ActorDiedError()})
    config = FailureConfig(max_failures=2)
    assert DefaultFailurePolicy(config).make_decision(wrapped) == FailureDecision.RETRY  # what Ray does alone
    policy = failures.StopOnOwnErrors(config)
    assert policy.make_decision(wrapped) == FailureDecision.RAISE
    assert failures.own_error(wrapped) is own
    assert [policy.make_decision(lost) for _ in range(3)] == [FailureDecision.RETRY] * 2 + [FailureDecision.RAISE]
    for name in failures.NOT_RETRIED:  # every name is a real error class of peerlab
        module, _, cls = name.rpartition(".")
        assert issubclass(getattr(__import__(module, fromlist=[cls]), cls), Exception), name


def test_non_finite_loss_stops_once_with_one_line_and_a_quiet_console(ray_cluster, demo_corpus, tmp_path):
    # learning rate 1e6: the loss or the gradients turn non-finite after a few steps, checkpoints every step.
    address = ray_cluster.get_runtime_context().gcs_address
    out = train_command(
        *tiny_run(demo_corpus, tmp_path),
        "--set",
        "train_config.learning_rate=1e6",
        "--name",
        "lr",
        "--address",
        address,
    )
    assert out.returncode == 3, out.stderr[-3000:]  # the run stopped (peerlab.cli's exit statuses)
    line = one_line(out)
    assert line.startswith("error: the run stopped: the ") and " is nan at step " in line, line
    step = int(line.split(" is nan at step ")[1].split(";")[0])
    assert line.endswith(f"The last good checkpoint is {tmp_path / 'lr' / 'checkpoints' / f'step-{step - 1:06d}'}")
    console = out.stdout + out.stderr
    assert "training on 1 cpu worker(s)" in out.stdout and "step 1/6  loss " in out.stdout  # the platform's lines
    assert "Reporting training result" not in console and "TrainingReport" not in console  # Ray's stay in its logs
    assert console.count("is nan at step") == 1 and "Traceback" not in console
    # One attempt: a restart would have continued from the last checkpoint and rewritten run_info.json.
    assert json.loads((tmp_path / "lr" / "run_info.json").read_text())["start_step"] == 0
    records = [json.loads(x) for x in (tmp_path / "lr" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, step))


def test_verbose_shows_rays_output_too(ray_cluster, demo_corpus, tmp_path):
    address = ray_cluster.get_runtime_context().gcs_address
    local = ["--set", "train_config.num_workers=0"]  # Train's local mode: Ray's own lines without a worker group
    out = train_command(
        *tiny_run(demo_corpus, tmp_path, steps=3), *local, "--name", "v", "--verbose", "--address", address
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "step 3/3  loss " in out.stdout and "done: metrics in" in out.stdout
    assert "Running in local mode" in out.stdout + out.stderr and "Reported metrics" in out.stdout + out.stderr


# --------------------------------------------------------------------------------------
# The driver's progress lines
# --------------------------------------------------------------------------------------


def test_progress_prints_starts_steps_evaluations_and_restarts(tmp_path, capsys):
    from peerlab.tracking import Progress

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 9.0}) + "\n")  # an earlier run's line
    progress = Progress(run, total_steps=4)
    info = {"workers": 2, "device": "cpu", "start_step": 0}
    (run / "run_info.json").write_text(json.dumps(info))
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 2, "loss": 3.5, "tokens_per_s": 100.0, "eta_s": 20}) + "\n")
        f.write('{"step": 3, "loss": 3.25')  # a line not finished yet: printed once it is
    progress.poll()
    (run / "run_info.json").write_text(json.dumps({**info, "start_step": 2}))  # the workers restarted
    os.utime(run / "run_info.json", ns=(1, 1))  # a new time stamp, whatever the file system's resolution
    with open(run / "metrics.jsonl", "a") as f:
        f.write(', "tokens_per_s": 50.0}\n')
    row = {"step": 4, "task": "peerlab_heldout_mc", "metric": "acc", "value": 0.25, "stderr": 0.05}
    (run / "evals.jsonl").write_text(json.dumps(row) + "\n")
    progress.poll()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "training on 2 cpu worker(s)"
    assert lines[1] == "step 2/4  loss 3.5000  100 tokens/s  ETA 00:00:20"
    assert lines[2] == "workers restarted (attempt 2): 2 cpu worker(s), continuing from the checkpoint of step 2"
    assert lines[3] == "step 3/4  loss 3.2500  50 tokens/s  ETA ?"
    assert lines[4] == "lm-eval at step 4:" and lines[6].split() == ["peerlab_heldout_mc", "acc", "0.2500", "0.0500"]
    assert len(lines) == 7
