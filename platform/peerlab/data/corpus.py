"""The embedded default's corpus: real text found offline on any machine with this package installed.

Three domains that differ, read from the Python installation and the installed packages:

- prose: the Python documentation's topic pages (`pydoc_data/topics.py`) and the docstrings
  of the standard library's modules, classes and functions: English prose;
- code: the standard library's Python source files (tests left out);
- docs: the long descriptions of the installed packages (their README files, Markdown or
  reStructuredText, from `*.dist-info/METADATA`), peerlab's own left out: an editable
  install carries this repository's README, and the corpus must not move when it is edited.

`prepare_demo_corpus(out_dir)` extracts them deterministically (sorted paths, fixed size
caps), cuts long texts into documents at blank lines, and writes per domain
`train.jsonl` and `heldout.jsonl` (a stable hash of each document's source and number picks
the held-out 3%). It then trains the demo tokenizer, a byte-level BPE of 8,192 tokens, on the
training files only. A manifest records what was written; a second call with the same
sources finds it and does nothing.
"""

from __future__ import annotations

import ast
import hashlib
import json
import random
import re
import sys
import sysconfig
import zlib
from email.parser import HeaderParser
from pathlib import Path
from typing import Iterator

from peerlab.data.tokenizer import train_bpe

DOMAINS = ("prose", "code", "docs")
MAX_CHARS = {"prose": 3_000_000, "code": 6_000_000, "docs": 3_000_000}  # per domain, before splitting
DOC_CHARS = 4_000  # longer texts are cut into documents of about this size, at blank lines
HELDOUT_PER_10K = 300  # 3% of documents held out
VOCAB_SIZE = 8192
VERSION = 2  # 2: peerlab's own README left out of docs
EVAL_VERSION = 1
# Small on purpose: the sweep runs these tasks at the end of every trial (a few seconds on a CPU).
BPB_DOCS = 32  # passages per domain for the bits-per-byte tasks
BPB_CHARS = 1_000  # each at most this long, cut at blank lines (else at a line end)
MC_ITEMS = 99  # multiple-choice items, a third per domain
MC_CONTEXT_CHARS = 240  # the passage's opening the model reads
MC_ENDING_CHARS = 100  # each ending: about this many characters
MC_CHOICES = 4


def _stdlib() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_sources() -> list[Path]:
    root = _stdlib()
    skip = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "lib2to3"}
    return sorted(p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts))


def prose_texts() -> Iterator[tuple[str, str]]:
    """(source name, text): documentation topics, then docstrings of the standard library."""
    topics = _stdlib() / "pydoc_data" / "topics.py"
    if topics.is_file():
        namespace: dict = {}
        exec(compile(topics.read_text(encoding="utf-8"), str(topics), "exec"), namespace)  # a plain dict literal
        for name in sorted(namespace.get("topics", {})):
            yield f"topics/{name}", namespace["topics"][name]
    for path in _stdlib_sources():
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        nodes = [tree] + [
            n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
        ]
        docs = [ast.get_docstring(n) for n in nodes]
        text = "\n\n".join(d for d in docs if d and len(d) > 200)
        if text:
            yield f"docstrings/{path.relative_to(_stdlib())}", text


def code_texts() -> Iterator[tuple[str, str]]:
    for path in _stdlib_sources():
        try:
            yield f"stdlib/{path.relative_to(_stdlib())}", path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue


def _package_metadata() -> list[Path]:
    """The installed packages' METADATA files, sorted, without peerlab's own (its README)."""
    site = Path(sysconfig.get_paths()["purelib"])
    metas = sorted(site.glob("*.dist-info/METADATA"))
    return [m for m in metas if m.parent.name.split("-")[0].lower() != "peerlab"]


def docs_texts() -> Iterator[tuple[str, str]]:
    for meta in _package_metadata():
        message = HeaderParser().parsestr(meta.read_text(encoding="utf-8", errors="replace"))
        body = message.get_payload() or message.get("Description") or ""
        if len(body) > 500:
            yield f"packages/{meta.parent.name.split('-')[0]}", body


def split_text(text: str, limit: int = DOC_CHARS) -> list[str]:
    """Cut at blank lines into pieces of at most about `limit` characters (a longer paragraph stays whole)."""
    pieces, current = [], ""
    for para in re.split(r"\n\s*\n", text.strip()):
        if current and len(current) + len(para) + 2 > limit:
            pieces.append(current)
            current = para
        else:
            current = f"{current}\n\n{para}" if current else para
    if current:
        pieces.append(current)
    return pieces


def domain_documents(domain: str) -> list[tuple[str, str]]:
    """(document id, text) of one domain, in a fixed order, within the domain's size cap."""
    texts = {"prose": prose_texts, "code": code_texts, "docs": docs_texts}[domain]()
    out, total = [], 0
    for source, text in texts:
        for i, piece in enumerate(split_text(text)):
            if total >= MAX_CHARS[domain]:
                return out
            out.append((f"{source}#{i}", piece))
            total += len(piece)
    return out


def is_heldout(doc_id: str) -> bool:
    return zlib.crc32(doc_id.encode()) % 10_000 < HELDOUT_PER_10K


def _sources_fingerprint() -> str:
    """What the corpus is made of: Python's version and the installed packages' metadata files."""
    names = [p.parent.name for p in _package_metadata()]
    return hashlib.sha256(json.dumps([VERSION, sys.version, names]).encode()).hexdigest()[:16]


def prepare_demo_corpus(out_dir: str | Path = "data/demo", force: bool = False, quiet: bool = False) -> Path:
    """Write the demo corpus and tokenizer under out_dir (once); return out_dir."""
    out = Path(out_dir)
    manifest_path = out / "manifest.json"
    fingerprint = _sources_fingerprint()
    if not force and manifest_path.is_file():
        if json.loads(manifest_path.read_text()).get("fingerprint") == fingerprint:
            prepare_eval_data(out, quiet=quiet)  # a corpus prepared before the eval tasks existed gets them now
            return out
    manifest = {"fingerprint": fingerprint, "domains": {}}
    train_texts: list[str] = []
    for domain in DOMAINS:
        docs = domain_documents(domain)
        if not docs:
            raise RuntimeError(f"found no text for the demo corpus' {domain} domain in this Python installation")
        folder = out / domain
        folder.mkdir(parents=True, exist_ok=True)
        counts = {"train": 0, "heldout": 0}
        files = {split: open(folder / f"{split}.jsonl.tmp", "w", encoding="utf-8") for split in counts}
        for doc_id, text in docs:
            split = "heldout" if is_heldout(doc_id) else "train"
            files[split].write(json.dumps({"id": doc_id, "text": text}, ensure_ascii=False) + "\n")
            counts[split] += 1
            if split == "train":
                train_texts.append(text)
        for split, f in files.items():
            f.close()
            (folder / f"{split}.jsonl.tmp").replace(folder / f"{split}.jsonl")
        manifest["domains"][domain] = {
            **counts,
            "chars": sum(len(t) for _, t in docs),
            "sha256": {s: hashlib.sha256((folder / f"{s}.jsonl").read_bytes()).hexdigest() for s in counts},
        }
        if not quiet:
            print(f"demo corpus: {domain}: {counts['train']} training and {counts['heldout']} held-out documents")
    train_bpe(train_texts, VOCAB_SIZE, out / "tokenizer")
    manifest_path.write_text(json.dumps(manifest, indent=1))
    if not quiet:
        print(f"demo corpus: tokenizer ({VOCAB_SIZE} tokens) in {out / 'tokenizer'}")
    prepare_eval_data(out, force=force, quiet=quiet)
    return out


def _cut_at_space(text: str, start: int, length: int) -> tuple[int, int] | None:
    """(begin, end) of a piece of about `length` characters from `start`: begins after a space, ends before one."""
    begin = text.find(" ", start)
    if begin < 0:
        return None
    end = text.find(" ", begin + 1 + length)
    if end < 0:
        return None
    return begin + 1, end


def _trim(text: str, limit: int) -> str:
    """At most `limit` characters: cut at the last line end before it (else at the limit)."""
    if len(text) <= limit:
        return text
    end = text.rfind("\n", 0, limit)
    return text[: end if end > limit // 2 else limit]


def _passages(texts: list[str], count: int, limit: int, minimum: int) -> list[str]:
    """Up to `count` pieces of at most about `limit` characters, one from each text in turn (round robin)."""
    pieces = [[_trim(p, limit) for p in split_text(t, limit)] for t in texts]
    pieces = [[p for p in ps if len(p) >= minimum] for ps in pieces]
    out = []
    for depth in range(max((len(p) for p in pieces), default=0)):
        for p in pieces:
            if depth < len(p):
                out.append(p[depth])
                if len(out) == count:
                    return out
    return out


def eval_task_rows(out_dir: str | Path) -> dict[str, list[dict]]:
    """{file name: rows} of the offline eval tasks, built from the held-out files of `out_dir`."""
    out = Path(out_dir)
    rng = random.Random(1234)
    files: dict[str, list[dict]] = {}
    mc: list[dict] = []
    per_domain = MC_ITEMS // len(DOMAINS)
    for domain in DOMAINS:
        lines = (out / domain / "heldout.jsonl").read_text(encoding="utf-8").splitlines()
        texts = [json.loads(line)["text"] for line in lines if line.strip()]
        bpb = _passages(texts, BPB_DOCS, BPB_CHARS, minimum=200)
        files[f"bpb_{domain}.jsonl"] = [{"id": f"{domain}/{i}", "text": t} for i, t in enumerate(bpb)]
        # Multiple choice: context = a passage's opening (ends before a space), ending = what follows it.
        items = []
        for text in _passages(texts, 4 * per_domain, 4 * (MC_CONTEXT_CHARS + MC_ENDING_CHARS), minimum=600):
            cut = text.rfind(" ", 0, MC_CONTEXT_CHARS)
            span = _cut_at_space(text, cut, MC_ENDING_CHARS) if cut > MC_CONTEXT_CHARS // 2 else None
            if span is not None and span[0] == cut + 1:
                items.append((text[:cut], text[span[0] : span[1]], text))
        items = items[:per_domain]
        for i, (context, ending, _) in enumerate(items):
            others = [j for j in range(len(items)) if j != i]
            endings = []
            for j in rng.sample(others, len(others)):
                source = items[j][2]
                span = _cut_at_space(source, rng.randrange(len(source) // 2), MC_ENDING_CHARS)
                if span is not None and source[span[0] : span[1]] != ending:
                    endings.append(source[span[0] : span[1]])
                if len(endings) == MC_CHOICES - 1:
                    break
            label = rng.randrange(MC_CHOICES)
            endings.insert(label, ending)
            mc.append({"id": f"{domain}/{i}", "domain": domain, "context": context, "endings": endings, "label": label})
    files["heldout_mc.jsonl"] = mc
    return files


def prepare_eval_data(out_dir: str | Path = "data/demo", force: bool = False, quiet: bool = False) -> Path:
    """Write the offline eval tasks' data into out_dir/evals/ (once per held-out files); return that folder."""
    out = Path(out_dir)
    folder = out / "evals"
    manifest_path = folder / "manifest.json"
    heldout = [(out / d / "heldout.jsonl").read_bytes() for d in DOMAINS]
    sizes = [EVAL_VERSION, BPB_DOCS, BPB_CHARS, MC_ITEMS, MC_CONTEXT_CHARS, MC_ENDING_CHARS, MC_CHOICES]
    fingerprint = hashlib.sha256(json.dumps(sizes).encode() + b"".join(heldout)).hexdigest()[:16]
    if not force and manifest_path.is_file():
        if json.loads(manifest_path.read_text()).get("fingerprint") == fingerprint:
            return folder
    folder.mkdir(parents=True, exist_ok=True)
    manifest = {"fingerprint": fingerprint, "files": {}}
    for name, rows in eval_task_rows(out).items():
        with open(folder / f"{name}.tmp", "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        (folder / f"{name}.tmp").replace(folder / name)
        manifest["files"][name] = len(rows)
    manifest_path.write_text(json.dumps(manifest, indent=1))
    if not quiet:
        sizes = ", ".join(f"{name} {n}" for name, n in manifest["files"].items())
        print(f"demo corpus: eval task data in {folder}: {sizes}")
    return folder


if __name__ == "__main__":
    prepare_demo_corpus(sys.argv[1] if len(sys.argv) > 1 else "data/demo", force="--force" in sys.argv)
