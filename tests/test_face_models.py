"""Face backbones: output shapes, parameter / MAC counts against published figures, checkpointing."""

import pytest
import torch

from mhe_scale.models.face import (FACE_BACKBONES, build_face_backbone, count_macs, count_parameters,
                                   list_face_backbones)

torch.set_num_threads(1)

SMALL = ["iresnet18", "mobilefacenet", "vit_t"]
# parameters (millions) with the 512-d head; r50 / r100 are the published ArcFace figures
EXPECTED_PARAMS_M = {"iresnet18": 24.03, "iresnet34": 34.14, "iresnet50": 43.6, "iresnet100": 65.2,
                     "iresnet200": 118.8, "mobilefacenet": 1.20}
VIT_SIZES = {"vit_t": (256, 12), "vit_s": (512, 12), "vit_b": (512, 24), "vit_l": (768, 24)}


def meta_model(name: str, **kwargs):
    with torch.device("meta"):
        return build_face_backbone(name, **kwargs)


def test_registry_names_and_errors():
    assert list_face_backbones() == ["iresnet18", "iresnet34", "iresnet50", "iresnet100", "iresnet200",
                                     "mobilefacenet", "vit_t", "vit_s", "vit_b", "vit_l"]
    with pytest.raises(ValueError, match="unknown face backbone 'resnet50'.*iresnet50"):
        build_face_backbone("resnet50")
    with pytest.raises(TypeError, match="'mobilefacenet'.*bogus"):
        build_face_backbone("mobilefacenet", bogus=1)


@pytest.mark.parametrize("name", SMALL)
def test_forward_112(name):
    """Real 112x112 forward at batch 2 in both modes (backward: see the checkpointing test)."""
    torch.manual_seed(0)
    model = build_face_backbone(name)
    assert model.num_features == 512
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        out = model(x)
        assert out.shape == (2, 512) and out.dtype == torch.float32 and torch.isfinite(out).all()
        # train mode: BN normalises with the batch's statistics, so a row depends on the other row
        assert not torch.allclose(model(torch.cat([x[:1], -x[1:]])), out, atol=1e-3)
        model.eval()  # eval mode: running statistics, no dropout: each row is its own, batch of one included
        torch.testing.assert_close(model(x)[:1], model(x[:1]), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(model(torch.cat([x[:1], -x[1:]]))[:1], model(x[:1]), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match=r"expects images \[B, 3, 112, 112\].*\[2, 3, 96, 96\]"):
        model(torch.randn(2, 3, 96, 96))


@pytest.mark.parametrize("name", list(FACE_BACKBONES))
def test_parameter_counts(name):
    model = meta_model(name)
    params = count_parameters(model)
    if name in EXPECTED_PARAMS_M:
        assert params / 1e6 == pytest.approx(EXPECTED_PARAMS_M[name], abs=0.06), params
    else:  # closed form of the FaceViT described in face_vit.py (patch 9 -> 144 tokens, MLP x4, 512-d)
        d, depth = VIT_SIZES[name]
        n, f = 144, 512
        block = 2 * 2 * d + 3 * d * d + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d)
        expected = (3 * 81 * d + d) + n * d + d + depth * block + 2 * d + (n * d * d + 2 * d + d * f + 2 * f)
        assert params == expected
    if name.startswith("iresnet"):  # the embedding BN's scale is frozen
        assert count_parameters(model, trainable_only=True) == params - 512


@pytest.mark.parametrize("name, gmacs", [("iresnet50", 6.3), ("mobilefacenet", 0.221), ("vit_t", 1.5)])
def test_macs_match_published(name, gmacs):
    """ArcFace r50: 6.3 G; MobileFaceNet paper: 221M MAdds; insightface ViT-T: 1.5 G."""
    model = meta_model(name)
    assert count_macs(model) / 1e9 == pytest.approx(gmacs, rel=0.01)
    assert model(torch.zeros(2, 3, 112, 112, device="meta")).shape == (2, 512)


def test_count_macs_meta_equals_real_and_refuses_cpu_attention():
    torch.manual_seed(0)
    assert count_macs(build_face_backbone("mobilefacenet")) == count_macs(meta_model("mobilefacenet"))
    with pytest.raises(ValueError, match="meta device"):
        count_macs(build_face_backbone("vit_t", depth=1, embed_dim=32))


def test_mobilefacenet_paper_size():
    """Table 1 with the paper's 128-d output: 0.99M parameters (ours 1.00M: PReLU slopes, BN)."""
    assert count_parameters(meta_model("mobilefacenet", num_features=128)) / 1e6 == pytest.approx(0.99, abs=0.02)


SMALL_INPUTS = {"iresnet18": dict(input_size=32, dropout=0.2), "mobilefacenet": dict(input_size=32),
                "vit_t": dict(img_size=36, drop_path=0.3, mask_ratio=0.25, embed_dim=64, depth=3)}


@pytest.mark.parametrize("name", SMALL)
def test_grad_checkpointing_same_gradients(name):
    """Checkpointed stages recompute in backward (seen by a forward-call counter) and give the same
    gradients, random ops (dropout, drop path, token masking) included, in float64. One model runs
    twice (train-mode BN uses batch statistics, so its running stats do not matter)."""
    torch.manual_seed(0)
    kwargs = SMALL_INPUTS[name]
    model = build_face_backbone(name, **kwargs).double()
    size = kwargs.get("input_size", kwargs.get("img_size"))
    x = torch.randn(3, 3, size, size, dtype=torch.float64)
    first = model.blocks[0] if name == "vit_t" else model.stages[0]
    count = [0]
    first.register_forward_pre_hook(lambda *_: count.__setitem__(0, count[0] + 1))
    grads, calls = [], []
    for enable in (False, True):
        model.set_grad_checkpointing(enable)
        model.zero_grad(set_to_none=True)
        count[0] = 0
        torch.manual_seed(1)
        out = model(x)
        (out * torch.linspace(-1, 1, out.numel(), dtype=torch.float64).view_as(out)).sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
        calls.append(count[0])
    assert calls == [1, 2]
    for pname, g in grads[0].items():
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, pname
        torch.testing.assert_close(grads[1][pname], g, rtol=1e-9, atol=1e-12, msg=pname)


@pytest.mark.parametrize("name", SMALL)
def test_grad_checkpointing_updates_bn_running_stats_once(name):
    """One training step with checkpointed stages leaves every BN's running_mean / running_var /
    num_batches_tracked exactly where the same step without checkpointing leaves them (the
    recompute in backward must not update them a second time)."""
    torch.manual_seed(0)
    kwargs = SMALL_INPUTS[name]
    size = kwargs.get("input_size", kwargs.get("img_size"))
    x = torch.randn(3, 3, size, size, dtype=torch.float64)
    buffers = []
    for enable in (False, True):
        torch.manual_seed(0)
        model = build_face_backbone(name, **kwargs).double().train()
        model.set_grad_checkpointing(enable)
        torch.manual_seed(1)
        model(x).square().sum().backward()
        buffers.append(dict(model.named_buffers()))
    assert any(k.endswith("running_mean") for k in buffers[0])
    assert buffers[0].keys() == buffers[1].keys()
    for key, plain in buffers[0].items():
        torch.testing.assert_close(buffers[1][key], plain, rtol=0, atol=0, msg=key)
