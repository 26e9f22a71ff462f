"""PCA whitening: whitened training features have zero mean and identity covariance; inserted after
pooling with its inverse folded into the classifier, the logits (and so top-1) are unchanged."""

import pytest
import torch

from mhe_scale.losses.margin import MarginLoss
from mhe_scale.models.gem import GeM
from mhe_scale.models.resnet import resnet
from mhe_scale.models.whitening import Whitening, WhitenedBackbone, fold_into_classifier
from mhe_scale.tasks.multigrain import MultiGrainModel


def correlated(n=400, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g, dtype=torch.float64)
    return torch.randn(n, d, generator=g, dtype=torch.float64) @ mix + 3.0


def test_whitened_features_have_identity_covariance():
    f = correlated()
    w = Whitening.fit(f, eps=0.0)(f)
    torch.testing.assert_close(w.mean(0), torch.zeros(6, dtype=torch.float64), atol=1e-10, rtol=0)
    torch.testing.assert_close(torch.cov(w.t()), torch.eye(6, dtype=torch.float64), atol=1e-8, rtol=0)
    reduced = Whitening.fit(f, dim=2, eps=0.0)(f)  # the two leading components: largest variance first
    assert reduced.shape == (400, 2)
    torch.testing.assert_close(torch.cov(reduced.t()), torch.eye(2, dtype=torch.float64), atol=1e-8, rtol=0)
    top = torch.linalg.eigvalsh(torch.cov(f.t()))[-1]
    direction = Whitening.fit(f, dim=1, eps=0.0).matrix[0]
    assert float(direction @ torch.cov(f.t()) @ direction) == pytest.approx(1.0)
    assert float(direction.norm() ** -2) == pytest.approx(float(top))


def test_folding_keeps_every_logit_and_top1(tmp_path):
    torch.manual_seed(0)
    model = MultiGrainModel(resnet(18, stem="cifar", width=4, pool=GeM(3.0)), 7, 0.5, MarginLoss()).eval()
    images = torch.randn(120, 3, 16, 16)
    with torch.no_grad():
        feats = model.embed(images)
        white = Whitening.fit(feats.double()).float()
        white.save(tmp_path / "w.safetensors")
        white = Whitening.from_file(tmp_path / "w.safetensors")
        new_backbone = WhitenedBackbone(model.backbone, white)
        new_classifier = fold_into_classifier(model.classifier, white)
        test = torch.randn(40, 3, 20, 24)  # other images, another size
        before = model.classifier(model.embed(test))
        after = new_classifier(new_backbone.forward_features(test))
    torch.testing.assert_close(after, before, rtol=1e-3, atol=1e-4)
    assert torch.equal(after.argmax(1), before.argmax(1))
    assert new_backbone.num_features == model.backbone.num_features


def test_reduced_whitening_cannot_be_folded():
    white = Whitening.fit(correlated(), dim=3)
    with pytest.raises(ValueError, match="cannot be folded"):
        fold_into_classifier(torch.nn.Linear(6, 4).double(), white)
