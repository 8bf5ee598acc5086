"""The training loop every Ray Train worker runs (`train_loop`), and the run it belongs to.

One optimizer step = `gradient_accumulation_steps` micro-batches of
`per_device_train_batch_size` blocks on every worker (data-parallel through DDP or FSDP2
when there are several workers: `peerlab.train.distributed.DataParallel`). The loop resumes
by itself: from `resume_from_checkpoint`, else from the newest complete checkpoint of its
run folder, which is also how it continues after Ray Train restarts a failed worker group.
Every `logging_steps` rank 0 writes a line of metrics, every `eval_steps` it adds the
held-out loss and bits per byte of each dataset, and every `save_steps` (and at the end) all
ranks hand their data position and random state to rank 0, which writes a checkpoint. The
lm-eval set (`eval_config.evals`) runs after the last step's checkpoint, and every
`eval_config.lm_eval_steps` when that is set (`lm_evaluate`).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from peerlab import storage
from peerlab.config import Config, config_from_dict
from peerlab.data.mixture import DataMixture, DataOptions
from peerlab.data.tokenizer import load_tokenizer
from peerlab.eval.heldout import heldout_blocks, heldout_loss
from peerlab.model import build_model, peer_bytes_per_token, training_flops_per_token
from peerlab.model.loss import kernel_name
from peerlab.model.moe import MoE
from peerlab.tracking import MetricsLog, read_evals, read_metrics
from peerlab.train import checkpoint as ckpt
from peerlab.train import usage
from peerlab.train.allocator import reuse_freed_memory
from peerlab.train.compiling import apply_compile, eager
from peerlab.train.distributed import DataParallel, Place, gather, mean_across, sync_buffers, where_am_i
from peerlab.train.optim import build_optimizer, build_scheduler, sparse_experts_on, total_steps
from peerlab.train.precision import apply_float8, autocast, describe, grad_scaler, optimizer_stepped, set_tf32
from peerlab.train.utilization import compute_precision, device_peaks, utilization

log = logging.getLogger("peerlab.train")


class TrainingError(RuntimeError):
    """The run cannot go on (a non-finite loss, say); the message names the step and the last good checkpoint."""


def report(metrics: dict, to_tune: bool = False) -> None:
    """Hand metrics to Ray Train (and, through TuneReportCallback, to Tune) when running under it.

    `to_tune`: the loop runs in Train's local mode inside a Tune trial (a CPU sweep), where
    ray.train.report only keeps the metrics; they go to ray.tune.report instead.
    """
    if to_tune:
        import ray.tune

        ray.tune.report(metrics)
        return
    try:
        import ray.train

        ray.train.get_context()
    except Exception:
        return
    try:
        ray.train.report(metrics)
    except Exception as err:  # Train's local mode inside a Tune trial wants ray.tune.report (FACTS.md)
        try:
            import ray.tune

            ray.tune.report(metrics)
        except Exception:
            log.debug("metrics not reported to Ray: %s", err)


def resume_point(cfg: Config, run_dir: Path, place: Place, run_uri: str | None = None) -> Path | None:
    """The checkpoint to continue from, chosen by rank 0 and shared with every rank.

    The run folder's own newest complete checkpoint comes first (it is the run's latest
    progress, also after Ray Train restarted the workers); only a run with none of its own
    starts from resume_from_checkpoint (a checkpoint, or the newest of a run or its
    checkpoints/ folder: `ckpt.resolve`). Every rank must see the same storage.
    """
    path = None
    if place.rank == 0:
        path = ckpt.latest(run_dir / "checkpoints")
        named = cfg.train_config.resume_from_checkpoint
        if path is None and named:
            path = ckpt.resolve(named)
        elif path is not None and named and not Path(named).resolve().is_relative_to(run_dir.resolve()):
            log.warning("resume_from_checkpoint %s is not used: the run folder has checkpoints of its own", named)
    if place.world > 1:
        shared = [str(path) if path else None]
        dist.broadcast_object_list(shared, src=0)
        path = Path(shared[0]) if shared[0] else None
        if path is not None and run_uri and not (path / ckpt.MANIFEST).is_file() and path.parent.parent == run_dir:
            storage.fetch_checkpoint(f"{run_uri}/checkpoints/{path.name}", path.parent)  # this node's copy
        if path is not None and not (path / ckpt.MANIFEST).is_file():
            raise TrainingError(
                f"rank {place.rank} cannot see checkpoint {path}: put output_dir on storage all workers share"
            )
    return path


def follow_config(optimizer: torch.optim.Optimizer, scheduler, weight_decay: list[float]) -> None:
    """After a resume, train on with this config's learning rate, weight decay and schedule (its max_steps
    and warm-up too): a checkpoint's optimizer state brings back the values it trained with, and its first
    step would otherwise take the old schedule's rate. `scheduler` has the config's base rates already (a
    LambdaLR, as transformers' schedules are); with an unchanged config every value is what it was."""
    for group, base, decay, lr_lambda in zip(
        optimizer.param_groups, scheduler.base_lrs, weight_decay, scheduler.lr_lambdas, strict=True
    ):
        group.update(initial_lr=base, lr=base * lr_lambda(scheduler.last_epoch), weight_decay=decay)


def stop_if_not_finite(step: int, loss: float, grad_norm: float, fp16: bool, place: Place, run_dir: Path) -> None:
    """Raise TrainingError on a non-finite loss, or non-finite gradients that no fp16 loss scaler will skip.

    It runs before the optimizer applies the gradients: no checkpoint ever holds such a step.
    """
    bad = "loss" if not math.isfinite(loss) else None
    if bad is None and not fp16 and not math.isfinite(mean_across(grad_norm, place)):
        bad = "gradient norm"
    if bad is not None:
        good = ckpt.latest(run_dir / "checkpoints")
        value = loss if bad == "loss" else grad_norm
        raise TrainingError(
            f"the {bad} is {value} at step {step}; the run stops here. "
            f"The last good checkpoint is {good or 'none (no checkpoint was written yet)'}"
        )


def lm_evaluate(
    cfg: Config, model: nn.Module, tokenizer, step: int, place: Place, amp, run_dir: Path, wandb_run
) -> None:
    """Run the lm-eval set on the model in memory and append the results to <run>/evals.jsonl.

    With DDP rank 0 evaluates the unwrapped model while the others wait at a barrier. Under
    FSDP every forward needs every rank, so every rank runs the same requests in the same
    order (the same task data, batches and greedy decisions on every rank); rank 0 writes.
    lm-eval reseeds Python's, NumPy's and torch's generators: their states are put back after,
    so training after an evaluation draws what it would have drawn without it.
    """
    from peerlab.eval.harness import format_table, run_lm_eval
    from peerlab.eval.lm import PeerlabLM
    from peerlab.tracking import append_evals

    # The requests' shapes vary and decoding goes token by token: uncompiled (peerlab.train.compiling).
    with eager():
        e = cfg.eval_config
        sync_buffers(model, place.world)  # the same BatchNorm statistics on every rank, so the same greedy decisions
        sharded = cfg.train_config.fsdp and place.world > 1
        if place.rank == 0 or sharded:
            saved = ckpt.rng_state()
            lm = PeerlabLM(
                model=model,
                tokenizer=tokenizer,
                batch_size=e.eval_batch_size,
                max_length=cfg.dataset_config.max_seq_length,
                autocast=amp,
            )
            outcome = run_lm_eval(
                lm,
                e.evals,
                e.evals_registry_path,
                data_dir=e.eval_data_dir,
                limit=e.lm_eval_limit,
                confirm_run_unsafe_code=e.confirm_run_unsafe_code,
            )
            ckpt.set_rng_state(*saved)
            if place.rank == 0:
                append_evals(run_dir, step, outcome.rows, wandb_run)
                log.info(
                    "lm-eval at step %d: %d results in %.1f s%s\n%s",
                    step,
                    len(outcome.rows),
                    outcome.seconds,
                    f" ({len(outcome.skipped)} tasks skipped)" if outcome.skipped else "",
                    format_table(outcome.rows),
                )
        if place.world > 1:
            dist.barrier()


def train_loop(loop_config: dict) -> dict:
    """Ray Train's per-worker function; also runs directly in one process. Returns the last metrics."""
    cfg = config_from_dict(loop_config["config"])
    run_dir = Path(loop_config["run_dir"])
    t, d = cfg.train_config, cfg.dataset_config
    place = where_am_i()
    reuse_freed_memory()  # table-sized step tensors reuse the last step's pages (peerlab.train.allocator)
    logging.basicConfig(level=t.log_level.upper(), format="%(asctime)s %(name)s: %(message)s")
    log.setLevel(t.log_level.upper())
    set_tf32(t)
    if place.device.type == "cuda":
        torch.cuda.set_device(place.device)
        if loop_config.get("gpu_memory_fraction"):  # a trial sharing its GPU keeps to its share of the memory
            torch.cuda.set_per_process_memory_fraction(loop_config["gpu_memory_fraction"], place.device)

    torch.manual_seed(t.seed)  # the same initial weights on every rank
    model = build_model(cfg.model_config).to(place.device)
    sources = [ds.name for ds in d.datasets]  # usage by data source: each batch's source ids go to these layers
    by_source = []
    if cfg.model_config.use_peer and cfg.model_config.peer_config.log_expert_usage:
        usage.track_moe(model)  # an MoE arm's layers count their experts' load too
        by_source = usage.track_sources(model, len(sources))
    micro_batch_tokens = t.per_device_train_batch_size * d.max_seq_length  # what Float8's filter times layers at
    float8 = apply_float8(
        model, t, place.device, force=loop_config.get("force_float8", False), tokens=micro_batch_tokens
    )
    # each block, after Float8 and before DDP/FSDP wrap it
    compiled = apply_compile(model, t, place.device, backend=loop_config.get("compile_backend", "inductor"))
    steps = total_steps(t)
    parallel = DataParallel(model, place, fsdp=t.fsdp, sparse_experts=sparse_experts_on(t))  # DDP, FSDP2 or as it is
    optimizer = build_optimizer(model, t, fused=place.device.type == "cuda")
    scheduler = build_scheduler(optimizer, t, steps)
    scaler = grad_scaler(t, place.device)

    tokenizer = load_tokenizer(d.tokenizer_name)
    opts = DataOptions(
        d.tokenizer_name,
        d.max_seq_length,
        seed=t.seed,
        rank=place.rank,
        world=place.world,
        heldout_fraction=d.heldout_fraction,
        engine=loop_config.get("data_engine", "ray"),
    )
    start_step, data_state, trainer_state = 0, None, {}
    run_uri = loop_config.get("run_uri")  # the run folder's URI on object storage; run_dir is its staging copy
    if run_uri and place.rank == 0 and not run_dir.is_dir():  # another node than the driver's: pull it here
        storage.pull_run(run_uri, run_dir)
    source = resume_point(cfg, run_dir, place, run_uri)
    if source is not None:
        state = ckpt.load(source)
        full = StateDictOptions(full_state_dict=True)
        set_model_state_dict(model, state.model, options=full)
        configured = [group["weight_decay"] for group in optimizer.param_groups]
        set_optimizer_state_dict(model, optimizer, optim_state_dict=state.optimizer, options=full)
        scheduler.load_state_dict({**state.scheduler, "base_lrs": scheduler.base_lrs})
        follow_config(optimizer, scheduler, configured)
        trainer_state = state.trainer
        scaler.load_state_dict(trainer_state.get("scaler", {}) or scaler.state_dict())
        start_step = trainer_state["step"]
        if start_step > steps:
            raise TrainingError(
                f"{source} is at step {start_step}, past this run's {steps} steps: raise max_steps "
                "(or num_train_epochs), or resume from an earlier checkpoint"
            )
        ranks = state.data["ranks"]
        if len(ranks) != place.world:
            raise TrainingError(f"{source} was written by {len(ranks)} workers; this run has {place.world}")
        data_state = ranks[place.rank]
        ckpt.set_rng_state(state.rng_plain["ranks"][place.rank], ckpt.rank_tensors(state.rng_tensors, place.rank))
        if place.rank == 0:
            log.info("resuming from %s at step %d", source, start_step)
    else:
        torch.manual_seed(t.seed + place.rank)  # per-rank streams of randomness from here on

    pids = gather(os.getpid(), place)  # every rank's process id, in rank order
    precision = describe(t, float8)
    flops_per_token = training_flops_per_token(cfg.model_config, d.max_seq_length)
    bytes_per_token = peer_bytes_per_token(cfg.model_config, next(model.parameters()).element_size())
    peaks = None
    if place.rank == 0:
        peaks = device_peaks(place.device, compute_precision(precision["autocast"], float8.on, t.tf32))
        with autocast(t, place.device, float8):  # the loss's choice depends on the autocast dtype
            lm_loss = kernel_name(place.device)
        info = {**precision, **compiled, "sparse_experts": sparse_experts_on(t), "peaks": peaks.as_dict()}
        info["lm_loss"] = lm_loss  # "liger-kernel" on CUDA, else "peerlab" (model/loss.py)
        info["gpu_memory_fraction"] = loop_config.get("gpu_memory_fraction") if place.device.type == "cuda" else None
        info.update(flops_per_token=flops_per_token, peer_bytes_per_token=bytes_per_token)
        write_run_info(run_dir, place, info, start_step, pids)

    metrics = MetricsLog(run_dir, cfg, enabled=place.rank == 0)
    amp = autocast(t, place.device, float8)
    # Evaluation runs on rank 0, except under FSDP, where every forward needs every rank.
    evaluates = place.rank == 0 or (t.fsdp and place.world > 1)
    eval_blocks = heldout_blocks(d, tokenizer) if evaluates else {}
    tokens_per_step = t.per_device_train_batch_size * t.gradient_accumulation_steps * d.max_seq_length * place.world
    last: dict = {}

    with DataMixture(d.datasets, opts, data_state) as data:

        def save(step: int, final: bool = False) -> None:
            sync_buffers(model, place.world)  # every rank's BatchNorm statistics, averaged, go in the checkpoint
            states = gather((data.state_dict(), ckpt.rng_state()), place)
            full = StateDictOptions(full_state_dict=True, cpu_offload=place.world > 1)  # gathered on rank 0
            model_state = get_model_state_dict(model, options=full)
            optimizer_state = get_optimizer_state_dict(model, optimizer, options=full)
            if place.rank == 0:
                folder = ckpt.save(
                    run_dir / "checkpoints" / f"step-{step:06d}",
                    model_state,
                    optimizer_state,
                    scheduler.state_dict(),
                    {"ranks": [s for s, _ in states]},
                    {"step": step, "scaler": scaler.state_dict() if t.fp16 else None},
                    rng=[r for _, r in states],
                )
                ckpt.prune(run_dir / "checkpoints", t.save_total_limit)
                metrics.checkpoint(folder, step, final=final)
                if run_uri:
                    # the new checkpoint, manifest last, and the run's files
                    storage.push_run(run_dir, run_uri, t.save_total_limit)
            if place.world > 1:
                dist.barrier()

        window_start, window_tokens, window_train_s = time.perf_counter(), 0, 0.0
        run_start = time.perf_counter()
        for step in range(start_step + 1, steps + 1):
            step_start = time.perf_counter()
            micro_batches = range(t.gradient_accumulation_steps)
            batches = (fed(by_source, *data.next_batch(t.per_device_train_batch_size)) for _ in micro_batches)
            check = functools.partial(stop_if_not_finite, step, fp16=t.fp16, place=place, run_dir=run_dir)
            step_loss, grad_norm = parallel.step(batches, optimizer, scaler, amp, t, check)
            lr = optimizer.param_groups[0]["lr"]  # what this step used
            if optimizer_stepped(scaler, grad_norm):  # a step fp16's scaler skipped leaves the schedule where it was
                scheduler.step()
            window_tokens += tokens_per_step
            window_train_s += time.perf_counter() - step_start

            record: dict = {}
            if step % t.logging_steps == 0 or step == steps:
                now = time.perf_counter()
                rate = window_tokens / max(now - window_start, 1e-9)
                record = {"loss": step_loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": rate}
                if peaks is not None:  # of the time in training steps (evaluations left out)
                    step_rate = window_tokens / max(window_train_s, 1e-9)
                    record.update(utilization(flops_per_token, bytes_per_token, step_rate, peaks, place.world))
                window_start, window_tokens = now, 0
                record["train_s"], window_train_s = window_train_s, 0.0  # seconds in training steps since the last line
                record["eta_s"] = (steps - step) * tokens_per_step / rate if rate > 0 else None
                seen = gather(data.stats(), place)  # every rank's counts: the totals of the run
                for key in sorted({k for s in seen for k in s}):
                    if key.startswith(("tokens_seen/", "skipped/")):
                        record[key] = sum(s.get(key, 0) for s in seen)
                    elif key.startswith("passes/"):  # passes each worker completed over its share: the most of any
                        record[key] = max(s.get(key, 0) for s in seen)
                record.update(moe_metrics(model))
            if step % t.eval_steps == 0 or step == steps:
                sync_buffers(model, place.world)  # every rank evaluates the same BatchNorm statistics
                if evaluates:  # (under FSDP every rank computes the same numbers; rank 0 writes them)
                    with eager():  # evaluation runs uncompiled (peerlab.train.compiling)
                        held = heldout_loss(model, eval_blocks, t.per_device_eval_batch_size, place.device, amp)
                    record.update(with_means(held))
            if record:
                record = {"step": step, **record}
                metrics.write(record)
                if "loss" in record:
                    report(record, to_tune=loop_config.get("report_to") == "tune")
                    last = record
            peer = cfg.model_config.peer_config
            # Every snapshot covers log_freq steps, so that runs and datasets compare: the steps after the last
            # full window are left out (a stub of a few steps could show a dataset as never routed), except in a
            # run shorter than log_freq, whose one snapshot is at its end.
            window_ends = step % peer.log_freq == 0 or (step == steps and steps < peer.log_freq)
            if cfg.model_config.use_peer and peer.log_expert_usage and window_ends:
                rows = usage.collect(model, step, peer.usage_threshold, distributed=place.world > 1)
                source_rows = usage.collect_by_source(model, step, sources, distributed=place.world > 1)
                if place.rank == 0:
                    usage.write(rows, run_dir, metrics.wandb)
                    usage.write_by_source(source_rows, run_dir, metrics.wandb)
            if step % t.save_steps == 0 or step == steps:
                save(step, final=step == steps)
            e = cfg.eval_config
            if e.evals and e.lm_eval_steps and step % e.lm_eval_steps == 0 and step != steps:
                lm_evaluate(cfg, model, tokenizer, step, place, amp, run_dir, metrics.wandb)
        if place.rank == 0:
            log.info("finished %d steps in %.1f s", steps - start_step, time.perf_counter() - run_start)
    final_eval_due = steps > start_step
    if start_step >= steps:  # resumed at its last step: it stopped after its final checkpoint, before it ended
        last, final_eval_due = already_trained(run_dir, steps, place, bool(cfg.eval_config.evals))
        if last:
            report(last, to_tune=loop_config.get("report_to") == "tune")
    # The end-of-run lm-eval set runs once the data streams are closed: their Ray Data tasks no longer
    # compete with it for the CPUs (demo set on 2 cores: 11.7 s, against 30.3 s while they still ran).
    if cfg.eval_config.evals and final_eval_due:
        lm_evaluate(cfg, model, tokenizer, steps, place, amp, run_dir, metrics.wandb)
    metrics.close()
    if run_uri and place.rank == 0:
        # the lines and evaluations written after the last checkpoint
        storage.push_run(run_dir, run_uri, t.save_total_limit)
    return last


def already_trained(run_dir: Path, steps: int, place: Place, evals: bool) -> tuple[dict, bool]:
    """A run that starts at its last step (interrupted after its final checkpoint, before its end): what its
    last step logged (the record Tune and the caller get again) and whether its final lm-eval set is still
    to run. Rank 0 reads its metrics.jsonl and evals.jsonl; every rank gets the same answer."""
    answer = ({}, False)
    if place.rank == 0:
        logged = [r for r in read_metrics(run_dir) if r.get("step") == steps and "loss" in r]
        evaluated = any(row.get("step") == steps for row in read_evals(run_dir))
        answer = (logged[-1] if logged else {}, evals and not evaluated)
        log.info(
            "the run had trained all %d steps; %s",
            steps,
            "its final lm-eval set runs now" if answer[1] else "nothing to do",
        )
    return gather(answer, place)[0]


def fed(layers: list, batch: torch.Tensor, sources: list[int]) -> torch.Tensor:
    """`batch`, once its sequences' data sources are handed to the usage-tracking PEER `layers`: the generator
    of micro-batches calls it right before each forward."""
    usage.set_sources(layers, sources)
    return batch


def moe_metrics(model: nn.Module) -> dict:
    """Each MoE layer's last training forward (this worker's micro-batch): the share of the token-expert
    assignments each expert got (`moe_load/<layer>`, a list summing to 1) and its balance loss."""
    out = {}
    for i, block in enumerate(getattr(model, "layers", [])):
        mlp = getattr(block, "mlp", None)
        if isinstance(mlp, MoE) and mlp.last_load is not None:
            out[f"moe_load/{i}"] = [round(float(v), 6) for v in mlp.last_load.float().cpu()]
            out[f"moe_balance_loss/{i}"] = float(mlp.last_balance_loss.detach())
    return out


def write_run_info(run_dir: Path, place: Place, precision: dict, start_step: int, pids: list[int]) -> Path:
    """<run>/run_info.json: where and how this attempt trains (workers and their process ids, device, backend,
    precision, torch.compile).

    Rewritten at every start, so after a resume or a restart it describes the latest attempt.
    """
    gpu = torch.cuda.get_device_name(place.device) if place.device.type == "cuda" else None
    info = {
        "workers": place.world,
        "pids": pids,
        "device": place.device.type,
        "gpu": gpu,
        "backend": dist.get_backend() if dist.is_available() and dist.is_initialized() else None,
        "start_step": start_step,
        "torch": torch.__version__,
        **precision,
    }
    path = run_dir / "run_info.json"
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(info, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def with_means(held: dict) -> dict:
    """Held-out metrics plus their mean over datasets: eval_loss/mean, eval_bpb/mean (what sweeps compare)."""
    out = dict(held)
    for prefix in ("eval_loss/", "eval_bpb/"):
        values = [v for k, v in held.items() if k.startswith(prefix)]
        if values:
            out[f"{prefix}mean"] = sum(values) / len(values)
    return out


REPORT_POLL_S = "0.1"  # how often Ray Train's controller collects the workers' reports (seconds)


def environment() -> dict:
    """Variables the workers need (the driver's offline switches travel with the job)."""
    keys = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "WANDB_MODE", "WANDB_DIR", "RAY_AUTH_MODE")
    keys += storage.ENVIRONMENT  # object storage's credentials and endpoint, for an s3:// or gs:// output_dir
    keys += tuple(k for k in os.environ if k.startswith("PEERLAB_"))  # peerlab's own switches (README), on any node
    env = {k: os.environ[k] for k in keys if k in os.environ}
    # Ray Train's controller takes a worker's report off a one-place queue when it polls, every 2 s by default,
    # and ray.train.report waits for the place: a logged step cost up to 2 s of training (Ray 2.60,
    # ray/train/v2/_internal/constants.py DEFAULT_HEALTH_CHECK_INTERVAL_S).
    env["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", REPORT_POLL_S)
    return env
