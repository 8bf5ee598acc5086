"""The sweep's result tables, built from its trials' run folders (what analysis/ reads).

    trials.parquet  one row per trial: ids, mix weights, PEER settings, seed, status, error,
                    final train loss, final held-out metrics, lm-eval metrics, tokens, steps,
                    wall time, parameter counts and compute
    curves.parquet  every trial's metrics.jsonl, one row per logged step
    usage.parquet   every trial's expert-usage snapshots (layer, step, usage, KL, load grid)
    usage_by_source.parquet  every trial's expert usage by data source (peerlab.train.usage: per source
                    and per pair of sources)
    evals.parquet   every trial's evals.jsonl (step, task, metric, value, stderr)
    ladder.parquet  a ladder's sweep only: a row per trial that ran, with its scale, sizes and compute

The tables are rebuilt from the run folders each time (nothing else holds results), and
each is written to a temporary file first and renamed, so a reader never sees half a table.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from peerlab.config import config_from_dict, ffn_type
from peerlab.model.size import active_parameters, training_flops_per_token
from peerlab.tracking import EVAL_KEYS, read_evals, read_metrics
from peerlab.tune import Trial, read_attempts, trial_dir, trial_status


def trial_column(metric: str) -> str:
    """trials.parquet's column of a sweep metric: the training loss (`--metric loss`) is `final_loss` there."""
    return "final_loss" if metric == "loss" else metric


def trial_row(trial: Trial, sweep_dir: Path, records: list[dict], evals: pd.DataFrame) -> dict:
    """The trials.parquet row of one trial (metrics NaN where the trial has none), from its metrics.jsonl
    records (one per step, in step order) and its evals.jsonl rows."""
    run_dir = trial_dir(sweep_dir, trial.trial_id)
    cfg = config_from_dict(trial.config)
    m, p = cfg.model_config, cfg.model_config.peer_config
    status, marker = trial_status(run_dir)
    weights = {d.name: d.weight for d in cfg.dataset_config.datasets}
    norm = sum(weights.values())
    total, active = active_parameters(m)
    row = {
        "trial_id": trial.trial_id,
        "cell": trial.cell,
        "mix": trial.mix,
        "setting": trial.setting,
        "seed": trial.seed,
        **({"scale": trial.scale} if trial.scale else {}),
        **{f"weight/{name}": w / norm for name, w in weights.items()},
        "peer/num_experts": p.num_experts,
        "peer/num_experts_per_tok": p.num_experts_per_tok,
        "peer/num_heads": p.num_heads,
        "peer/query_dim": p.query_dim,
        "peer/batch_norm_query": p.batch_norm_query,
        "peer/expert_hidden_size": p.expert_hidden_size,
        "peer/product_key_dim": "x".join(str(n) for n in p.product_key_dim),
        "peer/peer_start_layer": m.peer_start_layer,
        "peer/use_peer": ffn_type(m) == "peer",  # whether the cell runs PEER (an MoE or PKM arm's config says true)
        "ffn_type": ffn_type(m),  # peer, dense, moe or pkm (peerlab.arms)
        "status": status,
        "error": marker.get("error"),
        "params_total": total,
        "params_active": active,
        "flops_per_token": training_flops_per_token(m, cfg.dataset_config.max_seq_length),
        "config_path": str(run_dir / "resolved_config.yaml"),
    }
    starts = read_attempts(run_dir, starts_only=True)
    row["attempts"] = len(starts)  # times the trial started: more than 1 after a lost node or a --resume
    row["nodes"] = ",".join(dict.fromkeys(a["node_id"] for a in starts))  # the Ray nodes it ran on, in order
    logged = [r for r in records if "loss" in r]
    evaluated = [r for r in records if any(k.startswith("eval_") for k in r)]
    last = logged[-1] if logged else {}
    row[trial_column("loss")] = last.get("loss", float("nan"))
    row["steps"] = int(last.get("step", 0))
    row["tokens"] = int(sum(v for k, v in last.items() if k.startswith("tokens_seen/")))
    row["flops"] = 6.0 * active * row["tokens"]
    row["train_s"] = float(sum(r.get("train_s", 0.0) for r in logged))
    if evaluated:
        row.update({k: v for k, v in evaluated[-1].items() if k.startswith("eval_")})
    wall = marker.get("wall_s")
    if wall is None and (run_dir / "metrics.jsonl").is_file() and (run_dir / "resolved_config.yaml").is_file():
        wall = (run_dir / "metrics.jsonl").stat().st_mtime - (run_dir / "resolved_config.yaml").stat().st_mtime
    row["wall_s"] = wall if wall is not None else float("nan")
    if len(evals):
        final = evals[evals["step"] == evals["step"].max()]
        row.update({f"lm_eval/{t}/{m_}": v for t, m_, v in zip(final["task"], final["metric"], final["value"])})
    return row


def _with_trial(frame: pd.DataFrame, trial_id: str) -> pd.DataFrame:
    return frame.assign(trial_id=trial_id)[["trial_id", *frame.columns]]


def build_tables(trials: list[Trial], sweep_dir: Path) -> dict[str, pd.DataFrame]:
    """{trials, curves, usage, evals, usage_by_source}: the tables of the sweep, from its run folders."""
    sweep_dir = Path(sweep_dir)
    rows, curves, usage, evals, by_source = [], [], [], [], []
    for t in trials:
        run_dir = trial_dir(sweep_dir, t.trial_id)
        # A resumed run logs again the steps after its checkpoint: the last record of a step wins
        last = {r["step"]: r for r in read_metrics(run_dir) if "step" in r}
        records = [last[step] for step in sorted(last)]
        found = pd.DataFrame(read_evals(run_dir), columns=EVAL_KEYS)
        rows.append(trial_row(t, sweep_dir, records, found))
        if records:
            curves.append(_with_trial(pd.DataFrame(records), t.trial_id))
        if (run_dir / "usage.parquet").is_file():
            usage.append(_with_trial(pd.read_parquet(run_dir / "usage.parquet"), t.trial_id))
        if (run_dir / "usage_by_source.parquet").is_file():
            by_source.append(_with_trial(pd.read_parquet(run_dir / "usage_by_source.parquet"), t.trial_id))
        if len(found):
            evals.append(_with_trial(found, t.trial_id))

    def joined(frames: list[pd.DataFrame], columns: list[str]) -> pd.DataFrame:
        frames = [f for f in frames if len(f)]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)

    table = pd.DataFrame(rows)
    weights = [c for c in table.columns if c.startswith("weight/")]
    table[weights] = table[weights].fillna(0.0)  # a dataset a trial's mix leaves out has weight 0 there
    return {
        "trials": table,
        "curves": joined(curves, ["trial_id", "step"]),
        "usage": joined(usage, ["trial_id", "step", "layer"]),
        "evals": joined(evals, ["trial_id", *EVAL_KEYS]),
        "usage_by_source": joined(by_source, ["trial_id", "step", "layer", "kind", "source"]),
    }


def ladder_frame(trials: list[Trial], table: pd.DataFrame, multiples: dict[str, float]) -> pd.DataFrame:
    """ladder.parquet: a row per trial of a ladder that ran: cell, scale (its label), multiple (its compute
    over the base's), seed, params_total, params_active, tokens and flops (the run's plan, times the share
    of its steps it reached: an early-stopped run counts what it trained), status and every metric."""
    from peerlab.ladder import ladder_sizes

    rows = []
    by_id = table.set_index("trial_id")
    metrics = [c for c in table.columns if c == "final_loss" or c.startswith(("eval_", "lm_eval/")) or "*" in c]
    for t in trials:
        if not t.scale or t.trial_id not in by_id.index:
            continue
        row = by_id.loc[t.trial_id]
        if row["status"] == "unfinished" and not row["steps"]:
            continue  # never started (not promoted, or not reached yet)
        sizes = ladder_sizes(t.config)
        done = min(1.0, row["steps"] / t.config["train_config"]["max_steps"]) if row["steps"] else 1.0
        rows.append(
            {
                "trial_id": t.trial_id,
                "cell": t.cell,
                "mix": t.mix,
                "setting": t.setting,
                "scale": t.scale,
                "multiple": multiples.get(t.scale, float("nan")),
                "seed": t.seed,
                "params_total": sizes["params_total"],
                "params_active": sizes["params_active"],
                "tokens": int(sizes["tokens"] * done),
                "flops": sizes["flops"] * done,
                "status": row["status"],
                **{m: row[m] for m in metrics},
            }
        )
    return pd.DataFrame(rows)


def write_tables(
    trials: list[Trial], sweep_dir: Path, metric: str | None = None, ladder: dict[str, float] | None = None
) -> dict[str, Path]:
    """Write trials/curves/usage/evals/usage_by_source.parquet into the sweep folder (each atomically); returns their paths.

    A `metric` that is a weighted sum of metrics ('eval_bpb/code*0.5+eval_bpb/prose*0.5') gets a
    column of its own in trials.parquet, so the report can rank on it. A ladder's sweep (`ladder`:
    {scale label: multiple of the base's compute}) also gets ladder.parquet (`ladder_frame`).
    """
    from peerlab.mixsearch import parse_metric

    sweep_dir = Path(sweep_dir)
    paths = {}
    tables = build_tables(trials, sweep_dir)
    terms = parse_metric(metric) if metric else {}
    if len(terms) > 1 or any(w != 1 for w in terms.values()):
        frame = tables["trials"]
        present = [k for k in terms if k in frame]
        total = sum(w * frame[k] for k, w in terms.items() if k in frame)
        frame[metric] = total if len(present) == len(terms) else float("nan")
    if ladder:
        tables["ladder"] = ladder_frame(trials, tables["trials"], ladder)
    for name, frame in tables.items():
        path = sweep_dir / f"{name}.parquet"
        tmp = sweep_dir / f".{name}.parquet.tmp"
        frame.to_parquet(tmp, index=False)
        tmp.replace(path)
        paths[name] = path
    return paths
