"""Packed tokens/s of the mixed data pipeline against Hugging Face `datasets.interleave_datasets`.

    python benchmarks/data_pipeline.py [--tokens 10000000] [--rounds 3]

Both read the embedded default corpus (the three training files of data/demo, prepared if
missing) with the same weights (0.4 / 0.3 / 0.3) and tokenizer (the demo BPE), and both
deliver packed blocks of 257 tokens:

  peerlab   DataMixture on Ray Data (a local cluster on this machine), token-level mixing
  hf        load_dataset("json", streaming=True) per file -> interleave_datasets(probabilities)
            -> map(tokenizer, batched) -> the same Packer

For each: start-up (until the first block), the steady rate after it, and the rate from
the first request to the last block; the two alternate for `--rounds` rounds on one Ray
cluster, and the ratios are those of the medians. Then the tokenizer by itself on each file: the ceiling
both share on this machine. The run also measures how many tokens/s one training
worker consumes with the demo model (forward, backward and AdamW on CPU), the rate the
pipeline must outrun.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import numpy as np

from peerlab.config import DatasetEntry, load_config
from peerlab.data.corpus import DOMAINS, prepare_demo_corpus
from peerlab.data.packing import Packer

WEIGHTS = (0.4, 0.3, 0.3)


def timed(blocks, tokens: int) -> dict:
    """Drain blocks until `tokens` tokens: start-up, steady and end-to-end rates."""
    t0 = time.perf_counter()
    first = got = 0
    for block in blocks:
        if not got:
            first = time.perf_counter()
        got += block.size
        if got >= tokens:
            break
    end = time.perf_counter()
    blocks.close()  # stop the pipeline now, so that it does not run on while the other one is timed
    return {"startup_s": first - t0, "steady": (got - 257) / (end - first), "overall": got / (end - t0)}


def peerlab_blocks(corpus, seq_len: int):
    from peerlab.data import DataMixture, DataOptions

    entries = [
        DatasetEntry(name=d, path=str(corpus / d), format="jsonl", weight=w, text_field="text")
        for d, w in zip(DOMAINS, WEIGHTS)
    ]
    with DataMixture(entries, DataOptions(str(corpus / "tokenizer"), seq_len=seq_len, engine="ray")) as mix:
        while True:
            yield mix.next_block()[1]


def hf_blocks(corpus, seq_len: int):
    import datasets
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(corpus / "tokenizer"))
    parts = [
        datasets.load_dataset("json", data_files=str(corpus / d / "train.jsonl"), split="train", streaming=True)
        for d in DOMAINS
    ]
    mixed = datasets.interleave_datasets(parts, probabilities=list(WEIGHTS), seed=0, stopping_strategy="all_exhausted")
    mixed = mixed.select_columns(["text"]).map(
        lambda b: {"ids": tok(b["text"], add_special_tokens=False)["input_ids"]}, batched=True, remove_columns=["text"]
    )
    packer = Packer(seq_len + 1, tok.eos_token_id)
    for row, record in enumerate(mixed):
        packer.add((0, 0, row, row), np.asarray(record["ids"]))  # (pass, file, row, running index)
        while packer.ready():
            yield packer.take()


def tokenizer_alone(corpus, docs: int = 2048) -> dict[str, dict[str, float]]:
    """Tokens/s of the demo tokenizer by itself in this process, 256 documents a call: the ceiling
    both pipelines share. `encode_batch` is what the HF peer's tokenizer call runs; peerlab's
    read tasks use `encode_batch_fast` (no character offsets)."""
    import json

    from tokenizers import Tokenizer

    fast = Tokenizer.from_file(str(corpus / "tokenizer" / "tokenizer.json"))
    out = {}
    for d in DOMAINS:
        with open(corpus / d / "train.jsonl") as f:
            texts = [json.loads(line)["text"] for line, _ in zip(f, range(docs))]
        out[d] = {}
        for name in ("encode_batch", "encode_batch_fast"):
            encode = getattr(fast, name)
            t0, tokens = time.perf_counter(), 0
            for i in range(0, len(texts), 256):
                tokens += sum(len(e.ids) for e in encode(texts[i : i + 256], add_special_tokens=False))
            out[d][name] = tokens / (time.perf_counter() - t0)
    return out


def training_consumption(config: str, corpus) -> float:
    """Tokens/s one worker trains on with the demo model (batch and length of the config)."""
    import torch

    from peerlab.model import build_model

    cfg = load_config(config)
    torch.manual_seed(0)
    model = build_model(cfg.model_config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch, seq = cfg.train_config.per_device_train_batch_size, cfg.dataset_config.max_seq_length
    ids = torch.randint(0, cfg.model_config.vocab_size, (batch, seq + 1))

    def step():
        loss = torch.nn.functional.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()
    t0 = time.perf_counter()
    for _ in range(5):
        step()
    return 5 * batch * seq / (time.perf_counter() - t0)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=10_000_000, help="packed tokens each pipeline delivers")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--corpus", default="data/demo")
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--rounds", type=int, default=3, help="rounds, each timing both pipelines; figures are medians")
    args = ap.parse_args(argv)

    corpus = prepare_demo_corpus(args.corpus, quiet=True)
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False, configure_logging=False)
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs"
    print(
        f"data pipeline, {args.tokens:,} packed tokens in blocks of {args.seq_len + 1}, weights {WEIGHTS} ({machine})"
    )
    print(f"  {'':<32}{'start-up':>10}{'steady tokens/s':>18}{'overall tokens/s':>18}")
    runs: dict[str, list[dict]] = {"peerlab (Ray Data)": [], "hf interleave_datasets": []}
    for k in range(args.rounds):
        for name, blocks in (("peerlab (Ray Data)", peerlab_blocks), ("hf interleave_datasets", hf_blocks)):
            r = timed(blocks(corpus, args.seq_len), args.tokens)
            runs[name].append(r)
            print(
                f"  {name + f', round {k + 1}':<32}{r['startup_s']:>9.1f}s{r['steady']:>18,.0f}{r['overall']:>18,.0f}"
            )
    ray.shutdown()
    ours, theirs = ({key: statistics.median(r[key] for r in rs) for key in rs[0]} for rs in runs.values())
    for name, r in zip(runs, (ours, theirs)):
        print(f"  {name + ', median':<32}{r['startup_s']:>9.1f}s{r['steady']:>18,.0f}{r['overall']:>18,.0f}")
    print(
        f"  peerlab / hf (medians): steady {ours['steady'] / theirs['steady']:.2f}, "
        f"overall {ours['overall'] / theirs['overall']:.2f}"
    )
    alone = tokenizer_alone(corpus)
    need = training_consumption(args.config, corpus)
    for d, rates in alone.items():
        shown = ", ".join(f"{name} {rate:,.0f}" for name, rate in rates.items())
        print(f"  the tokenizer alone on {d} (tokens/s, this process): {shown}")
    print(
        f"  one worker trains the demo model on {need:,.0f} tokens/s: peerlab steady / training = "
        f"{ours['steady'] / need:.0f}, overall / training = {ours['overall'] / need:.0f}"
    )


if __name__ == "__main__":
    main()
