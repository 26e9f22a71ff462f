"""p*: training GeM's p alone moves it where the classifier works, leaving everything else as it
was; the cross-validation alternative picks the best p of a grid; per-class subsets."""

import torch
from torch import nn

from mhe_scale.models.gem import GeM, GeMBackbone
from mhe_scale.tasks.multigrain import MultiGrainModel, cross_validate_p, finetune_p, per_class_subset


class MapIsInput(nn.Module):
    """A 'backbone' whose feature map is its input [B, 1, h, w] (num_features 1), with a BN to check eval mode."""

    num_features = 1

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(1)

    def forward_feature_map(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(x)


def peaky_vs_flat(n=32, seed=0):
    """Class 0: one activation of 16 on a 4x4 map; class 1: all ones. Same mean: p = 1 cannot tell
    them apart, GeM_p(class 0) = 16^(1 - 1/p) grows with p."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=g)
    x = torch.ones(n, 1, 4, 4)
    x[labels == 0] = 0
    pos = torch.randint(0, 16, (n,), generator=g)
    for i in torch.nonzero(labels == 0).view(-1).tolist():
        x[i, 0, pos[i] // 4, pos[i] % 4] = 16
    return x, labels


def model(p=1.0):
    m = MultiGrainModel(GeMBackbone(MapIsInput(), GeM(p)), 2)
    with torch.no_grad():  # class 0 iff pooled value > 2, i.e. iff p > 4/3 for class-0 images
        m.classifier.weight.copy_(torch.tensor([[1.0], [-1.0]]))
        m.classifier.bias.copy_(torch.tensor([-2.0, 2.0]))
    return m


def top1(m, x, y):
    with torch.no_grad():
        return float((m.classifier(m.embed(x)).argmax(1) == y).float().mean())


def test_finetuning_p_alone_raises_it_until_the_classes_separate():
    m = model(1.0)
    x, y = peaky_vs_flat()
    before = {k: v.clone() for k, v in m.state_dict().items() if not k.endswith("pool.p")}
    assert top1(m.eval(), x, y) < 0.75
    batches = [(x[i:i + 8], y[i:i + 8]) for i in range(0, 32, 8)] * 10
    history = finetune_p(m, batches, lr=0.5, steps=40)
    assert len(history) == 40 and history[-1] > 4 / 3 and min(history) >= 1.0
    assert top1(m, x, y) == 1.0
    after = m.state_dict()
    for k, v in before.items():  # backbone (BN statistics too: eval mode) and classifier untouched
        assert torch.equal(after[k], v), k
    assert all(q.requires_grad for q in m.parameters())


def test_cross_validation_picks_the_best_p_of_the_grid():
    m = model(3.0)
    x, y = peaky_vs_flat(seed=1)
    m.eval()
    scores = cross_validate_p(m, [(x[:16], y[:16]), (x[16:], y[16:])], [1.0, 1.2, 2.0, 4.0])
    expected = {}
    for p in [1.0, 1.2, 2.0, 4.0]:  # naive: pooled value per image from the formula
        pooled = torch.tensor([(16.0 ** p / 16) ** (1 / p) if int(c) == 0 else 1.0 for c in y])
        expected[p] = float(((torch.where(pooled > 2, 0, 1)) == y).float().mean())
    assert scores == expected
    assert float(m.backbone.pool.p) == 2.0  # the first p with the best score


def test_per_class_subset():
    labels = torch.tensor([0, 1, 1, 2, 1, 0, 2, 2, 2, 1])
    idx = per_class_subset(labels, 2, seed=3)
    assert torch.equal(torch.bincount(labels[idx]), torch.tensor([2, 2, 2]))
    assert len(set(idx.tolist())) == 6 and torch.equal(idx, idx.sort().values)
    assert torch.equal(per_class_subset(labels, 10), torch.arange(10))


def test_pstar_tool_refuses_bad_input_with_one_line(tmp_path, capsys):
    """Issue 22 item 7: a missing or truncated checkpoint, one that does not fit the config, and
    --largest-side -3 print one line naming the file / flag and exit 2 (tracebacks before)."""
    import pytest
    from safetensors.torch import save_file

    from conftest import load_tool
    from mhe_scale.config import load_config
    from mhe_scale.tasks.multigrain import build_model

    tool = load_tool("pstar")
    config = "configs/multigrain/cifar10_r18_joint_p3.yaml"
    net = build_model(load_config(config).model, 10)
    good = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(good))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:1000])
    wrong = tmp_path / "wrong.safetensors"
    save_file({"classifier.weight": torch.zeros(10, 4), "other": torch.zeros(1)}, str(wrong))
    cases = [(["--largest-side", "-3"], str(good), "--largest-side -3: must be >= 1"),
             (["--largest-side", "40", "--grid"], str(good), "--grid []"),
             (["--largest-side", "40"], str(tmp_path / "missing.safetensors"), "missing.safetensors does not exist"),
             (["--largest-side", "40"], str(truncated), "truncated.safetensors: not a readable safetensors file"),
             (["--largest-side", "40"], str(wrong), "wrong.safetensors does not fit")]
    for flags, checkpoint, named in cases:
        capsys.readouterr()
        assert tool.main(["crossval", config, checkpoint, *flags]) == 2, named
        err = capsys.readouterr().err.strip()
        assert named in err and "\n" not in err and err.startswith("error: "), err
    with pytest.raises(SystemExit):  # argparse's own refusal of a non-number stays as it was
        tool.main(["crossval", config, str(good), "--largest-side", "x"])


def test_pstar_tool_on_a_run_folder_writes_out_and_draws_limit(tmp_path, capsys):
    """A run folder is taken (newest verified step); finetune --out into a missing folder died with a
    SafetensorError traceback after the work; crossval --limit N took the first N test images, one class
    of a test split in class order."""
    import json
    from pathlib import Path

    import numpy as np
    from PIL import Image
    from safetensors.torch import load_file, save_file

    from conftest import load_tool
    from mhe_scale.config import load_config
    from mhe_scale.engine.checkpoint import checkpoint_name, write_manifest
    from mhe_scale.tasks.multigrain import build_model

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in "ab":
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(4):
                Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(tmp_path / split / c / f"{i}.png")
    config = tmp_path / "mg.yaml"
    config.write_text(f"_base_: {Path('configs/multigrain/base_cifar.yaml').resolve()}\ndata:\n  format: folder\n"
                      f"  path: {tmp_path / 'train'}\n  test_path: {tmp_path / 'test'}\n  num_classes: 2\n"
                      "model:\n  width: 4\n")
    net = build_model(load_config(str(config)).model, 2)
    step = tmp_path / "run" / "mg" / "checkpoints" / checkpoint_name(3)
    step.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(step / "model.safetensors"))
    write_manifest(step, 3, 1)
    tool = load_tool("pstar")
    out = tmp_path / "new" / "deeper" / "p.safetensors"
    capsys.readouterr()
    assert tool.main(["finetune", str(config), str(tmp_path / "run"), "--largest-side", "8", "--per-class", "2",
                      "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert f"created folder {out.parent}" in captured.err and f"weights {step / 'model.safetensors'}" in captured.err
    assert set(load_file(str(out))) == set(net.state_dict()) and json.loads(captured.out)["out"] == str(out)
    assert not list(out.parent.glob(".*tmp*"))
    assert tool.main(["finetune", str(config), str(step), "--largest-side", "8", "--out", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err
    assert tool.main(["crossval", str(config), str(tmp_path / "run"), "--largest-side", "8", "--limit", "4",
                      "--grid", "3"]) == 0
    line = json.loads(capsys.readouterr().out)
    assert line["images"] == 4 and line["classes"] == 2  # the first 4 test images are all class 'a'
