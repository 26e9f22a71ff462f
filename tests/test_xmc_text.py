"""Raw-text XMC: the raw / JSON-lines / Reuters readers against hand-built files and naive
references (errors naming file:line), the label map, the tokenisation cache, padding, streaming,
the HF encoder on the real MiniLM, the dataset configs, and a tiny end-to-end text run."""

import gzip
import json
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from mhe_scale.config import load_config
from mhe_scale.data import text_batches
from mhe_scale.data.text_batches import TokenizedTextDataset, collate_text, iter_text_batches, pad_ragged, tokenize
from mhe_scale.data.xmc_text import (TextFormatError, detect_format, load_text_splits, read_label_map, reuters_split,
                                     split_rows, write_label_map)

REPO = Path(__file__).resolve().parents[1]
WORDS = ["grain", "wheat", "oil", "crude", "gold", "money", "ship", "trade"]


def rows_of(ds) -> list[tuple[str, list[int]]]:
    return list(zip(ds["text"], ds["labels"]))


def write_raw(folder: Path, train: list[tuple[str, str]], test: list[tuple[str, str]], texts_name: str = "raw_texts"):
    folder.mkdir(parents=True, exist_ok=True)
    for split, rows in (("train", train), ("test", test)):
        (folder / f"{split}_{texts_name}.txt").write_text("".join(t + "\n" for t, _ in rows))
        (folder / f"{split}_labels.txt").write_text("".join(lab + "\n" for _, lab in rows))


def toy_raw(folder: Path, n_train: int = 40, n_test: int = 16, seed: int = 0) -> None:
    """Learnable toy corpus: a document names its labels' words; label names are those words."""
    gen = torch.Generator().manual_seed(seed)
    rows = {}
    for split, n in (("train", n_train), ("test", n_test)):
        out = []
        for _ in range(n):
            labs = sorted({WORDS[int(i)] for i in torch.randint(0, len(WORDS), (2,), generator=gen)})
            out.append((f"news about {' and '.join(labs)} markets today", " ".join(labs)))
        rows[split] = out
    write_raw(folder, rows["train"], rows["test"])


@pytest.fixture(scope="module")
def tokenizer():
    from mhe_scale.models.text import load_tokenizer

    return load_tokenizer("minilm")


# ------------------------------------------------------------------ readers
def test_raw_reader_rows_and_sorted_label_map(tmp_path):
    train = [("first doc", "b a"), ("second doc", "c"), ("", "a a")]  # repeated name counts once
    test = [("third doc", "d b")]
    write_raw(tmp_path, train, test)
    (tmp_path / "train_texts.txt").write_text("ignored when raw texts exist\n" * 3)
    splits = load_text_splits("auto", tmp_path, cache_dir=str(tmp_path / "cache"))
    assert detect_format(tmp_path) == "raw"
    names = sorted({n for _, lab in train + test for n in lab.split()})
    assert splits.label_names == names == ["a", "b", "c", "d"]
    want = lambda rows: [(t, list(dict.fromkeys(names.index(n) for n in lab.split()))) for t, lab in rows]
    assert rows_of(splits.train) == want(train)
    assert rows_of(splits.test) == want(test)


def test_raw_reader_falls_back_to_texts_txt(tmp_path):
    write_raw(tmp_path, [("x y", "l1")], [("z", "l2 l1")], texts_name="texts")
    splits = load_text_splits("raw", tmp_path, cache_dir=str(tmp_path / "cache"))
    assert rows_of(splits.test) == [("z", [1, 0])]


@pytest.mark.parametrize("short", ["labels", "texts"])
def test_raw_reader_line_count_mismatch_names_file_and_line(tmp_path, short):
    write_raw(tmp_path, [("a", "x"), ("b", "y"), ("c", "x")], [("d", "y")])
    victim = tmp_path / ("train_labels.txt" if short == "labels" else "train_raw_texts.txt")
    victim.write_text("".join(victim.read_text().splitlines(keepends=True)[:2]))
    with pytest.raises(TextFormatError) as info:
        load_text_splits("raw", tmp_path, cache_dir=str(tmp_path / "cache"))
    other = "train_raw_texts.txt:3" if short == "labels" else "train_labels.txt:3"
    assert other in str(info.value) and "one line per document" in str(info.value)


def test_raw_reader_bad_utf8_names_line(tmp_path):
    write_raw(tmp_path, [("a", "x"), ("b", "y")], [("d", "y")])
    (tmp_path / "train_raw_texts.txt").write_bytes(b"fine\ncaf\xe9 latin1\n")
    with pytest.raises(TextFormatError, match=r"train_raw_texts\.txt:2: not valid UTF-8.*iconv"):
        load_text_splits("raw", tmp_path, cache_dir=str(tmp_path / "cache"))


def write_jsonl(path: Path, objs: list, raw_lines: list[str] = ()) -> None:
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for o in objs:
            f.write(json.dumps(o) + "\n")
        for line in raw_lines:
            f.write(line + "\n")


def test_jsonl_reader_text_fields_and_label_names(tmp_path):
    trn = [{"uid": "u1", "title": "T one", "content": "body one", "target_ind": [2, 0, 2], "target_rel": [1, 1, 1]},
           {"uid": "u2", "title": "T two", "content": "", "target_ind": []}]
    tst = [{"uid": "u3", "title": "T three", "content": "body three", "target_ind": [1]}]
    write_jsonl(tmp_path / "trn.json.gz", trn)
    write_jsonl(tmp_path / "tst.json.gz", tst)
    splits = load_text_splits("auto", tmp_path, cache_dir=str(tmp_path / "c1"))
    assert detect_format(tmp_path) == "jsonl"
    assert rows_of(splits.train) == [("T one body one", [2, 0]), ("T two ", [])]
    assert splits.label_names == ["0", "1", "2"]  # no lbl.json.gz: ids up to the largest seen
    write_jsonl(tmp_path / "lbl.json.gz", [{"uid": f"l{i}", "title": f"label {i}"} for i in range(4)])
    titles = load_text_splits("jsonl", tmp_path, text_fields=["title"], cache_dir=str(tmp_path / "c2"))
    assert rows_of(titles.test) == [("T three", [1])]
    assert titles.label_names == ["label 0", "label 1", "label 2", "label 3"]


@pytest.mark.parametrize("line, match", [
    ('{"uid": 1, "title": "t", "content": "c", "target_ind": [0]', r"tst\.json\.gz:2: not a JSON object"),
    ('{"uid": 1, "title": "t", "content": "c"}', r"tst\.json\.gz:2: the object lacks \['target_ind'\]"),
    ('{"uid": 1, "title": "t", "target_ind": [0]}', r"tst\.json\.gz:2: the object lacks \['content'\]"),
    ('{"uid": 1, "title": "t", "content": "c", "target_ind": ["3"]}', r"tst\.json\.gz:2: target_ind must be a list"),
    ('{"uid": 1, "title": "t", "content": "c", "target_ind": [0, 5]}', r"tst\.json\.gz:2: label ids \[5\] outside"),
    ('[1, 2]', r"tst\.json\.gz:2: expected a JSON object per line"),
])
def test_jsonl_malformed_line_names_file_and_line(tmp_path, line, match):
    good = {"uid": 0, "title": "t", "content": "c", "target_ind": [1]}
    write_jsonl(tmp_path / "trn.json.gz", [good])
    write_jsonl(tmp_path / "tst.json.gz", [good], [line])
    write_jsonl(tmp_path / "lbl.json.gz", [{"title": f"x{i}"} for i in range(3)])
    with pytest.raises(TextFormatError, match=match):
        load_text_splits("jsonl", tmp_path, cache_dir=str(tmp_path / "cache"))


def test_reuters_split_is_a_seeded_partition():
    tr, te = reuters_split(3019, 0.25, seed=0)
    assert (len(tr), len(te)) == (2264, 755)
    assert sorted(tr.tolist() + te.tolist()) == list(range(3019))
    again = reuters_split(3019, 0.25, seed=0)
    assert (again[0] == tr).all() and (again[1] == te).all()
    assert not (reuters_split(3019, 0.25, seed=1)[1] == te).all()
    with pytest.raises(ValueError, match="test_fraction"):
        reuters_split(10, 1.0, 0)


def test_reuters_reader_on_generated_array(tmp_path):
    records = [{"id": f"test/{i}", "text": f"story {i}", "labels": [["b", "a"], ["c"], ["a"]][i % 3]} for i in range(8)]
    path = tmp_path / "reuters.json"
    path.write_text(json.dumps(records))
    splits = load_text_splits("auto", path, test_fraction=0.25, seed=3, cache_dir=str(tmp_path / "cache"))
    tr, te = reuters_split(8, 0.25, 3)
    want = lambda ids: [(records[i]["text"], [["a", "b", "c"].index(n) for n in records[i]["labels"]]) for i in ids]
    assert rows_of(splits.train) == want(tr) and rows_of(splits.test) == want(te)
    path.write_text(json.dumps(records[:2] + [{"id": "test/x", "text": 3, "labels": []}]))
    with pytest.raises(TextFormatError, match=r"reuters\.json: record 2 \(id test/x\)"):
        load_text_splits("reuters", path, cache_dir=str(tmp_path / "cache2"))


def test_reuters_shared_file(shared_data, tmp_path):
    path = shared_data / "reuters21578-modapte-test" / "test_data.json"
    splits = load_text_splits("auto", path, cache_dir=str(tmp_path / "cache"))
    assert (len(splits.train), len(splits.test), len(splits.label_names)) == (2264, 755, 90)
    counts = [len(x) for x in list(splits.train["labels"]) + list(splits.test["labels"])]
    assert min(counts) >= 1 and abs(sum(counts) / len(counts) - 1.24) < 0.01  # SOURCE.md: 1.24 labels/doc


def test_label_map_round_trip(tmp_path):
    names = ["zeta", "älpha", "b c", "0"]
    write_label_map(tmp_path / "label_map.json", names)
    assert read_label_map(tmp_path / "label_map.json") == names
    (tmp_path / "bad.json").write_text(json.dumps({"num_labels": 2, "names": ["a", "a"]}))
    with pytest.raises(TextFormatError, match="bad.json"):
        read_label_map(tmp_path / "bad.json")


# ------------------------------------------------------------------ tokenisation, padding, streaming
def test_tokenize_second_load_is_a_cache_hit(tmp_path, tokenizer, monkeypatch):
    toy_raw(tmp_path / "data")
    cache = str(tmp_path / "cache")
    first = tokenize(load_text_splits("raw", tmp_path / "data", cache_dir=cache).train, tokenizer, 6, cache_dir=cache)
    want = tokenizer(list(load_text_splits("raw", tmp_path / "data", cache_dir=cache).train["text"]), truncation=True,
                     max_length=6)["input_ids"]
    assert list(first["input_ids"]) == want and max(len(x) for x in want) == 6  # truncated, [SEP] kept

    def refuse(*args, **kwargs):
        raise AssertionError("tokenised again although the cache holds this split")

    monkeypatch.setattr(text_batches, "_tokenize_batch", refuse)
    again = tokenize(load_text_splits("raw", tmp_path / "data", cache_dir=cache).train, tokenizer, 6, cache_dir=cache)
    assert again.cache_files == first.cache_files and list(again["input_ids"]) == want
    with pytest.raises(Exception):  # another max_length is another cache entry: tokenises (and refuses)
        tokenize(load_text_splits("raw", tmp_path / "data", cache_dir=cache).train, tokenizer, 7, cache_dir=cache)


def naive_pad(lists, pad):
    width = max([1] + [len(x) for x in lists])
    return torch.tensor([list(x) + [pad] * (width - len(x)) for x in lists])


def test_pad_ragged_and_collate_match_naive():
    lists = [[5, 6, 7], [], [8], [9, 10]]
    flat = torch.tensor([v for x in lists for v in x])
    assert torch.equal(pad_ragged(flat, torch.tensor([len(x) for x in lists]), -1), naive_pad(lists, -1))
    assert torch.equal(pad_ragged(torch.zeros(0, dtype=torch.long), torch.tensor([0, 0]), -1), torch.full((2, 1), -1))
    rows = [{"input_ids": [101, 7, 102], "labels": [4, 1]}, {"input_ids": [101, 102], "labels": []}]
    inputs, targets = collate_text(rows, pad_token_id=0)
    assert torch.equal(inputs["input_ids"], torch.tensor([[101, 7, 102], [101, 102, 0]]))
    assert torch.equal(inputs["attention_mask"], torch.tensor([[1, 1, 1], [1, 1, 0]]))
    assert torch.equal(targets, torch.tensor([[4, 1], [-1, -1]]))


def test_dataset_batches_through_dataloader(tmp_path, tokenizer):
    toy_raw(tmp_path / "data", n_train=23)
    cache = str(tmp_path / "cache")
    tokens = tokenize(load_text_splits("raw", tmp_path / "data", cache_dir=cache).train, tokenizer, 12, cache_dir=cache)
    ds = TokenizedTextDataset(tokens, pad_token_id=tokenizer.pad_token_id)
    order = [7, 0, 22, 7, 3]
    want = collate_text([tokens[i] for i in order], tokenizer.pad_token_id)
    (inputs, targets), = list(DataLoader(ds, batch_sampler=[order]))
    assert torch.equal(inputs["input_ids"], want[0]["input_ids"]) and torch.equal(targets, want[1])
    assert torch.equal(inputs["attention_mask"], want[0]["attention_mask"])
    single, y = ds[3]  # one point: padded to the split's longest text / label list
    n = len(tokens[3]["input_ids"])
    assert single["input_ids"].shape == (max(len(x) for x in tokens["input_ids"]),)
    assert single["input_ids"][:n].tolist() == tokens[3]["input_ids"] and single["attention_mask"].sum() == n
    assert y[y >= 0].tolist() == tokens[3]["labels"] and len(y) == max(len(x) for x in tokens["labels"])
    chunks = list(ds.label_batches(batch_size=10))
    assert [len(c) for c in chunks] == [10, 10, 3]
    assert [row[row >= 0].tolist() for c in chunks for row in c] == list(tokens["labels"])


def test_streaming_matches_the_cached_split(tmp_path, tokenizer):
    toy_raw(tmp_path / "data", n_train=11)
    stream = tokenize(split_rows("raw", tmp_path / "data", "train", streaming=True), tokenizer, 12)
    batches = list(iter_text_batches(stream, batch_size=4, pad_token_id=tokenizer.pad_token_id))
    assert [len(t) for _, t in batches] == [4, 4, 3]
    cached = TokenizedTextDataset(tokenize(load_text_splits("raw", tmp_path / "data", cache_dir=str(tmp_path / "c"))
                                           .train, tokenizer, 12), tokenizer.pad_token_id)
    inputs, targets = cached.batch(range(8, 11))
    assert torch.equal(batches[-1][0]["input_ids"], inputs["input_ids"]) and torch.equal(batches[-1][1], targets)


# ------------------------------------------------------------------ encoder
@pytest.mark.parametrize("k", [1, 2])
def test_hf_encoder_concatenates_last_k_cls(tokenizer, k):
    from mhe_scale.models.text import HFTextEncoder

    enc = HFTextEncoder("minilm", last_k_cls=k, dropout=0.5).eval()
    batch = tokenizer(["Wheat exports rose.", "Gold fell sharply in London trading today."], padding=True,
                      return_tensors="pt")
    feats = enc.forward_features(dict(batch))
    assert enc.num_features == k * 384 and feats.shape == (2, k * 384)
    with torch.no_grad():
        states = enc.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).hidden_states
    want = torch.cat([states[-1 - j][:, 0] for j in range(k)], dim=1)  # last layer first
    torch.testing.assert_close(feats, want)
    if k == 2:
        enc.pooling = "mean"
        mean = enc.forward_features(dict(batch))
        for i in range(2):  # naive masked mean per row
            n = int(batch["attention_mask"][i].sum())
            torch.testing.assert_close(mean[i, :384], states[-1][i, :n].mean(0), rtol=1e-5, atol=1e-6)


def test_hf_encoder_freezing_and_refusals():
    from mhe_scale.models.text import HFTextEncoder, resolve_model_path

    enc = HFTextEncoder("minilm", last_k_cls=1, freeze_layers=5)
    trainable = {n.split(".")[2] for n, p in enc.model.named_parameters() if p.requires_grad}
    assert trainable == {"5"}  # encoder.layer.5.* only
    batch = {"input_ids": torch.tensor([[101, 2054, 2003, 102]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    torch.manual_seed(0)
    want = enc.train().forward_features(batch)
    enc.set_grad_checkpointing(True)
    assert any(getattr(m, "gradient_checkpointing", False) for m in enc.model.modules())
    torch.manual_seed(0)  # same dropout masks: recomputation must not change the values
    got = enc.forward_features(batch)
    got.sum().backward()
    torch.testing.assert_close(got, want)
    assert enc.model.encoder.layer[5].output.dense.weight.grad is not None
    assert enc.model.encoder.layer[4].output.dense.weight.grad is None  # frozen: backward stops above it
    with pytest.raises(FileNotFoundError, match="never downloads"):
        resolve_model_path("bert-base-uncased")
    with pytest.raises(ValueError, match="last_k_cls=7"):
        HFTextEncoder("minilm", last_k_cls=7)


# ------------------------------------------------------------------ configs and the task
STANDARD = {"eurlex4k": [3956], "wiki10_31k": [30938], "amazoncat13k": [13330], "wiki500k": [501008, 501070],
            "amazon670k": [670091], "amazon3m": [2812281]}  # label counts of the raw-text releases


@pytest.mark.parametrize("name", sorted(STANDARD) + ["reuters_minilm"])
def test_text_configs_load_and_heads_cover_the_labels(name):
    from mhe_scale.heads.mhc import cascade_sizes

    cfg = load_config(REPO / "configs" / "xmc" / f"{name}.yaml")
    assert cfg.data.name == "xmc_text" and cfg.model.name == "hf"
    for c in STANDARD.get(name, [90]):
        if cfg.head.name == "mhc":
            sizes = cascade_sizes(c, cfg.head.sizes, 2, cfg.head.num_groups)
            assert sizes[0] * sizes[1] >= c and sizes[0] * sizes[1] - c < sizes[1]  # no all-padding group


def train_on_toy_corpus(tmp_path: Path, *overrides: str) -> Path:
    """The Reuters MiniLM config on a 32 + 12 document toy corpus, tiny head; returns the run folder."""
    from mhe_scale.train import main

    toy_raw(tmp_path / "data", n_train=32, n_test=12)
    out = tmp_path / "run"
    code = main([str(REPO / "configs" / "xmc" / "reuters_minilm.yaml"), f"data.path={tmp_path / 'data'}",
                 "data.text_format=raw", "data.max_length=32", f"data.cache_dir={tmp_path / 'cache'}",
                 "head.num_groups=3", "head.top_k_groups=2", "head.hidden=16", "train.batch_size=8",
                 "train.eval_batch_size=16", "train.epochs=1", "train.threads=1", f"train.output_dir={out}",
                 *overrides])
    assert code == 0
    return out


def test_text_task_end_to_end(tmp_path):
    out = train_on_toy_corpus(tmp_path)
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"mhc", "fc", "most frequent (train)"}
    for row in results.values():
        assert all(0.0 <= v <= 1.0 for v in row["metrics"].values())
    assert results["fc"]["costs"]["head params (K)"] == pytest.approx((768 * 8 + 8) / 1e3)
    assert read_label_map(out / "label_map.json") == sorted(WORDS)
    assert (out / "mhc" / "loss_log.jsonl").is_file() and len((out / "mhc" / "loss_log.jsonl").read_text().splitlines()) == 4
