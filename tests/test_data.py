"""The data pipeline: sources, packing, mixing by weight, exact resume, held-out parts, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from peerlab.config import DatasetEntry, load_config
from peerlab.data import (
    DataError,
    DataMixture,
    DataOptions,
    Packer,
    Selection,
    TokenizerError,
    check_data,
    check_source,
    documents,
    heldout_texts,
    load_tokenizer,
    train_bpe,
)
from peerlab.data.corpus import DOMAINS, prepare_demo_corpus
from peerlab.data import mixture
from peerlab.data.sources import list_files, pass_order
from tests.conftest import ROOT


def entry(path, name="d", **kw) -> DatasetEntry:
    if "text_template" not in kw:
        kw.setdefault("text_field", "text")
    return DatasetEntry(name=name, path=str(path), **kw)


def write_jsonl(path: Path, records) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex jolly bumpkins".split()


def random_docs(n, seed, prefix=""):
    rng = np.random.default_rng(seed)
    return [{"text": prefix + " ".join(rng.choice(WORDS, rng.integers(3, 80)))} for _ in range(n)]


@pytest.fixture(scope="module")
def small_tokenizer(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("tok")
    return str(train_bpe([" ".join(WORDS)] * 50 + ["{}:,\"'#[]()"], 400, out))


# --------------------------------------------------------------------------------------
# Packing
# --------------------------------------------------------------------------------------


def test_packing_keeps_every_token_except_the_last_partial_block():
    rng = np.random.default_rng(0)
    docs = [rng.integers(1, 100, rng.integers(1, 40)) for _ in range(200)]
    packer = Packer(17, eos=0)
    blocks = []
    for row, ids in enumerate(docs):
        packer.add((0, 0, row, row), ids)
        while packer.ready():
            blocks.append(packer.take())
    stream = np.concatenate([np.append(d, 0) for d in docs])
    got = np.concatenate(blocks)
    assert len(stream) - len(got) < 17  # only the final partial block is missing
    assert np.array_equal(got, stream[: len(got)])  # nothing lost, repeated or reordered


def test_packer_resume_point_rebuilds_the_rest():
    rng = np.random.default_rng(1)
    docs = [rng.integers(1, 100, rng.integers(1, 30)) for _ in range(60)]
    full = Packer(8, eos=0)
    out, points = [], []
    for row, ids in enumerate(docs):
        full.add((0, 0, row, row), ids)
        while full.ready():
            out.append(full.take())
            points.append(full.resume_point())
    for cut in (0, 5, len(out) // 2, len(out) - 2):
        (_, _, row, index), offset = points[cut]
        assert index == row  # (every record is a document here)
        again = Packer(8, eos=0)
        rest = []
        for r in range(row, len(docs)):
            again.add((0, 0, r, r), docs[r], skip=offset if r == row else 0)
            while again.ready():
                rest.append(again.take())
        assert all(np.array_equal(a, b) for a, b in zip(rest, out[cut + 1 :]))
        assert len(rest) == len(out) - cut - 1


# --------------------------------------------------------------------------------------
# Sources and formats
# --------------------------------------------------------------------------------------


def texts_of(e, **sel):
    return [t for _, _, t in documents(e, Selection(**sel))]


def test_formats_json_array_jsonl_csv_text_parquet_and_folders(tmp_path):
    recs = [{"text": f"doc {i}", "n": i} for i in range(5)]
    (tmp_path / "a.json").write_text(json.dumps(recs))
    write_jsonl(tmp_path / "b.jsonl", recs)
    (tmp_path / "c.csv").write_text("text,n\n" + "".join(f'"doc {i}",{i}\n' for i in range(5)))
    (tmp_path / "d.txt").write_text("".join(f"doc {i}\n" for i in range(5)))
    pq.write_table(pa.Table.from_pylist(recs), tmp_path / "e.parquet")
    want = [f"doc {i}" for i in range(5)]
    for name in ("a.json", "b.jsonl", "c.csv", "d.txt", "e.parquet"):
        assert texts_of(entry(tmp_path / name), heldout_fraction=0) == want, name
    assert texts_of(entry(tmp_path / "d.txt", text_unit="file"), heldout_fraction=0) == ["\n".join(want) + "\n"]
    folder = tmp_path / "folder"
    write_jsonl(folder / "part-0.jsonl", recs[:2])
    write_jsonl(folder / "sub" / "part-1.jsonl", recs[2:])
    assert texts_of(entry(folder, format="jsonl"), heldout_fraction=0) == want


def test_gzipped_files_and_folders_of_one_format(tmp_path):
    """Shards as the hub ships them (c4-train.00000-of-01024.json.gz) are read through gzip; a folder of data
    beside a LICENSE.txt is refused unless `format` says which kind is the data (it trained on the licence)."""
    import gzip

    folder = tmp_path / "shards"
    folder.mkdir()
    for k in range(2):
        with gzip.open(folder / f"c4-train.0000{k}-of-00002.json.gz", "wt", encoding="utf-8") as f:
            f.writelines(json.dumps({"text": f"shard {k} doc {i}"}) + "\n" for i in range(3))
    want = [f"shard {k} doc {i}" for k in range(2) for i in range(3)]
    assert texts_of(entry(folder), heldout_fraction=0) == want
    (folder / "LICENSE.txt").write_text("Permission is hereby granted\n")
    with pytest.raises(
        DataError, match="several formats: json \\(c4-train.*\\), text \\(LICENSE.txt\\); set its format"
    ):
        list_files(entry(folder))
    for fmt in ("json", "jsonl"):
        assert texts_of(entry(folder, format=fmt), heldout_fraction=0) == want
    with gzip.open(tmp_path / "lines.txt.gz", "wt", encoding="utf-8") as f:
        f.write("one\ntwo\n")
    assert texts_of(entry(tmp_path / "lines.txt.gz"), heldout_fraction=0) == ["one", "two"]
    (tmp_path / "cut.jsonl.gz").write_bytes(gzip.compress(b'{"text": "a"}\n' * 100)[:40])
    with pytest.raises(DataError, match="cannot read .*cut.jsonl.gz as jsonl"):
        texts_of(entry(tmp_path / "cut.jsonl.gz"), heldout_fraction=0)
    with pytest.raises(DataError, match="holds no csv files \\(or .gz of them\\); it holds json, text files"):
        list_files(entry(folder, format="csv"))


def test_an_evaluated_only_folder_needs_held_out_files_only(tmp_path, small_tokenizer):
    """An eval_datasets folder of validation files (no train files) is checked and evaluated; as a training
    dataset it is refused. A test file of another format beside the data is never read, so it is no mixture."""
    from transformers import AutoTokenizer

    from peerlab.config import DatasetConfig
    from peerlab.eval.heldout import heldout_blocks

    folder = tmp_path / "val"
    write_jsonl(folder / "validation.jsonl", random_docs(20, 30, "v "))
    (folder / "test.csv").write_text("text\nnever read\n")
    e = entry(folder)
    check_source(e, evaluated=True)
    with pytest.raises(DataError, match="has no files to train on"):
        check_source(e)
    blocks = heldout_blocks(
        DatasetConfig(datasets=[], eval_datasets=[e], max_seq_length=16), AutoTokenizer.from_pretrained(small_tokenizer)
    )
    assert list(blocks) == ["d"] and blocks["d"].ids.numel() > 16
    (folder / "validation.jsonl").unlink()
    write_jsonl(folder / "train.jsonl", random_docs(5, 30, "t "))
    with pytest.raises(DataError, match="no held-out text to evaluate"):
        check_source(e, evaluated=True, heldout_fraction=0)


def test_long_csv_fields_and_byte_order_marks(tmp_path):
    """A CSV document past Python's csv field limit (131,072 characters) is read whole; a byte order mark
    (Excel's "CSV UTF-8", Notepad's UTF-8) is not part of the first field's name or the first document."""
    long = "word " * 60_000  # 300,000 characters
    (tmp_path / "long.csv").write_text("text\n" + '"short"\n' + f'"{long}"\n', encoding="utf-8")
    assert texts_of(entry(tmp_path / "long.csv"), heldout_fraction=0) == ["short", long]
    (tmp_path / "bom.csv").write_text("text,n\nhello,1\n", encoding="utf-8-sig")
    (tmp_path / "bom.jsonl").write_text('{"text": "hello"}\n', encoding="utf-8-sig")
    (tmp_path / "bom.txt").write_text("hello\n", encoding="utf-8-sig")
    for name in ("bom.csv", "bom.jsonl", "bom.txt"):
        assert texts_of(entry(tmp_path / name), heldout_fraction=0) == ["hello"], name


def test_count_tokens_is_what_the_tokenizer_gives_and_counts_again_when_the_file_changes(tmp_path, small_tokenizer):
    """count_tokens: one end-of-text token per training document on top of the tokenizer's own ids, across the
    small first tables and the full ones; its per-process cache must not outlive a change to the file."""
    import os

    from transformers import AutoTokenizer

    from peerlab.data.sources import count_tokens

    tok = AutoTokenizer.from_pretrained(small_tokenizer)
    rng = np.random.default_rng(0)
    docs = [" ".join(rng.choice(WORDS, size=rng.integers(1, 40))) for _ in range(700)]  # > 16 + 32 + ... + 256
    path = tmp_path / "docs.jsonl"
    write_jsonl(path, [{"text": d} for d in docs])

    def expected(texts):
        return sum(len(tok(t, add_special_tokens=False)["input_ids"]) + 1 for t in texts)

    e = entry(path)
    assert count_tokens(e, small_tokenizer, heldout_fraction=0) == expected(docs)
    write_jsonl(path, [{"text": d} for d in docs + ["one more document"]])
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))  # a later modification time
    assert count_tokens(e, small_tokenizer, heldout_fraction=0) == expected(docs + ["one more document"])


def test_templates_render_fields(tmp_path):
    path = write_jsonl(tmp_path / "i.jsonl", [{"instruction": "Add", "input": "1 2", "output": "3"}])
    e = entry(path, text_template="Instruction:\n{instruction}\n\nInput:\n{input}\n\nOutput:\n{output}")
    assert texts_of(e, heldout_fraction=0) == ["Instruction:\nAdd\n\nInput:\n1 2\n\nOutput:\n3"]
    # A null field (Alpaca's empty input) is empty text, not "None"; a list or an object is refused by name.
    write_jsonl(path, [{"instruction": "Add", "input": None, "output": 3}])
    assert texts_of(e, heldout_fraction=0) == ["Instruction:\nAdd\n\nInput:\n\n\nOutput:\n3"]
    write_jsonl(path, [{"instruction": "Add", "input": ["1", "2"], "output": "3"}])
    with pytest.raises(DataError, match="field 'input' is list, not text \\(used by text_template\\)"):
        texts_of(e, heldout_fraction=0)


def test_held_out_split_files_and_hash_rule(tmp_path):
    folder = tmp_path / "ds"
    write_jsonl(folder / "train.jsonl", random_docs(50, 0, "train "))
    write_jsonl(folder / "heldout.jsonl", random_docs(5, 1, "held "))
    e = entry(folder, format="jsonl")
    assert all(t.startswith("train ") for t in texts_of(e))
    assert len(texts_of(e)) == 50  # a held-out split file: no hash rule on the training files
    assert all(t.startswith("held ") for t in heldout_texts(e)) and len(heldout_texts(e)) == 5
    single = entry(write_jsonl(tmp_path / "one.jsonl", random_docs(400, 2)))
    train = texts_of(single, heldout_fraction=0.1)
    held = heldout_texts(single, heldout_fraction=0.1)
    assert 20 <= len(held) <= 60 and len(train) + len(held) == 400
    rows_train = {r for _, r, _ in documents(single, Selection(heldout_fraction=0.1))}
    rows_held = {r for _, r, _ in documents(single, Selection(part="heldout", heldout_fraction=0.1))}
    assert not rows_train & rows_held


def test_held_out_and_test_files_are_never_trained_on(tmp_path):
    """No train* files: the other files are trained on, never test*/validation*/heldout* ones."""
    folder = tmp_path / "ds"
    for split in ("test", "validation", "misc"):
        write_jsonl(folder / f"{split}.jsonl", random_docs(20, len(split), f"{split} "))
    write_jsonl(folder / "heldout_extra.jsonl", random_docs(5, 9, "heldout "))
    e = entry(folder, format="jsonl")
    assert {t.split()[0] for t in texts_of(e, heldout_fraction=0)} == {"misc"}
    assert {t.split()[0] for t in heldout_texts(e)} == {"validation", "heldout"}  # test* files: not read
    (folder / "misc.jsonl").unlink()
    with pytest.raises(DataError, match="no files to train on for split 'train'.*named heldout, validation, test are"):
        texts_of(e)
    # A file named as the dataset is the user's choice: trained on, with the hash rule holding out its share.
    single = entry(folder / "validation.jsonl")
    assert len(texts_of(single, heldout_fraction=0.2)) + len(heldout_texts(single, 0.2)) == 20
    assert 0 < len(heldout_texts(single, 0.2)) < 20


def test_splits_are_named_by_subfolders_and_by_words_of_file_names(tmp_path):
    """The common layouts: train/, validation/ and test/ subfolders, and names such as wiki_test.jsonl or
    heldout-00001.jsonl. A word is a split's name whole ("contest" is not "test")."""
    folder = tmp_path / "ds"
    for name in ("train/part-0", "validation/part-0", "test/part-0", "wiki_test", "heldout-00001", "contest"):
        write_jsonl(folder / f"{name}.jsonl", random_docs(10, 6, f"{name.replace('/', '_')} "))
    e = entry(folder, format="jsonl")
    trained = {t.split()[0] for t in texts_of(e, heldout_fraction=0)}
    assert trained == {"train_part-0"}  # train/ names the split: the other files are not trained on
    assert {t.split()[0] for t in heldout_texts(e)} == {"validation_part-0", "heldout-00001"}  # test: not read
    (folder / "train" / "part-0.jsonl").unlink()
    assert {t.split()[0] for t in texts_of(e, heldout_fraction=0)} == {"contest"}


def test_the_files_a_folder_never_reads_are_said_before_ray_starts(demo_corpus, tmp_path, capsys):
    """A folder's split words can set files aside; the run says which, once, before Ray starts."""
    from peerlab.cli import checked_data

    folder = tmp_path / "ds"
    write_jsonl(folder / "train" / "part-0.jsonl", random_docs(20, 8, "t "))
    write_jsonl(folder / "validation" / "part-0.jsonl", random_docs(5, 8, "v "))
    write_jsonl(folder / "unit_test_cases.jsonl", random_docs(5, 8, "u "))
    cfg = load_config(
        ROOT / "configs" / "demo.yaml",
        [f"dataset_config.datasets.{i}.path={demo_corpus / d}" for i, d in enumerate(DOMAINS)]
        + [f"dataset_config.datasets.0.path={folder}", f"dataset_config.tokenizer_name={demo_corpus / 'tokenizer'}"],
    )
    checked_data(cfg)
    checked_data(cfg)  # (a sweep checks each mix: said once)
    out = capsys.readouterr().out.strip().splitlines()
    assert out == [
        f"dataset 'prose': {folder} trains on 1 files, holds out 1 (validation/part-0.jsonl), "
        "never reads 1 (unit_test_cases.jsonl)"
    ]


@pytest.mark.parametrize("split", ["validation", "heldout", "test", "Test"])
def test_a_held_out_split_name_on_a_local_source_is_refused_at_load(demo_corpus, split):
    from peerlab.config import ConfigError

    overrides = [f"dataset_config.datasets.{i}.path={demo_corpus / d}" for i, d in enumerate(DOMAINS)]
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "configs" / "demo.yaml", [*overrides, f"dataset_config.datasets.1.split={split}"])
    message = str(err.value)
    assert "\n" not in message and "dataset_config.datasets.1.split" in message and "use split: train" in message
    with pytest.raises(DataError, match="use split: train"):  # the data layer refuses it too
        texts_of(entry(demo_corpus / "code", format="jsonl", split=split))
    hub = ["dataset_config.datasets.0.path=someone/corpus", f"dataset_config.datasets.0.split={split}"]
    cfg = load_config(ROOT / "configs" / "demo.yaml", [*overrides, *hub])  # a hub split is the hub's own
    assert cfg.dataset_config.datasets[0].split == split


def test_hub_path_reads_through_load_dataset(tmp_path, small_tokenizer):
    """The hub reader (datasets.load_dataset(path, subset, split, streaming)) on a local dataset folder, offline."""
    from peerlab.data.sources import hub_documents, is_local

    assert not is_local(DatasetEntry(name="pile", path="monology/pile-uncopyrighted", text_field="text"))
    write_jsonl(tmp_path / "hubby" / "train.jsonl", [{"text": f"hub doc {i}"} for i in range(300)])
    e = DatasetEntry(name="hub", path=str(tmp_path / "hubby"), split="train", streaming=True, text_field="text")
    tables = list(hub_documents(e, Selection(heldout_fraction=0.05)))
    train = [t for table in tables for t in table["text"].to_pylist()]
    held = [
        t
        for table in hub_documents(e, Selection(part="heldout", heldout_fraction=0.05))
        for t in table["text"].to_pylist()
    ]
    assert sorted(train + held) == sorted(f"hub doc {i}" for i in range(300)) and 3 <= len(held) <= 30
    resumed = [
        t
        for table in hub_documents(e, Selection(start=(0, 100), heldout_fraction=0.05))
        for t in table["text"].to_pylist()
    ]
    assert resumed == [t for t in train if int(t.split()[-1]) >= 100]  # resuming skips what was read


# --------------------------------------------------------------------------------------
# Bad input: one line each, naming dataset, file, record and field
# --------------------------------------------------------------------------------------


def test_bad_inputs_each_give_one_line(tmp_path, small_tokenizer):
    good = write_jsonl(tmp_path / "good.jsonl", [{"text": "fine"}])
    cases = []
    cases.append((entry(tmp_path / "nope.jsonl"), "path", "does not exist"))
    cases.append((entry("./nope/code"), "path ./nope/code", f"read from the working directory, {Path.cwd()}"))
    (tmp_path / "empty.jsonl").write_text("")
    cases.append((entry(tmp_path / "empty.jsonl"), "empty.jsonl", "has no text to train on"))
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": oops}\n')
    cases.append((entry(tmp_path / "bad.jsonl"), "bad.jsonl line 2", "malformed JSON"))
    (tmp_path / "weird.xml").write_text("<a/>")
    cases.append((entry(tmp_path / "weird.xml"), "weird.xml", "cannot tell the format"))
    missing = write_jsonl(tmp_path / "missing.jsonl", [{"text": "a"}, {"body": "b"}])
    cases.append((entry(missing), "record 2 has no field 'text'", "skip_bad_records"))
    number = write_jsonl(tmp_path / "number.jsonl", [{"text": 5}])
    cases.append((entry(number), "field 'text' is int, not text", "record 1"))
    cases.append(
        (entry(good, text_template="{title}: {text}"), "no field 'title' (used by text_template)", "good.jsonl")
    )
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    cases.append((entry(tmp_path / "latin1.txt"), "latin1.txt is not UTF-8", "byte"))
    for e, *expected in cases:
        with pytest.raises(DataError) as err:
            check_source(e)
        message = str(err.value)
        assert "\n" not in message and "dataset 'd'" in message
        for part in expected:
            assert part in message, (message, part)


def test_the_check_reads_a_dataset_whole_not_file_by_file(tmp_path):
    """An empty shard or a shard of empty records beside shards with text is fine (empty records are left out);
    a file whose first 100 records are empty is read on, and refused if it has no text at all (it failed only
    after Ray started); a small dataset with fewer training documents than workers is refused (a worker would
    get none: it too failed after Ray started, blaming the path and field)."""
    folder = tmp_path / "shards"
    write_jsonl(folder / "part-0.jsonl", [{"text": "some text"}] * 3)
    (folder / "part-1.jsonl").write_text("")
    write_jsonl(folder / "part-2.jsonl", [{"text": ""}] * 5)
    check_source(entry(folder, format="jsonl"), heldout_fraction=0)
    blank = write_jsonl(tmp_path / "blank.jsonl", [{"text": ""}] * 150)
    with pytest.raises(DataError, match="blank.jsonl has no text to train on"):
        check_source(entry(blank))
    write_jsonl(blank, [{"text": ""}] * 150 + [{"text": "late"}])
    check_source(entry(blank), heldout_fraction=0)
    one = write_jsonl(tmp_path / "one.jsonl", [{"text": "a single long book " * 50}])
    check_source(entry(one), heldout_fraction=0)  # one worker: fine
    with pytest.raises(DataError, match="has 1 training documents for 2 workers.*or train on fewer workers") as err:
        check_source(entry(one), workers=2, heldout_fraction=0)
    assert "\n" not in str(err.value)
    books = tmp_path / "books"
    (books / "a.txt").parent.mkdir()
    (books / "a.txt").write_text("one book\n")
    with pytest.raises(DataError, match="has 1 training files \\(text_unit: file\\) for 3 workers"):
        check_source(entry(books, format="text", text_unit="file"), workers=3, heldout_fraction=0)
    with pytest.raises(DataError, match="text_unit: file makes each file of format text one document; part-0"):
        check_source(entry(folder, text_unit="file"))  # a folder of jsonl: records are its documents


def test_skip_bad_records_skips_and_counts(tmp_path, small_tokenizer):
    path = write_jsonl(tmp_path / "m.jsonl", [{"text": "alpha beta"}, {"body": "x"}, {"text": "gamma"}] * 20)
    e = entry(path, skip_bad_records=True)
    assert texts_of(e, heldout_fraction=0) == ["alpha beta", "gamma"] * 20
    mix = DataMixture([e], DataOptions(small_tokenizer, seq_len=4, engine="local", heldout_fraction=0))
    for _ in range(10):
        mix.next_block()
    assert mix.stats()["skipped/d"] >= 1


def test_source_without_text_is_an_error(tmp_path, small_tokenizer):
    path = write_jsonl(tmp_path / "blank.jsonl", [{"text": ""}] * 5)
    with pytest.raises(DataError, match="has no text"):
        check_source(entry(path))
    mix = DataMixture([entry(path)], DataOptions(small_tokenizer, seq_len=4, engine="local"))
    with pytest.raises(DataError, match="yields no text"):
        mix.next_block()


def test_tokenizer_errors(tmp_path):
    with pytest.raises(TokenizerError, match="not a local folder and not in the Hugging Face cache.*offline") as err:
        load_tokenizer("gpt2")
    assert "\n" not in str(err.value) and "tokenizer_name" in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(TokenizerError, match="cannot be loaded"):
        load_tokenizer(str(tmp_path / "empty"))
    with pytest.raises(TokenizerError, match="tokenizer folder .*/nothere does not exist"):
        load_tokenizer(str(tmp_path / "nothere"))
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(TokenizerError, match="is a file; give the folder that holds it"):
        load_tokenizer(str(tmp_path / "tokenizer.json"))


def test_check_data_refuses_a_tokenizer_larger_than_the_model(demo_corpus, tmp_path):
    cfg = load_config(
        ROOT / "configs" / "demo.yaml",
        [f"dataset_config.tokenizer_name={demo_corpus / 'tokenizer'}", "model_config.vocab_size=4000"]
        + [f"dataset_config.datasets.{i}.path={demo_corpus / d}" for i, d in enumerate(DOMAINS)],
    )
    with pytest.raises(TokenizerError, match="has 8192 tokens but model_config.vocab_size is 4000"):
        check_data(cfg.dataset_config, cfg.model_config)


# --------------------------------------------------------------------------------------
# Mixing, determinism, resume, passes
# --------------------------------------------------------------------------------------


def mixed_sources(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", random_docs(6, 10, "a "))
    b_dir = tmp_path / "b"
    for k in range(3):
        write_jsonl(b_dir / f"part-{k}.jsonl", random_docs(40, 20 + k, f"b{k} "))
    return [entry(a, name="a", weight=1.0), entry(b_dir, name="b", format="jsonl", weight=3.0)]


def test_resuming_inside_a_document_that_changed_is_a_data_error(tmp_path, small_tokenizer):
    """A checkpoint's data position points into a document by its place and token; when the file was rewritten
    and that document is now shorter, the resume is a one-line DataError naming the dataset and the fix (it was
    an AssertionError, which Ray Train retried)."""
    sources = mixed_sources(tmp_path)
    opts = DataOptions(small_tokenizer, seq_len=16, seed=3, engine="local")
    mix = DataMixture(sources, opts)
    while mix.state_dict()["sources"][0]["offset"] < 4:  # stop where "a" resumes 4 or more tokens into a document
        mix.next_block()
    state = mix.state_dict()
    write_jsonl(tmp_path / "a.jsonl", [{"text": "x"}] * 6)  # the same records, each now 2 tokens long
    resumed = DataMixture(sources, opts, state)
    with pytest.raises(DataError, match="dataset 'a': the saved data position .* changed since the checkpoint"):
        for _ in range(50):
            resumed.next_block()


def test_exact_resume_at_any_block(tmp_path, small_tokenizer):
    sources = mixed_sources(tmp_path)
    opts = DataOptions(small_tokenizer, seq_len=16, seed=3, engine="local")
    full = DataMixture(sources, opts)
    blocks = [full.next_block() for _ in range(400)]  # several passes over "a"
    assert full.stats()["passes/a"] >= 1
    for cut in (1, 37, 150, 333):
        first = DataMixture(sources, opts)
        for _ in range(cut):
            first.next_block()
        state = json.loads(json.dumps(first.state_dict()))  # survives a JSON checkpoint
        resumed = DataMixture(sources, opts, state)
        rest = [resumed.next_block() for _ in range(400 - cut)]
        assert all(i == j and np.array_equal(x, y) for (i, x), (j, y) in zip(rest, blocks[cut:]))


def test_exact_resume_on_a_worker_of_several(tmp_path, small_tokenizer, caplog):
    """The position carries the running document index, so worker 1 of 3 resumes exactly, even in a pass
    of many small files with held-out and empty records; a position saved without it still loads."""
    rng = np.random.default_rng(5)
    for k in range(12):
        docs = random_docs(int(rng.integers(1, 5)), seed=50 + k, prefix=f"s{k} ")
        write_jsonl(tmp_path / "s" / f"part-{k:02d}.jsonl", docs + [{"text": ""}] * int(rng.integers(0, 2)))
    sources = [*mixed_sources(tmp_path), entry(tmp_path / "s", name="s", format="jsonl", weight=2.0)]
    opts = DataOptions(small_tokenizer, seq_len=8, seed=4, rank=1, world=3, heldout_fraction=0.15, engine="local")
    with DataMixture(sources, opts) as full:
        blocks = [full.next_block() for _ in range(250)]
        assert full.stats()["passes/s"] >= 1
    indices = []
    for cut in (7, 64, 111, 203):
        with DataMixture(sources, opts) as first:
            for _ in range(cut):
                first.next_block()
            state = json.loads(json.dumps(first.state_dict()))
        indices += [p["index"] for p in state["sources"]]
        with DataMixture(sources, opts, state) as resumed:
            rest = [resumed.next_block() for _ in range(250 - cut)]
        assert all(i == j and np.array_equal(x, y) for (i, x), (j, y) in zip(rest, blocks[cut:]))
    assert max(indices) > 0  # the positions carried running indices past the first document
    one = DataOptions(small_tokenizer, seq_len=8, seed=4, heldout_fraction=0.15, engine="local")
    with DataMixture(sources, one) as full:
        blocks = [full.next_block() for _ in range(60)]
    with DataMixture(sources, one) as first:
        for _ in range(30):
            first.next_block()
        state = first.state_dict()
    for position in state["sources"]:
        del position["index"]  # as written before positions had it
    with DataMixture(sources, one, state) as resumed:  # one worker: still exact
        assert all(np.array_equal(resumed.next_block()[1], x) for _, x in blocks[30:])
    with caplog.at_level("WARNING", logger="peerlab.data"):  # several workers: approximate, and it says so
        DataMixture(sources, opts, state).close()
    assert "predates the running document index" in caplog.text
    caplog.clear()
    with DataMixture(sources, opts) as first:
        first.next_block()
        state = first.state_dict()
    del state["shares"]  # written when workers took index % W
    with caplog.at_level("WARNING", logger="peerlab.data"):
        DataMixture(sources, opts, state).close()
    assert "rank modulo the workers" in caplog.text


def test_same_seed_same_blocks_other_seed_other_order(tmp_path, small_tokenizer):
    sources = mixed_sources(tmp_path)

    def run(seed):
        mix = DataMixture(sources, DataOptions(small_tokenizer, seq_len=16, seed=seed, engine="local"))
        return [mix.next_block() for _ in range(120)]

    a, b, c = run(1), run(1), run(2)
    assert all(i == j and np.array_equal(x, y) for (i, x), (j, y) in zip(a, b))
    assert not all(np.array_equal(x, y) for (_, x), (_, y) in zip(a, c))  # another file order for "b"


def test_shares_follow_weights_on_each_worker(tmp_path, small_tokenizer):
    sources = mixed_sources(tmp_path)
    sources[0].weight, sources[1].weight = 0.35, 0.65
    for rank in (0, 1):
        mix = DataMixture(sources, DataOptions(small_tokenizer, seq_len=16, seed=0, rank=rank, world=2, engine="local"))
        for n in range(1, 301):
            mix.next_block()
            if n in (20, 100, 300):
                shares = np.array([mix.stats()["tokens_seen/a"], mix.stats()["tokens_seen/b"]]) / (n * 17)
                assert abs(shares[0] - 0.35) <= max(0.02, 1 / n)


def test_workers_read_disjoint_documents(tmp_path):
    e = entry(write_jsonl(tmp_path / "w.jsonl", random_docs(100, 5)))
    rows = [{r for _, r, _ in documents(e, Selection(rank=k, world=2))} for k in (0, 1)]
    assert not rows[0] & rows[1] and len(rows[0]) + len(rows[1]) == len(texts_of(e))


def shares_of(e, world, **sel) -> list[list[str]]:
    """Each worker's texts of one pass."""
    return [texts_of(e, rank=k, world=world, **sel) for k in range(world)]


def assert_shared_fairly(shares, everything):
    """Disjoint, together everything, and each worker within one document of 1/W of it."""
    together = [t for share in shares for t in share]
    assert sorted(together) == sorted(everything) and len(set(together)) == len(together)
    assert max(map(len, shares)) - min(map(len, shares)) <= 1, [len(x) for x in shares]


@pytest.mark.parametrize("world", [2, 3])
def test_records_that_take_turns_are_shared_by_length_too(tmp_path, world):
    """Short questions and long answers as records taking turns: by index % W one worker of two got every long
    record (7x the tokens of the other in a researcher's file). Each run of W documents goes one to each worker
    in a changing order, so each worker's characters are near 1/W of the pass, and its count within one of 1/W."""
    records = [{"text": f"q{i} " * 3} if i % world == 0 else {"text": f"answer{i} " * 100} for i in range(300)]
    e = entry(write_jsonl(tmp_path / "qa.jsonl", records))
    shares = shares_of(e, world, heldout_fraction=0)
    assert_shared_fairly(shares, texts_of(e, heldout_fraction=0))
    chars = [sum(map(len, share)) for share in shares]
    assert max(chars) / min(chars) < 1.3, chars


def test_files_as_documents_are_shared_by_every_worker(tmp_path, small_tokenizer):
    """text_unit: file makes every document row 0 of its file: workers share them by a running index."""
    folder = tmp_path / "essays"
    folder.mkdir()
    for k in range(7):
        (folder / f"essay-{k}.txt").write_text(f"essay {k}\n" + " ".join(WORDS[k:]) + "\n")
    e = entry(folder, format="text", text_unit="file")
    everything = texts_of(e, heldout_fraction=0)
    assert len(everything) == 7
    for world in (2, 3):
        assert_shared_fairly(shares_of(e, world, heldout_fraction=0), everything)
        for rank in range(world):  # every worker trains (none "yields no text")
            opts = DataOptions(small_tokenizer, seq_len=8, rank=rank, world=world, heldout_fraction=0, engine="local")
            with DataMixture([e], opts) as mix:
                assert len(mix.next_block()[1]) == 9


def test_workers_share_the_training_documents_of_many_small_files(tmp_path):
    """Balanced on the documents each worker trains on: held-out and empty records take no share."""
    rng = np.random.default_rng(3)
    folder = tmp_path / "small"
    for k in range(40):
        docs = random_docs(int(rng.integers(1, 4)), seed=k, prefix=f"f{k} ")
        write_jsonl(folder / f"part-{k:02d}.jsonl", docs + [{"text": ""}] * int(rng.integers(0, 2)))
    e = entry(folder, format="jsonl")
    everything = texts_of(e, heldout_fraction=0.2)
    assert 20 < len(everything) < len(texts_of(e, heldout_fraction=0))  # some are held out
    for world in (2, 3, 4):
        assert_shared_fairly(shares_of(e, world, heldout_fraction=0.2), everything)


def test_hub_rows_are_shared_like_local_ones(tmp_path):
    from peerlab.data.sources import hub_documents

    write_jsonl(tmp_path / "hubby" / "train.jsonl", [{"text": f"hub doc {i}" if i % 7 else ""} for i in range(90)])
    e = DatasetEntry(name="hub", path=str(tmp_path / "hubby"), split="train", streaming=True, text_field="text")

    def share(**sel):
        return [
            t for table in hub_documents(e, Selection(heldout_fraction=0.1, **sel)) for t in table["text"].to_pylist()
        ]

    assert_shared_fairly([share(rank=k, world=3) for k in range(3)], share())


def test_saved_state_of_another_mix_is_refused(tmp_path, small_tokenizer):
    sources = mixed_sources(tmp_path)
    opts = DataOptions(small_tokenizer, seq_len=16, engine="local")
    state = DataMixture(sources, opts).state_dict()
    with pytest.raises(DataError, match="another mix"):
        DataMixture(sources[:1], opts, state)


# --------------------------------------------------------------------------------------
# Ray Data, on the embedded default corpus
# --------------------------------------------------------------------------------------


def demo_entries(demo_corpus, weights=(0.5, 0.3, 0.2)):
    return [entry(demo_corpus / d, name=d, format="jsonl", weight=w) for d, w in zip(DOMAINS, weights)]


def test_ray_data_stream_equals_local_and_resumes_exactly(ray_cluster, demo_corpus, monkeypatch):
    # Each stream's head (read in this process) ends after about 1,000 tokens, inside the first pass: the
    # blocks after it come from Ray Data's read task, which starts at the document after the head.
    monkeypatch.setattr(mixture, "HEAD_TOKENS", 1000)
    sources = demo_entries(demo_corpus)
    tok = str(demo_corpus / "tokenizer")
    with DataMixture(sources, DataOptions(tok, seq_len=64, seed=5, engine="ray")) as ray_mix:
        with DataMixture(sources, DataOptions(tok, seq_len=64, seed=5, engine="local")) as local_mix:
            ray_blocks = [ray_mix.next_block() for _ in range(120)]
            local_blocks = [local_mix.next_block() for _ in range(120)]
        assert all(i == j and np.array_equal(x, y) for (i, x), (j, y) in zip(ray_blocks, local_blocks))
        state = ray_mix.state_dict()
        more = [ray_mix.next_block() for _ in range(40)]
    with DataMixture(sources, DataOptions(tok, seq_len=64, seed=5, engine="ray"), state) as resumed:
        again = [resumed.next_block() for _ in range(40)]
    assert all(i == j and np.array_equal(x, y) for (i, x), (j, y) in zip(more, again))


def test_ray_shares_within_two_points_on_two_workers(ray_cluster, demo_corpus):
    weights = (0.5, 0.3, 0.2)
    tok = str(demo_corpus / "tokenizer")
    for rank in (0, 1):
        opts = DataOptions(tok, seq_len=128, seed=0, rank=rank, world=2, engine="ray")
        with DataMixture(demo_entries(demo_corpus, weights), opts) as mix:
            batch, sources = mix.next_batch(150)
        assert batch.shape == (150, 129)
        stats = mix.stats()
        total = sum(stats[f"tokens_seen/{d}"] for d in DOMAINS)
        for d, w in zip(DOMAINS, weights):
            assert abs(stats[f"tokens_seen/{d}"] / total - w) <= 0.02


def test_ray_stream_cycles_many_passes_like_the_local_one(ray_cluster, tmp_path, small_tokenizer, monkeypatch):
    # 3 files of 2 short documents: 300 blocks take over ten passes, each in its own seeded file
    # order, all in one Ray Data read task. The head is the first pass's one table: the read task starts
    # at the end of a pass. Ray Data gathers a read task's tables into blocks of BLOCK_BYTES (1 MiB, some
    # ten thousand passes of these documents, seconds of reading): 4 KiB here.
    monkeypatch.setattr(mixture, "HEAD_TOKENS", 1)
    monkeypatch.setattr(mixture, "BLOCK_BYTES", 4096)
    for f in range(3):
        write_jsonl(tmp_path / "tiny" / f"part{f}.jsonl", random_docs(2, seed=f, prefix=f"file {f}: "))
    e = entry(tmp_path / "tiny", name="tiny", format="jsonl")
    opts = dict(tokenizer=small_tokenizer, seq_len=16, seed=1, heldout_fraction=0)
    with DataMixture([e], DataOptions(**opts, engine="ray")) as ray_mix:
        ray_blocks = [ray_mix.next_block()[1] for _ in range(300)]
        passes = ray_mix.stats()["passes/tiny"]
    with DataMixture([e], DataOptions(**opts, engine="local")) as local_mix:
        local_blocks = [local_mix.next_block()[1] for _ in range(300)]
    assert passes > 10
    assert len({tuple(pass_order(3, 1, 0, p)) for p in range(passes)}) > 1  # the passes had different orders
    assert all(np.array_equal(x, y) for x, y in zip(ray_blocks, local_blocks))


def test_resume_at_the_end_of_a_pass_starts_the_next(ray_cluster, tmp_path, small_tokenizer):
    for f in range(3):
        write_jsonl(tmp_path / "src" / f"part{f}.jsonl", random_docs(3, seed=10 + f))
    e = entry(tmp_path / "src", name="src", format="jsonl")
    opts = DataOptions(small_tokenizer, seq_len=8, seed=2, heldout_fraction=0, engine="ray")

    def state(**position):
        return {"datasets": [{"name": "src", "path": e.path}], "sources": [position]}

    # Just after the last record of pass 1's last file, against the start of pass 2.
    at_end = state(passes=1, file=2, row=3, offset=0, blocks=0, skipped=0)
    at_next = state(passes=2, file=0, row=0, offset=0, blocks=0, skipped=0)
    with DataMixture([e], opts, at_end) as a, DataMixture([e], opts, at_next) as b:
        first = [a.next_block()[1] for _ in range(20)]
        second = [b.next_block()[1] for _ in range(20)]
        assert a.stats()["passes/src"] == b.stats()["passes/src"] >= 2
    assert all(np.array_equal(x, y) for x, y in zip(first, second))


@pytest.mark.parametrize("head_tokens", [0, 32768], ids=["in the read task", "in the head"])
def test_ray_stream_without_text_for_a_worker_is_a_one_line_error(
    ray_cluster, tmp_path, small_tokenizer, monkeypatch, head_tokens
):
    monkeypatch.setattr(mixture, "HEAD_TOKENS", head_tokens)
    from peerlab.data.sources import worker_of

    path = write_jsonl(tmp_path / "one.jsonl", [{"text": "alpha beta gamma"}])  # one document: one worker's
    idle = 1 - worker_of(0, 2)  # the worker without it
    opts = DataOptions(small_tokenizer, seq_len=4, rank=idle, world=2, heldout_fraction=0, engine="ray")
    with pytest.raises(DataError) as err:
        with DataMixture([entry(path)], opts) as mix:
            mix.next_block()
    assert "\n" not in str(err.value) and f"yields no text for worker {idle} of 2" in str(err.value)


# --------------------------------------------------------------------------------------
# The embedded default corpus
# --------------------------------------------------------------------------------------


def test_demo_corpus_has_three_domains(demo_corpus):
    # Its determinism: test_smoke_demo_refuses_bad_data_before_ray_starts prepares it afresh and compares.
    manifest = json.loads((demo_corpus / "manifest.json").read_text())
    assert set(manifest["domains"]) == set(DOMAINS)
    code = (demo_corpus / "code" / "train.jsonl").open().readline()
    prose = (demo_corpus / "prose" / "train.jsonl").open().readline()
    assert "def " in json.loads(code)["text"] or "import " in json.loads(code)["text"]
    assert json.loads(prose)["text"].count(" ") > 20
    stamp = (demo_corpus / "manifest.json").stat().st_mtime_ns
    prepare_demo_corpus(demo_corpus, quiet=True)  # already there: nothing rewritten
    assert (demo_corpus / "manifest.json").stat().st_mtime_ns == stamp


def test_docs_domain_leaves_out_peerlabs_own_readme():
    # An editable install's METADATA carries this repository's README: were it read, every README
    # edit would change the corpus, its tokenizer and every demo figure on a fresh clone.
    from importlib.metadata import distribution

    from peerlab.data.corpus import docs_texts

    assert len(distribution("peerlab").metadata.get_payload() or "") > 500  # it would be read
    sources = [source for source, _ in docs_texts()]
    assert sources and not any(s.lower() == "packages/peerlab" for s in sources)


def test_demo_config_data_checks_pass(demo_corpus):
    cfg = load_config(
        ROOT / "configs" / "demo.yaml",
        [f"dataset_config.tokenizer_name={demo_corpus / 'tokenizer'}"]
        + [f"dataset_config.datasets.{i}.path={demo_corpus / d}" for i, d in enumerate(DOMAINS)],
    )
    tokenizer = check_data(cfg.dataset_config, cfg.model_config)
    assert len(tokenizer) == 8192 and tokenizer.eos_token == "<|endoftext|>"
    ids = tokenizer("def f(x):\n    return x  # the end")["input_ids"]
    assert tokenizer.decode(ids) == "def f(x):\n    return x  # the end"


def test_smoke_demo_refuses_bad_data_before_ray_starts(tmp_path, demo_corpus):
    """A bad dataset path: exit status 2, one line naming dataset and path, and no Ray cluster started.
    The demo corpus it prepares on its first run (in a fresh folder) is the session's, byte for byte."""
    import subprocess
    import sys

    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "experiments" / "smoke.py"),
            "--config",
            str(ROOT / "configs" / "demo.yaml"),
            "--set",
            "dataset_config.datasets.1.path=/no/such/code.jsonl",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert (
        out.stderr.strip().count("\n") == 0 and "dataset 'code': path /no/such/code.jsonl does not exist" in out.stderr
    )
    assert "Ray dashboard" not in out.stdout and (tmp_path / "data" / "demo" / "manifest.json").is_file()
    for d in DOMAINS:  # the demo corpus is deterministic: a fresh one equals the session's
        for split in ("train", "heldout"):
            a = (demo_corpus / d / f"{split}.jsonl").read_bytes()
            assert a == (tmp_path / "data" / "demo" / d / f"{split}.jsonl").read_bytes() and len(a) > 10_000
