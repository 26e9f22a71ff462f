"""tools/export_onnx.py: the ONNX graph run by onnxruntime matches PyTorch to 1e-4 on real COCO-MINI
photos, for probabilities and logits, any batch size, every head kind (cosine scale folded in,
ML-GCN attention a constant). Skipped where onnx / onnxruntime do not import."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from conftest import load_tool
from mhe_scale.data.image_dataset import transform_preset
from mhe_scale.data.multilabel_json import MultilabelImageDataset, read_multilabel_json

pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def coco_val(coco_mini, tmp_path_factory):
    out = tmp_path_factory.mktemp("coco-val") / "val.json"
    assert load_tool("import_coco").main([str(coco_mini / "annotations" / "instances_val2017.json"), "--images",
                                          str(coco_mini / "val2017"), "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("head,loss,output", [("pooled", "asl", "probabilities"), ("ml_decoder", "aam", "logits"),
                                              ("ml_gcn", "aam", "probabilities")])
def test_onnx_matches_pytorch_on_real_images(coco_val, tmp_path, head, loss, output):
    tool = load_tool("export_onnx")
    overrides = [f"data.train_path={coco_val}", f"data.test_path={coco_val}", "model.name=resnet18", "model.width=4",
                 f"model.head={head}", f"model.cosine={loss == 'aam'}", f"loss.name={loss}", "model.decoder_dim=16",
                 "model.decoder_heads=2", "model.decoder_ff=32", "model.gcn_hidden=16", "model.gcn_embed_dim=8"]
    config = "configs/multilabel/coco_r50_pooled_bce.yaml"
    from mhe_scale.config import load_config
    from mhe_scale.tasks.multilabel import build_net

    cfg = load_config(config, overrides)
    ann = read_multilabel_json(coco_val)
    torch.manual_seed(0)
    net = build_net(cfg, 80, ann.targets)
    for m in net.modules():  # non-trivial BN statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2), m.running_var.uniform_(0.5, 2.0)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "model.safetensors"))
    out = tmp_path / "model.onnx"
    assert tool.main([config, str(tmp_path / "model.safetensors"), "--out", str(out), "--output", output,
                      "--image-size", "64", *overrides]) == 0
    net.eval()
    data = MultilabelImageDataset(ann, transform_preset("imagenet", False, size=64))
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for batch in ([0, 1, 2], [5, 6, 7, 8, 9]):  # dynamic batch
        images = torch.stack([data[i][0] for i in batch])
        with torch.no_grad():
            want = net.logits(images)
            want = torch.sigmoid(want) if output == "probabilities" else want
        (got,) = session.run(None, {"images": images.numpy()})
        assert got.shape == (len(batch), 80)
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-4)
    import onnx

    stored = {t.name for t in onnx.load(str(out)).graph.initializer}
    assert not any("adjacency" in n or "gc1" in n or "label_embeddings" in n for n in stored)  # ML-GCN: a constant
    if loss == "aam":  # the cosine scale is in the graph: logits reach beyond [-1, 1]
        assert float(net.logit_scale) == 23.0
