"""The data of the offline lm-eval tasks in `evals/registry/`, found from any working directory.

Each task YAML there names `custom_dataset: !function peerlab.eval.registry.task_data` and
its file (`dataset_kwargs: {data_file: ...}`); lm-eval calls `task_data` with the task's
metadata and those kwargs. The folder holding the files is the metadata key
`peerlab_eval_data`: the YAML's own value is relative to the YAML file
(`../../data/demo/evals`, where `python experiments/prepare_data.py` writes them), and a
value given at run time (`TaskManager(metadata=...)`, lm-eval's `--metadata`) replaces it.
So nothing depends on the current directory, which differs in Ray Train workers.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

DATA_KEY = "peerlab_eval_data"


class EvalDataError(FileNotFoundError):
    """A task's data file is missing; the message says how to make it."""


class _QuietCustomDataset(logging.Filter):
    """Drops lm-eval's per-task hint about `--metadata` for custom datasets (our metadata is set for it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Custom kwargs can be passed to `--metadata`" not in record.getMessage()


logging.getLogger("lm_eval.api.task").addFilter(_QuietCustomDataset())


def data_folder(metadata: dict) -> Path:
    """The task data's folder: `peerlab_eval_data`, relative to the task's YAML file when not absolute."""
    folder = Path(str(metadata.get(DATA_KEY) or "../../data/demo/evals")).expanduser()
    source = metadata.get("config_source")
    if not folder.is_absolute() and source and source != "inline":
        folder = Path(source).resolve().parent / folder
    return folder.resolve()


def task_data(data_file: str, **metadata):
    """lm-eval's `custom_dataset`: {"test": the rows of `data_file`} as a datasets.DatasetDict."""
    import datasets

    path = data_folder(metadata) / data_file
    if not path.is_file():
        raise EvalDataError(
            f"{path} is missing: write the offline eval tasks' data with `python experiments/prepare_data.py` "
            f"(or give their folder as lm-eval metadata {DATA_KEY}=DIR, e.g. eval_config.eval_data_dir)"
        )
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
