import math
import re
from pathlib import Path

import pytest
import torch

from mhe_scale.config import ConfigError, HeadConfig, load_config, to_object, to_yaml
from mhe_scale.heads import head_arguments, list_heads
from mhe_scale.heads.factory import build_head, head_kwargs

REPO = Path(__file__).resolve().parents[1]


def test_overrides_are_typed_and_applied():
    cfg = load_config(None, ["head.sizes=[1415,1456]", "optim.lr=0.1", "head.margin=[1.0,0.5,0.0]"])
    assert list(cfg.head.sizes) == [1415, 1456]
    assert cfg.optim.lr == 0.1
    assert list(cfg.head.margin) == [1.0, 0.5, 0.0]
    assert cfg.train.output_dir == "runs/experiment"  # interpolation resolved


@pytest.mark.parametrize("override,message", [
    ("head.size=[3]", r"task 'synthetic' does not take key\(s\) head\.size \(did you mean head\.sizes\?\)"),
    ("optim.lr=fast", r"'optim\.lr'.*could not be converted to Float"),
    ("train.batch_size=1.5", r"'train\.batch_size'"),
    ("head.sizes=[a,2]", r"'head\.sizes\[0\]'"),
    ("nosuchsection.x=1", r"nosuchsection"),
    ("lr", r"must look like key=value"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_yaml_file_errors_name_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("head:\n  name: mhp\n  sizez: [3, 4]\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*head\.sizez"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_base_include_and_readonly(tmp_path):
    (tmp_path / "base.yaml").write_text("name: base\noptim:\n  lr: 0.5\n")
    (tmp_path / "exp.yaml").write_text("_base_: base.yaml\nname: exp\nhead:\n  name: fc\n")
    cfg = load_config(tmp_path / "exp.yaml", ["optim.weight_decay=0.01"])
    assert (cfg.name, cfg.optim.lr, cfg.head.name, cfg.optim.weight_decay) == ("exp", 0.5, "fc", 0.01)
    assert "lr: 0.5" in to_yaml(cfg)
    with pytest.raises(Exception):
        cfg.optim.lr = 1.0  # configs are not runtime state
    assert to_object(cfg).optim.lr == 0.5


def test_every_head_argument_has_a_config_key():
    """Each constructor argument of every registered head is reachable from HeadConfig."""
    keys = set(HeadConfig.__dataclass_fields__)
    for name in list_heads():
        missing = set(head_arguments(name)) - keys - {"in_features", "num_classes", "multilabel"}
        assert not missing, f"head {name} takes {missing} which HeadConfig cannot set"


def test_head_factory_is_strict():
    cfg = load_config(None, ["head.name=mhp", "head.sample_rate=0.1"]).head
    with pytest.raises(ConfigError, match=r"head\.sample_rate is set but head 'mhp' does not take it"):
        head_kwargs(cfg)
    cfg = load_config(None, ["head.name=nope"]).head
    with pytest.raises(ConfigError, match="not a registered head"):
        head_kwargs(cfg)
    cfg = load_config(None, ["head.name=mhp", "head.sizes=[5,4]"]).head
    head = build_head(cfg, 8, 20, multilabel=False)
    assert head.sizes == [5, 4]


LABELS_FROM_DATA = {"xmc_amazon3m": 2_812_281, "xmc_amazon670k": 670_091, "xmc_amazoncat13k": 13_330,
                    "xmc_bibtex": 159, "xmc_delicious": 983, "xmc_eurlex4k": 3_956, "xmc_medical": 45,
                    "xmc_reuters_minilm": 90, "xmc_wiki10_31k": 30_938, "xmc_wiki500k": 501_070,
                    "xmc_eurlex57k_bert": 4_271, "xmc_eurlex57k_minilm": 4_271, "xmc_eurlex57k_tfidf": 4_271,
                    "cifar10": 10, "cifar100": 100, "imagenet": 1000}
"""Label counts of the XMC configs, whose tasks read C from the data (the datasets' published sizes)."""


def config_num_classes(cfg) -> tuple[int, bool]:
    """(C the run's head is built for, multilabel), as the config's task would find them."""
    if cfg.task in ("xmc", "xmc_text"):
        assert cfg.name in LABELS_FROM_DATA, f"{cfg.name}: add its dataset's label count to LABELS_FROM_DATA"
        return LABELS_FROM_DATA[cfg.name], True
    if cfg.task == "classify":
        return cfg.data.num_classes or LABELS_FROM_DATA[cfg.data.name], False
    return cfg.data.num_classes, cfg.data.name == "synthetic" and cfg.data.labels_per_point > 1


def check_accelerator_plan(cfg) -> None:
    """What build_accelerator and fit check before training, without a process group: precision,
    tracker, DeepSpeed config (8 processes), train.*, the weight average and the engine's refusals."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from mhe_scale.engine.accelerator import (TRACKERS, deepspeed_requested, resolve_deepspeed_config,
                                              resolve_mixed_precision)
    from mhe_scale.engine.ema import build_weight_average
    from mhe_scale.engine.loop import _refuse_unsupported, check_train_config

    precision = resolve_mixed_precision(cfg.dist, cuda=True)
    assert cfg.dist.log_with in (None, *TRACKERS)
    accelerator = SimpleNamespace(distributed_type=DistributedType.NO, mixed_precision=precision)
    if deepspeed_requested(cfg.dist):
        ds = resolve_deepspeed_config(cfg.dist, cfg.train, precision, world_size=8)
        accelerator = SimpleNamespace(distributed_type=DistributedType.DEEPSPEED, mixed_precision=precision,
                                      state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(deepspeed_config=ds)))
    check_train_config(cfg.train)
    build_weight_average(torch.nn.Linear(1, 1), cfg.train, steps_per_epoch=100)
    _refuse_unsupported(cfg.train, accelerator, cfg.dist.shard_head)


@pytest.mark.parametrize("path", sorted((REPO / "configs").rglob("*.yaml")), ids=lambda p: str(p.relative_to(REPO)))
def test_shipped_config_builds_its_head_and_accelerator_plan(path, monkeypatch):
    """Every shipped config: its head builds (on the meta device, class-sharded ones as one process)
    for the config's number of classes, and its dist/train settings pass the engine's checks."""
    from mhe_scale.parallel.factory import build_sharded_head

    for var in ("ACCELERATE_MIXED_PRECISION", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_CONFIG_FILE"):
        monkeypatch.delenv(var, raising=False)
    cfg = load_config(path)
    if cfg.task == "multilabel":  # its head is model.head: tests/test_multilabel_task.py builds each config's net
        check_accelerator_plan(cfg)
        return
    num_classes, multilabel = config_num_classes(cfg)
    heads = [cfg.head] + ([cfg.eval.baseline] if cfg.eval.baseline is not None else [])
    if "base" in path.relative_to(REPO).parts:  # fragments included by _base_: they name no head
        heads = []
    for head_cfg in heads:
        with torch.device("meta"):
            if cfg.dist.shard_head:
                head = build_sharded_head(head_cfg, 16, num_classes, multilabel, group=None)
            else:
                head = build_head(head_cfg, 16, num_classes, multilabel)
        assert sum(p.numel() for p in head.parameters()) > 0
        if head_cfg.sizes is not None:  # the given factorisation covers every class
            assert math.prod(head_cfg.sizes) >= num_classes, (head_cfg.name, list(head_cfg.sizes), num_classes)
    check_accelerator_plan(cfg)


def test_config_checks_can_fail(monkeypatch):
    """The checks above reject what they should (so passing them means something)."""
    from mhe_scale.parallel.factory import build_sharded_head

    demo = REPO / "configs/demo/mhp_synthetic.yaml"
    with pytest.raises(ValueError):
        check_accelerator_plan(load_config(demo, ["train.ema_decay=0.9", "train.swa_start=3"]))
    with pytest.raises(NotImplementedError):
        check_accelerator_plan(load_config(demo, ["dist.shard_head=true", "head.name=fc", "train.ema_decay=0.9"]))
    with pytest.raises(ValueError, match="mixed_precision"):
        check_accelerator_plan(load_config(demo, ["dist.mixed_precision=fp8"]))
    face = load_config(REPO / "configs/face/webface42m_r50_mhs.yaml", ["head.sizes=[16384,125]"])
    with pytest.raises(ValueError):
        with torch.device("meta"):
            build_sharded_head(face.head, 16, face.data.num_classes, False, group=None)


def test_every_unknown_key_is_named_in_one_error_with_the_task():
    with pytest.raises(ConfigError) as info:
        load_config(overrides=["data.name=xc", "data.image_size=3", "model.width_mult=2", "head.bogus=1"])
    text = str(info.value)
    assert "task 'xmc'" in text
    for key in ("data.image_size", "model.width_mult", "head.bogus"):
        assert key in text


def test_task_sections_are_typed_per_task():
    face = load_config(overrides=["task=face", "data.name=face_synthetic"])
    assert face.task == "face" and face.data.image_size == 112
    with pytest.raises(ConfigError, match="data.num_test"):  # a synthetic-data key is not a face key
        load_config(overrides=["task=face", "data.num_test=3"])
    assert load_config(overrides=["data.name=xc"]).task == "xmc"  # inferred from data.name
    with pytest.raises(ConfigError, match="task='nosuch' is not registered"):
        load_config(overrides=["task=nosuch"])


def test_one_override_replaces_the_whole_head_section(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("head:\n  name: mhp\n  sizes: [10, 10]\n  loss: bce\n")
    merged = load_config(path, ["head.name=fc"])
    assert merged.head.sizes == [10, 10]  # a dotted override merges into the section
    replaced = load_config(path, ["head={name:fc,cosine:true}"])
    assert replaced.head.name == "fc" and replaced.head.cosine is True
    assert replaced.head.sizes is None and replaced.head.loss is None


@pytest.mark.parametrize("epochs", ["0", "-1", "nan"])
def test_non_positive_epochs_name_the_key(epochs):
    from mhe_scale.engine.loop import check_train_config

    cfg = load_config(None, [f"train.epochs={epochs}"]).train
    with pytest.raises(ValueError, match=r"train\.epochs=.* must be > 0"):
        check_train_config(cfg)
    check_train_config(load_config(None, ["train.epochs=0.5"]).train)  # a fraction of an epoch is fine


def test_empty_head_sizes_name_the_key():
    for name in ("mhp", "mhc", "mhs"):
        cfg = load_config(None, [f"head.name={name}", "head.sizes=[]"]).head
        with pytest.raises(ConfigError, match=r"head\.sizes=\[\] is empty"):
            build_head(cfg, 8, 20, multilabel=False)


def test_mhp_on_multilabel_data_warns_and_points_to_mhc():
    cfg = load_config(None, ["head.name=mhp"]).head
    with pytest.warns(UserWarning, match=r"head\.name=mhp on a multi-label task.*most-frequent.*mhc"):
        build_head(cfg, 8, 20, multilabel=True)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # single-label mhp and multi-label mhc stay quiet
        build_head(cfg, 8, 20, multilabel=False)
        build_head(load_config(None, ["head.name=mhc"]).head, 8, 20, multilabel=True)


def test_heads_command_says_mhp_is_not_for_multilabel_data(capsys):
    from mhe_scale.cli import main

    assert main(["heads"]) == 0
    out = capsys.readouterr().out
    assert "multi-label data (XMC) -> mhc or fc" in out and "most-frequent-labels baseline" in out
    assert set(list_heads()) <= {line.split()[0] for line in out.splitlines() if line.strip()}


def test_tasks_schema_lists_every_section_of_a_task():
    """`mhe-scale tasks NAME` expands a task's own extra sections (multilabel's loss / recipe) key by key."""
    from mhe_scale.tasks.registry import describe_schema, get_task

    lines = describe_schema(get_task("multilabel").schema)
    assert any(line.startswith("loss.name: str") for line in lines)
    assert any(line.startswith("recipe.early_stop_patience") for line in lines)
    assert any(line.startswith("eval.baseline") for line in lines)  # an optional head stays one value
    assert not any(line.startswith(("loss:", "recipe:")) for line in lines)
    replaced = load_config(REPO / "configs/multilabel/coco_r50_mldecoder_aam.yaml", ["loss={name:bce}"])
    assert replaced.loss.name == "bce" and replaced.loss.s is None  # a task's own section replaces whole too


# ---------------------------------------------------------------- sections given a list or a value; lower bounds
@pytest.mark.parametrize("text,key,got", [("head: [1, 2]\n", "head", "a list [1, 2]"),
                                          ("train: 5\n", "train", "a value 5")])
def test_a_section_given_a_list_or_a_value_names_the_key(tmp_path, text, key, got):
    (tmp_path / "alone.yaml").write_text(text)
    with pytest.raises(ConfigError, match=rf"alone\.yaml: '{key}' is a section of keys .*; got {re.escape(got)}"):
        load_config(tmp_path / "alone.yaml")
    (tmp_path / "base.yaml").write_text("head:\n  name: fc\ntrain:\n  epochs: 1\n")
    (tmp_path / "delta.yaml").write_text("_base_: base.yaml\n" + text)
    kind, value = got.rsplit(" ", 1) if key == "train" else ("a list", "[1, 2]")
    with pytest.raises(ConfigError, match=rf"delta\.yaml .*'{key}' is a mapping .* given {kind} \({re.escape(value)}\)"):
        load_config(tmp_path / "delta.yaml")


@pytest.mark.parametrize("override,key", [("head=[1,2]", "head"), ("train=5", "train")])
def test_a_section_overridden_by_a_list_or_a_value_names_the_key(override, key):
    with pytest.raises(ConfigError, match=rf"'{key}' is a (mapping|section)"):
        load_config(REPO / "configs/demo/mhp_synthetic.yaml", [override])
    with pytest.raises(ConfigError, match=rf"'{key}' is a section"):
        load_config(None, [override])


@pytest.mark.parametrize("override,message", [("data.num_train=-5", "data.num_train=-5 must be >= 1"),
                                              ("data.num_test=0", "data.num_test=0 must be >= 1"),
                                              ("data.num_classes=1", "data.num_classes=1 must be >= 2")])
def test_counts_below_their_bound_are_refused_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=rf"overrides: {re.escape(message)}"):
        load_config(REPO / "configs/demo/mhp_synthetic.yaml", [override])
    assert load_config(REPO / "configs/demo/mhp_synthetic.yaml", ["data.num_train=1"]).data.num_train == 1
