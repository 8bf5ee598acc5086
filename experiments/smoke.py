"""The model's smoke demo: train the embedded default model for a few steps on CPU.

    python experiments/smoke.py [--config configs/demo.yaml] [--steps 60]

Until the data pipeline exists (issue 3), the text is local and real: this project's
README and Python's own license text, read as UTF-8 bytes (token id = byte value).
It prints the loss as it falls, tokens/s, and checks that greedy decoding through the
MLA latent cache gives the same tokens as decoding without it.
"""

from __future__ import annotations

import argparse
import sys
import sysconfig
import time
from pathlib import Path

import torch

from peerlab.cli import UsageError, add_config_arguments, config_from_arguments
from peerlab.model import build_model

ROOT = Path(__file__).resolve().parents[1]


def local_text() -> bytes:
    sources = [ROOT / "README.md", Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"]
    text = b"\n\n".join(p.read_bytes() for p in sources if p.is_file())
    if len(text) < 10_000:
        raise SystemExit("error: not enough local text found for the smoke demo")
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_arguments(ap, str(ROOT / "configs" / "demo.yaml"))
    ap.add_argument("--steps", type=int, default=60)
    args = ap.parse_args(argv)
    cfg = config_from_arguments(args)
    if cfg.model_config.vocab_size < 256:
        raise UsageError("the smoke demo reads bytes; model_config.vocab_size must be >= 256")
    t = cfg.train_config
    torch.manual_seed(t.seed)
    model = build_model(cfg.model_config)
    data = torch.tensor(list(local_text()), dtype=torch.long)
    seq, batch = min(cfg.dataset_config.max_seq_length, 128), t.per_device_train_batch_size
    held_out = data[-(len(data) // 10):]
    train = data[: -(len(data) // 10)]
    opt = torch.optim.AdamW(model.parameters(), lr=t.learning_rate, weight_decay=t.weight_decay)
    params = sum(p.numel() for p in model.parameters())
    print(f"smoke demo: {params:,} parameters, {len(train):,} training bytes, batch {batch} x {seq}")

    def sample(source: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        starts = torch.randint(0, len(source) - seq - 1, (batch,), generator=generator)
        return torch.stack([source[s : s + seq + 1] for s in starts.tolist()])  # (B, T+1)

    def loss_of(block: torch.Tensor) -> torch.Tensor:
        logits = model(block[:, :-1])
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), block[:, 1:].flatten())

    gen = torch.Generator().manual_seed(t.seed)
    eval_blocks = sample(held_out, torch.Generator().manual_seed(0))
    start, first_eval = time.perf_counter(), None
    for step in range(1, args.steps + 1):
        model.train()
        loss = loss_of(sample(train, gen))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.max_grad_norm)
        opt.step()
        if step % 10 == 0 or step == 1:
            model.eval()
            with torch.no_grad():
                held = loss_of(eval_blocks).item()
            first_eval = held if first_eval is None else first_eval
            rate = step * batch * seq / (time.perf_counter() - start)
            print(f"step {step:4d}  train loss {loss.item():.3f}  held-out loss {held:.3f}  {rate:,.0f} tokens/s")
    prompt = data[:32].unsqueeze(0)
    with_cache = model.generate(prompt, 48, use_cache=True)
    without = model.generate(prompt, 48, use_cache=False)
    same = torch.equal(with_cache, without)
    text = bytes(with_cache[0, 32:].tolist()).decode("utf-8", errors="replace")
    print(f"greedy continuation: {text!r}")
    print(f"cached and uncached decoding agree: {same}")
    print(f"held-out loss {first_eval:.3f} -> {held:.3f}")
    return 0 if same and held < first_eval else 1


if __name__ == "__main__":
    sys.exit(main())
