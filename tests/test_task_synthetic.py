"""The synthetic demo task's wiring: run folders and the printed note on what the data favours."""

from pathlib import Path

from mhe_scale.config import load_config

REPO = Path(__file__).resolve().parents[1]


def fake_runs(monkeypatch):
    """Replace training by a recorder of (head name, run folder); returns the record."""
    import mhe_scale.tasks.synthetic as task

    calls = []

    def train_one(cfg, head_cfg, data, accelerator, folder=None):
        calls.append((head_cfg.name, folder))
        return {"metrics": {"P@1": 0.5}, "costs": {"head params (M)": 1.0}}

    monkeypatch.setattr(task, "train_one", train_one)
    return calls


def test_baseline_with_the_heads_name_and_sizes_gets_its_own_folder_and_row(monkeypatch, tmp_path):
    from accelerate import Accelerator

    from mhe_scale.tasks.synthetic import run_folder, run_synthetic

    calls = fake_runs(monkeypatch)
    cfg = load_config(REPO / "configs/demo/mhp_synthetic.yaml",
                      ["data.num_classes=20", "data.num_train=40", "data.num_test=10", "head.sizes=[5,4]",
                       "eval.baseline.name=mhp", "eval.baseline.sizes=[5,4]", f"train.output_dir={tmp_path}"])
    results = run_synthetic(cfg, Accelerator(cpu=True))
    folders = [folder for _, folder in calls]
    assert len(folders) == 2 and folders[0] != folders[1] and None not in folders, folders
    assert folders == [run_folder(cfg.head), run_folder(cfg.eval.baseline, baseline=True)] == ["mhp-5x4",
                                                                                                "mhp-5x4-baseline"]
    assert list(results) == ["mhp [5, 4]", "mhp [5, 4] (baseline)"]


def test_demo_output_states_what_the_data_favours(monkeypatch, tmp_path, capsys):
    from accelerate import Accelerator

    from mhe_scale.tasks.synthetic import run_synthetic

    fake_runs(monkeypatch)
    base = ["data.num_classes=20", "data.num_train=40", "data.num_test=10", f"train.output_dir={tmp_path}"]
    run_synthetic(load_config(REPO / "configs/demo/mhp_synthetic.yaml", base), Accelerator(cpu=True))
    printed = " ".join(capsys.readouterr().out.split())  # the note is wrapped at 100 columns
    assert "shuffle_label_ids=false" in printed and "favour it by construction" in printed
    assert "64.47" in printed and "75.10" in printed  # the shuffled-id result it points to
    assert "favour it by construction" in " ".join((tmp_path / "results.md").read_text().split())
    run_synthetic(load_config(REPO / "configs/demo/mhp_synthetic.yaml", base + ["data.shuffle_label_ids=true"]),
                  Accelerator(cpu=True))
    printed = " ".join(capsys.readouterr().out.split())
    assert "shuffle_label_ids=true" in printed and "random permutation" in printed
    assert "favour it by construction" not in printed
