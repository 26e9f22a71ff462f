import torch

from mhe_scale.data.synthetic import SyntheticDataConfig as DataConfig
from mhe_scale.data.synthetic import make_synthetic
from mhe_scale.labels import PAD


def test_single_label_power_law_and_determinism():
    cfg = DataConfig(num_classes=1000, num_train=20000, num_test=100, input_dim=16, zipf_exponent=1.1)
    a, b = make_synthetic(cfg), make_synthetic(cfg)
    assert torch.equal(a.train.inputs, b.train.inputs) and torch.equal(a.train.targets, b.train.targets)
    counts = torch.bincount(a.train.targets, minlength=1000).sort(descending=True).values.double()
    assert torch.equal(a.label_counts.sort(descending=True).values.double(), counts)
    # rank-frequency slope on log-log axes over the well-sampled head is close to -exponent
    ranks = torch.arange(1, 51, dtype=torch.float64)
    slope = torch.linalg.lstsq(torch.stack([ranks.log(), torch.ones(50, dtype=torch.float64)], 1),
                               counts[:50].log().unsqueeze(1)).solution[0, 0]
    assert -1.4 < slope < -0.8


def test_multi_label_rows_are_distinct_padded_and_sized():
    cfg = DataConfig(num_classes=5000, num_train=3000, num_test=10, input_dim=8, labels_per_point=10)
    data = make_synthetic(cfg)
    t = data.train.targets
    assert t.dim() == 2 and data.multilabel
    valid = t != PAD
    assert valid[:, 0].all()  # every point has at least one label, pads only at the end
    assert (valid[:, 1:] <= valid[:, :-1]).all()
    for row in t[:300]:
        labels = row[row != PAD].tolist()
        assert len(labels) == len(set(labels))
    mean = valid.sum(1).double().mean().item()
    assert 7.0 < mean <= 10.0  # draws average 10; repeats of frequent labels are dropped
    assert int(data.label_counts.sum()) == int(valid.sum())
