"""EURLEX57K reader (text_format eurlex): both layouts give the same rows (against a naive
reference built from the generated documents), the label id space is the sorted union of every
split, streaming yields the same rows, errors name the file and line, and the real corpus's
counts match its SOURCE.md."""

import gzip
import json
from pathlib import Path

import pytest

from eurlex_corpus import CONCEPTS, TEST_ONLY, joined_text, make_docs, write_folders, write_jsonl
from mhe_scale.data.xmc_text import (TextFormatError, detect_format, eurlex_label_ids, label_names, load_text_splits,
                                     split_rows)

SIZES = {"train": 30, "dev": 8, "test": 10}


def rows_of(ds) -> list[tuple[str, list[int]]]:
    return [(r["text"], r["labels"]) for r in ds]


def naive_rows(docs: dict[str, list[dict]], split: str) -> list[tuple[str, list[int]]]:
    used = sorted({c for rows in docs.values() for d in rows for c in d["concepts"]}, key=int)
    return [(joined_text(d), [used.index(c) for c in d["concepts"]]) for d in docs[split]]


@pytest.fixture()
def docs():
    return make_docs(SIZES)


@pytest.mark.parametrize("layout", ["jsonl", "folders"])
def test_both_layouts_read_the_naive_rows(tmp_path, docs, layout):
    folder = (write_jsonl if layout == "jsonl" else write_folders)(tmp_path / layout, docs)
    assert detect_format(folder) == "eurlex"
    for split in ("train", "dev", "test"):
        got = rows_of(split_rows("eurlex", folder, split, cache_dir=str(tmp_path / "cache")))
        assert got == naive_rows(docs, split)
    splits = load_text_splits("auto", folder, cache_dir=str(tmp_path / "cache"), eval_split="dev")
    assert rows_of(splits.test) == naive_rows(docs, "dev")
    used = sorted({c for rows in docs.values() for d in rows for c in d["concepts"]}, key=int)
    assert splits.label_names == [f"name of {c} [{c}]" for c in used]


def test_layouts_agree_and_streaming_yields_the_same_rows(tmp_path, docs):
    a, b = write_jsonl(tmp_path / "a", docs), write_folders(tmp_path / "b", docs)
    for split in ("train", "test"):
        cached = rows_of(split_rows("eurlex", a, split, cache_dir=str(tmp_path / "c")))
        assert cached == rows_of(split_rows("eurlex", b, split, cache_dir=str(tmp_path / "c")))
        assert cached == rows_of(split_rows("eurlex", a, split, streaming=True))
        assert cached == rows_of(split_rows("eurlex", b, split, streaming=True))


def test_label_space_is_the_union_of_all_splits_numeric_order(tmp_path, docs):
    folder = write_jsonl(tmp_path, docs)
    ids = eurlex_label_ids(folder)
    train_ids = {c for d in docs["train"] for c in d["concepts"]}
    assert ids == sorted(ids, key=int) and set(TEST_ONLY) <= set(ids) and not TEST_ONLY & train_ids
    assert len(label_names("eurlex", folder)) == len(ids)
    assert ids[0] == CONCEPTS[0]  # "100" before "107" ... numerically, not as strings


def test_dev_is_refused_for_formats_without_it(tmp_path):
    (tmp_path / "train_raw_texts.txt").write_text("a\n")
    (tmp_path / "train_labels.txt").write_text("x\n")
    with pytest.raises(ValueError, match="data.eval_split='dev'.*only train and test"):
        split_rows("raw", tmp_path, "dev")


def _rewrite_line(path: Path, lineno: int, new: str) -> None:
    lines = gzip.open(path, "rt").read().splitlines()
    lines[lineno - 1] = new
    with gzip.open(path, "wt") as f:
        f.write("\n".join(lines) + "\n")


@pytest.mark.parametrize("line, message", [
    ("{not json", "not a JSON object"),
    ('{"celex_id": "x", "text": "  ", "labels": ["100"]}', "document without text"),
    ('{"celex_id": "x", "text": "some text", "labels": []}', "document without labels"),
    ('{"celex_id": "x", "text": "some text", "labels": ["100", "555"]}', r"label ids \['555'\] are not in"),
])
def test_bad_jsonl_line_names_file_and_line(tmp_path, docs, line, message):
    folder = write_jsonl(tmp_path, docs)
    _rewrite_line(folder / "dev.jsonl.gz", 3, line)
    with pytest.raises(TextFormatError, match=message) as info:
        load_text_splits("eurlex", folder, cache_dir=str(tmp_path / "cache"))
    assert str(info.value).startswith(f"{folder / 'dev.jsonl.gz'}:3: ")
    assert "\n" not in str(info.value)


def test_bad_document_file_is_named(tmp_path, docs):
    folder = write_folders(tmp_path, docs)
    victim = folder / "train" / f"{docs['train'][4]['celex_id']}.json"
    doc = json.loads(victim.read_text())
    victim.write_text(json.dumps(doc | {"header": "", "recitals": "", "main_body": [], "attachments": ""}))
    with pytest.raises(TextFormatError, match="document without text") as info:
        split_rows("eurlex", folder, "train", cache_dir=str(tmp_path / "cache"))
    assert str(info.value).startswith(f"{victim}: ")
    victim.write_text(json.dumps(doc | {"concepts": ["100", "nope"]}))
    with pytest.raises(TextFormatError, match=rf"{victim}: label ids \['nope'\]"):
        split_rows("eurlex", folder, "train", cache_dir=str(tmp_path / "cache"))


def test_missing_descriptor_file_is_named(tmp_path, docs):
    folder = write_jsonl(tmp_path, docs)
    (folder / "labels.json").unlink()
    with pytest.raises(TextFormatError, match="no labels.json"):
        eurlex_label_ids(folder)


def test_real_corpus_counts_match_source_md(shared_data, tmp_path):
    folder = shared_data / "eurlex57k"
    if not (folder / "train.jsonl.gz").is_file():
        pytest.skip("EURLEX57K not in ../shared/data")
    assert len(eurlex_label_ids(folder)) == 4271  # the union of the three splits (SOURCE.md)
