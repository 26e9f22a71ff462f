import torch
from torch import nn

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
