"""Sweeps on a Ray cluster of two nodes on this machine, results on a real S3 API (moto's server).

The module stops the session's one-node cluster (FACTS.md: never two clusters on one host),
brings up its own with `ray.cluster_utils.Cluster` (a head node and a worker node, each with
its own CPUs and raylet; the head serves the dashboard and the job API on loopback), and
starts the session's cluster again when it is done. The node processes start without any
AWS settings: the sweep's driver hands them to its trials, as on a real cluster.

- A two-trial sweep joins it with --address; one trial runs on each node. The worker node is
  killed at its trial's start (no checkpoint yet), a new worker node joins, the trial restarts
  there from step 0; that node is killed after the trial's first checkpoint reached the
  bucket, and the trial continues on the head from that checkpoint. Every trial finishes, each
  step is in curves.parquet once, and the lines the driver printed say what happened.
- `ray job submit --working-dir` runs a sweep on the cluster: its outputs land in the bucket,
  and an output_dir inside the job's copy of the working directory is refused before Ray.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from peerlab import storage
from peerlab.tune import newest_step, read_attempts

from tests.conftest import ROOT, start_session_cluster
from tests.test_storage import KEYS, free_port, s3, s3_server  # noqa: F401  (the S3 server and a user's S3 settings)
from tests.test_tune import sweep_files

pytest.importorskip("moto")
TRIALS = ("prose_mix_default_s42", "code_mix_default_s42")
STEPS, SAVE = 120, 20
HEALTH = {"health_check_period_ms": 500, "health_check_timeout_ms": 1000, "health_check_failure_threshold": 2}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A head node (2 CPUs, dashboard and job API on 127.0.0.1) and a worker node (2 CPUs)."""
    import ray
    from ray.cluster_utils import Cluster

    was_running = ray.is_initialized()
    ray.shutdown()
    clean = {k: os.environ.pop(k) for k in [*KEYS, "AWS_ENDPOINT_URL"] if k in os.environ}  # nodes start without
    path = os.environ["PATH"]  # the nodes' `python` is the one peerlab is installed in (a job's entrypoint runs it)
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{path}"
    dashboard = free_port()
    node = {"object_store_memory": 200 * 1024 * 1024, "num_cpus": 2}  # GCS on this host (Ray maps 127.0.0.1 to it)
    head = Cluster(
        initialize_head=True,
        connect=False,
        head_node_args={
            **node,
            "include_dashboard": True,
            "dashboard_host": "127.0.0.1",
            "dashboard_port": dashboard,
            "_system_config": HEALTH,
        },
    )
    try:
        head.node_args = node
        head.add_node(**node)
        head.wait_for_nodes()
        head.dashboard_url = f"http://127.0.0.1:{dashboard}"
        yield head
    finally:
        os.environ.update(clean, PATH=path)
        head.shutdown()
        ray._common.utils.reset_ray_address()  # the address file Cluster wrote: no later ray.init joins it
        if was_running:
            start_session_cluster()


def sweep_sets(out: str, steps: int = STEPS) -> list[str]:
    sets = [
        "model_config.hidden_size=48",
        "model_config.num_hidden_layers=2",
        "model_config.num_attention_heads=2",
        "model_config.intermediate_size=96",
        "model_config.peer_config.num_experts=1024",
        "model_config.peer_config.product_key_dim=[32, 32]",
        "model_config.peer_config.num_heads=2",
        "model_config.peer_config.query_dim=16",
        "model_config.peer_config.log_freq=20",
        f"train_config.max_steps={steps}",
        "train_config.logging_steps=1",
        f"train_config.save_steps={SAVE}",
        f"train_config.eval_steps={steps // 2}",
        "train_config.per_device_train_batch_size=4",
        "train_config.max_failures=2",
        "dataset_config.max_seq_length=64",
        "eval_config.evals=[]",
        f"train_config.output_dir={out}",
    ]
    return [x for s in sets for x in ("--set", s)]


def starts(uri: str, trial_id: str) -> list[dict]:
    return read_attempts(storage.join(uri, "trials", trial_id), starts_only=True)


def wait_for(what: str, check, proc: subprocess.Popen, timeout: float = 180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = check()
        if found:
            return found
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"the sweep ended while waiting for {what}:\n{out[-3000:]}\n{err[-3000:]}")
        time.sleep(0.2)
    proc.kill()
    out, err = proc.communicate()
    raise AssertionError(f"timed out waiting for {what}:\n{out[-3000:]}\n{err[-3000:]}")


def test_a_sweep_on_two_nodes_survives_losing_the_worker_node(cluster, s3, demo_corpus, tmp_path):  # noqa: F811
    import pandas as pd

    mixes, config = sweep_files(demo_corpus, tmp_path)
    out = f"{s3}/sweeps"
    sets = [f"dataset_config.tokenizer_name={demo_corpus / 'tokenizer'}"]
    argv = [sys.executable, str(ROOT / "experiments" / "ablate.py"), "--custom-datasets", str(mixes),
            "--config", str(config), *sweep_sets(out), "--set", sets[0], "--name", "two", "--max-concurrent", "2",
            "--cpus-per-trial", "1.5", "--metric", "eval_loss/mean", "--no-report", "--address", cluster.address]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    uri = f"{out}/two"
    head_id = cluster.head_node.node_id
    first = next(iter(cluster.worker_nodes))

    # Both trials start, one on each node (1.5 CPUs each, 2 per node)
    on_worker = wait_for(
        "a trial on the worker node",
        lambda: next((t for t in TRIALS if [a["node_id"] for a in starts(uri, t)] == [first.node_id]), None),
        proc,
    )
    other = next(t for t in TRIALS if t != on_worker)
    wait_for("the other trial on the head", lambda: [a["node_id"] for a in starts(uri, other)] == [head_id], proc)
    run = storage.join(uri, "trials", on_worker)
    assert newest_step(run) == 0
    cluster.remove_node(first, allow_graceful=False)  # a spot instance gone: no checkpoint yet
    lost_early = newest_step(run)
    second = cluster.add_node(**cluster.node_args)  # a replacement joins; the head is busy with the other trial
    wait_for("the trial's second start", lambda: len(starts(uri, on_worker)) == 2, proc)
    assert starts(uri, on_worker)[1]["node_id"] == second.node_id and starts(uri, on_worker)[1]["from_step"] == 0
    checkpoint = wait_for("its first checkpoint in the bucket", lambda: newest_step(run), proc)
    assert not storage.exists(storage.join(run, "done.json"))
    cluster.remove_node(second, allow_graceful=False)  # lost again, after a checkpoint
    out_text, err_text = proc.communicate(timeout=300)
    assert proc.returncode == 0, out_text[-3000:] + err_text[-3000:]

    # The trial ran three times: on the first worker from step 0, on the second from step 0 (none was
    # written before the first loss), on the head from the checkpoint the second wrote
    tries = starts(uri, on_worker)
    assert [a["node_id"] for a in tries] == [first.node_id, second.node_id, head_id]
    assert lost_early == 0 and [a["from_step"] for a in tries][:2] == [0, 0]
    assert tries[2]["from_step"] >= checkpoint >= SAVE
    assert f"{on_worker} was lost on node {first.node_id[:12]}" in out_text, out_text
    assert "(try 2 of 3) and it restarts from step 0: it had no checkpoint yet" in out_text, out_text
    assert f"(try 3 of 3) and it continues from its checkpoint of step {tries[2]['from_step']}" in out_text, out_text
    assert "sweep took" in out_text and "2 finished" in out_text, out_text

    files = storage.list_files(uri)
    local = tmp_path / "tables"
    for name in ("trials.parquet", "curves.parquet"):
        storage._download(storage.join(uri, name), local / name)
    trials = pd.read_parquet(local / "trials.parquet").set_index("trial_id")
    assert (trials["status"] == "finished").all() and (trials["steps"] == STEPS).all()
    assert trials.loc[on_worker, "attempts"] == 3 and trials.loc[other, "attempts"] == 1
    assert trials.loc[on_worker, "nodes"] == f"{first.node_id},{second.node_id},{head_id}"
    curves = pd.read_parquet(local / "curves.parquet")
    for trial_id in TRIALS:  # every step once, none lost
        steps = curves.loc[curves["trial_id"] == trial_id, "step"].tolist()
        assert steps == list(range(1, STEPS + 1)), (trial_id, steps)
        assert f"trials/{trial_id}/checkpoints/step-{STEPS:06d}/checkpoint.json" in files
        done = json.loads(storage.read_bytes(storage.join(uri, "trials", trial_id, "done.json")))
        assert done["node_id"] == head_id
    assert not list(tmp_path.rglob("checkpoints"))  # nothing of the trials on the driver's disk


def ray_command() -> str:
    return str(Path(sys.executable).parent / "ray")


def test_ray_job_submit_runs_a_sweep_whose_outputs_land_in_the_bucket(cluster, s3, demo_corpus, tmp_path):  # noqa: F811
    import pandas as pd

    # The head alone: nodes on one machine share Ray's folder, so each node's agent unpacks the job's working
    # dir into the same path and one's clean-up deletes it under the driver on another (real nodes have own disks)
    for node in list(cluster.worker_nodes):
        cluster.remove_node(node)
    mixes, _ = sweep_files(demo_corpus, tmp_path)
    out = f"{s3}/jobs"
    keys = {k: os.environ[k] for k in [*KEYS, "AWS_ENDPOINT_URL", "AWS_EC2_METADATA_DISABLED"]}
    sweep = ["python", "experiments/ablate.py", "--custom-datasets", str(mixes), "--config", "configs/demo.yaml",
             *sweep_sets(out, steps=4), "--set", f"dataset_config.tokenizer_name={demo_corpus / 'tokenizer'}",
             "--mixes", "prose_mix", "--name", "job", "--metric", "eval_loss/mean"]  # fmt: skip
    submit = [ray_command(), "job", "submit", "--address", cluster.dashboard_url, "--working-dir", str(ROOT),
              "--runtime-env-json", json.dumps({"env_vars": keys})]  # fmt: skip
    job = subprocess.run([*submit, "--", *sweep], capture_output=True, text=True, timeout=600, cwd=ROOT, check=False)
    assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-3000:]
    assert f"sweep folder: {out}/job" in job.stdout and "1 finished" in job.stdout, job.stdout[-4000:]
    files = storage.list_files(f"{out}/job")
    assert {"sweep.json", "trials.parquet", "curves.parquet", "report/report.md"} <= set(files)
    local = tmp_path / "trials.parquet"
    storage._download(f"{out}/job/trials.parquet", local)
    assert pd.read_parquet(local)["status"].tolist() == ["finished"]

    # A relative output_dir would land in the job's copy of the working directory, which Ray deletes:
    # refused in one line before Ray, and the job fails
    relative = [*sweep, "--set", "train_config.output_dir=output", "--name", "lost"]
    job = subprocess.run([*submit, "--", *relative], capture_output=True, text=True, timeout=300, cwd=ROOT, check=False)
    assert job.returncode != 0
    lines = [x for x in (job.stdout + job.stderr).splitlines() if x.startswith("error: train_config.output_dir")]
    # (ray job submit prints the job's log twice when it fails: as it streams, and in the status message)
    assert len(set(lines)) == 1 and "inside this job's copy of --working-dir" in lines[0], job.stdout[-3000:]
    assert "Ray dashboard" not in job.stdout
