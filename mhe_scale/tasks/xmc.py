"""XMC on real sparse data (Extreme Classification Repository format, or a raw-text corpus turned into
TF-IDF vectors / frozen-encoder embeddings once: data.name text_tfidf | text_embed): an MLP over the
features, an MHE head (and optionally a baseline head, e.g. full BCE `fc`), trained the same way
and scored with P@k, nDCG@k, PSP@k, PSnDCG@k and R@k. A "most frequent labels" row (every test
point gets the k most frequent training labels) is printed beside them as the floor to beat.

    mhe-scale train configs/xmc/bibtex.yaml [head.name=mhp ...]

Output layout as the synthetic task: {output_dir}/config.yaml, results.json, results.md.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mhe_scale.config import ExperimentConfig, HeadConfig
from mhe_scale.data.text_features import TEXT_FEATURE_KINDS, load_text_features
from mhe_scale.data.xc_format import read_xc_format
from mhe_scale.data.xmc_dataset import LABEL_ORDERS, XcDataConfig, XMCDataset, cluster_label_order, idf_weights, relabel
from mhe_scale.data.xmc_text import write_label_map
from mhe_scale.tasks.xmc_evaluate import evaluate
from mhe_scale.engine.loop import fit
from mhe_scale.engine.run_identity import run_config
from mhe_scale.engine.model import Classifier, build_optimizers, build_run_head, count_parameters, optimizer_state_numel
from mhe_scale.eval.xmc_baselines import most_frequent_labels
from mhe_scale.eval.xmc import XMCMetrics, inverse_propensity, label_counts
from mhe_scale.tasks.report import head_label, resume_record, run_folder, train_each_head, write_results
from mhe_scale.models import build_encoder
from mhe_scale.tasks.paths import config_path_candidates
from mhe_scale.models.mlp import MlpConfig
from mhe_scale.tasks.registry import register_task

POPULARITY = "most frequent (train)"


@dataclass(kw_only=True)
class XmcConfig(ExperimentConfig):
    task: str = "xmc"
    data: XcDataConfig = field(default_factory=XcDataConfig)
    model: MlpConfig = field(default_factory=MlpConfig)


@dataclass(frozen=True)
class XMCData:
    """Both splits of an XC dataset, scaled alike, and the training label statistics."""

    train: XMCDataset
    test: XMCDataset
    num_features: int
    num_classes: int
    label_counts: Tensor
    """Training frequency N_l of each label [C]."""
    inv_propensity: Tensor
    """w_l = 1 / p_l [C] float64 for PSP@k (from label_counts and the training size)."""
    label_map: Tensor | None = None
    """new_id [C] when labels were renumbered (data.label_order=cluster): file label y is new_id[y]."""
    multilabel: bool = True
    label_names: list[str] | None = None
    """Name of each file label id (text_* corpora; written to label_map.json), None for XC files."""


def resolve_data_path(path: str | None) -> Path:
    """data.path as given (from the working directory), else relative to the repository root."""
    if not path:
        raise ValueError("data.path is not set; point it at a folder holding train.txt and test.txt, e.g. "
                         "data.path=../shared/data/mulan-bibtex/xc_format")
    candidates = config_path_candidates(path)
    for candidate in candidates:
        if (candidate / "train.txt").is_file() and (candidate / "test.txt").is_file():
            return candidate
    tried = " or ".join(map(str, candidates))
    raise FileNotFoundError(f"data.path={path!r}: no train.txt and test.txt in {tried}; set data.path to "
                            f"the XC-format folder, e.g. ../shared/data/mulan-bibtex/xc_format")


def load_xmc(cfg: XcDataConfig) -> XMCData:
    """Read {path}/train.txt and test.txt; idf (for tfidf), the label order and propensities come
    from the training split only. Metrics do not depend on the label order (both splits are renumbered)."""
    if cfg.label_order not in LABEL_ORDERS:
        raise ValueError(f"data.label_order={cfg.label_order!r} is not known; choose one of {LABEL_ORDERS}")
    if cfg.name in TEXT_FEATURE_KINDS:
        return load_text_xmc_features(cfg)
    folder = resolve_data_path(cfg.path)
    train_xc, test_xc = read_xc_format(folder / "train.txt"), read_xc_format(folder / "test.txt")
    if (train_xc.num_features, train_xc.num_labels) != (test_xc.num_features, test_xc.num_labels):
        raise ValueError(f"{folder}: train.txt has F={train_xc.num_features}, L={train_xc.num_labels} but test.txt has "
                         f"F={test_xc.num_features}, L={test_xc.num_labels}; both headers must agree")
    assert train_xc.features is not None
    idf = idf_weights(train_xc.features) if cfg.normalize == "tfidf" else None
    train = XMCDataset.from_xc(train_xc, cfg.normalize, idf)
    test = XMCDataset.from_xc(test_xc, cfg.normalize, idf)
    new_id = None
    if cfg.label_order == "cluster":
        new_id = cluster_label_order(train, train_xc.num_labels, seed=cfg.seed)
        train, test = train.with_labels(relabel(train.labels, new_id)), test.with_labels(relabel(test.labels, new_id))
    counts = label_counts(train.labels, train_xc.num_labels)
    w = inverse_propensity(counts, len(train), cfg.propensity_a, cfg.propensity_b)
    return XMCData(train, test, train_xc.num_features, train_xc.num_labels, counts, w, new_id)


def load_text_xmc_features(cfg: XcDataConfig) -> XMCData:
    """data.name text_tfidf | text_embed: train and data.eval_split (as XMCData.test) of a text corpus,
    the label order and propensities from the training split only."""
    from mhe_scale.tasks.xmc_text import resolve_text_path

    feats = load_text_features(cfg, resolve_text_path(cfg.path))
    train, test, num_classes = feats.train, feats.eval, len(feats.label_names)
    new_id = None
    if cfg.label_order == "cluster":
        new_id = cluster_label_order(train, num_classes, seed=cfg.seed)
        train, test = train.with_labels(relabel(train.labels, new_id)), test.with_labels(relabel(test.labels, new_id))
    counts = label_counts(train.labels, num_classes)
    w = inverse_propensity(counts, len(train), cfg.propensity_a, cfg.propensity_b)
    return XMCData(train, test, train.num_features, num_classes, counts, w, new_id, label_names=feats.label_names)


def unseen_label_count(data: XMCData) -> tuple[int, int]:
    """(distinct labels of the eval split never seen in train, eval label occurrences on them)."""
    seen = data.label_counts > 0
    labels = data.test.labels[data.test.labels >= 0]
    unseen = labels[~seen[labels]]
    return int(unseen.unique().numel()), int(unseen.numel())


def popularity_metrics(data: XMCData, ks: list[int]) -> dict[str, float]:
    """Metrics of predicting the max(ks) most frequent training labels (ties: lower id first) for
    every test point."""
    top = most_frequent_labels(data.label_counts, max(ks))
    metrics = XMCMetrics(ks=tuple(ks), inv_propensity=data.inv_propensity)
    metrics.update(top.expand(len(data.test), -1), data.test.labels)
    return metrics.compute()


def predict_top(model: Classifier, dataset: XMCDataset, k: int, batch_size: int, accelerator=None,
                ema=None) -> tuple[Tensor, Tensor]:
    """(scores [N, k], ids [N, k]) of model.predict over a whole dataset on one process (EMA weights if
    given); ids are the model's (renumbered) label ids."""
    from mhe_scale.eval.distributed import evaluating, test_batches

    scores, ids = [], []
    with evaluating(model, accelerator, ema):
        for inputs, _ in test_batches(model, dataset, batch_size, accelerator, desc="predict"):
            s, i = model.predict(inputs, k)
            scores.append(s.float().cpu())
            ids.append(i.cpu())
    return torch.cat(scores), torch.cat(ids)


def train_head(cfg: ExperimentConfig, head_cfg: HeadConfig, data: XMCData, accelerator,
               folder: str | None = None, predict_on: dict[str, XMCDataset] | None = None) -> dict[str, Any]:
    """Fresh encoder (same seed for every head) + the head; train, evaluate -> {metrics, costs}.

    Checkpoints and the loss log go to output_dir/folder (default: named after the head).
    predict_on {name: dataset}: also return "predictions" {name: (scores [N, k], ids [N, k])}, k = max(eval.ks),
    of the trained model on each (e.g. dev, to tune a threshold applied to the test predictions)."""
    if cfg.model.sparse_input and not data.train.sparse_inputs:  # the encoder reads {cols, vals} entries
        data = replace(data, train=data.train.as_sparse_inputs(), test=data.test.as_sparse_inputs())
    torch.manual_seed(cfg.train.seed)
    encoder = build_encoder(cfg.model, data.num_features)
    head = build_run_head(head_cfg, cfg.dist.shard_head, encoder.num_features, data.num_classes, data.multilabel,
                          seed=cfg.train.seed)
    model = Classifier(encoder, head)
    optimizer, head_optimizer = build_optimizers(cfg.optim, model)
    accelerator.print(f"[{head_label(head_cfg)}] {head!r}")
    folder = folder or run_folder(head_cfg)
    run_dir = Path(cfg.train.output_dir) / folder  # per head: checkpoints, loss log, tracker tags
    file_ids = None if data.label_map is None else torch.argsort(data.label_map)  # new id -> the file's id

    def evaluate_now(ema=None, save: bool = False) -> dict[str, float]:  # every process: metrics of the whole set
        return evaluate(model, data.test, list(cfg.eval.ks), cfg.train.eval_batch_size, data.inv_propensity,
                        desc=f"eval {head_cfg.name}", ema=ema, accelerator=accelerator,
                        predictions_to=run_dir / "predictions.txt" if save else None,
                        prediction_k=cfg.eval.prediction_k, written_ids=file_ids)

    result = fit(model, optimizer, data.train, cfg.train, accelerator, desc=f"train {head_cfg.name}", out_dir=run_dir,
                 head_optimizer=head_optimizer, eval_fn=evaluate_now, run_name=folder,
                 run_config=run_config(cfg, head_cfg))
    start = time.perf_counter()
    metrics = evaluate_now(result.ema, save=cfg.eval.prediction_k > 0)
    costs = {"train s": result.seconds, "eval s": time.perf_counter() - start,
             "samples/s": result.samples_per_second,
             "head params (K)": count_parameters(head) / 1e3,
             "encoder params (K)": count_parameters(encoder) / 1e3,
             "head optim state (K)": optimizer_state_numel(head_optimizer or optimizer, list(head.parameters())) / 1e3,
             "final loss": result.last_loss}
    out = {"metrics": metrics, "costs": costs, **resume_record(result)}
    if predict_on:
        out["predictions"] = {name: predict_top(model, ds.as_sparse_inputs() if data.train.sparse_inputs else ds,
                                                max(cfg.eval.ks), cfg.train.eval_batch_size, accelerator, result.ema)
                              for name, ds in predict_on.items()}
    return out


@register_task("xmc", XmcConfig, "extreme multi-label classification on XC-format sparse files (MLP + head), "
               "P@k / nDCG@k / PSP@k", data_names=("xc", *TEXT_FEATURE_KINDS))
def run_xmc(cfg: ExperimentConfig, accelerator) -> dict[str, dict[str, Any]]:
    """Train cfg.head (and cfg.eval.baseline if set) on the XC dataset at cfg.data.path; print and save tables."""
    start = time.perf_counter()
    data = load_xmc(cfg.data)
    per_point = float((data.test.labels >= 0).sum()) / max(1, len(data.test))
    scaling = cfg.data.normalize if cfg.data.name == "xc" else cfg.data.name
    split = "test" if cfg.data.name == "xc" else cfg.data.eval_split
    accelerator.print(f"{cfg.data.name} data {cfg.data.path}: {len(data.train):,} train / {len(data.test):,} {split} "
                      f"points, F={data.num_features:,} features ({scaling}), C={data.num_classes:,} labels "
                      f"({cfg.data.label_order} order), "
                      f"{per_point:.2f} labels per {split} point ({time.perf_counter() - start:.1f}s)")
    if data.label_names is not None:
        unseen, hits = unseen_label_count(data)
        accelerator.print(f"  {unseen:,} {split} labels ({hits:,} occurrences) never occur in train: misses in every "
                          "metric")
        if accelerator.is_main_process:
            Path(cfg.train.output_dir).mkdir(parents=True, exist_ok=True)
            write_label_map(Path(cfg.train.output_dir) / "label_map.json", data.label_names)
    results = train_each_head(cfg, lambda head_cfg, folder: train_head(cfg, head_cfg, data, accelerator, folder))
    results[POPULARITY] = {"metrics": popularity_metrics(data, list(cfg.eval.ks)), "costs": {}}
    write_results(cfg, results, accelerator)
    return results
