"""Streamed raw-text training (data.streaming=true): per-epoch shuffled, rank-disjoint, reproducible
micro-batches; the counting pass against the cached split; and a streamed end-to-end text run."""

import json
from pathlib import Path

import pytest
import torch

from mhe_scale.config import load_config
from mhe_scale.data.text_stream import TextBatchStream, count_rows_and_labels
from mhe_scale.data.xmc_text import split_rows
from mhe_scale.tasks.xmc_text import load_text_xmc

from test_xmc_text import REPO, WORDS, toy_raw, train_on_toy_corpus, write_raw


@pytest.fixture(scope="module")
def tokenizer():
    from mhe_scale.models.text import load_tokenizer

    return load_tokenizer("minilm")


def numbered_corpus(folder: Path, n: int) -> None:
    """Document i says 'item i' (a unique text) and has labels i % 8 and (i // 8) % 8."""
    rows = [(f"item {i} about {WORDS[i % 8]}", f"{WORDS[i % 8]} {WORDS[(i // 8) % 8]}") for i in range(n)]
    write_raw(folder, rows, rows[:4])


def epoch_rows(stream, epoch, rank=0, world=1, micro=4, seed=7):
    """The documents (as token tuples) of each micro-batch, padding stripped."""
    out = []
    for inputs, targets in stream.batches(epoch, rank, world, micro, seed):
        assert inputs["input_ids"].shape[0] == len(targets) == micro
        out.append([tuple(ids[mask.bool()].tolist()) for ids, mask in zip(inputs["input_ids"], inputs["attention_mask"])])
    return out


def test_epochs_are_shuffled_reproducible_and_rank_disjoint(tmp_path, tokenizer):
    numbered_corpus(tmp_path / "data", 30)
    rows = split_rows("raw", tmp_path / "data", "train", streaming=True)
    stream = TextBatchStream(rows, 30, tokenizer, max_length=16, shuffle_buffer=64)
    first = epoch_rows(stream, 0)
    assert len(first) == 7  # 30 // 4 full micro-batches; the short one is dropped
    docs = [d for batch in first for d in batch]
    assert len(set(docs)) == 28
    assert epoch_rows(stream, 0) == first  # a function of (seed, epoch): what resume relies on
    assert epoch_rows(stream, 1) != first
    assert epoch_rows(stream, 0, seed=8) != first
    ranks = [{d for batch in epoch_rows(stream, 0, rank=r, world=2) for d in batch} for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 12 and not ranks[0] & ranks[1]  # 15 rows each -> 3 batches of 4
    assert ranks[0] | ranks[1] <= set(docs) | {d for b in epoch_rows(stream, 0, micro=1) for d in b}
    unshuffled = TextBatchStream(rows, 30, tokenizer, max_length=16, shuffle_buffer=1)
    assert epoch_rows(unshuffled, 0, micro=1)[:3] == epoch_rows(unshuffled, 5, micro=1)[:3]  # file order


def test_counting_pass_matches_the_labels(tmp_path):
    numbered_corpus(tmp_path / "data", 30)
    n, counts = count_rows_and_labels(split_rows("raw", tmp_path / "data", "train", streaming=True))
    assert n == 30
    # label names are sorted words; the file's labels are WORDS[i % 8] and WORDS[(i // 8) % 8] (once if equal)
    names = sorted(WORDS)
    want = torch.zeros(8, dtype=torch.long)
    for i in range(30):
        for w in {WORDS[i % 8], WORDS[(i // 8) % 8]}:
            want[names.index(w)] += 1
    assert torch.equal(counts, want)


def test_streamed_data_has_the_cached_statistics(tmp_path, tokenizer):
    toy_raw(tmp_path / "data", n_train=40, n_test=16)
    overrides = [f"data.path={tmp_path / 'data'}", "data.text_format=raw", "data.max_length=16",
                 f"data.cache_dir={tmp_path / 'cache'}"]
    config = REPO / "configs" / "xmc" / "reuters_minilm.yaml"
    cached = load_text_xmc(load_config(config, overrides).data, tokenizer)
    streamed = load_text_xmc(load_config(config, [*overrides, "data.streaming=true"]).data, tokenizer)
    assert isinstance(streamed.train, TextBatchStream) and len(streamed.train) == len(cached.train) == 40
    assert streamed.label_names == cached.label_names
    assert torch.equal(streamed.label_counts, cached.label_counts)
    assert torch.equal(streamed.inv_propensity, cached.inv_propensity)
    assert torch.equal(streamed.test.batch(range(16))[1], cached.test.batch(range(16))[1])


def test_streamed_text_task_end_to_end(tmp_path):
    out = train_on_toy_corpus(tmp_path, "data.streaming=true", "data.shuffle_buffer=16", "eval.baseline=null",
                              "train.epochs=2", "train.log_every=1")
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"mhc", "most frequent (train)"}
    assert all(0.0 <= v <= 1.0 for v in results["mhc"]["metrics"].values())
    steps = [json.loads(line)["step"] for line in (out / "mhc" / "loss_log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))  # 32 // 8 = 4 steps per epoch, 2 epochs
