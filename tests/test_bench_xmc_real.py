"""tools/bench_xmc_real.py on the smallest shipped dataset (Medical, ../shared/data): the table and
JSON it writes, and that the means it reports are the means of the seeds it ran."""

import json

import pytest

from conftest import load_tool


def test_bench_reports_the_mean_of_its_seeds(shared_data, tmp_path, capsys):
    out = tmp_path / "bench.json"
    bench = load_tool("bench_xmc_real")
    code = bench.main(["--data-root", str(shared_data), "--datasets", "medical", "--heads", "fc", "mhc",
                       "--seeds", "0", "1", "--json", str(out),
                       "--set", "train.epochs=10", f"train.output_dir={tmp_path / 'runs'}"])
    assert code == 0
    rows = json.loads(out.read_text())["medical"]
    assert set(rows) == {"fc", "mhc", "most frequent"}
    for head in ("fc", "mhc"):
        per_seed = rows[head]["per seed"]
        assert set(per_seed) == {"0", "1"}
        for key, mean in rows[head]["metrics"].items():
            assert mean == pytest.approx((per_seed["0"][key] + per_seed["1"][key]) / 2)
            assert 0.0 <= mean <= 1.0
    assert rows["fc"]["metrics"]["P@1"] > rows["most frequent"]["metrics"]["P@1"]
    table = capsys.readouterr().out
    assert "| medical | fc |" in table and "| medical | mhc |" in table
