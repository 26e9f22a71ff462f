"""tools/bench_eurlex.py on a generated EURLEX57K-like slice (a few hundred documents, seconds): every
row of the table, choices made on dev (the kNN k is the dev argmax), the unseen-label count, and a
one-line error for a corpus it cannot read."""

import gzip
import json

from conftest import load_tool
from eurlex_corpus import TEST_ONLY, make_docs, write_jsonl


def test_bench_table_on_a_slice(tmp_path, capsys):
    docs = make_docs({"train": 160, "dev": 40, "test": 40}, seed=2)
    folder = write_jsonl(tmp_path / "eurlex", docs)
    bench = load_tool("bench_eurlex")
    out = tmp_path / "eurlex57k.json"
    rc = bench.main(["--data", str(folder), "--cache-dir", str(tmp_path / "cache"), "--seeds", "0", "1",
                     "--groups", "4", "--candidates", "1", "--heads", "fc", "mhc", "mhc_cluster", "mhp", "--knn-k", "1", "3", "--ridge-alpha", "0.1", "1",
                     "--ridge-features", "20", "--json", str(out),
                     "--set", "model.hidden=16", "model.num_features=8", "head.hidden=8", "train.epochs=1",
                     "train.batch_size=32", "data.min_df=1"])
    assert rc == 0
    record = json.loads(out.read_text())
    rows = record["rows"]
    assert list(rows)[:3] == ["most frequent (train)", "TF-IDF kNN", "OvR ridge (TF-IDF)"]
    assert {"fc (full BCE)", "mhp (2 heads; caveat: digits shared by many labels)"} <= set(rows)
    assert sum(name.startswith("mhc G=4 K=1") for name in rows) == 2  # given and cluster label order
    knn = rows["TF-IDF kNN"]
    assert knn["choice"]["k"] == int(max(knn["dev sweep"], key=knn["dev sweep"].get))
    for row in rows.values():
        assert all(0.0 <= row["metrics"][c] <= 1.0 for c in bench.COLUMNS)
    assert set(rows["fc (full BCE)"]["per seed"]) == {"0", "1"} and "std" in rows["fc (full BCE)"]
    unseen = {c for d in docs["test"] for c in d["concepts"]} & TEST_ONLY
    assert record["data"]["test labels never in train"] == len(unseen) > 0
    assert record["command"].startswith("python tools/bench_eurlex.py --data") and record["torch"]
    table = capsys.readouterr().out
    assert "| published: BERT-base" in table and "| 79.6 | 82.3 | - | 73.2 |" in table


def test_bench_bad_corpus_is_one_line(tmp_path, capsys):
    docs = make_docs({"train": 10, "dev": 4, "test": 4})
    folder = write_jsonl(tmp_path / "eurlex", docs)
    with gzip.open(folder / "test.jsonl.gz", "at") as f:
        f.write('{"celex_id": "x", "text": "t", "labels": ["31337"]}\n')
    rc = load_tool("bench_eurlex").main(["--data", str(folder), "--cache-dir", str(tmp_path / "c")])
    err = capsys.readouterr().err.strip()  # (datasets' progress bars go to stderr too)
    assert rc == 2 and "Traceback" not in err
    assert err.splitlines()[-1].startswith(f"error: {folder / 'test.jsonl.gz'}:5: label ids ['31337']")
