"""Export a trained multi-label model (tasks/multilabel.py) to ONNX, with a sidecar JSON a deployment reads.

    python tools/export_onnx.py CONFIG RUN --out export/model.onnx [--weights auto|ema|model]
        [--output probabilities|logits] [--image-size S] [key=value ...]

CONFIG (+ overrides) names the model and data.train_path (its classes give C and their sorted order,
the order of the outputs and of thresholds.npy). RUN is the run folder ({output_dir}/{head}-{loss}:
its newest checkpoints/step-* folder that verifies against its manifest; newer ones that fail are
named), a step folder (it must verify), or a model.safetensors in one.

Weights (`--weights`, printed on stdout and written to the sidecar): `auto` (default) exports the
weights the run's metrics and thresholds.npy came from: the EMA / SWA average (the step folder's
ema.safetensors over its model.safetensors) when the run kept one, else model.safetensors; `ema`
insists on the average, `model` takes the raw trained weights.

The graph maps images float32 [B, 3, S, S] (RGB, normalised as the eval transform does) to
`probabilities` = σ(logits) or `logits` [B, C]; a cosine head's scale s and margin m are folded in
(logits = s (cos − m)); ML-GCN's channel attention is a constant computed from the loaded weights.
The batch axis is dynamic. Uses torch's TorchScript-based exporter (dynamo=False: the torch.export
one needs onnxscript, not installed here); needs the `onnx` package.

Writes --out (its folder is created when missing, and the tool says so) and the sidecar
`<out>.json` (written atomically): format, onnx file name, input (name, shape, dtype, layout NCHW,
channel order RGB, pixel scale 1/255, mean, std, the eval resize / crop), output (name, kind),
classes in output order, thresholds (thresholds.npy of the run folder, probability space; with
--output logits also their logits; null when the run tuned none) and whether they belong to the
exported step, weights, the step folder, the run folder, the config and overrides. Refuses with one
line on stderr and exit 2: a bad CONFIG, a missing, unverifiable or truncated checkpoint (safetensors
errors name the file), weights that do not fit CONFIG's model (another head / width / class count),
`--weights ema` without an average, a thresholds.npy of the wrong shape, and a CONFIG (+ overrides) whose
model.*, data.preset or data.image_size differ from those the step folder's trainer_state.json records
(weights of the same shapes load under another image size, and the decisions differ from the run's; pass
the run's own config.yaml as CONFIG, or --image-size S to export another size on purpose).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from mhe_scale.config import load_config  # noqa: E402
from mhe_scale.data.image_dataset import PRESET_DEFAULTS  # noqa: E402
from mhe_scale.data.multilabel_json import read_multilabel_json  # noqa: E402
from mhe_scale.eval.thresholds import load_thresholds  # noqa: E402
from mhe_scale.models.ml_gcn import MLGCNHead  # noqa: E402
from mhe_scale.models.state_fit import read_weights  # noqa: E402
from mhe_scale.tasks.multilabel import MultilabelNet, build_net  # noqa: E402
from mhe_scale.tasks.paths import config_path_candidates  # noqa: E402
from mhe_scale.engine.run_folder import find_checkpoint, newest_verified  # noqa: E402

OUTPUTS = ("probabilities", "logits")
WEIGHTS = ("auto", "ema", "model")
SIDECAR_FORMAT = 1
AVERAGE_COUNTERS = ("__swa_samples__", "__swa_steps__")
"""Keys of an SWA's ema.safetensors that are counters, not weights (engine/ema.py)."""


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


class Weights:
    """The state a net is loaded with and where it came from (a plain class: tools load without a module
    entry, which dataclasses need).

    kind: "ema" (the EMA / SWA average over model.safetensors) or "model"; notes: warnings for stdout
    (skipped newer folders, a config that asks for EMA with no average beside)."""

    def __init__(self, state: dict[str, Tensor], kind: str, file: Path, step_folder: Path | None,
                 notes: list[str]) -> None:
        self.state, self.kind, self.file, self.step_folder, self.notes = state, kind, file, step_folder, notes


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    return read_weights(path, "truncated? export a finished step folder")


def select_weights(checkpoint: str | os.PathLike, choice: str = "auto", config_uses_average: bool = False) -> Weights:
    """The weights to export (module docstring): model.safetensors with ema.safetensors laid over it for
    `ema` (and for `auto` when the step folder holds one)."""
    if choice not in WEIGHTS:
        raise ValueError(f"--weights {choice!r}: choose one of {WEIGHTS}")
    path, notes = Path(checkpoint), []
    if path.is_file():
        folder, file = path.parent, path
    elif path.is_dir():
        found = find_checkpoint(path)
        folder, file = found.folder, found.folder / "model.safetensors"
        notes += [f"warning: {p} is newer than {folder.name} but unusable ({why}); exporting {folder.name}"
                  for p, why in found.skipped]
    else:
        raise FileNotFoundError(f"checkpoint {path} does not exist; pass a run folder, a checkpoints/step-* folder "
                                "or its model.safetensors")
    state = _read_safetensors(file)
    average = folder / "ema.safetensors"
    kind = "ema" if choice == "ema" or (choice == "auto" and average.is_file()) else "model"
    if kind == "ema":
        if not average.is_file():
            raise FileNotFoundError(f"--weights ema: {average} does not exist (the run kept no EMA / SWA average); "
                                    "export --weights model")
        shadows = {k: v for k, v in _read_safetensors(average).items() if k not in AVERAGE_COUNTERS}
        unknown = sorted(set(shadows) - set(state))
        if unknown:
            raise ValueError(f"{average} names tensors {unknown[:5]} that {file} lacks; they are not one run's files")
        state = {**state, **shadows}
        if any(k in AVERAGE_COUNTERS for k in _read_safetensors(average)):
            notes.append("warning: SWA weights: BN statistics engine.fit recomputes after training are not in the "
                         "checkpoint, so a BN net's export can differ from the run's final metrics")
    elif config_uses_average and choice == "auto":
        notes.append(f"warning: the config trains with EMA / SWA but {folder} holds no ema.safetensors: exporting "
                     "the raw weights; the run's metrics and thresholds came from the average")
    return Weights(state, kind, file, folder if (folder / "trainer_state.json").is_file() else None, notes)


def _find(path: str, key: str) -> Path:
    found = next((p for p in config_path_candidates(path) if p.exists()), None)
    if found is None:
        raise FileNotFoundError(f"{key}={path!r} does not exist")
    return found


def build_loaded_net(cfg: Any, weights: Weights) -> tuple[MultilabelNet, list[str]]:
    """(net of a multilabel config with the weights loaded, in eval mode, ML-GCN attention frozen; classes)."""
    if cfg.task != "multilabel":
        raise ValueError(f"task is {cfg.task!r}; export_onnx exports multilabel models")
    if not cfg.data.train_path:
        raise ValueError("data.train_path is not set; its classes give the output order")
    classes = read_multilabel_json(_find(cfg.data.train_path, "data.train_path"),
                                   drop_unknown=cfg.data.drop_unknown_labels).classes
    net = build_net(cfg, len(classes), None)
    try:
        missing, unexpected = net.load_state_dict(weights.state, strict=False)
    except RuntimeError as err:  # a size mismatch: another width / class count
        first = next((line.strip() for line in str(err).splitlines() if "size mismatch" in line), str(err)[:200])
        raise ValueError(f"{weights.file} does not fit the config's model ({first}); export with the config (and "
                         "overrides) the run was trained with") from None
    if missing or unexpected:
        raise ValueError(f"{weights.file} does not fit the config's model: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}; export with the config (and overrides) the run was trained with")
    net.eval()
    if isinstance(net.head, MLGCNHead):
        net.head.freeze_attention()
    return net, classes


SHAPING_KEYS = ("data.preset", "data.image_size")
"""Keys besides model.* that change what the exported graph computes from the same weights."""


def run_differences(cfg: Any, step_folder: Path | None, explicit_size: bool) -> list[str]:
    """'key: X here, Y in the run' for every model.* key, data.preset and data.image_size (unless --image-size
    was given) of cfg that differs from the run that wrote step_folder (its trainer_state.json's
    info.run_config); [] when the folder records none. Weights of the same shapes load under another
    data.image_size or preset, and the export's decisions then differ from the run's without a word."""
    from mhe_scale.engine.run_identity import describe, differences, run_config

    try:
        state = json.loads((step_folder / "trainer_state.json").read_text(encoding="utf-8")) if step_folder else {}
        recorded = state["info"]["run_config"]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    keys = [k for k in SHAPING_KEYS if not (explicit_size and k == "data.image_size")]
    return [f"{key}: {describe(new)} here, {describe(old)} in the run"
            for key, old, new in differences(recorded, run_config(cfg)) if key.startswith("model.") or key in keys]


def check_same_run(cfg: Any, weights: Weights, explicit_size: bool) -> None:
    """ValueError (one line) when CONFIG + overrides differ from the run in a key that shapes the outputs."""
    from mhe_scale.engine.run_folder import find_config

    found = run_differences(cfg, weights.step_folder, explicit_size)
    if not found:
        return
    try:
        own = f"the run's own config ({find_config(weights.step_folder)})"
    except ValueError:
        own = "the run's own config"
    raise ValueError(f"CONFIG and overrides differ from the run that wrote {weights.step_folder} "
                     f"(trainer_state.json): {'; '.join(found[:3])}; pass {own} as CONFIG, or these values as "
                     "overrides (--image-size S exports another input size on purpose)")


def load_net(config: str | os.PathLike, checkpoint: str | os.PathLike, overrides: list[str] | None = None,
             weights: str = "auto") -> MultilabelNet:
    """The net of a multilabel config with a checkpoint's weights (select_weights), ready to export."""
    from mhe_scale.engine.ema import uses_weight_average

    cfg = load_config(config, overrides or [])
    return build_loaded_net(cfg, select_weights(checkpoint, weights, uses_weight_average(cfg.train)))[0]


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


def preprocessing(preset: str, size: int) -> dict[str, Any]:
    """The eval transform of data/image_dataset.transform_preset as data: what a deployment must do."""
    if preset not in PRESET_DEFAULTS:
        raise ValueError(f"data.preset={preset!r}: choose one of {sorted(PRESET_DEFAULTS)}")
    _, mean, std = PRESET_DEFAULTS[preset]
    body: dict[str, Any] = {"channel_order": "RGB", "layout": "NCHW", "pixel_scale": "uint8 / 255", "mean": list(mean),
                            "std": list(std), "normalise": "(x / 255 - mean[c]) / std[c] per channel c"}
    if preset == "cifar":
        return {**body, "resize": f"none: the image must already be {size}x{size}", "resize_exact": None}
    shorter = round(size * 256 / 224)
    # image_transforms.ResizeCenterCrop's arithmetic: a deployment that rounds the longer side or floors the
    # offsets is one pixel off on many images (COCO-MINI at 64 px: CF1@tuned 6.35 instead of the run's 7.20)
    return {**body, "resize": (f"resize the shorter side to {shorter} and the longer to floor({shorter} x longer / "
                               f"shorter) (PIL bilinear), then crop {size}x{size} at offsets round-half-to-even("
                               f"(resized - {size}) / 2) per axis"),
            "resize_exact": {"shorter_side": shorter, "longer_side": "floor", "interpolation": "PIL bilinear",
                             "crop": size, "crop_offset": "round_half_even"}}


def run_folder_of(step_folder: Path | None) -> Path | None:
    """{output_dir}/{run} of a {run}/checkpoints/step-* folder."""
    if step_folder is None or step_folder.parent.name != "checkpoints":
        return None
    return step_folder.parent.parent


def sidecar(classes: list[str], weights: Weights, out: Path, size: int, preset: str, output: str,
            config: str, overrides: list[str]) -> tuple[dict[str, Any], list[str]]:
    """(the sidecar dict (module docstring), warnings for stdout)."""
    notes: list[str] = []
    run = run_folder_of(weights.step_folder)
    thresholds = None
    same_step = None
    if run is not None and (run / "thresholds.npy").is_file():
        thresholds = [float(t) for t in load_thresholds(run / "thresholds.npy", len(classes))]
        step = weights.step_folder
        try:
            newest = newest_verified(run / "checkpoints").folder
        except ValueError:
            newest = None
        same_step = newest is not None and step is not None and newest.resolve() == step.resolve()
        if not same_step:
            notes.append(f"warning: {run / 'thresholds.npy'} was tuned on the run's final weights "
                         f"({newest.name if newest else 'unknown step'}), not on {step.name if step else '?'}")
    elif run is not None:
        notes.append(f"note: {run} has no thresholds.npy (no data.val_path): the sidecar's thresholds are null")
    body: dict[str, Any] = {
        "format": SIDECAR_FORMAT, "onnx": out.name,
        "input": {"name": "images", "shape": ["batch", 3, size, size], "dtype": "float32",
                  **preprocessing(preset, size)},
        "output": {"name": output, "shape": ["batch", len(classes)], "kind": output},
        "classes": classes,
        "thresholds": thresholds,
        "decision": "class c is predicted when probability[c] >= thresholds[c] (0.5 when thresholds is null)",
        "thresholds_match_weights": same_step,
        "weights": weights.kind, "checkpoint": str(weights.file.resolve()),
        "step_folder": None if weights.step_folder is None else str(weights.step_folder.resolve()),
        "run_folder": None if run is None else str(run.resolve()),
        "config": str(Path(config).resolve()), "overrides": list(overrides)}
    if output == "logits" and thresholds is not None:
        body["logit_thresholds"] = [math.log(t / (1 - t)) if 0 < t < 1 else (math.inf if t >= 1 else -math.inf)
                                    for t in thresholds]
    return body, notes


def write_json_atomic(path: Path, body: dict[str, Any]) -> Path:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(body, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("checkpoint", help="run folder, checkpoints/step-* folder, or its model.safetensors")
    parser.add_argument("--out", required=True)
    parser.add_argument("--weights", choices=WEIGHTS, default="auto",
                        help="auto: the weights the run's metrics came from (EMA / SWA when kept)")
    parser.add_argument("--output", choices=OUTPUTS, default="probabilities")
    parser.add_argument("--image-size", type=int, default=None, help="default: data.image_size, else the preset's")
    parser.add_argument("--opset", type=int, default=17)
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_intermixed_args(argv)
    try:
        from mhe_scale.engine.ema import uses_weight_average

        if args.image_size is not None and args.image_size < 1:
            raise ValueError(f"--image-size {args.image_size}: must be >= 1")
        cfg = load_config(args.config, args.overrides)
        weights = select_weights(args.checkpoint, args.weights, uses_weight_average(cfg.train))
        net, classes = build_loaded_net(cfg, weights)
        check_same_run(cfg, weights, args.image_size is not None)
        size = args.image_size or cfg.data.image_size or PRESET_DEFAULTS[cfg.data.preset][0]
        out = Path(args.out)
        meta, notes = sidecar(classes, weights, out, size, cfg.data.preset, args.output, args.config, args.overrides)
        created = not out.parent.exists()
        path = export_onnx(net, out, size, args.output, args.opset)
        side = write_json_atomic(out.with_name(out.name + ".json"), meta)
    except (ValueError, FileNotFoundError, IsADirectoryError, ImportError) as err:  # ConfigError is a ValueError
        print(f"error: {err}", file=sys.stderr)
        return 2
    for note in weights.notes + notes:
        print(note)
    if created:
        print(f"created folder {path.parent}")
    print(f"weights: {weights.kind} ({weights.file}" + (" + ema.safetensors)" if weights.kind == "ema" else ")"))
    print(f"{path}: images [batch, 3, {size}, {size}] -> {args.output} [batch, {len(classes)}]; sidecar {side}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
