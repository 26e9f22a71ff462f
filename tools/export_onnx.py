"""Export a trained multi-label model (tasks/multilabel.py) to ONNX.

    python tools/export_onnx.py CONFIG CHECKPOINT --out model.onnx [--output probabilities|logits]
        [--image-size 224] [key=value ...]

CONFIG (+ overrides) names the model and data.train_path (its classes give C and their sorted order,
the order of the outputs and of thresholds.npy); CHECKPOINT is a run's model.safetensors (or its
checkpoint folder). The graph maps images float32 [B, 3, S, S] (normalised as the eval transform
does) to `probabilities` = σ(logits) or `logits` [B, C]; a cosine head's scale s and margin m are
folded in (logits = s (cos − m)); ML-GCN's channel attention is a constant computed from the loaded
weights. The batch axis is dynamic. Uses torch's TorchScript-based exporter (dynamo=False: the
torch.export one needs onnxscript, not installed here); needs the `onnx` package.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from mhe_scale.config import load_config
from mhe_scale.data.multilabel_json import read_multilabel_json
from mhe_scale.models.ml_gcn import MLGCNHead
from mhe_scale.tasks.multilabel import MultilabelNet, build_net

OUTPUTS = ("probabilities", "logits")


class ExportedModel(nn.Module):
    """images [B, 3, S, S] -> probabilities or logits [B, C] of a MultilabelNet."""

    def __init__(self, net: MultilabelNet, output: str = "probabilities") -> None:
        super().__init__()
        if output not in OUTPUTS:
            raise ValueError(f"--output {output!r}: choose one of {OUTPUTS}")
        self.net, self.output = net, output

    def forward(self, images: Tensor) -> Tensor:
        logits = self.net.logits(images)
        return torch.sigmoid(logits) if self.output == "probabilities" else logits


def load_net(config: str | os.PathLike, checkpoint: str | os.PathLike, overrides: list[str] | None = None) -> MultilabelNet:
    """The net of a multilabel config with a checkpoint's weights, in eval mode, ML-GCN attention frozen."""
    cfg = load_config(config, overrides or [])
    if cfg.task != "multilabel":
        raise ValueError(f"{config}: task is {cfg.task!r}; export_onnx exports multilabel models")
    classes = read_multilabel_json(cfg.data.train_path, drop_unknown=cfg.data.drop_unknown_labels).classes
    net = build_net(cfg, len(classes), None)
    path = Path(checkpoint)
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist; pass a run's model.safetensors")
    state = load_file(str(path))
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path} does not fit {config}: missing {missing[:5]}, unexpected {unexpected[:5]}; "
                         "export with the config (and overrides) the run was trained with")
    net.eval()
    if isinstance(net.head, MLGCNHead):
        net.head.freeze_attention()
    return net


def export_onnx(net: MultilabelNet, out: str | os.PathLike, image_size: int, output: str = "probabilities",
                opset: int = 17) -> Path:
    """Write the ONNX graph (input 'images' [batch, 3, S, S], output `output` [batch, C])."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    model = ExportedModel(net, output).eval()
    example = torch.zeros(2, 3, image_size, image_size)
    with torch.no_grad():
        torch.onnx.export(model, (example,), str(out), dynamo=False, input_names=["images"], output_names=[output],
                          dynamic_axes={"images": {0: "batch"}, output: {0: "batch"}}, opset_version=opset)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("checkpoint")
    parser.add_argument("--out", required=True)
    parser.add_argument("--output", choices=OUTPUTS, default="probabilities")
    parser.add_argument("--image-size", type=int, default=None, help="default: the config's data.image_size or 224")
    parser.add_argument("--opset", type=int, default=17)
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_intermixed_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        net = load_net(args.config, args.checkpoint, args.overrides)
        size = args.image_size or cfg.data.image_size or 224
        path = export_onnx(net, args.out, size, args.output, args.opset)
    except (ValueError, FileNotFoundError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{path}: images [batch, 3, {size}, {size}] -> {args.output} [batch, {net.head.num_classes}]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
