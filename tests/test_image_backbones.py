"""Image backbones: published parameter / MAC counts, shapes per stem, pooling, checkpointing with BN
statistics, the timm / torchvision adapter (fake libraries), safetensors weights, a tiny training run."""

import copy
import sys
import types

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from mhe_scale.models import image
from mhe_scale.models.face import count_macs, count_parameters
from mhe_scale.models.image import build_image_backbone, list_image_backbones
from mhe_scale.models.resnet import BasicBlock, Bottleneck, resnet

torch.set_num_threads(1)

# torchvision's documented ImageNet models (with the 1000-class fc): parameters and GMACs at 224
PUBLISHED = {"resnet18": (11_689_512, 1.81), "resnet34": (21_797_672, 3.66), "resnet50": (25_557_032, 4.09),
             "resnet101": (44_549_160, 7.80), "resnet152": (60_192_808, 11.51)}


def test_registry_names_and_errors():
    assert list_image_backbones() == ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
                                      "timm:<name>", "torchvision:<name>"]
    with pytest.raises(ValueError, match="unknown image backbone 'resnet19'.*resnet18"):
        build_image_backbone("resnet19")
    with pytest.raises(TypeError, match="'resnet18'.*bogus"):
        build_image_backbone("resnet18", width=4, bogus=1)
    with pytest.raises(ValueError, match="stem must be one of"):
        build_image_backbone("resnet18", stem="tiny")
    with pytest.raises(ValueError, match=r"expects images \[B, 3, H, W\], got \[2, 1, 32, 32\]"):
        build_image_backbone("resnet18", width=4)(torch.randn(2, 1, 32, 32))


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_published_parameter_and_mac_counts(name):
    with torch.device("meta"):
        model = build_image_backbone(name, stem="imagenet")
    params, gmacs = PUBLISHED[name]
    assert count_parameters(model) + model.num_features * 1000 + 1000 == params
    assert model.num_features == (512 if name in ("resnet18", "resnet34") else 2048)
    assert round((count_macs(model, 224) + model.num_features * 1000) / 1e9, 2) == gmacs


def test_cifar_stem_keeps_resolution_until_layer2():
    """resnet18, full width, CIFAR 32x32: 32 -> 32, 16, 8, 4 (tokens [B, 16, 512])."""
    torch.manual_seed(0)
    model = build_image_backbone("resnet18", stem="cifar")
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1) and isinstance(model.maxpool, nn.Identity)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert model.forward_feature_map(x).shape == (2, 512, 4, 4)
        assert model.forward_tokens(x).shape == (2, 16, 512)
        assert model(x).shape == (2, 512)


@pytest.mark.parametrize("name, width, channels", [("resnet18", 8, 64), ("resnet50", 8, 256)])
def test_imagenet_stem_224_gives_7x7(name, width, channels):
    model = build_image_backbone(name, stem="imagenet", width=width)
    assert model.num_features == channels
    with torch.no_grad():
        tokens = model.eval().forward_tokens(torch.randn(1, 3, 224, 224))
    assert tokens.shape == (1, 49, channels)


def test_pooled_is_mean_of_tokens_and_pool_is_replaceable():
    torch.manual_seed(0)
    model = build_image_backbone("resnet34", stem="cifar", width=4).eval()
    x = torch.randn(3, 3, 24, 24)
    with torch.no_grad():
        tokens = model.forward_tokens(x)
        fmap = model.forward_feature_map(x)
        assert tokens.shape == (3, 9, 32)
        assert torch.equal(tokens[:, 4], fmap[:, :, 1, 1])  # row-major positions
        torch.testing.assert_close(model.forward_features(x), tokens.mean(1))
    maxpool = build_image_backbone("resnet34", stem="cifar", width=4, pool=nn.Sequential(nn.AdaptiveMaxPool2d(1),
                                                                                        nn.Flatten(1)))
    maxpool.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(maxpool.eval()(x), tokens.amax(1))
    with pytest.raises(ValueError, match=r"pool must return \[B, C\]"):
        build_image_backbone("resnet18", width=4, pool=nn.AdaptiveAvgPool2d(1))(x)


@pytest.mark.parametrize("block, in_ch, planes", [(BasicBlock, 8, 8), (Bottleneck, 16, 4)])
def test_zero_init_residual_blocks_start_as_identity(block, in_ch, planes):
    model = resnet(18 if block is BasicBlock else 50, width=4, zero_init_residual=True)
    blocks = [b for b in model.blocks() if b.downsample is None]
    assert blocks and all(torch.all(b.last_bn().weight == 0) for b in model.blocks())
    x = torch.randn(2, blocks[0].conv1.in_channels, 5, 5)
    assert torch.equal(blocks[0](x.clone()), torch.relu(x))
    assert not torch.all(resnet(18, width=4).layer1[0].bn2.weight == 0)


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (cuDNN batch norm)")


@pytest.mark.parametrize("depth, device", [(18, "cpu"), (50, "cpu"), pytest.param(50, "cuda", marks=CUDA)])
def test_grad_checkpointing_same_outputs_grads_and_bn_stats(depth, device):
    torch.manual_seed(0)
    plain = resnet(depth, stem="cifar", width=4).train().to(device)
    ckpt = copy.deepcopy(plain)
    ckpt.set_grad_checkpointing(True)
    x = torch.randn(4, 3, 16, 16, device=device)
    outs = []
    for model in (plain, ckpt):
        out = model.forward_features(x)
        (out ** 2).sum().backward()
        outs.append(out.detach())
    torch.testing.assert_close(outs[0], outs[1])
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    for (name, b), c in zip(plain.named_buffers(), ckpt.buffers()):
        torch.testing.assert_close(b, c, msg=name)  # running stats updated once, num_batches_tracked == 1
    assert int(ckpt.layer4[-1].bn1.num_batches_tracked) == 1


def test_bf16_autocast_close_to_fp32():
    torch.manual_seed(0)
    model = build_image_backbone("resnet50", stem="cifar", width=4).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), ref, rtol=0.05, atol=0.05 * ref.abs().max().item())


def test_training_reduces_loss():
    torch.manual_seed(0)
    model = build_image_backbone("resnet18", stem="cifar", width=4)
    head = nn.Linear(model.num_features, 5)
    x, y = torch.randn(16, 3, 16, 16), torch.randint(0, 5, (16,))
    opt = torch.optim.Adam([*model.parameters(), *head.parameters()], lr=1e-2)
    losses = []
    for _ in range(12):
        loss = nn.functional.cross_entropy(head(model(x)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_pretrained_safetensors_round_trip(tmp_path):
    torch.manual_seed(0)
    source = build_image_backbone("resnet18", stem="cifar", width=4)
    source(torch.randn(4, 3, 16, 16))  # non-trivial running stats
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    save_file({**state, "fc.weight": torch.zeros(10, 32), "fc.bias": torch.zeros(10)}, tmp_path / "r18.safetensors")
    loaded = build_image_backbone("resnet18", stem="cifar", width=4, pretrained_path=tmp_path / "r18.safetensors")
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(source.eval()(x), loaded.eval()(x))
    with pytest.raises(ValueError, match=r"r18.safetensors does not fit ResNet.*conv1.weight \[4, 3, 3, 3\] vs "
                                         r"\[4, 3, 7, 7\]"):
        build_image_backbone("resnet18", stem="imagenet", width=4, pretrained_path=tmp_path / "r18.safetensors")
    torch.save(state, tmp_path / "r18.pth")
    with pytest.raises(ValueError, match="r18.pth is not a safetensors file.*never loaded"):
        build_image_backbone("resnet18", stem="cifar", width=4, pretrained_path=tmp_path / "r18.pth")
    with pytest.raises(FileNotFoundError, match="missing.safetensors does not exist"):
        build_image_backbone("resnet18", width=4, pretrained_path=tmp_path / "missing.safetensors")


def test_external_packages_missing_give_one_line_errors(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # "import timm" now fails with ModuleNotFoundError
    with pytest.raises(ImportError, match=r"^image backbone timm:resnet50 needs timm.*pip install timm") as err:
        build_image_backbone("timm:resnet50")
    assert "\n" not in str(err.value)

    def broken(package):
        raise RuntimeError("operator torchvision::nms does not exist\nmore lines")
    monkeypatch.setattr(image.importlib, "import_module", broken)
    with pytest.raises(ImportError, match=r"torchvision:resnet50 needs torchvision.*RuntimeError: operator "
                                          r"torchvision::nms does not exist\); install") as err:
        build_image_backbone("torchvision:resnet50")
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="stem/width apply to resnet18"):
        build_image_backbone("timm:resnet50", stem="cifar")


class FakeTimmNet(nn.Module):
    """timm's conventions: forward_features unpooled, forward_head(pre_logits=True) pooled."""

    def __init__(self, num_classes: int, channels: int = 3, output_fmt: str = "NCHW") -> None:
        super().__init__()
        self.conv, self.num_features, self.output_fmt = nn.Conv2d(3, channels, 3, stride=4), channels, output_fmt
        self.fc = nn.Linear(channels, num_classes) if num_classes else nn.Identity()
        self.checkpointing = False

    def forward_features(self, x):
        out = self.conv(x)
        return out.permute(0, 2, 3, 1) if self.output_fmt == "NHWC" else out

    def forward_head(self, x, pre_logits=False):
        x = (x.mean((1, 2)) if self.output_fmt == "NHWC" else x.mean((2, 3))) * 2  # x2: our pooling is not used
        return x if pre_logits else self.fc(x)

    def set_grad_checkpointing(self, enable=True):
        self.checkpointing = enable


class FakeTorchvisionNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features, self.avgpool, self.fc = nn.Conv2d(3, 5, 3, stride=4), nn.AdaptiveAvgPool2d(1), nn.Linear(5, 7)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.fc(torch.flatten(self.avgpool(self.features(x)), 1))


@pytest.mark.parametrize("fmt", ["NCHW", "NHWC"])
def test_timm_adapter_on_fake_timm(monkeypatch, tmp_path, fmt):
    created = {}

    def create_model(name, pretrained, num_classes, **kwargs):
        created.update(name=name, pretrained=pretrained, num_classes=num_classes, **kwargs)
        return FakeTimmNet(num_classes, output_fmt=fmt, **kwargs)
    monkeypatch.setitem(sys.modules, "timm", types.SimpleNamespace(create_model=create_model))
    model = build_image_backbone("timm:fakenet", channels=6)
    assert created == {"name": "fakenet", "pretrained": False, "num_classes": 0, "channels": 6}
    x = torch.randn(2, 3, 32, 32)
    assert model.num_features == 6
    assert model.forward_feature_map(x).shape == (2, 6, 8, 8)
    tokens = model.forward_tokens(x)
    assert tokens.shape == (2, 64, 6)
    torch.testing.assert_close(model(x), 2 * tokens.mean(1))  # timm's own pooled pre-logits
    model.set_grad_checkpointing(True)
    assert model.model.checkpointing
    max_pool = nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten(1))
    pooled = build_image_backbone("timm:fakenet", channels=6, pool=max_pool)
    pooled.load_state_dict(model.state_dict())
    torch.testing.assert_close(pooled(x), tokens.amax(1))
    save_file({**model.model.state_dict(), "head.weight": torch.zeros(3, 6)}, tmp_path / "w.safetensors")
    again = build_image_backbone("timm:fakenet", channels=6, pretrained_path=tmp_path / "w.safetensors")
    assert torch.equal(again.model.conv.weight, model.model.conv.weight)


def test_timm_adapter_vit_tokens(monkeypatch):
    """A ViT-like timm model returns tokens [B, N, D]: forward_tokens passes them on; no feature map."""
    net = FakeTimmNet(0, channels=6)
    net.forward_features = lambda x: net.conv(x).flatten(2).transpose(1, 2)
    net.forward_head = lambda x, pre_logits=False: x[:, 0]
    monkeypatch.setitem(sys.modules, "timm", types.SimpleNamespace(create_model=lambda *a, **k: net))
    model = build_image_backbone("timm:vit_like")
    x = torch.randn(2, 3, 32, 32)
    assert model.forward_tokens(x).shape == (2, 64, 6) and model(x).shape == (2, 6)
    with pytest.raises(ValueError, match=r"gives tokens \[2, 64, 6\], not a feature map"):
        model.forward_feature_map(x)


def test_torchvision_adapter_on_fake_torchvision(monkeypatch):
    calls = {}

    def get_model(name, weights, **kwargs):
        calls.update(name=name, weights=weights)
        return FakeTorchvisionNet()
    monkeypatch.setitem(sys.modules, "torchvision", types.SimpleNamespace(models=types.SimpleNamespace(
        get_model=get_model)))
    model = build_image_backbone("torchvision:fakenet")
    assert calls == {"name": "fakenet", "weights": None} and model.num_features == 5
    fc_calls = []
    model.model.fc.register_forward_hook(lambda *args: fc_calls.append(1))
    x = torch.randn(2, 3, 32, 32)
    fmap = model.forward_feature_map(x)
    torch.testing.assert_close(fmap, model.model.features(x))
    tokens = model.forward_tokens(x)
    assert tokens.shape == (2, 64, 5)
    torch.testing.assert_close(model(x), tokens.mean(1))
    model(x).sum().backward()
    assert model.model.calls == 5 and not fc_calls  # the probe and four forwards, all cut before the classifier
    assert model.model.fc.weight.grad is None and model.model.features.weight.grad is not None
    with pytest.raises(ValueError, match="has no set_grad_checkpointing"):
        model.set_grad_checkpointing(True)
