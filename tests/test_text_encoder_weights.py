"""An HF encoder folder is read from safetensors only: pytorch_model.bin (a pickle) is refused with one line."""

from pathlib import Path

import pytest
import torch

from mhe_scale.models.text import HFTextEncoder

transformers = pytest.importorskip("transformers")


def tiny_bert(folder: Path) -> dict[str, torch.Tensor]:
    """A 2-layer BERT saved as model.safetensors under folder; returns its state_dict."""
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=16, max_position_embeddings=16)
    model = transformers.BertModel(cfg, add_pooling_layer=False)
    model.save_pretrained(str(folder))
    assert (folder / "model.safetensors").is_file()
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_safetensors_weights_are_used_and_a_pickle_beside_them_is_not_read(tmp_path, monkeypatch):
    state = tiny_bert(tmp_path)
    torch.save({k: torch.zeros_like(v) for k, v in state.items()}, tmp_path / "pytorch_model.bin")

    def refuse(*args, **kwargs):
        raise AssertionError("the encoder's weights were unpickled")

    monkeypatch.setattr(torch, "load", refuse)
    encoder = HFTextEncoder(tmp_path, last_k_cls=2, dropout=0.0)
    loaded = encoder.model.state_dict()
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key


def test_only_pytorch_model_bin_is_refused_naming_the_file_and_the_conversion(tmp_path):
    state = tiny_bert(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError) as info:
        HFTextEncoder(tmp_path, dropout=0.0)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{tmp_path / 'pytorch_model.bin'}: the encoder's weights are a pickle and no "
                              "model.safetensors is there; mhe_scale loads weights from safetensors only")
    assert f"AutoModel.from_pretrained('{tmp_path}').save_pretrained('{tmp_path}')" in message
    (tmp_path / "pytorch_model.bin").unlink()
    with pytest.raises(FileNotFoundError, match=r"no model\.safetensors"):
        HFTextEncoder(tmp_path, dropout=0.0)
