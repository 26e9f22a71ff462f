"""optim.head_update=sparse on the face configuration (issue 24 item 3): a MobileFaceNet encoder (BatchNorm +
PReLU convolutions, tiny images), ArcFace s=64 m=0.5, global-norm clip 5 (active at every step), warm-up + poly,
class-sharded Partial FC 0.2 and MHS [8, 5] on one process, SGD momentum 0.9 and weight decay 5e-4, through `fit`.

That run is chaotic: one ulp in one head weight of the DENSE run moves its gradient norm by ~1e-3 within two steps
(docs/engine.md, "Row-sparse head updates"), so sparse == dense over 20 steps needs the dense arithmetic bit for bit:
optim.head_catch_up=replay (skipped steps applied one by one in float32) and the clip's float64 head norm."""

from __future__ import annotations

import json

import pytest
import torch
from accelerate import Accelerator

from mhe_scale.config import OptimConfig, TrainConfig
from mhe_scale.data.dali_face import FaceTransform
from mhe_scale.data.face_dataset import SyntheticFaceDataset
from mhe_scale.engine import Classifier, fit
from mhe_scale.engine.model import build_optimizers
from mhe_scale.models.mobilefacenet import MobileFaceNet
from mhe_scale.optim import refresh_all
from mhe_scale.parallel.sharded_fc import ShardedPartialFCHead
from mhe_scale.parallel.sharded_mhs import ShardedMultiHeadSamplingHead

C, FEAT, SIZE, BATCH, STEPS, CLIP = 40, 32, 16, 8, 20, 5.0


def _model(head_name: str) -> Classifier:
    torch.manual_seed(0)
    encoder = MobileFaceNet(num_features=FEAT, width_mult=0.25, input_size=SIZE)
    assert any(isinstance(m, torch.nn.PReLU) for m in encoder.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in encoder.modules())
    if head_name == "partial_fc":
        head = ShardedPartialFCHead(FEAT, C, sample_rate=0.2, scale=64.0, margin=(1.0, 0.5, 0.0), group=None)
    else:
        head = ShardedMultiHeadSamplingHead(FEAT, C, sizes=(8, 5), mode="batch_union", num_sampled_groups=1,
                                            cosine=True, margin=(1.0, 0.5, 0.0), scale=64.0, group=None)
    return Classifier(encoder, head)


def _fit(out, head_name: str, update: str, catch_up: str = "replay") -> tuple[list[dict], dict[str, torch.Tensor]]:
    model = _model(head_name)
    optim = OptimConfig(name="sgd", lr=0.1, momentum=0.9, weight_decay=5e-4, head_update=update,
                        head_catch_up=catch_up)
    optimizer, head_optimizer = build_optimizers(optim, model)
    cfg = TrainConfig(epochs=1.0, batch_size=BATCH, log_every=1, seed=1, keep_last=0, clip_grad_norm=CLIP,
                      save_every=0, output_dir=str(out), resume=False, schedule="poly", poly_power=2.0,
                      warmup_steps=3)
    torch.manual_seed(1)  # the flips draw from the global generator
    data = SyntheticFaceDataset(BATCH * STEPS, C, SIZE, seed=0, transform=FaceTransform(True, SIZE))
    fit(model, optimizer, data, cfg, Accelerator(cpu=True), head_optimizer=head_optimizer, out_dir=out)
    log = [json.loads(line) for line in (out / "loss_log.jsonl").read_text().splitlines()]
    weights = {f"head.{n}": refresh_all(p).detach().clone() for n, p in model.head.named_parameters()}
    weights |= {f"encoder.{n}": t.detach().clone() for n, t in model.encoder.state_dict().items()}
    return log, weights


@pytest.mark.parametrize("head_name", ["partial_fc", "mhs"])
def test_sparse_equals_dense_on_the_face_model_for_20_steps(tmp_path, head_name: str) -> None:
    dense_log, dense_w = _fit(tmp_path / "dense", head_name, "dense")
    sparse_log, sparse_w = _fit(tmp_path / "sparse", head_name, "sparse")
    assert len(dense_log) == STEPS >= 20
    assert min(r["grad_norm"] for r in dense_log) > CLIP  # the clip acts at every step
    assert len({r["lr"] for r in dense_log[:5]}) == 4  # warm-up over 3 steps, then poly decay: the lr moves
    for key in ("loss", "grad_norm"):
        torch.testing.assert_close(torch.tensor([r[key] for r in sparse_log], dtype=torch.float64),
                                   torch.tensor([r[key] for r in dense_log], dtype=torch.float64),
                                   rtol=1e-6, atol=0.0, msg=key)
    for name, value in dense_w.items():  # head rows, encoder weights, BN running statistics, PReLU slopes
        torch.testing.assert_close(sparse_w[name], value, rtol=1e-6, atol=1e-9, msg=name)


def test_head_catch_up_is_checked_and_older_runs_resume_with_the_closed_form() -> None:
    from mhe_scale.engine.run_identity import differences

    with pytest.raises(ValueError, match="optim.head_catch_up='exact'"):
        build_optimizers(OptimConfig(head_catch_up="exact"), _model("partial_fc"))
    old = {"optim": {"lr": 0.1, "head_update": "sparse"}}  # saved before the key existed: closed form
    assert differences(old, {"optim": {"lr": 0.1, "head_update": "sparse", "head_catch_up": "closed_form"}}) == []
    assert differences(old, {"optim": {"lr": 0.1, "head_update": "sparse", "head_catch_up": "replay"}})[0][0] == \
        "optim.head_catch_up"
