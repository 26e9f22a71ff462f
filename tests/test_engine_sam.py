"""SAM in fit (train.sam_rho): one step equals a hand-written two-gradient reference, batch-norm
statistics are updated by the first pass only, and settings where it cannot be exact are refused."""

import copy

import pytest
import torch
from accelerate import Accelerator
from torch import nn

from mhe_scale.config import OptimConfig
from mhe_scale.engine import Classifier, build_optimizer, fit
from mhe_scale.heads import create_head
from test_engine_loop import C, DIM, tiny_data, tiny_model, train_cfg

SGD = OptimConfig(name="sgd", lr=0.5, momentum=0.0, weight_decay=0.0)


class BNEncoder(nn.Module):
    """Linear -> BatchNorm1d -> ReLU, forward_features [B, 16]."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(DIM, 16), nn.BatchNorm1d(16), nn.ReLU())
        self.num_features = 16

    def forward_features(self, x):
        return self.body(x)


def naive_sam_step(model: Classifier, x, y, rho: float, lr: float) -> dict[str, torch.Tensor]:
    """g at w; e = rho g / ||g||; g' at w + e (BN running stats of the copy are irrelevant); w - lr g'."""
    first = copy.deepcopy(model)
    loss, _ = first(x, y)
    grads = torch.autograd.grad(loss, list(first.parameters()))
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads))
    second = copy.deepcopy(model)
    with torch.no_grad():
        for p, g in zip(second.parameters(), grads):
            p.add_(rho * g / norm)
    loss2, _ = second(x, y)
    grads2 = torch.autograd.grad(loss2, list(second.parameters()))
    return {name: (p - lr * g).detach() for (name, p), g in zip(model.named_parameters(), grads2)}


@pytest.mark.parametrize("encoder", ["mlp", "bn"])
def test_one_sam_step_equals_the_two_gradient_reference(tmp_path, encoder):
    data = tiny_data(32)
    model = tiny_model("fc") if encoder == "mlp" else Classifier(BNEncoder(), create_head("fc", in_features=16,
                                                                                          num_classes=C))
    from mhe_scale.data.samplers import epoch_permutation

    order = epoch_permutation(32, 3, 0)  # fit's data order for seed 3, epoch 0: one step reads all 32
    expected = naive_sam_step(copy.deepcopy(model).train(), data.inputs[order], data.targets[order], 0.1, SGD.lr)
    plain = copy.deepcopy(model)
    fit(plain, build_optimizer(SGD, plain), data, train_cfg(batch_size=32, output_dir=str(tmp_path / "p")),
        Accelerator(cpu=True))
    fit(model, build_optimizer(SGD, model), data, train_cfg(batch_size=32, sam_rho=0.1, output_dir=str(tmp_path / "s")),
        Accelerator(cpu=True))
    got = dict(model.named_parameters())
    for name, value in expected.items():
        torch.testing.assert_close(got[name].detach(), value, rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.allclose(dict(plain.named_parameters())["head.weight"], got["head.weight"])  # SAM changed it
    if encoder == "bn":  # the second pass left the running statistics alone: they equal the plain run's
        for (name, a), b in zip(model.named_buffers(), plain.buffers()):
            torch.testing.assert_close(a, b, msg=name)


def test_sam_refusals_name_the_key(tmp_path):
    data = tiny_data(64)
    model = tiny_model("fc")
    with pytest.raises(NotImplementedError, match=r"train\.sam_rho=0\.05: train\.grad_accum_steps > 1"):
        fit(model, build_optimizer(SGD, model), data, train_cfg(sam_rho=0.05, grad_accum_steps=2,
                                                                output_dir=str(tmp_path)), Accelerator(cpu=True))
    with pytest.raises(ValueError, match=r"train\.sam_rho=0\.0 must be > 0"):
        fit(model, build_optimizer(SGD, model), data, train_cfg(sam_rho=0.0, output_dir=str(tmp_path)),
            Accelerator(cpu=True))
