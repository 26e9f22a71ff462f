"""tools/bench_multigrain.py helpers: the one-pass multi-p pooling, the held-out training images,
the mean ± std table."""

import torch

from conftest import load_tool
from test_image_data import CLASSES, make_archive

from mhe_scale.models.gem import find_gem
from mhe_scale.tasks.multigrain import MultiGrainModelConfig, build_model

bench = load_tool("bench_multigrain")


def test_embed_grid_equals_model_embed_for_each_p_in_input_order():
    torch.manual_seed(0)
    model = build_model(MultiGrainModelConfig(name="resnet18", stem="cifar", width=4, gem_p=3.0), 10).eval()
    images = [torch.randn(3, s, s) for s in (16, 24, 16, 24, 16)]
    grid = bench.embed_grid(model, images, [1.0, 3.0, 4.5], batch_size=2)
    for p in (1.0, 3.0, 4.5):
        find_gem(model).set_p(p)
        with torch.no_grad():
            expected = torch.cat([model.embed(im[None]) for im in images])
        torch.testing.assert_close(grid[p], expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bench.embed_all(model, images, batch_size=2), expected, rtol=1e-4, atol=1e-5)


def test_held_out_training_images_are_those_after_the_first_per_class(tmp_path):
    archive = tmp_path / "tiny.tar.gz"
    members = make_archive(archive)  # 3 training images per class
    records, keep = bench.held_out_train(str(archive), tmp_path, per_class=2, extra=1)
    assert sorted(records.read(i) for i in keep) == sorted(members[f"train/{c}/0002.jpg"] for c in CLASSES)


def test_table_reports_mean_and_sample_std_over_seeds():
    runs = [{"cell": [1.0, 1.0], "seed": s, "row": {"top-1": v}} for s, v in enumerate((1.0, 2.0, 3.0))]
    runs.append({"cell": [0.5, 3.0], "seed": 0, "row": {"top-1": 7.0}})
    md = bench.table(runs)
    assert "| λ = 1 (CE only), p = 1 (3) | 2.0 ± 1.0 |" in md and "| λ = 0.5 (joint), p = 3 (1) | 7.0 |" in md
