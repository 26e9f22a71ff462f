import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_demo_runs_end_to_end_and_learns(tmp_path):
    """The README's main job, shrunk: both heads train, evaluate, and the tables are written."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "mhe_scale.cli", "train", "configs/demo/mhp_synthetic.yaml",
           "data.num_classes=600", "data.num_train=6000", "data.num_test=500", "model.hidden=128",
           "model.num_features=64", "train.epochs=3", "train.batch_size=128", f"train.output_dir={out}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| mhp |" in proc.stdout and "| fc |" in proc.stdout
    results = json.loads((out / "results.json").read_text())
    assert results["mhp"]["metrics"]["P@1"] > 0.5  # chance is ~1/600
    assert results["mhp"]["costs"]["head params (M)"] < results["fc"]["costs"]["head params (M)"]
    assert (out / "config.yaml").read_text().count("num_classes: 600") == 1


def test_train_reports_config_errors_cleanly():
    proc = subprocess.run([sys.executable, "-m", "mhe_scale.train", "configs/demo/mhp_synthetic.yaml", "head.sizez=[2]"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "head.sizez" in proc.stderr and "Traceback" not in proc.stderr
