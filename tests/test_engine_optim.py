"""optim.no_decay_bias_norm: biases and normalisation weights get no weight decay (LightXML's AdamW:
no_decay = bias, LayerNorm.weight), matrices decay by exactly (1 - lr * wd); off, every parameter decays.
The XMC configs whose recipe is LightXML's (the MHE XMC run.sh) turn it on."""

from pathlib import Path

import pytest
import torch
from torch import nn

from mhe_scale.config import OptimConfig, load_config
from mhe_scale.engine.model import build_optimizer, build_optimizers
from mhe_scale.heads import create_head

REPO = Path(__file__).resolve().parents[1]
LR, WD = 0.1, 0.3
LIGHTXML_CONFIGS = ("amazon3m", "amazon670k", "amazoncat13k", "eurlex4k", "wiki10_31k", "wiki500k")


class LinearNormModel(nn.Module):
    """Stands in for a Classifier: an encoder Linear + LayerNorm, and an fc head with a bias."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))
        nn.init.normal_(self.encoder[1].weight)  # not all ones: a decayed norm weight would show
        nn.init.normal_(self.encoder[1].bias)
        self.head = create_head("fc", in_features=3, num_classes=5, bias=True)
        nn.init.normal_(self.head.bias)


def step_with_zero_grads(optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[str, torch.Tensor]:
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    return before


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_biases_and_norm_weights_are_not_decayed(name):
    model = LinearNormModel()
    cfg = OptimConfig(name=name, lr=LR, weight_decay=WD, momentum=0.0, no_decay_bias_norm=True)
    before = step_with_zero_grads(build_optimizer(cfg, model), model)  # type: ignore[arg-type]
    flat = {"encoder.0.bias", "encoder.1.weight", "encoder.1.bias", "head.bias"}
    for n, p in model.named_parameters():
        if n in flat:
            assert torch.equal(p, before[n]), n
        else:
            torch.testing.assert_close(p, before[n] * (1 - LR * WD), rtol=1e-6, atol=0, msg=n)
            assert p.ndim == 2 and not torch.equal(p, before[n]), n


def test_default_decays_every_parameter_and_sharded_heads_split_too():
    model = LinearNormModel()
    before = step_with_zero_grads(build_optimizer(OptimConfig(lr=LR, weight_decay=WD), model), model)  # type: ignore[arg-type]
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, before[n] * (1 - LR * WD), rtol=1e-6, atol=0, msg=n)
    optimizer = build_optimizer(OptimConfig(lr=LR, head_lr=0.5, weight_decay=WD, no_decay_bias_norm=True), model)  # type: ignore[arg-type]
    groups = {g["name"]: (g["lr"], g["weight_decay"], len(g["params"])) for g in optimizer.param_groups}
    assert groups == {"encoder": (LR, WD, 1), "encoder.no_decay": (LR, 0.0, 3), "head": (0.5, WD, 1),
                      "head.no_decay": (0.5, 0.0, 1)}
    main, head = build_optimizers(OptimConfig(lr=LR, weight_decay=WD, no_decay_bias_norm=True), model)  # type: ignore[arg-type]
    assert head is None and len(main.param_groups) == 4


@pytest.mark.parametrize("config", LIGHTXML_CONFIGS)
def test_lightxml_recipes_exclude_biases_and_norms_from_decay(config):
    path = REPO / "configs" / "xmc" / f"{config}.yaml"
    assert "AdamW weight decay 0.01" in path.read_text()  # the recipe cited
    cfg = load_config(path)
    assert cfg.optim.no_decay_bias_norm is True and cfg.optim.weight_decay == 0.01
