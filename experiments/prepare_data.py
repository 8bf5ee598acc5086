"""Prepare the embedded default corpus and its tokenizer (the main command runs this by itself).

    python experiments/prepare_data.py [--out data/demo] [--force]

Writes data/demo/{prose,code,docs}/{train,heldout}.jsonl from this Python installation and
its installed packages, and data/demo/tokenizer (a byte-level BPE of 8,192 tokens trained on
the training files). Deterministic; a second run finds the manifest and does nothing.
"""

from __future__ import annotations

import argparse

from peerlab.data.corpus import prepare_demo_corpus

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="data/demo")
    ap.add_argument("--force", action="store_true", help="write again even if the manifest matches")
    args = ap.parse_args()
    print(f"demo corpus in {prepare_demo_corpus(args.out, force=args.force)}")
