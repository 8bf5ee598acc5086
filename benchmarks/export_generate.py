"""Greedy decoding of the exported model (transformers' generate) against peerlab's own decoding.

    python benchmarks/export_generate.py [--config configs/demo.yaml] [--batch 1] [--prompt 64] [--new 64] [--rounds 3]

The model is the config's (random init: speed does not depend on the weights), exported in
memory: the standalone `PeerlabForCausalLM` of peerlab/export/modeling_peerlab.py with the same
weights. Three decoders of the same prompts, alternating, median of `--rounds`:

- peerlab: `PeerMLAModel.generate(use_cache=True)`, the latent cache it preallocates (the peer);
- export: `generate(do_sample=False)`, transformers' loop, the latents in a DynamicCache;
- export without cache: `generate(use_cache=False)`, every step recomputes the whole sequence.

Prints new tokens/s and each one's ratio to peerlab's: of the median wall times, of the fastest
rounds and of the median CPU seconds of this process (on a machine shared with other jobs the
last two move less with the others' load); the three must give the same tokens.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    ap.add_argument("--new", type=int, default=64, help="new tokens")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    from peerlab.config import load_config
    from peerlab.export.exporter import hf_config, hf_state_dict
    from peerlab.export.modeling_peerlab import PeerlabForCausalLM
    from peerlab.model import build_model

    torch.manual_seed(0)
    cfg = load_config(args.config)
    model = build_model(cfg.model_config).eval()
    hf = PeerlabForCausalLM(hf_config(cfg.model_config)).eval()  # no eos: every decoder makes --new tokens
    hf.load_state_dict(hf_state_dict(model.state_dict()))
    ids = torch.randint(0, cfg.model_config.vocab_size, (args.batch, args.prompt))
    decoders = {
        "peerlab generate (latent cache)": lambda: model.generate(ids, args.new, use_cache=True),
        "export generate (latent cache)": lambda: hf.generate(ids, max_new_tokens=args.new, do_sample=False),
        "export generate, no cache": lambda: hf.generate(
            ids, max_new_tokens=args.new, do_sample=False, use_cache=False
        ),
    }
    seconds = {name: [] for name in decoders}
    cpu = {name: [] for name in decoders}  # this process's CPU seconds (all its threads): less moved by other jobs
    outputs = {}
    with torch.no_grad():
        for _ in range(args.rounds):
            for name, decode in decoders.items():
                start, cpu_start = time.perf_counter(), time.process_time()
                outputs[name] = decode()
                seconds[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - cpu_start)
    same = all(torch.equal(out, outputs["peerlab generate (latent cache)"]) for out in outputs.values())
    print(
        f"{args.config}: {sum(p.numel() for p in model.parameters()):,} parameters, batch {args.batch}, "
        f"prompt {args.prompt}, {args.new} new tokens, {torch.get_num_threads()} threads, median of {args.rounds}"
    )
    peer = statistics.median(seconds["peerlab generate (latent cache)"])
    fastest = min(seconds["peerlab generate (latent cache)"])
    peer_cpu = statistics.median(cpu["peerlab generate (latent cache)"])
    print("| decoder | new tokens/s (median) | ratio to peerlab's | of the fastest rounds | of the CPU seconds |")
    print("| --- | --- | --- | --- | --- |")
    for name, times in seconds.items():
        t, c = statistics.median(times), statistics.median(cpu[name])
        print(
            f"| {name} | {args.batch * args.new / t:.1f} | {peer / t:.2f}x | {fastest / min(times):.2f}x "
            f"| {peer_cpu / c:.2f}x |"
        )
    print(f"same tokens: {same}")


if __name__ == "__main__":
    main()
