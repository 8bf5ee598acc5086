"""Where documents come from: local files or Hugging Face datasets, as Ray Data streams of text.

A dataset entry of the config (`DatasetEntry`) names either a local path (a file, or a
folder of files) or a hub dataset. Either way it becomes a sequence of documents in a fixed
order, each identified by `(file, row)`: the file's place in the source's file list (0 for
a hub dataset) and the record's place in that file. That identity makes streams resumable
(restart reading at a `(file, row)`) and splittable into training and held-out parts:

- a local folder with files of a held-out split (`heldout*` or `validation*`, next to the
  `train*` files) holds those files out; `test*` files are never read;
- any other source holds out the documents whose stable hash of `(file name, row)` falls
  below `dataset_config.heldout_fraction` (1% by default). Training never sees them.

Workers share a pass by a running document index: the documents of the part a stream reads
(not empty, not the other part's), numbered from 0 in the pass's file order, go one of each W
consecutive numbers to each of W workers, in an order that changes from one run of W to the next
(`worker_of`), so each worker gets within one document of 1/W of them, whatever the number of
files and of records per file, and records that take turns (a short question, a long answer)
do not all land on one worker. A bad record skipped under `skip_bad_records`
takes no number; the worker of the next number counts it.

Local formats: `json`/`jsonl` (one JSON object per line, or one JSON array per file),
`csv` (a header row, then records), `text` (one document per line by default, or one per
file with `text_unit: file`) and `parquet`. Text comes from `text_field`, or from
`text_template` filled in with the record's fields. A record without the field (or with a
field that is not text) is an error naming the dataset, the file, the record and the field,
unless the entry sets `skip_bad_records: true`: then it is skipped and counted.

`read_stream` reads a source pass after pass (each pass's files in a seeded order) as Arrow
tables with columns `pass`, `file`, `row`, `index`, `text`; `DocumentDatasource` is the Ray Data
datasource that runs it, tokenising each table, in one read task on the cluster;
`peerlab.data.mixture` packs and mixes what it yields. (FACTS.md: Ray's own
`from_huggingface` asks the hub even for local data, so hub datasets are read here with
`datasets.load_dataset(..., streaming=True)` inside the read task.)
"""

from __future__ import annotations

import csv
import functools
import gzip
import itertools
import json
import os
import re
import threading
import time
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa

from peerlab.config import DatasetEntry, template_fields

EXTENSIONS = {".json": "json", ".jsonl": "jsonl", ".csv": "csv", ".txt": "text", ".text": "text", ".parquet": "parquet"}
HELDOUT_SPLITS = ("heldout", "validation")  # files of these splits are a local folder's held-out part
NOT_TRAINING_SPLITS = (*HELDOUT_SPLITS, "test")  # files never trained on (test files are not read at all)
CSV_FIELD_LIMIT = 2**31 - 1  # the longest CSV field read (the C long csv takes on every platform)
ROWS_PER_TABLE = 256  # documents per Arrow table (and per tokenising call): big enough for the tokenizer
# A pass's first tables are smaller (16 documents, doubling up to ROWS_PER_TABLE): a stream's first block
# then waits for a few dozen documents to be tokenised, not for hundreds (BENCHMARKS.md, "Data pipeline").
FIRST_ROWS_PER_TABLE = 16


class DataError(ValueError):
    """Bad input data: a one-line message naming the dataset, the file, the record and the fix."""


def extension_format(path: Path) -> str | None:
    """The format a file's extension names (through a .gz: `c4-00000.json.gz` is json), or None."""
    name = path.name.lower().removesuffix(".gz")
    return EXTENSIONS.get(Path(name).suffix)


def open_text(path: Path, **options):
    """A local file opened as UTF-8 text (a leading byte order mark left out), through gzip for a .gz file."""
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8-sig", **options)
    return open(path, encoding="utf-8-sig", **options)


def is_local(entry: DatasetEntry) -> bool:
    """A path that exists, or looks like one (./x, /x, x.jsonl), is local; anything else is a hub name."""
    p = entry.path
    return Path(p).exists() or p.startswith((".", "/", "~")) or extension_format(Path(p)) is not None


def file_format(entry: DatasetEntry, path: Path) -> str:
    if entry.format:
        return entry.format
    fmt = extension_format(path)
    if fmt is None:
        raise DataError(
            f"dataset '{entry.name}': cannot tell the format of {path}; set its format (json, jsonl, csv, text, parquet)"
        )
    return fmt


@dataclass(frozen=True)
class FileList:
    """The files of a local source: those it trains on, those it holds out, and those it never reads (a folder's
    test files, and the files of another split than the one it trains on); the last two may be empty."""

    root: Path
    train: tuple[Path, ...]
    heldout: tuple[Path, ...]
    unread: tuple[Path, ...] = ()

    def summary(self) -> str:
        """What a folder's split names do with its files, in words."""

        def some(paths) -> str:
            names = [str(p.relative_to(self.root)) for p in paths[:3]]
            return ", ".join(names) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")

        parts = [f"trains on {len(self.train)} files"]
        if self.heldout:
            parts.append(f"holds out {len(self.heldout)} ({some(self.heldout)})")
        if self.unread:
            parts.append(f"never reads {len(self.unread)} ({some(self.unread)})")
        return ", ".join(parts)


def _split_of(path: Path, root: Path, wanted: str) -> str | None:
    """The split a file of a local folder belongs to: the first split name (`wanted`, or one never trained on)
    among the words of its path below the folder, its subfolders first (`test/part-0.jsonl`,
    `wiki_validation.jsonl`, `heldout-00001.parquet`); words are separated by '-', '_', '.', spaces and digits.
    None where no word names one."""
    names = (wanted.lower(), *NOT_TRAINING_SPLITS)
    for part in path.relative_to(root).parts:
        for word in re.split(r"[-._ 0-9]+", part.lower()):
            if word in names:
                return word
    return None


def list_files(entry: DatasetEntry, train: bool = True) -> FileList:
    """The local files of an entry, sorted; raises DataError for a missing path or an empty folder, and
    (`train`) for a folder without files to train on: one of held-out files only is enough to evaluate."""
    root = Path(entry.path).expanduser()
    if not root.exists():
        where = "" if root.is_absolute() else f" (a relative path is read from the working directory, {Path.cwd()})"
        raise DataError(f"dataset '{entry.name}': path {entry.path} does not exist{where}")
    if entry.split.lower() in NOT_TRAINING_SPLITS:  # config loading refuses it too (check_dataset_entry)
        raise DataError(f"dataset '{entry.name}': {split_refusal(entry.split)}")
    if root.is_file():  # a file named as the dataset is trained on, whatever its name (the hash rule holds out)
        return FileList(root.parent, (root,), ())

    def family(fmt: str | None) -> str | None:
        return "json" if fmt == "jsonl" else fmt  # one reader for json and jsonl

    kinds = {p: family(extension_format(p)) for p in sorted(root.rglob("*")) if p.is_file()}
    wanted = family(entry.format)
    files = [p for p, kind in kinds.items() if kind is not None and wanted in (None, kind)]
    if not files:
        found = sorted({k for k in kinds.values() if k})
        what = f"; it holds {', '.join(found)} files" if found else ""
        kind = entry.format or "json, jsonl, csv, txt or parquet"
        raise DataError(f"dataset '{entry.name}': folder {entry.path} holds no {kind} files (or .gz of them){what}")
    split = {p: _split_of(p, root, entry.split) for p in files}
    read = [p for p in files if split[p] != "test"]  # test files are never read
    first = {kinds[p]: p.name for p in reversed(read)}  # each format read, and its first file
    if entry.format is None and len(first) > 1:  # a README.txt or LICENSE.txt beside the data is not data
        listed = ", ".join(f"{f} ({name})" for f, name in sorted(first.items()))
        raise DataError(
            f"dataset '{entry.name}': folder {entry.path} holds files of several formats: {listed}; "
            "set its format to read one kind"
        )
    heldout = tuple(p for p in files if split[p] in HELDOUT_SPLITS)
    named = tuple(p for p in files if split[p] == entry.split.lower())
    training = named or tuple(p for p in files if split[p] not in NOT_TRAINING_SPLITS)
    if not training and (train or not heldout):
        raise DataError(
            f"dataset '{entry.name}': folder {entry.path} has no files to train on for split '{entry.split}' "
            f"(files or subfolders named {', '.join(NOT_TRAINING_SPLITS)} are never trained on); add train* files"
        )
    unread = tuple(p for p in files if p not in training and p not in heldout)
    return FileList(root, training, heldout, unread)


def split_refusal(split: str) -> str:
    """Why a local source cannot train on a held-out split name, and the fix."""
    return (
        f"split '{split}' would train on the files held out for evaluation; use split: train "
        f"(a local folder's {', '.join(HELDOUT_SPLITS)} files are found by name and held out, test files are not read)"
    )


def is_heldout_row(name: str, row: int, fraction: float) -> bool:
    """The hash rule: a stable, uniform choice of `fraction` of the documents of a file."""
    return zlib.crc32(f"{name}:{row}".encode()) % 10_000 < round(fraction * 10_000)


# --------------------------------------------------------------------------------------
# Records and their text
# --------------------------------------------------------------------------------------


def read_records(entry: DatasetEntry, path: Path) -> Iterator[tuple[int, dict | str]]:
    """(row, record) for each record of a local file; row counts records from 0.

    Errors name the line: `line` below is 1-based, as editors show it.
    """
    fmt = file_format(entry, path)
    try:
        if fmt in ("json", "jsonl"):
            yield from _json_records(entry, path)
        elif fmt == "csv":
            csv.field_size_limit(CSV_FIELD_LIMIT)  # (Python's default, 131,072 characters, refuses long documents)
            with open_text(path, newline="") as f:
                reader = csv.DictReader(f)
                if reader.fieldnames is None:
                    return
                for row, record in enumerate(reader):
                    yield row, record
        elif fmt == "text":
            if entry.text_unit == "file":
                with open_text(path) as f:
                    yield 0, f.read()
            else:
                with open_text(path) as f:
                    for row, line in enumerate(f):
                        yield row, line.rstrip("\n")
        elif fmt == "parquet":
            import pyarrow.parquet as pq

            row = 0
            for batch in pq.ParquetFile(path).iter_batches(batch_size=ROWS_PER_TABLE):
                for record in batch.to_pylist():
                    yield row, record
                    row += 1
    except UnicodeDecodeError as err:
        raise DataError(
            f"dataset '{entry.name}': {path} is not UTF-8 text ({err.reason} at byte {err.start})"
        ) from None
    except (OSError, EOFError, pa.ArrowInvalid, csv.Error) as err:  # (EOFError: a .gz cut short)
        raise DataError(f"dataset '{entry.name}': cannot read {path} as {fmt}: {str(err).splitlines()[0]}") from None


def _json_records(entry: DatasetEntry, path: Path) -> Iterator[tuple[int, dict]]:
    with open_text(path) as f:
        first = f.read(1)
        while first and first.isspace():
            first = f.read(1)
        f.seek(0)
        if first == "[":  # one JSON array
            try:
                records = json.load(f)
            except json.JSONDecodeError as err:
                raise DataError(
                    f"dataset '{entry.name}': {path} line {err.lineno}: malformed JSON ({err.msg})"
                ) from None
            for row, record in enumerate(records):
                yield row, record
            return
        row = 0
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"dataset '{entry.name}': {path} line {number}: malformed JSON ({err.msg})") from None
            yield row, record
            row += 1


class TextOf:
    """The text of a record: its `text_field`, or its `text_template` filled in."""

    def __init__(self, entry: DatasetEntry):
        self.entry = entry
        self.fields = list(dict.fromkeys(template_fields(entry.text_template))) if entry.text_template else []

    def __call__(self, record: dict | str, where: str) -> str | None:
        """The record's text; None if it must be skipped (skip_bad_records); DataError otherwise."""
        e = self.entry
        if isinstance(record, str):  # text files: the line or the file is the document
            return record
        if not isinstance(record, dict):
            return self._bad(f"{where} is {type(record).__name__}, not a record with fields")
        if e.text_field is not None:
            if e.text_field not in record:
                return self._bad(f"{where} has no field '{e.text_field}' (text_field)")
            value = record[e.text_field]
            if not isinstance(value, str):
                return self._bad(f"{where}: field '{e.text_field}' is {type(value).__name__}, not text")
            return value
        values = {}
        for name in self.fields:
            if name not in record:
                return self._bad(f"{where} has no field '{name}' (used by text_template)")
            value = record[name]
            if isinstance(value, (list, dict)):
                return self._bad(f"{where}: field '{name}' is {type(value).__name__}, not text (used by text_template)")
            values[name] = "" if value is None else value  # a null field (Alpaca's empty input) is empty text
        return e.text_template.format_map(values)

    def _bad(self, problem: str) -> None:
        if self.entry.skip_bad_records:
            return None
        raise DataError(
            f"dataset '{self.entry.name}': {problem}; fix the data, or set skip_bad_records: true to skip such records"
        )


# --------------------------------------------------------------------------------------
# Passes, and the Ray Data datasource that reads them
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Selection:
    """Which documents of a source a stream takes.

    part: "train" or "heldout"; rank/world: keep the documents whose running index (in the
    pass) `worker_of` gives to rank; start: (file, row) to begin at, for resuming, and index: the
    running index of the first document at or after it; heldout_fraction: for the hash rule.
    """

    part: str = "train"
    rank: int = 0
    world: int = 1
    start: tuple[int, int] = (0, 0)
    heldout_fraction: float = 0.01
    index: int = 0


def _tables(pass_: int, docs: Iterator[tuple[int, int, int, str | None]]) -> Iterator[pa.Table]:
    """(file, row, index, text) documents as tables of FIRST_ROWS_PER_TABLE documents, doubling up to
    ROWS_PER_TABLE; a null text marks a bad record that was skipped (and is counted)."""
    rows_per_table = min(FIRST_ROWS_PER_TABLE, ROWS_PER_TABLE)
    while chunk := list(itertools.islice(docs, rows_per_table)):
        rows_per_table = min(2 * rows_per_table, ROWS_PER_TABLE)
        files, rows, indices, texts = zip(*chunk)
        yield pa.table(
            {
                "pass": pa.array([pass_] * len(rows), pa.int32()),
                "file": pa.array(files, pa.int32()),
                "row": pa.array(rows, pa.int64()),
                "index": pa.array(indices, pa.int64()),
                "text": pa.array(texts, pa.large_string()),
            }
        )


def _mix64(x: int) -> int:
    """SplitMix64's finaliser: a well-mixed 64-bit hash of x."""
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


@functools.lru_cache(maxsize=64)
def _ranks_of_group(group: int, world: int) -> tuple[int, ...]:
    return tuple(sorted(range(world), key=lambda rank: _mix64(group * world + rank)))


def worker_of(index: int, world: int) -> int:
    """The worker that reads the document of running index `index`: each run of `world` documents goes one to
    each worker, in an order drawn from the run's number (a hash of it), so every worker gets within one
    document of 1/world of a pass, and a pattern in the data (short and long records taking turns) does
    not follow one worker as index % world would."""
    if world == 1:
        return 0
    group, place = divmod(index, world)
    return _ranks_of_group(group, world)[place]


def select(
    entry: DatasetEntry, sel: Selection, records: Iterator[tuple[int, str, str, int, dict | str]], hashed: bool
) -> Iterator[tuple[int, int, int, str | None]]:
    """(file, row, index, text) of this worker's documents among `records`: (file, its stable name (for the
    hash rule), its path (for errors), row, record).

    The documents of the selected part (by the hash rule where `hashed`), without empty ones,
    are numbered from `sel.index` on; worker `sel.rank` keeps those `worker_of` gives it.
    A bad record (text None, skip_bad_records) takes no number and goes to the worker of the next one.
    """
    text_of = TextOf(entry)
    index = sel.index
    heldout = sel.part == "heldout"
    for ordinal, name, where, row, record in records:
        if hashed and is_heldout_row(name, row, sel.heldout_fraction) != heldout:
            continue
        text = text_of(record, f"{where} record {row + 1}")  # None: a bad record to skip and count
        if text == "":
            continue
        if worker_of(index, sel.world) == sel.rank:
            yield ordinal, row, index, text
        if text is not None:
            index += 1


def hub_documents(entry: DatasetEntry, sel: Selection, pass_: int = 0) -> Iterator[pa.Table]:
    """Tables of (pass, file=0, row, index, text) from `datasets.load_dataset(path, subset, split, streaming)`.

    The same call reads a hub name (pile-uncopyrighted, c4) or a local dataset folder; held-out
    documents are chosen by the hash rule.
    """
    import datasets

    if sel.part == "heldout" and sel.heldout_fraction <= 0:
        return  # nothing is held out: no need to read the whole dataset to find that out
    try:
        ds = datasets.load_dataset(entry.path, entry.subset, split=entry.split, streaming=entry.streaming)
    except Exception as err:  # the hub's errors come in many types; all mean "cannot load"
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DataError(f"dataset '{entry.name}': cannot load '{entry.path}' from the hub: {message}") from None
    first_row = sel.start[1]
    if first_row:
        ds = ds.skip(first_row)
    records = ((0, entry.path, entry.path, row, record) for row, record in enumerate(ds, start=first_row))
    yield from _tables(pass_, select(entry, sel, records, hashed=True))


def source_files(entry: DatasetEntry, part: str) -> tuple[list[tuple[str, Path]], bool]:
    """[(stable name, path)] of the files a part of a local source reads, and whether the hash rule applies."""
    files = list_files(entry, train=part == "train")
    if part == "heldout" and files.heldout:
        chosen, hashed = files.heldout, False
    else:
        chosen, hashed = files.train, part == "heldout" or not files.heldout
    return [(str(p.relative_to(files.root)), p) for p in chosen], hashed


def read_pass(
    entry: DatasetEntry, sel: Selection, order: list[int] | None = None, pass_: int = 0
) -> Iterator[pa.Table]:
    """The (pass, file, row, index, text) tables of one pass over a source, from `sel.start` on.

    `order` is the pass's file order (default: the files in sorted order); `sel.start` is
    (ordinal in that order, row) of the first record to read, `sel.index` the running index there.
    """
    if not is_local(entry):
        yield from hub_documents(entry, sel, pass_)
        return
    files, hashed = source_files(entry, sel.part)
    if hashed and sel.part == "heldout" and sel.heldout_fraction <= 0:
        return
    order = list(range(len(files))) if order is None else order
    start_file, start_row = sel.start

    def records() -> Iterator[tuple[int, str, str, int, dict | str]]:
        for ordinal in range(start_file, len(order)):
            name, path = files[order[ordinal]]
            first_row = start_row if ordinal == start_file else 0
            for row, record in read_records(entry, path):
                if row >= first_row:
                    yield ordinal, name, str(path), row, record

    yield from _tables(pass_, select(entry, sel, records(), hashed))


# Seconds each step of Ray Data's scheduling loop pauses in the processes that run our executions (0: no pause).
EXECUTOR_STEP_PAUSE_S = float(os.environ.get("PEERLAB_DATA_STEP_PAUSE_S", "0.1"))
_calm_lock = threading.Lock()


def calm_executor() -> None:
    """Pause each step of Ray Data's streaming-executor loop, in this process, for EXECUTOR_STEP_PAUSE_S,
    unless a consumer is waiting for a block.

    A training stream is consumed far slower than it can be read, so its execution spends the
    run backpressured, and Ray Data 2.60 then re-runs its scheduling loop without pause
    (`ray.wait` returns at once on the outputs that wait for the consumer): a busy core share
    per dataset, taken from training (BENCHMARKS.md, "Sweeps"). Each step still moves every
    block that is ready, and the read tasks keep their read-ahead buffers full meanwhile. When
    the consumer waits (the stream is behind, so training waits on it), the loop runs unpaused.
    """
    try:
        from ray.data._internal.execution.streaming_executor import StreamingExecutor
    except ImportError:  # another Ray Data layout: leave it as it is
        return
    with _calm_lock:  # the streams of a mix start in threads of their own, all at once
        if EXECUTOR_STEP_PAUSE_S <= 0 or getattr(StreamingExecutor, "_peerlab_calm", False):
            return
        if not hasattr(StreamingExecutor, "_scheduling_loop_step"):
            return
        StreamingExecutor._scheduling_loop_step = _calm(StreamingExecutor._scheduling_loop_step)
        StreamingExecutor._peerlab_calm = True


def _calm(step):
    """`step` (StreamingExecutor._scheduling_loop_step), then a pause unless a consumer waits."""

    def calm_step(self, topology):
        keep_going = step(self, topology)
        # A consumer waiting for a block (Ray Data counts them per operator): no pause, the stream is behind.
        if not any(getattr(state, "_num_waiting_consumers", 0) for state in topology.values()):
            time.sleep(EXECUTOR_STEP_PAUSE_S)
        return keep_going

    return calm_step


def pass_order(num_files: int, seed: int, index: int, pass_: int) -> list[int]:
    """The order of a source's files in one pass: seeded by (seed, dataset index, pass)."""
    return np.random.default_rng([seed, index, pass_]).permutation(num_files).tolist()


def read_stream(entry: DatasetEntry, sel: Selection, seed: int, index: int, first_pass: int = 0) -> Iterator[pa.Table]:
    """(pass, file, row, index, text) tables of a source from `sel.start` of pass `first_pass` on, pass after
    pass without end, each pass in its seeded file order (`pass_order`).

    A whole pass without text (every record empty, skipped, or another worker's) raises DataError.
    """
    num_files = len(source_files(entry, "train")[0]) if is_local(entry) else 1
    for pass_ in itertools.count(first_pass):
        part = sel if pass_ == first_pass else replace(sel, start=(0, 0), index=0)
        found = False
        for table in read_pass(entry, part, pass_order(num_files, seed, index, pass_), pass_):
            found = found or table["text"].null_count < len(table)
            yield table
        if not found and part.start == (0, 0):
            raise DataError(
                f"dataset '{entry.name}' yields no text for worker {sel.rank} of {sel.world}"
                f" (path {entry.path}); check its path, split and text_field/text_template"
                + (", and that it has a document for every worker" if sel.world > 1 else "")
            )


def tokenized_stream(
    entry: DatasetEntry, sel: Selection, seed: int, index: int, first_pass: int, tokenizer: str
) -> Iterator[pa.Table]:
    """`read_stream` with each table tokenised: (pass, file, row, ids, index). What a stream's read task
    runs on the cluster, and what the local engine runs in-process."""
    from peerlab.data.tokenizer import tokenize_table

    for table in read_stream(entry, sel, seed, index, first_pass):
        yield tokenize_table(table, tokenizer).append_column("index", table["index"])


def make_datasource(entry: DatasetEntry, sel: Selection, seed: int, index: int, first_pass: int, tokenizer: str):
    """The Ray Data datasource of one source's training stream: a single read task that runs
    `read_stream` (without end) and tokenises each table where it was read (`tokenize_table`,
    with `tokenizer` an encoder spec).

    One task for all passes keeps the documents in order with no task start at pass or file
    boundaries; the stream is consumed only as fast as training needs it.
    """
    from ray.data import Datasource, ReadTask
    from ray.data.block import BlockMetadata

    class DocumentDatasource(Datasource):
        def get_name(self) -> str:
            return f"[{entry.name}]"

        def estimate_inmemory_data_size(self):
            return None

        def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None):
            calm_executor()  # runs where the execution runs: the process that iterates the stream
            meta = BlockMetadata(num_rows=None, size_bytes=None, input_files=None, exec_stats=None)
            return [ReadTask(lambda: tokenized_stream(entry, sel, seed, index, first_pass, tokenizer), meta)]

    return DocumentDatasource()


def documents(entry: DatasetEntry, sel: Selection) -> Iterator[tuple[int, int, str]]:
    """(file, row, text) of the selected documents in one pass, read in this process: checks, tests, small reads."""
    for table in read_pass(entry, sel):
        for doc in zip(table["file"].to_pylist(), table["row"].to_pylist(), table["text"].to_pylist()):
            if doc[2] is not None:
                yield doc


def check_source(
    entry: DatasetEntry, records: int = 100, workers: int = 1, heldout_fraction: float = 0.01, evaluated: bool = False
) -> None:
    """Read the first records of every file of a local source: paths, formats, JSON, fields and text.

    Empty files and records are left out; a source with no text to train on at all is an error
    (past the first records only where they have none), and so is a small source (every file read
    whole) with fewer training documents than `workers`: workers share a pass by documents, so the
    others would have none. Raises DataError with a one-line message; meant to run before Ray
    starts. An `evaluated` source (eval_datasets: never trained on) needs held-out text instead.
    Hub sources are not checked here (that would need the network).
    """
    if not is_local(entry):
        return
    files = list_files(entry, train=not evaluated)
    if entry.text_unit == "file":
        not_text = [p for p in files.train + files.heldout if file_format(entry, p) != "text"]
        if not_text:
            raise DataError(
                f"dataset '{entry.name}': text_unit: file makes each file of format text one document; "
                f"{not_text[0].name} is {file_format(entry, not_text[0])}, whose documents are its records"
            )
    text_of = TextOf(entry)
    found, whole = False, True  # text in the records read; every training file read to its end
    for path in files.train + files.heldout:
        if path.stat().st_size == 0:
            continue
        seen = 0
        for row, record in read_records(entry, path):
            text = text_of(record, f"{path} record {row + 1}")
            found = found or (bool(text) and path in files.train)
            seen += 1
            if seen >= records:
                whole = whole and path not in files.train
                break
    if evaluated:
        if next(documents(entry, Selection(part="heldout", heldout_fraction=heldout_fraction)), None) is None:
            raise DataError(
                f"dataset '{entry.name}': {entry.path} has no held-out text to evaluate (it is in eval_datasets); "
                "give it heldout* or validation* files, or set dataset_config.heldout_fraction above 0"
            )
        return
    train = Selection(part="train", heldout_fraction=heldout_fraction)
    if whole and (workers > 1 or not found):  # a small source: count its training documents, up to `workers`
        count = sum(1 for _ in itertools.islice(documents(entry, train), workers))
        if count == 0:
            raise DataError(f"dataset '{entry.name}': {entry.path} has no text to train on")
        if count < workers:
            unit = "files (text_unit: file)" if entry.text_unit == "file" else "documents"
            raise DataError(
                f"dataset '{entry.name}': {entry.path} has {count} training {unit} for {workers} workers; "
                "workers share a dataset by documents, so some would have none: split its text into more "
                "documents, or train on fewer workers"
            )
    elif not whole and not found and next(documents(entry, train), None) is None:  # first records empty: read on
        raise DataError(f"dataset '{entry.name}': {entry.path} has no text to train on")


def heldout_texts(entry: DatasetEntry, heldout_fraction: float = 0.01, limit: int | None = None) -> list[str]:
    """The texts of a dataset's held-out documents (never used for training), in order, at most `limit`."""
    out = []
    for _, _, text in documents(entry, Selection(part="heldout", heldout_fraction=heldout_fraction)):
        out.append(text)
        if limit is not None and len(out) >= limit:
            break
    return out


def count_tokens(entry: DatasetEntry, tokenizer: str, heldout_fraction: float = 0.01) -> int:
    """Tokens in one pass over a local source's training documents, as the packer reads them (one eos each).

    What a mixture search's repetition limit and token-share prior are computed from. Counted once
    per process for the same files (by path, size and modification time) and tokenizer.
    """
    import hashlib

    from peerlab.data.tokenizer import _encoder, encoder_spec

    spec = encoder_spec(tokenizer)
    files = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for _, p in source_files(entry, "train")[0]]
    key = (repr(entry), tuple(files), hashlib.sha256(spec.encode()).hexdigest(), heldout_fraction)
    if key not in _token_counts:
        encode = _encoder(spec)
        total = 0
        for table in read_pass(entry, Selection(part="train", heldout_fraction=heldout_fraction)):
            texts = [t for t in table["text"].to_pylist() if t]
            total += sum(len(ids) + 1 for ids in encode(texts)) if texts else 0
        _token_counts[key] = total
    return _token_counts[key]


_token_counts: dict[tuple, int] = {}  # count_tokens' results in this process
