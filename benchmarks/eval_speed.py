"""lm-eval speed: the peerlab adapter against lm-eval's HFLM, and decoding with the latent cache against without.

    python benchmarks/eval_speed.py [--config configs/demo.yaml] [--requests 400] [--rounds 3] [--gen-tokens 256] [--threads N]

1. Loglikelihood requests/s on the same requests: the multiple-choice requests of the offline
   task `peerlab_heldout_mc` (a passage's opening and each of its four endings, real text through
   the demo tokenizer). The adapter wraps the PEER/MLA model of the config; the peer is
   lm-eval's own `HFLM` wrapping transformers' `DeepseekV3ForCausalLM` of the same shape
   (hidden size, layers, heads, MLA ranks and head sizes, vocabulary, context; a dense SwiGLU
   MLP of `intermediate_size` in every layer, since transformers has no PEER layer), randomly
   initialised (nothing is downloaded). Both score in float32 with the same batch size. A third
   line runs the adapter over peerlab's dense baseline (`use_peer: false`, the same config):
   the adapter against HFLM without the PEER layer's own cost. A fourth pair scores one answer
   per question only (no two requests share a context, so the adapter packs nothing): the
   ratio for requests that are not multiple choice.
2. Generation tokens/s of the adapter's greedy decoding (`generate_until`'s loop) with the MLA
   latent cache against recomputing the whole sequence at every step, at `--gen-tokens` new
   tokens after a 64-token prompt, batch 1 and batch 8.

Rounds alternate between the two sides; figures are medians. Needs the demo corpus
(`python experiments/prepare_data.py`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch


def mc_requests(data_dir: Path, count: int, distinct: bool = False) -> list:
    from lm_eval.api.instance import Instance

    rows = [json.loads(x) for x in (data_dir / "heldout_mc.jsonl").read_text().splitlines() if x.strip()]
    if distinct:  # one answer per question, in turn: no two requests share a context
        args = [(r["context"], " " + r["endings"][i % len(r["endings"])]) for i, r in enumerate(rows)][:count]
    else:
        args = [(r["context"], " " + ending) for r in rows for ending in r["endings"]][:count]
    return [Instance(request_type="loglikelihood", doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def deepseek_of_the_same_shape(model_config):
    """transformers' DeepseekV3ForCausalLM with the config's attention and sizes, every MLP dense."""
    from transformers import DeepseekV3ForCausalLM

    from peerlab.model.deepseek import deepseek_v3_config

    return DeepseekV3ForCausalLM(deepseek_v3_config(model_config)).eval()


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--data", default="data/demo", help="the demo corpus (its evals/ and tokenizer/)")
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--batch", type=int, default=None, help="default: eval_config.eval_batch_size")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--gen-tokens", type=int, default=256)
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's); 1 is steadier on a shared machine")
    ap.add_argument("--json", help="write the figures here too")
    args = ap.parse_args(argv)

    from lm_eval.models.huggingface import HFLM

    from peerlab.config import load_config
    from peerlab.data.tokenizer import load_tokenizer
    from peerlab.eval.lm import PeerlabLM
    from peerlab.model import build_model

    logging_off()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    batch = args.batch or cfg.eval_config.eval_batch_size
    max_length = cfg.dataset_config.max_seq_length
    tokenizer = load_tokenizer(str(Path(args.data) / "tokenizer"))
    torch.manual_seed(0)
    ours = PeerlabLM(
        model=build_model(cfg.model_config).eval(), tokenizer=tokenizer, batch_size=batch, max_length=max_length
    )
    dense_cfg = load_config(args.config, ["model_config.use_peer=false"]).model_config
    dense = PeerlabLM(model=build_model(dense_cfg).eval(), tokenizer=tokenizer, batch_size=batch, max_length=max_length)
    hf_model = deepseek_of_the_same_shape(cfg.model_config)
    theirs = HFLM(pretrained=hf_model, tokenizer=tokenizer, batch_size=batch, max_length=max_length)
    requests = mc_requests(Path(args.data) / "evals", args.requests)
    distinct = mc_requests(Path(args.data) / "evals", args.requests, distinct=True)
    params = {
        "peerlab": sum(p.numel() for p in ours.model.parameters()),
        "deepseek_v3": sum(p.numel() for p in hf_model.parameters()),
    }

    # 1. loglikelihood requests/s, alternating.
    ours.loglikelihood(requests[:batch], disable_tqdm=True)  # warm-up
    theirs.loglikelihood(requests[:batch], disable_tqdm=True)
    dense.loglikelihood(requests[:batch], disable_tqdm=True)
    t_ours, t_theirs, t_dense, t_ours_distinct, t_theirs_distinct = [], [], [], [], []
    for _ in range(args.rounds):
        t_ours.append(timed(lambda: ours.loglikelihood(requests, disable_tqdm=True)))
        t_theirs.append(timed(lambda: theirs.loglikelihood(requests, disable_tqdm=True)))
        t_dense.append(timed(lambda: dense.loglikelihood(requests, disable_tqdm=True)))
        t_ours_distinct.append(timed(lambda: ours.loglikelihood(distinct, disable_tqdm=True)))
        t_theirs_distinct.append(timed(lambda: theirs.loglikelihood(distinct, disable_tqdm=True)))
    a = ours.loglikelihood(requests[:4], disable_tqdm=True)
    assert all(torch.isfinite(torch.tensor(x[0])) for x in a)
    rate_ours = len(requests) / statistics.median(t_ours)
    rate_theirs = len(requests) / statistics.median(t_theirs)
    rate_dense = len(requests) / statistics.median(t_dense)
    rate_ours_distinct = len(distinct) / statistics.median(t_ours_distinct)
    rate_theirs_distinct = len(distinct) / statistics.median(t_theirs_distinct)

    # 2. generation tokens/s with and without the latent cache.
    passages = (Path(args.data) / "evals" / "bpb_prose.jsonl").read_text().splitlines()
    prompts = [ids[:64] for ids in (tokenizer(json.loads(x)["text"])["input_ids"] for x in passages) if len(ids) >= 64]
    prompts = prompts[:8]
    gen = {}
    for rows in (1, 8):
        rates = {True: [], False: []}
        for _ in range(args.rounds):
            for use_cache in (True, False):
                ours.use_cache = use_cache
                out = []
                seconds = timed(lambda: out.extend(ours.greedy(prompts[:rows], args.gen_tokens, [])))  # noqa: B023
                rates[use_cache].append(sum(len(o) for o in out) / seconds)
        gen[rows] = {"cache": statistics.median(rates[True]), "recompute": statistics.median(rates[False])}
    ours.use_cache = True

    figures = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "threads": torch.get_num_threads(),
        "config": args.config,
        "parameters": params,
        "requests": len(requests),
        "batch": batch,
        "loglikelihood_requests_per_s": {"peerlab": rate_ours, "hflm_deepseek_v3": rate_theirs},
        "loglikelihood_ratio": rate_ours / rate_theirs,
        "loglikelihood_dense_baseline_per_s": rate_dense,
        "loglikelihood_dense_ratio": rate_dense / rate_theirs,
        "distinct_requests": len(distinct),
        "loglikelihood_distinct_per_s": {"peerlab": rate_ours_distinct, "hflm_deepseek_v3": rate_theirs_distinct},
        "loglikelihood_distinct_ratio": rate_ours_distinct / rate_theirs_distinct,
        "generation_tokens_per_s": {str(k): v for k, v in gen.items()},
        "generation_cache_speedup": {str(k): v["cache"] / v["recompute"] for k, v in gen.items()},
        "gen_tokens": args.gen_tokens,
    }
    print(f"machine: {figures['machine']}, {figures['threads']} torch threads; config {args.config}")
    print(f"parameters: peerlab {params['peerlab']:,}, DeepseekV3 (dense MLP) {params['deepseek_v3']:,}")
    print(
        f"loglikelihood, {len(requests)} requests of peerlab_heldout_mc, batch {batch}: "
        f"peerlab {rate_ours:.1f} req/s, HFLM(DeepseekV3ForCausalLM) {rate_theirs:.1f} req/s, "
        f"ratio {rate_ours / rate_theirs:.2f}x (target >= 1.5x)"
    )
    print(
        f"  the adapter over peerlab's dense baseline of the same config (use_peer: false, no PEER layer): "
        f"{rate_dense:.1f} req/s, {rate_dense / rate_theirs:.2f}x HFLM (the adapter's own share of the difference)"
    )
    print(
        f"  {len(distinct)} requests with distinct contexts (one answer per question): peerlab "
        f"{rate_ours_distinct:.1f} req/s, HFLM {rate_theirs_distinct:.1f} req/s, "
        f"ratio {rate_ours_distinct / rate_theirs_distinct:.2f}x"
    )
    for rows, g in gen.items():
        print(
            f"greedy generation, batch {rows}, 64-token prompt + {args.gen_tokens} tokens: latent cache "
            f"{g['cache']:.1f} tok/s, recompute {g['recompute']:.1f} tok/s, {g['cache'] / g['recompute']:.2f}x "
            "(target >= 3x)"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))


def logging_off() -> None:
    import logging

    for name in ("lm_eval", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)


if __name__ == "__main__":
    main()
