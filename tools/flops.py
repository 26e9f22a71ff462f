#!/usr/bin/env python
"""Parameters and multiply-accumulates of face backbones; prints a markdown table.

    python tools/flops.py                                   # every registered backbone, 112x112
    python tools/flops.py --models iresnet50 mobilefacenet vit_t --size 112
    python tools/flops.py --models mobilefacenet:num_features=128 mobilefacenet:width_mult=2

A model is a registry name (mhe_scale.models.face), optionally with constructor keyword arguments
after a colon (`name:key=value,key=value`, values as Python literals). Models are built on the
meta device, so nothing is allocated or computed. GMACs are multiply-accumulates per image as
counted by torch.utils.flop_counter.FlopCounterMode (convolutions, matmuls, attention), the
quantity face papers call "FLOPs"; GFLOPs = 2 x GMACs. Parameters include the frozen BN scale
of IResNet's embedding layer; BN running statistics (buffers) are not parameters.
"""

from __future__ import annotations

import argparse
import ast
import sys

import torch

from mhe_scale.models.face import build_face_backbone, count_macs, count_parameters, list_face_backbones

# Published figures at 112x112 with a 512-d embedding unless noted. "README": insightface
# recognition/arcface_torch README (its "FLOPs" column is GMACs); r50/r100 parameter counts: ArcFace.
PUBLISHED = {
    "iresnet18": "2.6 G (README)",
    "iresnet50": "43.6M / 6.3 G (ArcFace; README)",
    "iresnet100": "65.2M / 12.1 G (ArcFace; README)",
    "iresnet200": "23.5 G (README)",
    "mobilefacenet": "paper (128-d): 0.99M / 0.221 G; README 'mobilefacenet-0.45G' is insightface's wider mbf",
    "mobilefacenet:num_features=128": "0.99M / 0.221 G (Chen et al. 2018, Table 1)",
    "vit_t": "1.5 G (README)",
    "vit_s": "5.7 G (README)",
    "vit_b": "11.4 G (README)",
    "vit_l": "25.3 G (README)",
}


def parse_model(spec: str) -> tuple[str, dict[str, object]]:
    """'name:key=value,key=value' -> (name, kwargs)."""
    name, _, rest = spec.partition(":")
    kwargs: dict[str, object] = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise SystemExit(f"--models {spec!r}: expected key=value after ':', got {item!r}")
        try:
            kwargs[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            raise SystemExit(f"--models {spec!r}: {value!r} is not a Python literal (e.g. 2, 0.5, True)") from None
    return name, kwargs


def table(specs: list[str], size: int) -> str:
    rows = ["| model | params (M) | GMACs | GFLOPs (2 x MACs) | published (params / GMACs) |",
            "|---|---:|---:|---:|---|"]
    for spec in specs:
        name, kwargs = parse_model(spec)
        if "vit" in name:
            kwargs.setdefault("img_size", size)
        else:
            kwargs.setdefault("input_size", size)
        with torch.device("meta"):
            model = build_face_backbone(name, **kwargs)
        macs = count_macs(model, size)
        rows.append(f"| {spec} | {count_parameters(model) / 1e6:.2f} | {macs / 1e9:.3f} | {2 * macs / 1e9:.3f} "
                    f"| {PUBLISHED.get(spec, '') if size == 112 else ''} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list_face_backbones(),
                        help="registry names, optionally name:key=value,... (default: all)")
    parser.add_argument("--size", type=int, default=112, help="image side in pixels (default 112)")
    args = parser.parse_args(argv)
    unknown = [s for s in args.models if parse_model(s)[0] not in list_face_backbones()]
    if unknown:
        raise SystemExit(f"unknown model(s) {unknown}; known: {', '.join(list_face_backbones())}")
    print(f"Input {args.size}x{args.size}, batch 1, torch {torch.__version__}, counted on the meta device.\n")
    print(table(args.models, args.size))


if __name__ == "__main__":
    sys.exit(main())
