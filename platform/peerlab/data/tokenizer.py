"""Tokenizers: any Hugging Face tokenizer by name or path, and the embedded default's own BPE.

`load_tokenizer(name)` is `AutoTokenizer.from_pretrained` with an offline-first lookup: a
local folder, then the local Hugging Face cache, then (only when the hub can be reached,
`peerlab.data.hub.hub_reachable`: a few seconds to find out) a download. A name that cannot
be found gives a one-line `TokenizerError` that says how to make it available.

The embedded default trains its own tokenizer once: a byte-level BPE (the `tokenizers`
library, GPT-2's pre-tokenisation, no unknown tokens) on the training split of the demo
corpus, saved with `save_pretrained` next to the corpus, so every trial of a sweep loads
the same file through the same `AutoTokenizer` call as a hub tokenizer.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Iterable

from peerlab.data.hub import hub_reachable, unreachable_reason

EOS = "<|endoftext|>"


class TokenizerError(ValueError):
    """A tokenizer that cannot be loaded; the message says how to fix it."""


def load_tokenizer(name: str):
    """The tokenizer `name` (a local folder, a cached hub name, or a hub name when online)."""
    from transformers import AutoTokenizer

    path = Path(name).expanduser()
    if path.is_file():
        raise TokenizerError(
            f"tokenizer_name {name} is a file; give the folder that holds it (and its tokenizer_config.json), "
            f"e.g. {path.parent}"
        )
    if not path.is_dir() and name.startswith((".", "/", "~")):  # a hub name never starts so: a path that is not there
        raise TokenizerError(f"tokenizer folder {name} does not exist; check dataset_config.tokenizer_name")
    if path.is_dir():
        try:
            tok = AutoTokenizer.from_pretrained(str(path))
        except Exception as err:  # a folder without tokenizer files, or broken ones
            raise TokenizerError(f"tokenizer folder {name} cannot be loaded: {str(err).splitlines()[0]}") from None
    else:
        try:
            tok = AutoTokenizer.from_pretrained(name, local_files_only=True)
        except Exception:
            if not hub_reachable():
                raise TokenizerError(
                    f"tokenizer '{name}' is not a local folder and not in the Hugging Face cache, and "
                    f"{unreachable_reason()}; fetch it once where the hub is reachable "
                    f"(python -c \"import transformers; transformers.AutoTokenizer.from_pretrained('{name}')\") "
                    f"or set dataset_config.tokenizer_name to a local tokenizer folder"
                ) from None
            try:
                tok = AutoTokenizer.from_pretrained(name)
            except Exception as err:
                raise TokenizerError(
                    f"tokenizer '{name}' cannot be loaded from the hub ({str(err).splitlines()[0]}); "
                    "check the name, or set dataset_config.tokenizer_name to a local tokenizer folder"
                ) from None
    if eos_id(tok) is None:
        raise TokenizerError(
            f"tokenizer '{name}' has no end-of-text token to join documents with; name one as eos_token in its "
            'tokenizer_config.json (e.g. "eos_token": "<|endoftext|>")'
        )
    return tok


def eos_id(tokenizer) -> int | None:
    """The id that ends each document in a packed stream (eos, else sep)."""
    for token_id in (tokenizer.eos_token_id, tokenizer.sep_token_id):
        if token_id is not None:
            return int(token_id)
    return None


@functools.lru_cache(maxsize=4)
def cached_tokenizer(name: str):
    """One tokenizer per process and name (Ray Data tasks reuse their worker processes)."""
    return load_tokenizer(name)


def train_bpe(texts: Iterable[str], vocab_size: int, out_dir: str | Path) -> Path:
    """Train a byte-level BPE on `texts` and save it where AutoTokenizer can load it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS, bos_token=EOS, unk_token=None)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    return out_dir


def encoder_spec(name: str) -> str:
    """What Ray Data tasks need to tokenise like `name`: the fast tokenizer's JSON when it has one.

    Tasks then load only the `tokenizers` library (a fraction of a second) instead of
    transformers; a tokenizer without a fast version is passed by name and loaded whole.
    """
    backend = getattr(cached_tokenizer(name), "backend_tokenizer", None)
    return backend.to_str() if backend is not None else name


@functools.lru_cache(maxsize=4)
def _encoder(spec: str):
    if spec.lstrip().startswith("{"):
        from tokenizers import Tokenizer

        fast = Tokenizer.from_str(spec)
        # encode_batch_fast: the same ids without the character offsets nobody here reads (about 13% less CPU)
        encode = getattr(fast, "encode_batch_fast", fast.encode_batch)
        return lambda texts: [e.ids for e in encode(texts, add_special_tokens=False)]
    slow = load_tokenizer(spec)
    return lambda texts: slow(texts, add_special_tokens=False)["input_ids"]


def tokenize_table(table, tokenizer: str):
    """Ray Data batch function: (pass, file, row, text) -> (pass, file, row, ids), ids int32 per document.

    `tokenizer` is an `encoder_spec`. A null text (a skipped bad record) gives null ids, so
    it can still be counted downstream. The ids column is built from one flat array and its
    offsets: `pa.array` over nested Python lists costs a third as much as the tokenising.
    """
    import itertools

    import numpy as np
    import pyarrow as pa

    texts = table["text"].to_pylist()
    present = np.array([t is not None for t in texts], dtype=bool)  # (documents,)
    encoded = _encoder(tokenizer)([t for t in texts if t is not None]) if present.any() else []
    offsets = np.zeros(len(texts) + 1, dtype=np.int32)  # (documents + 1,): a null document has length 0
    offsets[1:][present] = [len(ids) for ids in encoded]
    np.cumsum(offsets, out=offsets)
    flat = np.fromiter(itertools.chain.from_iterable(encoded), dtype=np.int32, count=int(offsets[-1]))  # (tokens,)
    missing = None if present.all() else pa.array(~present)
    ids = pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat), mask=missing)
    columns = {name: table[name] for name in ("pass", "file", "row")}
    return pa.table({**columns, "ids": ids})
