"""Raw-text XMC corpora -> HF `datasets` (columns text, labels) -> tokenised, cached, padded batches.

Readers (every one raises TextFormatError naming the file and line / record, and the fix):
  raw      AttentionXML / LightXML folder: {train,test}_raw_texts.txt (or {train,test}_texts.txt;
           raw_texts wins when both exist) with one document per line, and {train,test}_labels.txt
           with the space-separated label NAMES of that document. Label ids = position of the name
           in the sorted union of train and test names (save it with `write_label_map`).
  jsonl    label-feature folder: trn.json.gz / tst.json.gz (or .json), one JSON object per line
           with uid, title, content, target_ind [, target_rel (ignored)]; text = the `text_fields`
           joined by a space; label names from lbl.json.gz's titles when present, else the ids.
  reuters  one JSON array of {"id", "text", "labels": [names]} (the Reuters-21578 ModApte test
           split in ../shared/data); split here into train / test by a seeded permutation:
           test = the first round(test_fraction * N) points of randperm(N, seed), train the rest,
           both kept in file order; labels = sorted names of the whole file.
  eurlex   EURLEX57K (Chalkidis et al. 2019) in either layout: {train,dev,test}.jsonl.gz (or .jsonl), one
           object per line with celex_id, title, text, labels (EuroVoc concept id strings); or the
           original folders {train,dev,test}/<celex_id>.json with header, recitals, main_body (a list of
           paragraphs), attachments, concepts, whose text is the non-empty parts joined by newlines in that
           order (how the jsonl text was made). Both layouts give the same rows. labels.json (or the
           original EURLEX57K.json) maps concept ids to {"label": name, ...}; a label id it lacks is an
           error. Label ids = position in the sorted union of the concept ids of ALL splits, so labels
           that never occur in train still count in dev / test (as misses of a model trained on train).

Each split is written once by `Dataset.from_generator` into the datasets cache (memory-mapped,
keyed by the files' paths, sizes and mtimes), so a second load reads it from disk.
`split_rows(..., streaming=True)` yields the same rows as a `datasets.IterableDataset` (nothing
cached) for corpora too large to copy. Tokenisation, padding and batches: text_batches.py.
"""

from __future__ import annotations

import functools
import gzip
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch


@dataclass(kw_only=True)
class TextDataConfig:
    """data section of the xmc_text task (raw-text XMC corpora)."""

    name: str = "xmc_text"
    """Dataset kind: 'synthetic' (generated, planted structure) or a reader name added by tasks."""
    path: Optional[str] = None
    """Folder or file of a real dataset (unused by 'synthetic'). 'xc': a folder holding train.txt and
    test.txt in the Extreme Classification Repository format; a relative path is looked up from the
    working directory, then from the repository root."""
    text_format: str = "auto"
    """'xmc_text': raw (AttentionXML/LightXML folder: {train,test}_raw_texts.txt + _labels.txt), jsonl
    (trn.json.gz / tst.json.gz label-feature files), reuters (one JSON array, split here), eurlex
    (EURLEX57K: {train,dev,test}.jsonl.gz or {train,dev,test}/<celex_id>.json + labels.json) or auto (detect)."""
    eval_split: str = "test"
    """Split scored after training: test, or dev (eurlex only: make every choice on dev, score test once)."""
    max_length: int = 128
    """'xmc_text': tokens per document after truncation, [CLS] and [SEP] included."""
    text_fields: list[str] = field(default_factory=lambda: ["title", "content"])
    """'xmc_text' jsonl: keys of each JSON line joined (by a space) into the document text."""
    test_fraction: float = 0.25
    """'xmc_text' reuters: fraction of the documents held out as the test split (seeded by data.seed)."""
    cache_dir: Optional[str] = None
    """'xmc_text': folder of the HF datasets cache (rows and tokenised splits); None = datasets' default."""
    num_proc: int = 1
    """'xmc_text': processes for tokenisation (Dataset.map num_proc)."""
    max_train_points: Optional[int] = None
    """'xmc_text': keep only the first N training documents (smoke runs); None = all."""
    max_test_points: Optional[int] = None
    """'xmc_text': keep only the first N test documents (smoke runs); None = all."""
    streaming: bool = False
    """'xmc_text': read the training split as a stream while training (nothing cached; one counting pass
    first) instead of caching it as Arrow files; the test split is cached either way."""
    shuffle_buffer: int = 10000
    """'xmc_text' streaming: rows in the seeded shuffle buffer (<= 1: file order every epoch)."""
    propensity_a: float = 0.55
    """A of the inverse propensities for PSP@k (Jain et al. 2016; 0.6 for Amazon, 0.5 for Wikipedia)."""
    propensity_b: float = 1.5
    """B of the inverse propensities for PSP@k (2.6 for Amazon, 0.4 for Wikipedia)."""
    seed: int = 0
    """Seed of the generator (data is a pure function of the config)."""

TEXT_FORMATS = ("raw", "jsonl", "reuters", "eurlex")
EVAL_SPLITS = ("dev", "test")


class TextFormatError(ValueError):
    """A text-corpus file that cannot be read; the message names the file, the line and the fix."""


@dataclass(frozen=True)
class TextSplits:
    """train / test as HF datasets with columns text (str) and labels (list of int ids)."""

    train: Any
    test: Any
    label_names: list[str]
    """Name of label id i at position i (ids are 0..C-1)."""


def file_stamps(paths: Sequence[Path]) -> tuple[tuple[str, int, int], ...]:
    """(path, size, mtime_ns) of each file: part of every cache key, so edited files are re-read."""
    return tuple((str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in paths)


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, text without the line break) of a UTF-8 (optionally .gz) file."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                yield lineno, raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as exc:
                raise TextFormatError(f"{path}:{lineno}: not valid UTF-8 ({exc.reason} at byte {exc.start}); "
                                      "re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None


# ------------------------------------------------------------------ raw (AttentionXML / LightXML) folders
def raw_files(folder: Path, split: str) -> tuple[Path, Path]:
    """(texts, labels) files of `split` (train | test) in a raw-text folder."""
    texts = [folder / f"{split}_raw_texts.txt", folder / f"{split}_texts.txt"]
    found = [p for p in texts if p.is_file()]
    labels = folder / f"{split}_labels.txt"
    if not found or not labels.is_file():
        raise TextFormatError(f"{folder}: needs {split}_raw_texts.txt (or {split}_texts.txt) and {split}_labels.txt "
                              "(the AttentionXML / LightXML layout); point data.path at that folder")
    return found[0], labels


def raw_label_names(folder: Path) -> list[str]:
    """Sorted union of the label names in train_labels.txt and test_labels.txt."""
    names: set[str] = set()
    for split in ("train", "test"):
        for _, line in _lines(raw_files(folder, split)[1]):
            names.update(line.split())
    return sorted(names)


def _raw_rows(folder: str, split: str, stamp: Any) -> Iterator[dict]:
    """Rows {text, labels} of one split (stamp only keys the datasets cache)."""
    index = {name: i for i, name in enumerate(raw_label_names(Path(folder)))}
    texts, labels = raw_files(Path(folder), split)
    text_it, label_it = _lines(texts), _lines(labels)
    count = 0
    for count, (_, text) in enumerate(text_it, start=1):
        nxt = next(label_it, None)
        if nxt is None:
            raise TextFormatError(f"{texts}:{count}: {labels} ends after {count - 1} lines; the two files must have "
                                  "one line per document each (fix or drop the unmatched lines)")
        yield {"text": text, "labels": list(dict.fromkeys(index[n] for n in nxt[1].split()))}
    if next(label_it, None) is not None:
        raise TextFormatError(f"{labels}:{count + 1}: {texts} ends after {count} lines; the two files must have "
                              "one line per document each (fix or drop the unmatched lines)")


# ------------------------------------------------------------------ label-feature JSON lines
def jsonl_file(folder: Path, split: str) -> Path:
    stem = {"train": "trn", "test": "tst"}[split]
    for name in (f"{stem}.json.gz", f"{stem}.json"):
        if (folder / name).is_file():
            return folder / name
    raise TextFormatError(f"{folder}: no {stem}.json.gz (or {stem}.json); the label-feature layout holds "
                          "trn.json.gz and tst.json.gz with one JSON object per line")


def _json_line(path: Path, lineno: int, line: str) -> dict:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise TextFormatError(f"{path}:{lineno}: not a JSON object ({exc.msg} at column {exc.colno}); each line "
                              "must be one object such as {\"uid\": ..., \"title\": ..., \"content\": ..., "
                              "\"target_ind\": [3, 17]}") from None
    if not isinstance(obj, dict):
        raise TextFormatError(f"{path}:{lineno}: expected a JSON object per line, got {type(obj).__name__}")
    return obj


def jsonl_label_names(folder: Path) -> list[str] | None:
    """Titles of lbl.json.gz (line i = label i), or None when the folder has no label file."""
    path = next((folder / n for n in ("lbl.json.gz", "lbl.json") if (folder / n).is_file()), None)
    if path is None:
        return None
    return [str(_json_line(path, i, ln).get("title", i - 1)) for i, ln in _lines(path) if ln.strip()]


def _jsonl_rows(path: str, text_fields: tuple[str, ...], num_labels: int, stamp: Any) -> Iterator[dict]:
    """Rows {text, labels} of a trn/tst JSON-lines file (num_labels < 0: ids unchecked)."""
    for lineno, line in _lines(Path(path)):
        if not line.strip():
            continue
        obj = _json_line(Path(path), lineno, line)
        missing = [k for k in [*text_fields, "target_ind"] if k not in obj]
        if missing:
            raise TextFormatError(f"{path}:{lineno}: the object lacks {missing}; every line needs target_ind and the "
                                  f"text fields {list(text_fields)} (set data.text_fields to the keys the file has)")
        ids = obj["target_ind"]
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise TextFormatError(f"{path}:{lineno}: target_ind must be a list of integer label ids, got {ids!r}")
        bad = [i for i in ids if i < 0 or (num_labels >= 0 and i >= num_labels)]
        if bad:
            raise TextFormatError(f"{path}:{lineno}: label ids {bad} outside [0, {num_labels if num_labels >= 0 else 'inf'}) "
                                  "(lbl.json.gz line count); fix the ids or the label file")
        yield {"text": " ".join(str(obj[k]) for k in text_fields), "labels": list(dict.fromkeys(ids))}


# ------------------------------------------------------------------ Reuters-21578 JSON array
def read_reuters_records(path: Path) -> tuple[list[str], list[list[str]]]:
    """(texts, label-name lists) of a JSON array of {"id", "text", "labels"} records."""
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TextFormatError(f"{path}: not a UTF-8 JSON array ({exc}); expected "
                              "[{\"id\": ..., \"text\": ..., \"labels\": [...]}, ...]") from None
    if not isinstance(records, list):
        raise TextFormatError(f"{path}: the top level must be a JSON array of records, got {type(records).__name__}")
    for i, r in enumerate(records):
        if not (isinstance(r, dict) and isinstance(r.get("text"), str) and isinstance(r.get("labels"), list)
                and all(isinstance(n, str) for n in r["labels"])):
            raise TextFormatError(f"{path}: record {i} (id {r.get('id') if isinstance(r, dict) else '?'}) needs "
                                  "\"text\": string and \"labels\": list of label names; fix or drop that record")
    return [r["text"] for r in records], [r["labels"] for r in records]


def reuters_split(num_points: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train ids, test ids), each ascending: test = first round(f * N) of randperm(N) seeded by `seed`."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"data.test_fraction={test_fraction} must be in (0, 1), e.g. 0.25")
    perm = torch.randperm(num_points, generator=torch.Generator().manual_seed(seed)).numpy()
    n_test = int(round(test_fraction * num_points))
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


def _reuters_rows(path: str, split: str, test_fraction: float, seed: int, stamp: Any) -> Iterator[dict]:
    texts, names = read_reuters_records(Path(path))
    index = {n: i for i, n in enumerate(sorted({n for row in names for n in row}))}
    train_ids, test_ids = reuters_split(len(texts), test_fraction, seed)
    for i in (train_ids if split == "train" else test_ids).tolist():
        yield {"text": texts[i], "labels": list(dict.fromkeys(index[n] for n in names[i]))}


# ------------------------------------------------------------------ EURLEX57K (jsonl.gz or per-document folders)
EURLEX_SPLITS = ("train", "dev", "test")
EURLEX_PARTS = ("header", "recitals", "main_body", "attachments")
"""Fields of an original document whose non-empty parts (main_body: each paragraph) make its text."""


def eurlex_sources(folder: Path, split: str) -> list[Path]:
    """The files of one split: [split.jsonl.gz] (or .jsonl), else split/*.json sorted by name."""
    if split not in EURLEX_SPLITS:
        raise TextFormatError(f"{folder}: EURLEX57K has splits {EURLEX_SPLITS}, not {split!r}")
    for name in (f"{split}.jsonl.gz", f"{split}.jsonl"):
        if (folder / name).is_file():
            return [folder / name]
    docs = sorted((folder / split).glob("*.json")) if (folder / split).is_dir() else []
    if not docs:
        raise TextFormatError(f"{folder}: no {split}.jsonl.gz and no {split}/<celex_id>.json files; the EURLEX57K "
                              "layouts are {train,dev,test}.jsonl.gz or the original {train,dev,test}/ folders")
    return docs


def eurlex_label_file(folder: Path) -> Path:
    for name in ("labels.json", "EURLEX57K.json"):
        if (folder / name).is_file():
            return folder / name
    raise TextFormatError(f"{folder}: no labels.json (or the original EURLEX57K.json) mapping EuroVoc concept ids to "
                          "{\"label\": name}; put the descriptor file beside the splits")


def eurlex_descriptors(folder: Path) -> dict[str, str]:
    """concept id -> descriptor name, from labels.json."""
    path = eurlex_label_file(folder)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TextFormatError(f"{path}: not a UTF-8 JSON object ({exc}); expected {{concept_id: "
                              "{\"label\": name, ...}}") from None
    bad = next((k for k, v in obj.items() if not (isinstance(v, dict) and isinstance(v.get("label"), str))),
               None) if isinstance(obj, dict) else "(top level)"
    if bad is not None:
        raise TextFormatError(f"{path}: entry {bad!r} must be {{\"label\": name, ...}} (the file maps concept ids to "
                              "descriptors); fix that entry")
    return {str(k): v["label"] for k, v in obj.items()}


def _eurlex_text(doc: dict) -> str | None:
    """Text of an original per-document JSON: its non-empty parts joined by newlines (None: a part is malformed)."""
    parts: list[str] = []
    for key in EURLEX_PARTS:
        value = doc.get(key)
        values = value if key == "main_body" and isinstance(value, list) else [value]
        if not all(v is None or isinstance(v, str) for v in values):
            return None
        parts += [v for v in values if v]
    return "\n".join(parts)


def _eurlex_docs(folder: Path, split: str) -> Iterator[tuple[str, str, list[str]]]:
    """(where = 'file:line' or 'file', text, concept ids) of every document of a split, checked."""
    for path in eurlex_sources(folder, split):
        if path.suffix == ".json":
            try:
                records = [(str(path), json.loads(path.read_text(encoding="utf-8")))]
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise TextFormatError(f"{path}: not a UTF-8 JSON object ({exc}); fix or drop the file") from None
            text_key, label_key = None, "concepts"
        else:
            records = ((f"{path}:{n}", _json_line(path, n, line)) for n, line in _lines(path) if line.strip())
            text_key, label_key = "text", "labels"
        for where, obj in records:
            if not isinstance(obj, dict):
                raise TextFormatError(f"{where}: expected a JSON object per document, got {type(obj).__name__}")
            text = obj.get(text_key) if text_key else _eurlex_text(obj)
            if not isinstance(text, str) or not text.strip():
                need = "a non-empty \"text\"" if text_key else f"non-empty text in {list(EURLEX_PARTS)}"
                raise TextFormatError(f"{where}: document without text; it needs {need} (fix or drop it)")
            ids = obj.get(label_key)
            if not isinstance(ids, list) or not ids or not all(isinstance(i, (str, int)) for i in ids):
                raise TextFormatError(f"{where}: document without labels; \"{label_key}\" must be a non-empty list of "
                                      f"EuroVoc concept ids, got {ids!r} (fix or drop it)")
            yield where, text, [str(i) for i in ids]


def _concept_order(ids: str) -> tuple[int, str]:
    return (int(ids), ids) if ids.isdigit() else (1 << 62, ids)


@functools.lru_cache(maxsize=8)
def _eurlex_label_ids(folder: str, stamp: Any) -> tuple[str, ...]:
    known = eurlex_descriptors(Path(folder))
    seen: set[str] = set()
    for split in EURLEX_SPLITS:
        for where, _, ids in _eurlex_docs(Path(folder), split):
            unknown = [i for i in ids if i not in known]
            if unknown:
                raise TextFormatError(f"{where}: label ids {unknown} are not in {eurlex_label_file(Path(folder))}; "
                                      "fix the ids or use the descriptor file of this corpus")
            seen.update(ids)
    return tuple(sorted(seen, key=_concept_order))


def eurlex_files(folder: Path) -> list[Path]:
    """Every file the rows depend on (all splits: the label ids come from their union) + labels.json."""
    return [p for s in EURLEX_SPLITS for p in eurlex_sources(folder, s)] + [eurlex_label_file(folder)]


def eurlex_label_ids(folder: Path) -> list[str]:
    """Sorted union (numerically) of the concept ids of train, dev and test: label id i is entry i."""
    return list(_eurlex_label_ids(str(folder.resolve()), file_stamps(eurlex_files(folder))))


def eurlex_label_names(folder: Path) -> list[str]:
    """'descriptor [concept id]' of every label id (distinct, as label_map.json needs)."""
    names = eurlex_descriptors(folder)
    return [f"{names[i]} [{i}]" for i in eurlex_label_ids(folder)]


def _eurlex_rows(folder: str, split: str, stamp: Any) -> Iterator[dict]:
    index = {c: i for i, c in enumerate(eurlex_label_ids(Path(folder)))}
    for _, text, ids in _eurlex_docs(Path(folder), split):
        yield {"text": text, "labels": list(dict.fromkeys(index[c] for c in ids))}


# ------------------------------------------------------------------ loading
def detect_format(path: Path) -> str:
    if path.is_file():
        return "reuters"
    if any((path / n).is_file() for n in ("train.jsonl.gz", "train.jsonl", "labels.json", "EURLEX57K.json")):
        return "eurlex"
    if any((path / n).is_file() for n in ("trn.json.gz", "trn.json")):
        return "jsonl"
    return "raw"


def _generate(rows_fn: Any, kwargs: dict, cache_dir: str | None, streaming: bool) -> Any:
    """Dataset (or IterableDataset) of rows_fn(**kwargs), re-raising our own errors unwrapped."""
    import datasets

    if streaming:
        return datasets.IterableDataset.from_generator(rows_fn, gen_kwargs=kwargs)
    features = datasets.Features({"text": datasets.Value("string"), "labels": datasets.List(datasets.Value("int64"))})
    try:
        return datasets.Dataset.from_generator(rows_fn, gen_kwargs=kwargs, features=features, cache_dir=cache_dir)
    except datasets.exceptions.DatasetGenerationError as exc:
        cause = exc.__cause__
        if isinstance(cause, TextFormatError):
            raise cause from None
        raise


def split_rows(fmt: str, path: Path, split: str, text_fields: Sequence[str] = ("title", "content"),
               test_fraction: float = 0.25, seed: int = 0, cache_dir: str | None = None,
               streaming: bool = False) -> Any:
    """One split (train | test; eurlex also dev) of a corpus as a Dataset / IterableDataset (text, labels)."""
    if fmt == "eurlex":
        kwargs = {"folder": str(path), "split": split, "stamp": file_stamps(eurlex_files(path))}
        return _generate(_eurlex_rows, kwargs, cache_dir, streaming)
    if split not in ("train", "test"):
        raise ValueError(f"data.eval_split={split!r}: text_format {fmt!r} has only train and test splits; "
                         "use data.eval_split=test (dev splits exist for eurlex)")
    if fmt == "raw":
        files = [raw_files(path, split)[0], raw_files(path, "train")[1], raw_files(path, "test")[1]]
        kwargs = {"folder": str(path), "split": split, "stamp": file_stamps(files)}  # no lists here: they would shard
        return _generate(_raw_rows, kwargs, cache_dir, streaming)
    if fmt == "jsonl":
        file = jsonl_file(path, split)
        names = jsonl_label_names(path)
        kwargs = {"path": str(file), "text_fields": tuple(text_fields), "num_labels": -1 if names is None else len(names),
                  "stamp": file_stamps([file])}
        return _generate(_jsonl_rows, kwargs, cache_dir, streaming)
    if fmt == "reuters":
        reuters_split(2, test_fraction, seed)  # checks test_fraction before any work
        kwargs = {"path": str(path), "split": split, "test_fraction": float(test_fraction), "seed": int(seed),
                  "stamp": file_stamps([path])}
        return _generate(_reuters_rows, kwargs, cache_dir, streaming)
    raise ValueError(f"data.text_format={fmt!r} is not known; choose one of {TEXT_FORMATS} or auto")


def label_names(fmt: str, path: Path, train: Any = None, test: Any = None) -> list[str]:
    """Names of label ids 0..C-1 (jsonl without lbl.json.gz: '0'..'C-1', C = largest id + 1)."""
    if fmt == "raw":
        return raw_label_names(path)
    if fmt == "reuters":
        return sorted({n for row in read_reuters_records(path)[1] for n in row})
    if fmt == "eurlex":
        return eurlex_label_names(path)
    names = jsonl_label_names(path)
    if names is not None:
        return names
    top = max((_max_label(ds) for ds in (train, test) if ds is not None), default=-1)
    return [str(i) for i in range(top + 1)]


def _max_label(ds: Any) -> int:
    import pyarrow.compute as pc

    flat = pc.list_flatten(ds.with_format("arrow")[:]["labels"])
    return -1 if len(flat) == 0 else int(pc.max(flat).as_py())


def load_text_splits(fmt: str, path: str | os.PathLike, text_fields: Sequence[str] = ("title", "content"),
                     test_fraction: float = 0.25, seed: int = 0, cache_dir: str | None = None,
                     eval_split: str = "test") -> TextSplits:
    """train and the eval split (test, or dev for eurlex) of a corpus, as TextSplits.train / .test
    (fmt 'auto' detects it: a file is reuters, train.jsonl.gz / labels.json eurlex, trn.json.gz jsonl)."""
    if eval_split not in EVAL_SPLITS:
        raise ValueError(f"data.eval_split={eval_split!r} is not known; choose one of {EVAL_SPLITS}")
    path = Path(path)
    fmt = detect_format(path) if fmt == "auto" else fmt
    common = dict(text_fields=text_fields, test_fraction=test_fraction, seed=seed, cache_dir=cache_dir)
    train, test = split_rows(fmt, path, "train", **common), split_rows(fmt, path, eval_split, **common)
    return TextSplits(train, test, label_names(fmt, path, train, test))


def write_label_map(path: str | os.PathLike, names: Sequence[str]) -> None:
    """label_map.json: {"num_labels": C, "names": [name of id 0, ...]}."""
    Path(path).write_text(json.dumps({"num_labels": len(names), "names": list(names)}, ensure_ascii=False, indent=0))


def read_label_map(path: str | os.PathLike) -> list[str]:
    obj = json.loads(Path(path).read_text())
    names = obj.get("names") if isinstance(obj, dict) else None
    if not isinstance(names, list) or len(names) != obj.get("num_labels") or len(set(names)) != len(names):
        raise TextFormatError(f"{path}: expected {{\"num_labels\": C, \"names\": [C distinct names]}} as written by "
                              "write_label_map; rewrite it from the data")
    return names
