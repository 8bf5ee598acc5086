"""The data pipeline: datasets -> documents -> tokens -> packed blocks, mixed by weight.

sources.py    local files and hub datasets as ordered documents; Ray Data read tasks; held-out split
tokenizer.py  AutoTokenizer lookup (offline first) and the embedded default's BPE
hub.py        whether the Hugging Face hub can be reached (asked once, in seconds); hub datasets' cache
packing.py    documents joined with end-of-text and cut into blocks, with a resume point
mixture.py    one Ray Data stream per dataset, mixed at the token level, resumable
corpus.py     the embedded default's offline corpus (prose, code, docs) and its prepare step
"""

import importlib

# Exports load lazily: Ray Data tasks import peerlab.data.sources and .tokenizer in fresh worker
# processes, which should not pay for torch (mixture) or transformers on the way.
_EXPORTS = {
    "DataMixture": "mixture",
    "DataOptions": "mixture",
    "SourcePosition": "mixture",
    "SourceStream": "mixture",
    "Packer": "packing",
    "DataError": "sources",
    "Selection": "sources",
    "check_source": "sources",
    "documents": "sources",
    "heldout_texts": "sources",
    "list_files": "sources",
    "TokenizerError": "tokenizer",
    "load_tokenizer": "tokenizer",
    "train_bpe": "tokenizer",
}
__all__ = [*_EXPORTS, "check_data"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"peerlab.data.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'peerlab.data' has no attribute {name!r}")


def check_data(dataset_config, model_config=None, workers: int = 1):
    """Everything about the data that can be checked before Ray starts; returns the tokenizer.

    Local sources: paths, formats, the first records' JSON, fields and text, and a small source
    has a training document for each of `workers` (`check_source`). Hub sources: the
    hub is reachable or `datasets` has them cached. The tokenizer must load (offline first) and
    fit the model's vocabulary. Raises DataError or TokenizerError with a one-line message.
    """
    from peerlab.data.hub import check_hub_dataset
    from peerlab.data.sources import check_source
    from peerlab.data.tokenizer import TokenizerError, load_tokenizer

    for entry in dataset_config.datasets:
        check_source(entry, workers=workers, heldout_fraction=dataset_config.heldout_fraction)
        check_hub_dataset(entry)
    for entry in dataset_config.eval_datasets:  # read for their held-out part only
        check_source(entry, heldout_fraction=dataset_config.heldout_fraction, evaluated=True)
        check_hub_dataset(entry)
    tokenizer = load_tokenizer(dataset_config.tokenizer_name)
    if model_config is not None and len(tokenizer) > model_config.vocab_size:
        raise TokenizerError(
            f"tokenizer '{dataset_config.tokenizer_name}' has {len(tokenizer)} tokens but model_config.vocab_size is "
            f"{model_config.vocab_size}; set vocab_size to at least {len(tokenizer)} (a multiple of 64 is fastest)"
        )
    return tokenizer
