"""Run and sweep folders on object storage, against a real S3 API: moto's server on 127.0.0.1.

The module starts `moto_server` on a free loopback port and creates a bucket; each test gets
the S3 settings from the environment, as a user's run would (AWS_* variables, endpoint
override), and runs with its working directory in a temporary folder, so a run that wrote to
a local folder named `s3:` would show.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from peerlab import storage
from peerlab.cli import checked_resume
from peerlab.train import checkpoint as ckpt

from tests.conftest import ROOT
from tests.test_cli import NO_CLUSTER, tiny_run, train_command
from tests.test_tune import sweep_files, tiny_sets

pytest.importorskip("moto")
BUCKET = "peerlab-test"
KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    """moto's S3 server on 127.0.0.1, with one bucket; yields its endpoint URL."""
    port = free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "w")
    # this interpreter's moto (a moto_server found on PATH may belong to another Python)
    command = [sys.executable, "-c", "from moto.server import main; main()", "-H", "127.0.0.1", "-p", str(port)]
    proc = subprocess.Popen(command, stdout=log, stderr=log)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"moto_server did not start on port {port}") from None
                time.sleep(0.2)
        import boto3

        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", **_boto_keys()).create_bucket(Bucket=BUCKET)
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()


def _boto_keys() -> dict:
    return {"aws_access_key_id": KEYS["AWS_ACCESS_KEY_ID"], "aws_secret_access_key": KEYS["AWS_SECRET_ACCESS_KEY"]}


@pytest.fixture
def s3(s3_server, monkeypatch, tmp_path):
    """The S3 environment of a user's shell (keys, region, endpoint override), and a temporary working directory.

    Yields a fresh prefix URI in the bucket for this test.
    """
    for key, value in KEYS.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-metadata lookups for credentials
    monkeypatch.chdir(tmp_path)
    yield f"s3://{BUCKET}/{tmp_path.name}"
    assert not Path("s3:").exists()  # nothing was written to a local folder named after the URI


def bucket_files(uri: str) -> list[str]:
    return storage.list_files(uri)


def test_storage_verbs_round_trip(s3, tmp_path):
    storage.check_writable(s3)
    storage.write_bytes(storage.join(s3, "a", "b.txt"), b"hello")
    assert storage.read_bytes(f"{s3}/a/b.txt") == b"hello"
    assert storage.exists(f"{s3}/a/b.txt") and not storage.exists(f"{s3}/a/c.txt")
    local = tmp_path / "folder"
    (local / "checkpoints" / "step-000001").mkdir(parents=True)
    (local / "checkpoints" / "step-000001" / "checkpoint.json").write_text("{}")
    (local / "checkpoints" / "step-000001" / "model.safetensors").write_bytes(b"x" * 10)
    (local / "checkpoints" / "step-000002.tmp").mkdir()  # an unfinished save: never uploaded
    (local / "checkpoints" / "step-000002.tmp" / "model.safetensors").write_bytes(b"y")
    (local / ".ray").mkdir()  # Ray's own state stays local
    (local / ".ray" / "state.json").write_text("{}")
    (local / "metrics.jsonl").write_text('{"step": 1}\n')
    order = storage.upload_dir(local, f"{s3}/up")
    assert order[-1] == "checkpoints/step-000001/checkpoint.json"  # the manifest goes last
    assert bucket_files(f"{s3}/up") == sorted(order) and len(order) == 3
    back = tmp_path / "back"
    storage.download_dir(f"{s3}/up", back)
    assert (back / "metrics.jsonl").read_text() == '{"step": 1}\n'
    assert (back / "checkpoints" / "step-000001" / "model.safetensors").read_bytes() == b"x" * 10
    assert storage.list_files(str(back)) == sorted(order)
    # Local paths and file:// URIs are local
    assert not storage.is_remote(str(tmp_path)) and not storage.is_remote(f"file://{tmp_path}")
    assert storage.join("s3://b/p/", "run") == "s3://b/p/run" and storage.join("out", "run") == "out/run"
    assert storage.join(f"file://{tmp_path}", "run") == str(tmp_path / "run")


def test_a_sweeps_trial_folders_sync_both_ways_and_leave_checkpoints_on_the_bucket(s3, tmp_path):
    """Trials write on the bucket (from any node), the driver writes markers here: each side's changes,
    removals included, reach the other; a file changed on both sides keeps the newer."""
    uri, local = f"{s3}/sweep", tmp_path / "sweep"
    trial = f"{uri}/trials/t1"
    storage.write_bytes(f"{trial}/metrics.jsonl", b'{"step": 1}\n')  # a trial on another node
    storage.write_bytes(f"{trial}/checkpoints/step-000001/checkpoint.json", b"{}")
    storage.write_bytes(f"{trial}/error.json", b'{"error": "an earlier run"}')
    storage.write_bytes(f"{uri}/sweep.json", b"{}")
    assert sorted(storage.pull_sweep(uri, local)) == ["sweep.json", "trials/t1/error.json", "trials/t1/metrics.jsonl"]
    assert not (local / "trials" / "t1" / "checkpoints").exists()  # a trial fetches its own checkpoint
    assert storage.sync_trials(local, uri) == []  # nothing changed since: nothing moves
    (local / "trials" / "t2").mkdir()
    (local / "trials" / "t2" / "stopped.json").write_text('{"step": 3}')  # the driver (ASHA) stops t2
    storage.delete(f"{trial}/error.json")  # t1 runs again (run_trial removes its markers)
    storage.write_bytes(f"{trial}/metrics.jsonl", b'{"step": 1}\n{"step": 2}\n')  # and logs on
    pulled = storage.sync_trials(local, uri)
    assert pulled == ["t1/metrics.jsonl"] and not (local / "trials" / "t1" / "error.json").exists()
    assert (local / "trials" / "t1" / "metrics.jsonl").read_text().count("step") == 2
    assert storage.read_bytes(f"{uri}/trials/t2/stopped.json") == b'{"step": 3}'
    (local / "trials" / "t2" / "stopped.json").unlink()  # --resume runs t2 again
    time.sleep(1.1)  # the bucket's clock counts seconds
    storage.write_bytes(f"{trial}/done.json", b"{}")
    (local / "trials" / "t1" / "done.json").write_text('{"newer": true}')  # both sides wrote it: the newer wins
    storage.sync_trials(local, uri)
    assert not storage.exists(f"{uri}/trials/t2/stopped.json")
    assert storage.read_bytes(f"{trial}/done.json") == b'{"newer": true}'
    assert "checkpoints/step-000001/checkpoint.json" in bucket_files(trial)  # never touched by the sync


def fake_checkpoint(folder: Path, step: int) -> Path:
    """A complete checkpoint of a tiny model (real files, real manifest)."""
    import torch

    return ckpt.save(
        folder / f"step-{step:06d}",
        {"w": torch.full((2,), float(step))},
        {"state": {}, "param_groups": []},
        {"last_epoch": step},
        {"ranks": [{}]},
        {"step": step},
    )


def test_a_checkpoint_counts_on_the_bucket_only_with_its_manifest_and_matching_hashes(s3, tmp_path):
    run = f"{s3}/run"
    local = tmp_path / "run"
    for step in (2, 4, 6):
        fake_checkpoint(local / "checkpoints", step)
    (local / "metrics.jsonl").write_text("".join(f'{{"step": {i}}}\n' for i in range(1, 7)))
    order, upload = [], storage._upload
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(storage, "_upload", lambda path, uri: order.append(uri) or upload(path, uri))
        storage.push_run(local, run, keep=3)
    # The run's lines go up before any manifest: a node lost right after a checkpoint's manifest went up
    # leaves the lines up to that step in the bucket (the retried trial resumes there and loses none)
    manifests = [i for i, uri in enumerate(order) if uri.endswith("checkpoint.json")]
    assert order.index(f"{run}/metrics.jsonl") < min(manifests), order
    assert {n.split("/")[1] for n in bucket_files(run) if n.startswith("checkpoints/")} == {
        "step-000002", "step-000004", "step-000006"}  # fmt: skip
    # The newest upload lost its manifest (a crash before it went up), the next is damaged: step 2 is the newest good one.
    storage.delete(f"{run}/checkpoints/step-000006/checkpoint.json")
    storage.write_bytes(f"{run}/checkpoints/step-000004/optimizer.pt", b"cut short")
    got = storage.fetch_checkpoint(run, tmp_path / "fetched")
    assert got is not None and got.name == "step-000002" and ckpt.verify(got)["step"] == 2
    assert not (tmp_path / "fetched" / "step-000006").exists() and not (tmp_path / "fetched" / "step-000004").exists()
    # resume_from_checkpoint may name the run on the bucket: its newest complete checkpoint, fetched and checked
    from peerlab.config import Config

    cfg = Config()
    cfg.train_config.resume_from_checkpoint = run
    resolved = checked_resume(cfg).train_config.resume_from_checkpoint
    assert Path(resolved).name == "step-000002" and ckpt.load(Path(resolved)).trainer["step"] == 2
    # Another process (a restarted worker) pushing the same folder uploads no checkpoint that is already there,
    # and replaces one that is there under another manifest (step 6 lost its manifest above).
    uploads, upload_dir = [], storage.upload_dir
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(storage, "upload_dir", lambda folder, uri: uploads.append(folder.name) or upload_dir(folder, uri))
        storage._pushed.clear()
        storage.push_run(local, run, keep=3)
    assert uploads == ["step-000006"]
    # Pruned here, gone there: manifest first
    shutil.rmtree(local / "checkpoints" / "step-000002")
    shutil.rmtree(local / "checkpoints" / "step-000004")
    storage.push_run(local, run, keep=1)
    assert {n.split("/")[1] for n in bucket_files(run) if n.startswith("checkpoints/")} == {"step-000006"}
    assert storage.fetch_checkpoint(run, tmp_path / "again").name == "step-000006"


def test_a_run_pulled_again_keeps_the_checkpoints_save_total_limit_keeps(s3, tmp_path):
    """Staging holds the newest checkpoint it pulled and the ones written since: the bucket keeps the newest
    `keep` of both together (a rerun of a finished run deleted every older checkpoint on the bucket)."""
    run = f"{s3}/kept"
    first = tmp_path / "first"
    for step in (2, 4):
        fake_checkpoint(first / "checkpoints", step)
    storage.push_run(first, run, keep=2)

    def on_bucket() -> list[str]:
        return sorted({n.split("/")[1] for n in bucket_files(run) if n.startswith("checkpoints/")})

    again = tmp_path / "again"  # the run started again: finished, nothing new to train
    assert storage.pull_run(run, again).name == "step-000004"
    storage.push_run(again, run, keep=2)
    assert on_bucket() == ["step-000002", "step-000004"]
    fake_checkpoint(again / "checkpoints", 6)  # resumed with more steps: one more checkpoint, the oldest goes
    storage.push_run(again, run, keep=2)
    assert on_bucket() == ["step-000004", "step-000006"]


# --------------------------------------------------------------------------------------
# The commands, with output_dir on the bucket
# --------------------------------------------------------------------------------------


def command(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def refused(main, argv: list[str], capsys) -> str:
    """The one line of a command refused before anything started (exit 2)."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1, err
    return err[0]


@pytest.mark.parametrize("case", ["scheme", "unreachable", "credentials", "bucket"])
def test_a_bucket_that_cannot_be_used_is_refused_in_one_line_before_ray(case, s3, demo_corpus, monkeypatch, capsys):
    uri = f"{s3}/runs"
    if case == "scheme":
        uri = "ftp://example.org/runs"
    elif case == "unreachable":
        monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")  # nothing listens there
    elif case == "credentials":
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
            monkeypatch.delenv(key, raising=False)
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(Path("no-credentials").resolve()))
        monkeypatch.setenv("AWS_CONFIG_FILE", str(Path("no-config").resolve()))
    else:
        uri = "s3://no-such-bucket/runs"
    start = time.time()
    line = refused(command("train").main, [*tiny_run(demo_corpus, uri), *NO_CLUSTER], capsys)
    assert line.startswith("error: ") and uri in line, line
    want = {
        "scheme": "no file system handles ftp://",
        "credentials": "no S3 credentials",
        "bucket": "cannot be written",
    }
    assert want.get(case, "cannot be written") in line, line
    assert refused(command("train").main, [*tiny_run(demo_corpus, uri), "--dry-run"], capsys) == line  # the same check
    mixes, config = sweep_files(demo_corpus, Path.cwd())
    sweep = ["--custom-datasets", str(mixes), "--config", str(config), *tiny_sets(demo_corpus, uri), *NO_CLUSTER]
    line = refused(command("ablate").main, sweep, capsys)  # the sweep's folder, the same check
    assert uri in line and want.get(case, "cannot be written") in line, line
    assert time.time() - start < 60


def test_a_gcs_bucket_without_credentials_or_network_is_refused_in_one_line(demo_corpus, tmp_path):
    """The preflight's requests to Google Cloud Storage give up after 10 s of retries (pyarrow's GcsFileSystem
    retried without end: the command hung without a word)."""
    env = {k: v for k, v in os.environ.items() if k != "GOOGLE_APPLICATION_CREDENTIALS"}
    env["GCE_METADATA_HOST"] = "127.0.0.1:1"  # no metadata server either: nothing listens there
    uri = "gs://no-such-bucket/runs"
    out = train_command(*tiny_run(demo_corpus, uri), *NO_CLUSTER, env=env, timeout=180, cwd=tmp_path)
    line = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(line) == 1 and uri in line[0] and "cannot be written" in line[0], out.stderr


def test_a_run_on_the_bucket_writes_its_folder_there_and_resumes_from_it(ray_cluster, s3, demo_corpus, capsys):
    address = ray_cluster.get_runtime_context().gcs_address
    runs, train = f"{s3}/runs", command("train")
    flags = ["--set", "train_config.num_workers=0", "--name", "r", "--address", address]  # the loop in this process
    assert train.main([*tiny_run(demo_corpus, runs, steps=3), *flags]) == 0
    printed = capsys.readouterr().out
    assert f"done: metrics in {runs}/r/metrics.jsonl" in printed
    files = bucket_files(f"{runs}/r")
    assert {"metrics.jsonl", "resolved_config.yaml", "run_info.json"} <= set(files)
    assert {f"checkpoints/step-00000{i}/checkpoint.json" for i in (1, 2, 3)} <= set(files)
    records = [json.loads(x) for x in storage.read_bytes(f"{runs}/r/metrics.jsonl").decode().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]

    # The same name again, for more steps, from another process on a Ray Train worker (the credentials travel
    # with the job): it continues from the bucket's newest complete checkpoint, and the worker uploads.
    storage.delete(f"{runs}/r/checkpoints/step-000003/checkpoint.json")  # as if step 3's upload had stopped midway
    out = train_command(
        *tiny_run(demo_corpus, runs, steps=5), "--set", "train_config.num_workers=1", *flags[2:], cwd=Path.cwd()
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "training on 1 cpu worker(s), continuing from the checkpoint of step 2" in out.stdout, out.stdout
    records = [json.loads(x) for x in storage.read_bytes(f"{runs}/r/metrics.jsonl").decode().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 3, 4, 5]  # step 3 again: its checkpoint was not
    assert json.loads(storage.read_bytes(f"{runs}/r/run_info.json"))["start_step"] == 2
    assert "checkpoints/step-000005/checkpoint.json" in bucket_files(f"{runs}/r")
    assert not list(Path.cwd().rglob("checkpoints"))  # nothing of the run in the working directory

    # lm-eval on the bucket's checkpoint: the run's newest one is fetched, evals.jsonl goes back with the new lines
    registry = ["--registry", str(ROOT / "evals" / "registry")]  # the run resolved ./evals/registry in its temp dir
    evaluate, data = command("evaluate"), [*registry, "--data-dir", str(demo_corpus / "evals"), "--limit", "2"]
    assert evaluate.main(["--checkpoint", f"{runs}/r", "--tasks", "peerlab_bpb_prose", *data]) == 0
    assert f"appended to {runs}/r/evals.jsonl" in capsys.readouterr().out
    step4 = f"{runs}/r/checkpoints/step-000004"
    assert evaluate.main(["--checkpoint", step4, "--tasks", "peerlab_heldout_mc", *data]) == 0
    evals = [json.loads(x) for x in storage.read_bytes(f"{runs}/r/evals.jsonl").decode().splitlines()]
    assert {(r["step"], r["task"]) for r in evals} == {(5, "peerlab_bpb_prose"), (4, "peerlab_heldout_mc")}
    capsys.readouterr()  # (lm-eval's progress bars on stderr)
    line = refused(evaluate.main, ["--checkpoint", f"{runs}/r/checkpoints/step-000009", *data], capsys)
    assert line.startswith("error: --checkpoint: ") and "step-000009 holds no complete checkpoint" in line, line
    assert not list(Path.cwd().rglob("checkpoints"))


def test_a_two_trial_sweep_on_the_bucket_writes_its_tables_and_report_there(ray_cluster, s3, demo_corpus, capsys):
    import pandas as pd

    mixes, config = sweep_files(demo_corpus, Path.cwd())
    out = f"{s3}/sweeps"
    argv = ["--custom-datasets", str(mixes), "--config", str(config), *tiny_sets(demo_corpus, out, steps=3),
            "--set", "eval_config.evals=[]", "--name", "sw", "--max-concurrent", "2", "--metric", "eval_loss/mean",
            "--address", ray_cluster.get_runtime_context().gcs_address]  # fmt: skip
    # Its own process, as a user's: the trial actors get the S3 settings with the job's environment
    run = subprocess.run([sys.executable, str(ROOT / "experiments" / "ablate.py"), *argv],
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    printed = run.stdout
    assert f"sweep folder: {out}/sw" in printed and f"sweep folder mirrored to {out}/sw" in printed
    files = set(bucket_files(f"{out}/sw"))
    assert {
        "sweep.json",
        "trials.parquet",
        "curves.parquet",
        "usage.parquet",
        "report/report.md",
        "report/report.html",
    } <= files
    assert not any(f.startswith(".ray") for f in files)  # Ray's own state stays in the temporary staging folder
    local = Path.cwd() / "trials.parquet"
    local.write_bytes(storage.read_bytes(f"{out}/sw/trials.parquet"))
    trials = pd.read_parquet(local)
    assert len(trials) == 2 and (trials["status"] == "finished").all() and (trials["steps"] == 3).all()
    for trial_id in trials["trial_id"]:
        assert f"trials/{trial_id}/checkpoints/step-000003/checkpoint.json" in files
        assert f"trials/{trial_id}/metrics.jsonl" in files
    # The same command again reads the sweep back from the bucket: its trials are done, none runs again,
    # and their checkpoints stay in the bucket (no trial reads them).
    assert (trials["attempts"] == 1).all() and trials["nodes"].str.len().gt(0).all()
    ablate, downloaded, download = command("ablate"), [], storage._download
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(storage, "_download", lambda uri, local: downloaded.append(uri) or download(uri, local))
        assert ablate.main(argv) == 0
    printed = capsys.readouterr().out
    assert f"{out}/sw holds this sweep" in printed and "2 trials already done; running 0" in printed  # its URI
    assert f"{out}/sw/sweep.json" in downloaded and not [u for u in downloaded if "/checkpoints/" in u]
