"""tools/bench_classify.py and tools/bench_engine_overhead.py: their arguments, a tiny run of each (a
generated CIFAR-layout archive; a 3-step ResNet), the means they report, and fit == a plain loop."""

import json

import numpy as np
import pytest
import torch

from conftest import load_tool
from test_task_classify import write_archive


@pytest.fixture(scope="module")
def bench():
    return load_tool("bench_classify")


@pytest.fixture(scope="module")
def overhead():
    return load_tool("bench_engine_overhead")


def test_bench_classify_arguments(bench, tmp_path):
    args = bench.parse_args([])
    assert (args.epochs, args.limit_per_class, args.width, args.seeds) == (3.0, 500, 16, [0, 1, 2])
    assert args.heads == ["fc", "mhp", "mhc", "mhs"]
    args = bench.parse_args(["--epochs", "1", "--limit-per-class", "8", "--width", "4", "--seeds", "5",
                             "--heads", "mhp", "fc", "--json", str(tmp_path / "r.json")])
    assert (args.epochs, args.limit_per_class, args.width, args.seeds, args.heads) == (1.0, 8, 4, [5], ["mhp", "fc"])
    overrides = bench.run_overrides(args, "mhp", 5, tmp_path / "out", tmp_path / "cache")
    assert "head={name:mhp,sizes:[5,2]}" in overrides and "train.seed=5" in overrides
    assert "data.limit_per_class=8" in overrides and "model.width=4" in overrides and "train.save_every=0" in overrides
    for bad in (["--epochs", "0"], ["--heads", "nosuch"], ["--seeds", "1", "1"], ["--width", "0"]):
        with pytest.raises(SystemExit):
            bench.parse_args(bad)


def test_bench_classify_missing_archive_is_one_line_error(bench, tmp_path, capsys):
    assert bench.main(["--archive", str(tmp_path / "none.tar.gz")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --archive") and "\n" not in err


def test_bench_classify_tiny_run_reports_every_head_and_the_seed_means(bench, tmp_path):
    archive = write_archive(tmp_path / "images.tar.gz", per_class=8)
    common = ["--archive", str(archive), "--cache-dir", str(tmp_path / "cache"), "--epochs", "1",
              "--limit-per-class", "8", "--width", "4", "--batch-size", "8", "--quiet"]
    out = tmp_path / "all.json"
    assert bench.main([*common, "--seeds", "0", "--json", str(out)]) == 0
    heads = json.loads(out.read_text())["heads"]
    assert list(heads) == ["fc", "mhp", "mhc", "mhs"]
    for row in heads.values():
        assert 0.0 <= row["top1"] <= row["top5"] <= 1.0
        assert row["per seed"]["0"]["top1"] == row["top1"] and row["top1 std"] == 0.0
        assert row["head params"] > 0 and row["train s"] > 0
    assert heads["fc"]["head params"] == 32 * 6 + 6  # width 4 -> 8w = 32 features, 6 classes, with bias
    out = tmp_path / "two.json"
    assert bench.main([*common, "--heads", "mhp", "--seeds", "0", "1", "--json", str(out)]) == 0
    row = json.loads(out.read_text())["heads"]["mhp"]
    per_seed = [row["per seed"][s]["top1"] for s in ("0", "1")]
    assert row["top1"] == pytest.approx(np.mean(per_seed))
    assert row["top1 std"] == pytest.approx(np.std(per_seed, ddof=1))


def test_bench_engine_overhead_arguments(overhead):
    args = overhead.parse_args([])
    assert (args.steps, args.batch_size, args.width, args.repeats) == (40, 64, 16, 3)
    for bad in (["--steps", "0"], ["--repeats", "0"]):
        with pytest.raises(SystemExit):
            overhead.parse_args(bad)


def test_max_difference_sees_one_changed_element(overhead):
    a = {"w": torch.zeros(3, 2), "n": torch.tensor(4)}
    b = {"w": torch.zeros(3, 2), "n": torch.tensor(4)}
    assert overhead.max_difference(a, b) == 0.0
    b["w"][2, 1] = 1e-6
    assert overhead.max_difference(a, b) == pytest.approx(1e-6)
    assert overhead.max_difference(a, {"w": a["w"]}) == float("inf")


def test_fit_and_the_plain_loop_end_with_the_same_weights(overhead, capsys):
    res = overhead.run_benchmark(overhead.parse_args(["--steps", "3", "--batch-size", "8", "--width", "4",
                                                      "--repeats", "1"]))
    assert res["same weights"] and res["max weight diff"] == 0.0
    assert len(res["plain cpu s/step"]) == len(res["fit cpu s/step"]) == 1
    assert "| plain PyTorch |" in overhead.markdown(res)
