import torch
from torch import nn

from mhe_scale.config import TrainConfig
from mhe_scale.engine.ema import StochasticWeightAverage


def test_swa_is_the_mean_of_the_sampled_weights_and_round_trips():
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    swa = StochasticWeightAverage(model, start=3, every=2)
    snapshots = []
    for step in range(1, 10):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        swa.update()
        if step >= 3 and (step - 3) % 2 == 0:  # steps 3, 5, 7, 9
            snapshots.append(model.weight.detach().clone())
    assert swa.samples == 4
    expected = torch.stack(snapshots).mean(0)
    with swa.applied():
        assert torch.allclose(model.weight, expected, atol=1e-12)
    assert not torch.allclose(model.weight, expected)  # live weights restored afterwards

    other = StochasticWeightAverage(model, start=3, every=2)
    other.load_state_dict(swa.state_dict())
    assert (other.samples, other.steps) == (4, 9)
    assert torch.equal(other.shadows[0], swa.shadows[0])


def test_swa_follows_live_weights_before_it_starts():
    model = nn.Linear(2, 1)
    swa = StochasticWeightAverage(model, start=5)
    with torch.no_grad():
        model.weight.fill_(3.0)
    swa.update()
    assert swa.samples == 0 and torch.equal(swa.shadows[0], model.weight.detach())


def test_build_weight_average_from_config():
    from mhe_scale.config import load_config
    from mhe_scale.engine.ema import ExponentialMovingAverage, build_weight_average

    model = nn.Linear(2, 1)
    assert build_weight_average(model, load_config(None).train) is None
    ema = build_weight_average(model, load_config(None, ["train.ema_decay=0.9"]).train)
    assert type(ema) is ExponentialMovingAverage
    swa = build_weight_average(model, load_config(None, ["train.swa_start=10", "train.swa_every=5"]).train)
    assert isinstance(swa, StochasticWeightAverage) and (swa.start, swa.every) == (10, 5)
    import pytest

    with pytest.raises(ValueError, match="not both"):
        build_weight_average(model, load_config(None, ["train.ema_decay=0.9", "train.swa_start=1"]).train)
    by_epoch = load_config(None, ["train.swa_start_epoch=2.5", "train.swa_every=3"]).train
    swa = build_weight_average(model, by_epoch, steps_per_epoch=38)
    assert isinstance(swa, StochasticWeightAverage) and (swa.start, swa.every) == (95, 3)
    with pytest.raises(ValueError, match="steps per epoch"):
        build_weight_average(model, by_epoch)
    with pytest.raises(ValueError, match="not both"):
        build_weight_average(model, load_config(None, ["train.swa_start_epoch=1", "train.swa_start=1"]).train, 4)


def test_fit_starts_swa_at_the_epoch_asked(tmp_path):
    from accelerate import Accelerator

    from mhe_scale.config import OptimConfig
    from mhe_scale.engine import build_optimizer, fit
    from test_engine_loop import tiny_data, tiny_model, train_cfg

    shadows = {}
    for name, kw in (("epoch", {"swa_start_epoch": 1.5}), ("step", {"swa_start": 9})):  # 100 // 16 = 6 steps/epoch
        model = tiny_model("mhp")
        result = fit(model, build_optimizer(OptimConfig(lr=5e-3), model), tiny_data(100),
                     train_cfg(epochs=3.0, swa_every=2, **kw), Accelerator(cpu=True), out_dir=tmp_path / name)
        assert (result.ema.start, result.ema.samples) == (9, 5)  # steps 9, 11, 13, 15, 17 of 18
        shadows[name] = torch.cat([s.reshape(-1) for s in result.ema.shadows])
    assert torch.equal(shadows["epoch"], shadows["step"])


class BNEncoder(nn.Module):
    """inputs [B, 6] -> Linear -> BatchNorm1d -> features [B, 8] (the BN sees `pre(x)`)."""

    num_features = 8

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(6, 8)
        self.bn = nn.BatchNorm1d(8)

    def pre(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.pre(x))


def brute_force_stats(pre, batches):
    """Mean over batches of each batch's mean and unbiased variance of pre(batch), by loops."""
    means, variances = [], []
    for x in batches:
        h = pre(x).double()
        means.append(h.sum(0) / len(h))
        variances.append(((h - means[-1]) ** 2).sum(0) / (len(h) - 1))
    return sum(means) / len(means), sum(variances) / len(variances)


def test_ema_averages_float_buffers_and_copies_integer_ones():
    from mhe_scale.engine.ema import ExponentialMovingAverage

    torch.manual_seed(0)
    enc = BNEncoder().train()
    ema = ExponentialMovingAverage(enc, decay=0.75)
    start = enc.bn.running_mean.clone()
    enc.forward_features(torch.randn(16, 6) + 3.0)  # moves the live running stats
    ema.update()
    live = enc.bn.running_mean.clone()
    with ema.applied():
        torch.testing.assert_close(enc.bn.running_mean, 0.75 * start + 0.25 * live)
        assert int(enc.bn.num_batches_tracked) == 1  # copied, not averaged
    assert torch.equal(enc.bn.running_mean, live)  # live buffers restored
    state = ema.state_dict()
    assert "bn.running_var" in state and "bn.num_batches_tracked" in state
    other = ExponentialMovingAverage(BNEncoder(), decay=0.75)
    other.load_state_dict(state)
    assert torch.equal(other.buffer_shadows[0], ema.buffer_shadows[0])


def test_update_bn_recomputes_statistics_from_the_batches():
    from mhe_scale.engine.ema import update_bn

    torch.manual_seed(0)
    enc = BNEncoder().eval()
    batches = [torch.randn(10, 6) * 2 + 1 for _ in range(5)]
    enc.forward_features(batches[0])  # eval mode: stats untouched so far
    assert update_bn(enc, batches, enc.forward_features, max_batches=4) == 4
    mean, var = brute_force_stats(enc.pre, batches[:4])
    torch.testing.assert_close(enc.bn.running_mean.double(), mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(enc.bn.running_var.double(), var, rtol=1e-5, atol=1e-6)
    assert not enc.training and enc.bn.momentum == 0.1  # mode and momentum restored
    assert update_bn(nn.Linear(2, 2), [torch.zeros(1, 2)]) == 0  # no BN: nothing to do


def test_fit_swa_on_a_bn_encoder_evaluates_with_recomputed_statistics(tmp_path):
    """After fit with SWA, the averaged model's BN statistics are those of the averaged weights on the
    training data (computed here by brute force), not the live model's or an average of them."""
    from accelerate import Accelerator

    from mhe_scale.config import OptimConfig
    from mhe_scale.engine import build_optimizer, fit
    from mhe_scale.engine.model import Classifier
    from mhe_scale.heads import create_head
    from mhe_scale.data.synthetic import SyntheticSplit

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    data = SyntheticSplit(torch.randn(64, 6, generator=gen) * 3 + 2, torch.randint(0, 12, (64,), generator=gen))
    model = Classifier(BNEncoder(), create_head("fc", in_features=8, num_classes=12))
    cfg = TrainConfig(epochs=8.0, batch_size=64, log_every=1, seed=3, output_dir="unused", resume=False,
                      swa_start=3, swa_every=1)  # one step per epoch: the BN pass reads the whole set at once
    result = fit(model, build_optimizer(OptimConfig(lr=0.2), model), data, cfg, Accelerator(cpu=True),
                 out_dir=tmp_path)
    swa = result.ema
    assert swa.samples == 6
    enc = model.encoder
    live = enc.bn.running_mean.clone()
    with swa.applied():
        mean, var = brute_force_stats(enc.pre, [data.inputs])
        torch.testing.assert_close(enc.bn.running_mean.double(), mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(enc.bn.running_var.double(), var, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(enc.bn.running_mean, live, atol=1e-3)
    assert torch.equal(enc.bn.running_mean, live)  # the live model keeps its own statistics
