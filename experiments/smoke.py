"""The smoke demo: the embedded default model trained for a few steps on the embedded default data.

    python experiments/smoke.py [--config configs/demo.yaml] [--steps 60]

It prepares the offline demo corpus if it is missing (prose, Python code and package docs
from this Python installation, with their tokenizer), checks the data before anything
starts, starts a local Ray cluster (bound to 127.0.0.1; the dashboard URL is printed),
streams the config's data mix through Ray Data, and trains on it in this process: loss,
held-out loss, tokens/s and the tokens seen per dataset as it goes. At the end it checks
that greedy decoding through the MLA latent cache gives the tokens decoding without it
gives. Training on Ray Train, with checkpoints, is experiments/train.py (issue 4).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

import torch

from peerlab.cli import add_config_arguments, checked_data, config_from_arguments
from peerlab.data import DataMixture, DataOptions
from peerlab.eval.heldout import heldout_blocks, heldout_loss
from peerlab.model import build_model

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_arguments(ap, str(ROOT / "configs" / "demo.yaml"))
    ap.add_argument("--steps", type=int, default=60)
    args = ap.parse_args(argv)
    cfg = config_from_arguments(args)
    tokenizer = checked_data(cfg)

    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    context = ray.init(_node_ip_address="127.0.0.1", include_dashboard=True, log_to_driver=False)
    print(f"Ray dashboard: http://{context.dashboard_url}" if context.dashboard_url else "Ray dashboard: not running")

    t = cfg.train_config
    torch.manual_seed(t.seed)
    model = build_model(cfg.model_config)
    opt = torch.optim.AdamW(model.parameters(), lr=t.learning_rate, weight_decay=t.weight_decay)
    batch, seq = t.per_device_train_batch_size, cfg.dataset_config.max_seq_length
    opts = DataOptions(
        cfg.dataset_config.tokenizer_name, seq, seed=t.seed, heldout_fraction=cfg.dataset_config.heldout_fraction
    )
    held = heldout_blocks(cfg.dataset_config, tokenizer, blocks_per_dataset=4)
    params = sum(p.numel() for p in model.parameters())
    names = ", ".join(f"{d.name} {d.weight:g}" for d in cfg.dataset_config.datasets)
    print(f"smoke demo: {params:,} parameters; batch {batch} x {seq} tokens; mix: {names}")

    def loss_of(block: torch.Tensor) -> torch.Tensor:
        logits = model(block[:, :-1])
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), block[:, 1:].flatten())

    first_held = last_held = None
    with DataMixture(cfg.dataset_config.datasets, opts) as mix:
        start = time.perf_counter()
        for step in range(1, args.steps + 1):
            model.train()
            ids, _ = mix.next_batch(batch)
            loss = loss_of(ids)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.max_grad_norm)
            opt.step()
            if step == 1:
                start = time.perf_counter()  # rates after the first step (which waits for the data start-up)
            if step % 10 == 0 or step == 1:
                scores = heldout_loss(model, held, batch, torch.device("cpu"), contextlib.nullcontext())
                losses = [v for k, v in scores.items() if k.startswith("eval_loss/")]
                last_held = sum(losses) / len(losses)  # the mean over the datasets
                first_held = last_held if first_held is None else first_held
                rate = (step - 1) * batch * seq / max(time.perf_counter() - start, 1e-9)
                seen = ", ".join(
                    f"{k.split('/')[1]} {v:,}" for k, v in mix.stats().items() if k.startswith("tokens_seen")
                )
                print(
                    f"step {step:4d}  loss {loss.item():.3f}  held-out {last_held:.3f}  {rate:,.0f} tokens/s  seen: {seen}"
                )
    prompt = torch.tensor([tokenizer("def main(argv):\n    ", add_special_tokens=False)["input_ids"]])
    with_cache = model.generate(prompt, 32, use_cache=True)
    same = torch.equal(with_cache, model.generate(prompt, 32, use_cache=False))
    print(f"greedy continuation: {tokenizer.decode(with_cache[0, prompt.shape[1] :])!r}")
    print(f"cached and uncached decoding agree: {same}")
    print(f"held-out loss {first_held:.3f} -> {last_held:.3f}")
    ray.shutdown()
    return 0 if same and last_held < first_held else 1


if __name__ == "__main__":
    sys.exit(main())
